"""Operator deny-listing of one certificate, by serial or fingerprint (every active one of a
device: `device_views.deny_device`).

Every gateway process polls the deny-list and refuses a denied certificate
within about a second (see `certfleet.gateway.denylist_cache`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.fleet.reasons import checked_reason
from certfleet.pki.keys import sha256_hex
from certfleet.store import audit, certificates, denylist
from certfleet.store.engine import Store, opened
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import Certificate

# RFC 5280: at most 20 octets.
_SERIAL = re.compile(r"[0-9a-f]{1,40}")


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


async def deny(
    store: Store | str,
    *,
    reason: str,
    actor: str,
    serial: str | None = None,
    sha256: str | None = None,
) -> list[Denied]:
    """Deny-list one certificate, by serial or SHA-256 (a list, as for a device's).

    ``store`` is an open store or a URL. NotFoundError for a serial the store never saw.
    """
    if (serial is None) == (sha256 is None):
        raise StoreError("name exactly one of: a serial, a SHA-256 fingerprint")
    reason = checked_reason(reason, "the deny-list and the audit log")
    async with opened(store) as ready, ready.transaction() as session:
        if sha256 is not None:
            target = await _by_sha256(session, sha256)
        else:
            target = await _by_serial(session, serial or "")
        return [await deny_in(session, target, reason, actor)]


async def _by_sha256(session: AsyncSession, sha256: str) -> Certificate | str:
    """The stored certificate, or just the fingerprint of one the store never saw."""
    fingerprint = sha256_hex(sha256)
    if fingerprint is None:
        raise StoreError(f"{sha256!r} is not a SHA-256 fingerprint (64 hex digits)")
    try:
        return await certificates.get_certificate(session, fingerprint)
    except NotFoundError:
        return fingerprint


async def _by_serial(session: AsyncSession, serial: str) -> Certificate:
    # Serials are stored as lowercase hex; "0x" and colons are how people copy them.
    wanted = serial.replace(":", "").strip().lower().removeprefix("0x")
    if not _SERIAL.fullmatch(wanted):
        raise StoreError(f"{serial!r} is not a certificate serial (1 to 40 hex digits)")
    rows = await certificates.find_by_serial(session, wanted)
    if not rows:
        raise NotFoundError(
            f"no certificate with serial {serial} is known; deny it by --sha256 instead"
        )
    if len(rows) > 1:
        listed = ", ".join(row.sha256 for row in rows)
        raise StoreError(f"serial {serial} matches {len(rows)} certificates: use --sha256 {listed}")
    return rows[0]


async def deny_in(
    session: AsyncSession, target: Certificate | str, reason: str, actor: str
) -> Denied:
    """Deny-list a stored certificate (or a bare fingerprint) in the caller's transaction,
    with a DENYLIST_ADDED event and an audit entry the first time."""
    if isinstance(target, str):
        sha256, serial, device_uuid = target, None, None
    else:
        sha256, serial, device_uuid = target.sha256, target.serial, target.device_uuid
    entry, new = await denylist.deny_with_event(
        session, sha256, reason=reason, serial=serial, device_uuid=device_uuid
    )
    if new:
        await audit.append_audit(
            session,
            actor=actor,
            action="denylist.add",
            target=device_uuid or sha256,
            details={"sha256": sha256, "serial": serial, "reason": reason},
        )
    return Denied(sha256, serial, device_uuid, entry.reason, new)
