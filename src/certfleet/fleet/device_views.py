"""Devices as the operator sees them: listing with filters and pages, details, delete, deny,
and the timeline of their updates. The admin API and the CLI's local mode both call these,
so both give the same answers.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events import names
from certfleet.fleet import denylist_admin
from certfleet.fleet.denylist_admin import Denied
from certfleet.fleet.reasons import checked_reason
from certfleet.protocol import ROTATION_PREFIXES
from certfleet.store import audit, certificates, device_queries, devices, outbox, updates
from certfleet.store.device_queries import DeviceFilter, DeviceRow, DeviceState
from certfleet.store.engine import Store
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import CertStatus, UpdateEvent, utcnow

MAX_PAGE = 1000
DEFAULT_PAGE = 100
STATUSES = tuple(state.value for state in DeviceState)


class ConflictError(StoreError):
    """The request clashes with the device's state (HTTP 409)."""

    status = 409


def _when(moment: dt.datetime | None) -> str | None:
    return names.rfc3339(moment) if moment else None


@dataclass(frozen=True)
class Page:
    """One page of a listing and the cursor of the next (None on the last page)."""

    items: list[dict[str, Any]]
    next: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"items": [...], "next": cursor or null}."""
        return {"items": self.items, "next": self.next}


def encode_cursor(position: str | int) -> str:
    """An opaque cursor that resumes a listing after ``position`` (a uuid or a row id)."""
    raw = json.dumps({"after": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type[str] | type[int] = str) -> Any:
    """The position a cursor resumes after; StoreError if the cursor was not made here."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = json.loads(raw)["after"]
        if kind is int:
            if type(after) is not int:
                raise TypeError("not a row id")
            return after
        return str(uuidlib.UUID(after))
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(
            "cursor is not one this API gave out; use the 'next' value of the previous page"
        ) from exc


def device_uuid(text: str) -> str:
    """``text`` as a canonical lowercase uuid; StoreError if it is not one."""
    try:
        return str(uuidlib.UUID(text))
    except (ValueError, AttributeError, TypeError) as exc:
        raise StoreError(f"{text!r} is not a device uuid") from exc


def _cert_summary(row: DeviceRow, now: dt.datetime) -> dict[str, Any] | None:
    if row.cert is None:
        return None
    left = row.cert.not_after - now
    return {
        "serial": row.cert.serial,
        "sha256": row.cert.sha256,
        "not_before": _when(row.cert.not_before),
        "not_after": _when(row.cert.not_after),
        # Whole days; negative once expired.
        "days_left": left.days,
        "issuer": row.issuer.name if row.issuer else None,
        "status": row.cert.status,
        "denied": row.denied,
    }


def summary(row: DeviceRow, now: dt.datetime) -> dict[str, Any]:
    """The fields of a device in a listing."""
    device = row.device
    return {
        "uuid": device.uuid,
        "factory": row.factory,
        "group": device.group_name,
        "status": device_queries.state_of(row, now).value,
        "registered_via": device.registered_via,
        "created_at": _when(device.created_at),
        "last_seen_at": _when(device.last_seen_at),
        "deleted_at": _when(device.deleted_at),
        "config_locked": device.config_locked,
        "cert": _cert_summary(row, now),
    }


def device_filter(
    group: str | None, status: str | None, expiring_within: dt.timedelta | None, now: dt.datetime
) -> DeviceFilter:
    """Check the filters of a listing and build the store's filter."""
    if status is not None and status not in STATUSES:
        raise StoreError(f"unknown status {status!r}; statuses: {', '.join(STATUSES)}")
    if expiring_within is not None and expiring_within <= dt.timedelta(0):
        raise StoreError("expiring_within must be a positive duration such as 30d")
    before = now + expiring_within if expiring_within is not None else None
    return DeviceFilter(group, DeviceState(status) if status else None, before)


async def list_devices(
    store: Store,
    *,
    group: str | None = None,
    status: str | None = None,
    expiring_within: dt.timedelta | None = None,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
) -> Page:
    """One page of devices in uuid order; pass the returned `next` to get the following page."""
    _check_limit(limit)
    now = utcnow()
    wanted = device_filter(group, status, expiring_within, now)
    after = decode_cursor(cursor) if cursor else ""
    async with store.transaction() as session:
        # One extra row tells whether another page follows.
        rows = await device_queries.list_device_rows(
            session, wanted, now, after_uuid=after, limit=limit + 1
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(
        [summary(row, now) for row in rows], encode_cursor(rows[-1].device.uuid) if more else None
    )


async def count_by_status(store: Store) -> dict[str, int]:
    """How many devices have each status now (deleted ones included)."""
    async with store.transaction() as session:
        counts = await device_queries.count_by_state(session, utcnow())
    return {state.value: n for state, n in counts.items()}


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise StoreError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")


async def _row(session: AsyncSession, uuid: str) -> DeviceRow:
    row = await device_queries.get_device_row(session, device_uuid(uuid))
    if row is None:
        raise NotFoundError(f"no device {uuid}")
    return row


async def show_device(store: Store, uuid: str) -> dict[str, Any]:
    """A device with its current certificate, lock, last rotation (operator-triggered
    `certs-…` or the agent's `auto-…` renewal) and certificate count."""
    now = utcnow()
    async with store.transaction() as session:
        row = await _row(session, uuid)
        count = await device_queries.count_device_certificates(session, row.device.uuid)
        rotation = await device_queries.latest_update(
            session, row.device.uuid, prefixes=ROTATION_PREFIXES
        )
    return {
        **summary(row, now),
        "next_pubkey_sha256": row.device.next_pubkey_sha256,
        "certificates": count,
        "rotation": _rotation(rotation),
    }


def _rotation(found: tuple[Any, UpdateEvent | None] | None) -> dict[str, Any] | None:
    if found is None:
        return None
    update, last = found
    return {
        "id": update.correlation_id,
        "status": update.status,
        "started_at": _when(update.created_at),
        "updated_at": _when(update.updated_at),
        "last_step": last.event_type if last else None,
    }


async def delete_device(store: Store, uuid: str, *, actor: str, reason: str) -> dict[str, Any]:
    """Soft-delete a device and deny-list its active certificates, in one transaction.

    The device's rows and history stay; it is refused on every later request
    and its uuid cannot be registered again.
    """
    reason = checked_reason(reason, "the deny-list and the audit log")
    async with store.transaction() as session:
        row = await _row(session, uuid)
        if row.device.deleted_at is not None:
            raise ConflictError(
                f"device {row.device.uuid} was already deleted at {_when(row.device.deleted_at)}"
            )
        await _lock_live(session, row.device.uuid)
        denied = await _deny_active(session, row.device.uuid, reason, actor)
        device = await devices.soft_delete_device(session, row.device.uuid)
        data = {"uuid": device.uuid, "reason": reason, "time": _when(device.deleted_at)}
        await outbox.append_event(session, names.DEVICE_DELETED, data, device_uuid=device.uuid)
        details = {"reason": reason, "denied": [entry.sha256 for entry in denied]}
        await audit.append_audit(
            session, actor=actor, action="device.delete", target=device.uuid, details=details
        )
    return {
        "uuid": device.uuid,
        "deleted_at": _when(device.deleted_at),
        "denied": [entry.as_dict() for entry in denied],
    }


async def _lock_live(session: AsyncSession, uuid: str) -> None:
    # On PostgreSQL two deletes of one device could both pass the check above;
    # the row lock makes the second wait, then find the device deleted.
    try:
        await devices.lock_device(session, uuid)
    except NotFoundError as exc:
        raise ConflictError(f"device {uuid} was deleted meanwhile") from exc


async def deny_device(store: Store, uuid: str, *, actor: str, reason: str) -> list[Denied]:
    """Deny-list every active certificate of a device (deleted devices too)."""
    reason = checked_reason(reason, "the deny-list and the audit log")
    async with store.transaction() as session:
        row = await _row(session, uuid)
        denied = await _deny_active(session, row.device.uuid, reason, actor)
        if not denied:
            raise ConflictError(f"device {row.device.uuid} has no active certificate to deny")
        return denied


async def _deny_active(session: AsyncSession, uuid: str, reason: str, actor: str) -> list[Denied]:
    """Deny-list the device's active certificates, as `certfleet devices deny --serial` would
    each one."""
    found = await certificates.list_device_certificates(session, uuid)
    active = [cert for cert in found if cert.status == CertStatus.ACTIVE]
    return [await denylist_admin.deny_in(session, cert, reason, actor) for cert in active]


async def list_updates(
    store: Store, uuid: str, *, limit: int = DEFAULT_PAGE, cursor: str | None = None
) -> Page:
    """One page of a device's updates (rotations are `certs-…` or `auto-…`), newest first, with
    event counts; pass the returned `next` to get the following page."""
    _check_limit(limit)
    before = decode_cursor(cursor, int) if cursor else None
    async with store.transaction() as session:
        row = await _row(session, uuid)
        rows = await device_queries.list_updates_page(
            session, row.device.uuid, before_id=before, limit=limit + 1
        )
        more = len(rows) > limit
        rows = rows[:limit]
        counts = await device_queries.update_event_counts(session, [u.id for u in rows])
    items = [
        {
            "correlation_id": u.correlation_id,
            "kind": u.kind,
            "status": u.status,
            "created_at": _when(u.created_at),
            "updated_at": _when(u.updated_at),
            "events": counts.get(u.id, 0),
        }
        for u in rows
    ]
    return Page(items, encode_cursor(rows[-1].id) if more else None)


async def update_timeline(store: Store, uuid: str, correlation_id: str) -> dict[str, Any]:
    """One update of a device with its events in the order they were received."""
    async with store.transaction() as session:
        row = await _row(session, uuid)
        update = await updates.get_update(session, row.device.uuid, correlation_id)
        events = await updates.list_update_events(session, update.id)
    return {
        "correlation_id": update.correlation_id,
        "kind": update.kind,
        "status": update.status,
        "events": [_event(event) for event in events],
    }


def _event(event: UpdateEvent) -> dict[str, Any]:
    return {
        "id": event.event_id,
        "step": event.event_type,
        "device_time": _when(event.device_time),
        "received_at": _when(event.received_at),
        "success": event.success,
        "target": event.target_name,
        "version": event.version,
        "details": event.details,
    }


def timeline_line(event: dict[str, Any]) -> str:
    """`<time> : <step>(<target>) -> Succeed|Failed!`, as fioctl prints an update's events.

    An event that reports no outcome (success null) has no arrow part.
    """
    when = event["device_time"] or event["received_at"]
    line = f"{when} : {event['step']}({event['target'] or ''})"
    if event["success"] is None:
        return line
    return f"{line} -> {'Succeed' if event['success'] else 'Failed!'}"
