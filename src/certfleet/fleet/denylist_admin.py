"""Operator deny-listing: a certificate by serial or fingerprint, or every active one of a device.

Every gateway process polls the deny-list and refuses a denied certificate
within about a second (see `certfleet.gateway.denylist_cache`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events import names
from certfleet.store import audit, certificates, denylist, devices, outbox
from certfleet.store.engine import Store, open_store
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import Certificate, CertStatus

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Denied:
    """One deny-listed certificate; `new` is False if it was denied before."""

    sha256: str
    serial: str | None
    device_uuid: str | None
    reason: str
    new: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "sha256": self.sha256,
            "serial": self.serial,
            "device": self.device_uuid,
            "reason": self.reason,
            "new": self.new,
        }


@contextlib.asynccontextmanager
async def _store(url: str) -> AsyncIterator[Store]:
    store = await open_store(url, upgrade=True)
    try:
        yield store
    finally:
        await store.close()


async def deny(
    db_url: str,
    *,
    reason: str,
    actor: str,
    serial: str | None = None,
    sha256: str | None = None,
    device: str | None = None,
) -> list[Denied]:
    """Deny-list one certificate (by serial or SHA-256) or all active ones of a device."""
    if sum(x is not None for x in (serial, sha256, device)) != 1:
        raise StoreError("name exactly one of: a serial, a SHA-256 fingerprint, a device uuid")
    if not reason.strip():
        raise StoreError("give a --reason: it is kept with the deny-list entry")
    async with _store(db_url) as store, store.transaction() as session:
        if sha256 is not None:
            targets = [await _by_sha256(session, sha256)]
        elif serial is not None:
            targets = [await _by_serial(session, serial)]
        else:
            targets = await _by_device(session, device or "")
        return [await _deny(session, target, reason, actor) for target in targets]


async def _by_sha256(session: AsyncSession, sha256: str) -> Certificate | str:
    """The stored certificate, or just the fingerprint of one the store never saw."""
    fingerprint = sha256.replace(":", "").strip().lower()
    if not _SHA256.fullmatch(fingerprint):
        raise StoreError(f"{sha256!r} is not a SHA-256 fingerprint (64 hex digits)")
    try:
        return await certificates.get_certificate(session, fingerprint)
    except NotFoundError:
        return fingerprint


async def _by_serial(session: AsyncSession, serial: str) -> Certificate:
    rows = await certificates.find_by_serial(session, serial.replace(":", "").strip())
    if not rows:
        raise StoreError(
            f"no certificate with serial {serial} is known; deny it by --sha256 instead"
        )
    if len(rows) > 1:
        listed = ", ".join(row.sha256 for row in rows)
        raise StoreError(f"serial {serial} matches {len(rows)} certificates: use --sha256 {listed}")
    return rows[0]


async def _by_device(session: AsyncSession, device: str) -> list[Certificate]:
    try:
        device_uuid = str(uuid.UUID(device))
        await devices.get_device(session, device_uuid, include_deleted=True)
    except (ValueError, NotFoundError) as exc:
        raise StoreError(f"no device {device}") from exc
    rows = await certificates.list_device_certificates(session, device_uuid)
    active = [row for row in rows if row.status == CertStatus.ACTIVE]
    if not active:
        raise StoreError(f"device {device_uuid} has no active certificate to deny")
    return active


async def _deny(
    session: AsyncSession, target: Certificate | str, reason: str, actor: str
) -> Denied:
    if isinstance(target, str):
        sha256, serial, device_uuid = target, None, None
    else:
        sha256, serial, device_uuid = target.sha256, target.serial, target.device_uuid
    new = not await denylist.is_denied(session, sha256)
    entry = await denylist.add_denied(
        session, sha256, reason=reason, serial=serial, device_uuid=device_uuid
    )
    if new:
        payload = {
            "sha256": sha256,
            "serial": serial,
            "uuid": device_uuid,
            "reason": reason,
            "time": names.rfc3339(dt.datetime.now(dt.UTC)),
        }
        await outbox.append_event(session, names.DENYLIST_ADDED, payload, device_uuid=device_uuid)
        await audit.append_audit(
            session,
            actor=actor,
            action="denylist.add",
            target=device_uuid or sha256,
            details={"sha256": sha256, "serial": serial, "reason": reason},
        )
    return Denied(sha256, serial, device_uuid, entry.reason, new)
