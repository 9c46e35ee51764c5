"""Every CA and server certificate of the store, for the admin API and `report expiry`."""

from __future__ import annotations

from typing import Any

from certfleet.protocol import rfc3339
from certfleet.store import cas, factories
from certfleet.store.engine import Store

from .ca_info import CaInfo


async def list_all_cas(store: Store) -> list[dict[str, Any]]:
    """The CAs of every factory (factories by name, CAs oldest first), with their factory."""
    async with store.transaction() as session:
        rows = [
            (factory.name, ca)
            for factory in await factories.list_factories(session)
            for ca in await cas.list_cas(session, factory.id)
        ]
    return [_described(name, CaInfo.of(ca)) for name, ca in rows]


def _described(factory: str, info: CaInfo) -> dict[str, Any]:
    # RFC 3339 with Z, like every other time the API answers.
    times = {"not_before": rfc3339(info.not_before), "not_after": rfc3339(info.not_after)}
    return {"factory": factory, **info.as_dict(), **times}
