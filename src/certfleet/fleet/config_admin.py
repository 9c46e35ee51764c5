"""Operator changes to device config: files at factory, group or device scope, and their log.

Device-scope values are encrypted here, to the device's current public key,
before they are stored; factory and group values are stored in clear and the
gateway encrypts them for each device when it asks.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events import names
from certfleet.fleet.reasons import checked_reason
from certfleet.pki import ecies
from certfleet.pki.keys import pubkey_sha256
from certfleet.protocol import NEXT_KEY_ACTION, NEXT_KEY_WITHDRAWN_ACTION
from certfleet.store import audit, certificates, config_files, devices, factories, outbox
from certfleet.store.config_files import ConfigValue
from certfleet.store.engine import Store, opened
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import ConfigLog, ConfigScope, Device, Factory


class ConfigLockedError(StoreError):
    """A device rotating its key takes no device-scope config changes (HTTP 409)."""

    status = 409


@dataclass(frozen=True)
class ConfigSet:
    """What `set_config` stored."""

    factory: str
    scope: str
    key: str
    files: list[str]
    # The key device-scope values were encrypted to (sha256), if any were.
    encrypted_to: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "factory": self.factory,
            "scope": self.scope,
            "key": self.key,
            "files": self.files,
            "encrypted_to": self.encrypted_to,
        }


@dataclass(frozen=True)
class ConfigChange:
    """One entry of a scope's change log."""

    id: int
    scope: str
    key: str
    changed_by: str
    changed_at: dt.datetime
    reason: str
    files: list[str]

    @classmethod
    def of(cls, row: ConfigLog) -> ConfigChange:
        """From a store row."""
        return cls(
            row.id,
            row.scope,
            row.scope_key,
            row.changed_by,
            row.changed_at,
            row.reason,
            list(row.file_names),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "id": self.id,
            "scope": self.scope,
            "key": self.key,
            "changed_by": self.changed_by,
            "changed_at": names.rfc3339(self.changed_at),
            "reason": self.reason,
            "files": self.files,
        }


async def set_config(
    store: Store | str,
    scope: ConfigScope,
    key: str,
    files: Mapping[str, ConfigValue],
    *,
    reason: str,
    actor: str,
    factory: str | None = None,
) -> ConfigSet:
    """Create or replace config files in one scope (key: group name, device uuid or '').

    ``store`` is an open store (the admin API's) or a URL (a command's).

    A device rotating its key (next key announced, config locked) refuses
    device-scope changes with ConfigLockedError until it connects with the new
    key, because they would be encrypted to the key it is leaving. Factory and
    group files are encrypted for each device when it asks, so they need no lock.
    """
    _check_files(files)
    reason = checked_reason(reason, "the config log")
    async with opened(store) as ready, ready.transaction() as session:
        encrypted_to = None
        if scope == ConfigScope.DEVICE:
            # Locked, so that the device cannot announce a next key between the
            # lock check and the write (its PATCH /device waits for this transaction).
            device = await _device(session, key, lock=True)
            row = await _factory_by_id(session, device.factory_id)
            files, encrypted_to = await _for_device(session, device, files)
        else:
            row = await factories.resolve_factory(session, factory)
            key = key if scope == ConfigScope.GROUP else ""
            if scope == ConfigScope.GROUP and not key.strip():
                raise StoreError("a group name is needed for group-scope config")
        await config_files.put_config_files(
            session, row.id, scope, key, files, changed_by=actor, reason=reason
        )
        payload = {
            "scope": str(scope),
            "key": key,
            "files": sorted(files),
            "reason": reason,
            "time": names.rfc3339(dt.datetime.now(dt.UTC)),
        }
        device_uuid = key if scope == ConfigScope.DEVICE else None
        await outbox.append_event(
            session, names.DEVICE_CONFIG_CHANGED, payload, device_uuid=device_uuid
        )
        await audit.append_audit(
            session,
            actor=actor,
            action="config.set",
            target=f"{scope}:{key}" if key else str(scope),
            details={"files": sorted(files), "reason": reason},
        )
        return ConfigSet(row.name, str(scope), key, sorted(files), encrypted_to)


async def config_log(
    store: Store | str,
    *,
    device: str | None = None,
    group: str | None = None,
    factory: str | None = None,
    limit: int = 50,
) -> list[ConfigChange]:
    """Changes to one scope (the factory's unless a device or group is named), newest first."""
    if device and group:
        raise StoreError("name a device or a group, not both")
    async with opened(store) as ready, ready.transaction() as session:
        if device:
            found = await _device(session, device)
            factory_id, scope, key = found.factory_id, ConfigScope.DEVICE, found.uuid
        else:
            factory_id = (await factories.resolve_factory(session, factory)).id
            scope = ConfigScope.GROUP if group else ConfigScope.FACTORY
            key = group or ""
        rows = await config_files.config_history(session, factory_id, scope, key, limit)
        return [ConfigChange.of(row) for row in rows]


async def move_to_group(
    store: Store | str, device: str, group: str | None, *, reason: str, actor: str
) -> ConfigChange | None:
    """Put a device in `group` (None or '': in none); None if it was there already.

    The move counts as a change of the device's config (see
    store.config_files.move_to_group), so the device fetches its new group's
    files at its next check-in.
    """
    reason = checked_reason(reason, "the config log")
    group = group.strip() if group else None
    if group is not None and len(group) > 128:
        raise StoreError("a group name has at most 128 characters")
    async with opened(store) as ready, ready.transaction() as session:
        row = await _device(session, device, lock=True)
        before = row.group_name
        entry = await config_files.move_to_group(
            session,
            row,
            group,
            changed_by=actor,
            reason=f"moved from group {before or '-'} to {group or '-'}: {reason}",
        )
        if entry is None:
            return None
        await audit.append_audit(
            session,
            actor=actor,
            action="device.group",
            target=row.uuid,
            details={"from": before, "to": group, "reason": reason},
        )
        return ConfigChange.of(entry)


def _check_files(files: Mapping[str, ConfigValue]) -> None:
    if not files:
        raise StoreError("give at least one NAME=VALUE")
    for name in files:
        problem = config_files.bad_file_name(name)
        if problem:
            raise StoreError(problem)


async def unlock_config(
    store: Store | str, device: str, *, reason: str, actor: str
) -> dict[str, Any]:
    """Withdraw the next key a device announced, which unlocks its config.

    For a rotation that will not finish (a dead device, a lost journal). If the
    device's rotation does go on, the gateway refuses its new key and the agent
    rolls back to the old one.
    """
    reason = checked_reason(reason, "the audit log")
    async with opened(store) as ready, ready.transaction() as session:
        row = await _device(session, device, lock=True)
        announced = row.next_pubkey_sha256
        if announced is None:
            return {"uuid": row.uuid, "unlocked": False, "withdrawn_pubkey_sha256": None}
        await devices.withdraw_next_key(session, row.uuid, announced)
        await audit.append_audit(
            session,
            actor=actor,
            action=NEXT_KEY_WITHDRAWN_ACTION,
            target=row.uuid,
            details={"pubkey_sha256": announced, "reason": reason},
        )
        return {"uuid": row.uuid, "unlocked": True, "withdrawn_pubkey_sha256": announced}


async def _for_device(
    session: AsyncSession, device: Device, files: Mapping[str, ConfigValue]
) -> tuple[dict[str, ConfigValue], str | None]:
    """The files with clear values encrypted to the device's current key."""
    if device.config_locked:
        raise ConfigLockedError(
            f"device {device.uuid} is rotating its key (next key announced at "
            f"{await _announced_at(session, device.uuid)}); config changes wait until it "
            "connects with the new key, or `certfleet devices unlock` ends the rotation"
        )
    if all(f.unencrypted for f in files.values()):
        return dict(files), None
    key = await _current_key(session, device)
    encrypted = {
        name: f
        if f.unencrypted
        else ConfigValue(ecies.encrypt_b64(key, f.value.encode()), f.on_changed, False)
        for name, f in files.items()
    }
    return encrypted, pubkey_sha256(key)


async def _current_key(session: AsyncSession, device: Device) -> ec.EllipticCurvePublicKey:
    if device.current_cert_id is None:
        raise StoreError(
            f"device {device.uuid} has no current certificate to encrypt to; "
            "use --unencrypted or wait until it has registered"
        )
    row = await certificates.get_certificate_by_id(session, device.current_cert_id)
    key = x509.load_pem_x509_certificate(row.cert_pem.encode()).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise StoreError(f"device {device.uuid} has no EC key to encrypt to; use --unencrypted")
    return key


async def _announced_at(session: AsyncSession, device_uuid: str) -> str:
    for entry in await audit.list_audit(session, target=device_uuid, limit=50):
        if entry.action == NEXT_KEY_ACTION:
            return names.rfc3339(entry.at)
    return "an unknown time"


async def _device(session: AsyncSession, device: str, *, lock: bool = False) -> Device:
    try:
        device_uuid = str(uuid.UUID(device))
    except ValueError as exc:
        raise StoreError(f"{device!r} is not a device uuid") from exc
    try:
        if lock:
            return await devices.lock_device(session, device_uuid)
        return await devices.get_device(session, device_uuid)
    except NotFoundError as exc:
        raise NotFoundError(f"no device {device_uuid} (or it was deleted)") from exc


async def _factory_by_id(session: AsyncSession, factory_id: int) -> Factory:
    for row in await factories.list_factories(session):
        if row.id == factory_id:
            return row
    raise StoreError(f"no factory with id {factory_id}")


async def set_device_files(
    session: AsyncSession,
    device_uuid: str,
    files: Mapping[str, ConfigValue],
    *,
    reason: str,
    actor: str,
) -> ConfigSet:
    """`set_config` for one device inside the caller's transaction (campaigns trigger many).

    Refuses with ConfigLockedError while the device rotates its key, like set_config.
    """
    _check_files(files)
    device = await _device(session, device_uuid, lock=True)
    row = await _factory_by_id(session, device.factory_id)
    stored, encrypted_to = await _for_device(session, device, files)
    await config_files.put_config_files(
        session, row.id, ConfigScope.DEVICE, device.uuid, stored, changed_by=actor, reason=reason
    )
    payload = {
        "scope": str(ConfigScope.DEVICE),
        "key": device.uuid,
        "files": sorted(files),
        "reason": reason,
        "time": names.rfc3339(dt.datetime.now(dt.UTC)),
    }
    await outbox.append_event(
        session, names.DEVICE_CONFIG_CHANGED, payload, device_uuid=device.uuid
    )
    await audit.append_audit(
        session,
        actor=actor,
        action="config.set",
        target=f"{ConfigScope.DEVICE}:{device.uuid}",
        details={"files": sorted(files), "reason": reason},
    )
    return ConfigSet(row.name, str(ConfigScope.DEVICE), device.uuid, sorted(files), encrypted_to)
