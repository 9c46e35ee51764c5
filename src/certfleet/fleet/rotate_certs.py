"""Triggering a device's certificate rotation: the `fio-rotate-certs` config file.

A device rotates when a config file named `fio-rotate-certs` appears or
changes whose on-changed handler is `renew-client-cert` (the agent runs its
built-in rotation for any handler with that basename). Its value is lines of
KEY=VALUE: ESTSERVER, ROTATIONID (certs-<unix time>; a device runs each id
once) and, for keys in a PKCS#11 token, PKEYIDS and CERTIDS (two slots each:
the one in use and the one the new key or cert goes to).

The file is written through config_admin, so a device in the middle of a key
change (config locked) gets no new rotation.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.fleet import config_admin
from certfleet.fleet.reasons import checked_reason
from certfleet.store import config_files, devices
from certfleet.store.config_files import ConfigValue
from certfleet.store.engine import Store, opened
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import ConfigScope, Device

ROTATE_FILE = "fio-rotate-certs"
HANDLER = "/usr/share/certfleet-agent/handlers/renew-client-cert"
ROTATION_PREFIX = "certs-"
_SLOT_ID = re.compile(r"[0-9a-f]{2}([0-9a-f]{2})*")


@dataclass(frozen=True)
class RotationOrder:
    """What a device is told: where to renew, the rotation id, and token slots if any."""

    est_server: str
    rotation_id: str
    pkey_ids: str | None = None
    cert_ids: str | None = None

    def value(self) -> str:
        """The file's content, one KEY=VALUE a line."""
        lines = [f"ESTSERVER={self.est_server}", f"ROTATIONID={self.rotation_id}"]
        if self.pkey_ids and self.cert_ids:
            lines += [f"PKEYIDS={self.pkey_ids}", f"CERTIDS={self.cert_ids}"]
        return "\n".join(lines) + "\n"

    def files(self) -> dict[str, ConfigValue]:
        """The config file to set (unencrypted: it holds nothing secret)."""
        return {ROTATE_FILE: ConfigValue(self.value(), [HANDLER], True)}

    def with_rotation_id(self, rotation_id: str) -> RotationOrder:
        """The same order under another rotation id (a retry)."""
        return RotationOrder(self.est_server, rotation_id, self.pkey_ids, self.cert_ids)


@dataclass(frozen=True)
class Triggered:
    """What `rotate_device` did (or, on a dry run, would do)."""

    device: str
    order: RotationOrder
    dryrun: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "device": self.device,
            "rotation_id": self.order.rotation_id,
            "file": ROTATE_FILE,
            "value": self.order.value(),
            "on_changed": [HANDLER],
            "dryrun": self.dryrun,
        }


def rotation_id(now: dt.datetime | None = None) -> str:
    """certs-<unix time>, the reference's rotation id form."""
    moment = now or dt.datetime.now(dt.UTC)
    return f"{ROTATION_PREFIX}{int(moment.timestamp())}"


def next_rotation_id(after: str | None, now: dt.datetime | None = None) -> str:
    """A rotation id for now that is above ``after`` (a device runs each id only once)."""
    seconds = int((now or dt.datetime.now(dt.UTC)).timestamp())
    if after and after.startswith(ROTATION_PREFIX) and after[len(ROTATION_PREFIX) :].isdigit():
        seconds = max(seconds, int(after[len(ROTATION_PREFIX) :]) + 1)
    return f"{ROTATION_PREFIX}{seconds}"


def check_est_server(url: str | None) -> str:
    """The EST address devices renew at; https only, since they send their cert to it."""
    if not url:
        raise StoreError(
            "give --est-server URL: the EST address as devices reach it, "
            "e.g. https://est.acme.example:8443/.well-known/est"
        )
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise StoreError(f"--est-server {url!r} must be an https:// URL with a host name")
    return url.strip().rstrip("/")


def parse_slot_ids(text: str | None, option: str) -> str | None:
    """'01,07' (two distinct hex PKCS#11 ids) normalized to lowercase; None if not given."""
    if text is None:
        return None
    ids = [part.strip().lower().removeprefix("0x") for part in text.split(",")]
    ids = [f"0{part}" if len(part) % 2 else part for part in ids]
    if len(ids) != 2 or not all(_SLOT_ID.fullmatch(part) for part in ids) or ids[0] == ids[1]:
        raise StoreError(
            f"{option} {text!r} must be two different hex PKCS#11 object ids, like 01,07: "
            "the slot in use and the one the new object goes to"
        )
    return ",".join(ids)


def make_order(
    est_server: str | None,
    pkey_ids: str | None = None,
    cert_ids: str | None = None,
    *,
    rotation: str | None = None,
) -> RotationOrder:
    """A checked order; HSM slot ids come as a pair of options or not at all."""
    pkeys = parse_slot_ids(pkey_ids, "--hsm-pkey-ids")
    certs = parse_slot_ids(cert_ids, "--hsm-cert-ids")
    if (pkeys is None) != (certs is None):
        raise StoreError("give --hsm-pkey-ids and --hsm-cert-ids together (or neither)")
    return RotationOrder(check_est_server(est_server), rotation or rotation_id(), pkeys, certs)


async def rotate_device(
    store: Store | str,
    device: str,
    order: RotationOrder,
    *,
    reason: str,
    actor: str,
    dryrun: bool = False,
) -> Triggered:
    """Set `fio-rotate-certs` for one device; with ``dryrun`` only check and report.

    ``store`` is an open store or a URL. NotFoundError for an unknown or deleted
    device, ConfigLockedError (409) for one in the middle of a key change.
    """
    reason = checked_reason(reason, "the config log")
    async with opened(store) as ready, ready.transaction() as session:
        row = await _live_device(session, device)
        check_not_rotating(row)
        order = await _after_previous(session, row, order)
        if not dryrun:
            await trigger(session, row, order, reason=reason, actor=actor)
        return Triggered(row.uuid, order, dryrun)


async def trigger(
    session: AsyncSession, device: Device, order: RotationOrder, *, reason: str, actor: str
) -> RotationOrder:
    """Write the rotation file for a device in the caller's transaction; returns what was set.

    The rotation id is raised above the one the device last got if needed.
    ConfigLockedError if the device is in the middle of a key change.
    """
    order = await _after_previous(session, device, order)
    await config_admin.set_device_files(
        session, device.uuid, order.files(), reason=reason, actor=actor
    )
    return order


async def _after_previous(
    session: AsyncSession, device: Device, order: RotationOrder
) -> RotationOrder:
    # A device runs each rotation id once: two rotations in the same second need two ids.
    files = await config_files.list_config_files(
        session, device.factory_id, ConfigScope.DEVICE, device.uuid
    )
    previous = next((_rotation_in(f.value) for f in files if f.name == ROTATE_FILE), None)
    if previous is None or _seconds(previous) < _seconds(order.rotation_id):
        return order
    return order.with_rotation_id(next_rotation_id(previous))


def _rotation_in(value: str) -> str | None:
    for line in value.splitlines():
        name, _, rest = line.partition("=")
        if name.strip() == "ROTATIONID":
            return rest.strip()
    return None


def _seconds(rotation: str) -> int:
    digits = rotation.removeprefix(ROTATION_PREFIX)
    return int(digits) if digits.isdigit() else -1


def check_not_rotating(device: Device) -> None:
    """Refuse a device that is changing its key: a second rotation would clash with it."""
    if device.config_locked:
        raise config_admin.ConfigLockedError(
            f"device {device.uuid} is in the middle of a key change (next key "
            f"{(device.next_pubkey_sha256 or '?')[:16]}… announced); it gets no new rotation "
            "until it connects with its new key"
        )


async def _live_device(session: AsyncSession, device: str) -> Device:
    try:
        device_uuid = str(uuid.UUID(device))
    except ValueError as exc:
        raise StoreError(f"{device!r} is not a device uuid") from exc
    try:
        return await devices.get_device(session, device_uuid)
    except NotFoundError as exc:
        raise NotFoundError(f"no device {device_uuid} (or it was deleted)") from exc
