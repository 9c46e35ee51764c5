"""Config files for devices, per factory, group or device, with a change log.

``scope_key`` is the group name, the device uuid, or '' for the factory scope.
Encrypted values are stored as the ciphertext the caller gives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, ScalarSelect, and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import upsert_insert
from certfleet.store.schema import ConfigFile, ConfigLog, ConfigScope, Device, utcnow

_KEY = ["factory_id", "scope", "scope_key", "name"]
# Devices write each file under its name in a folder: no paths, no dot files.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_CHANGED = ["value", "on_changed", "unencrypted", "updated_at", "updated_by"]


@dataclass(frozen=True)
class ConfigValue:
    """One config file's content as a device sees it."""

    value: str
    on_changed: list[str] = field(default_factory=list)
    unencrypted: bool = False


def bad_file_name(name: str) -> str | None:
    """Why ``name`` cannot be a config file name, or None if it can."""
    if _FILE_NAME.fullmatch(name) and ".." not in name:
        return None
    return (
        f"config file name {name[:80]!r} is not allowed: use letters, digits, '.', '_' and '-' "
        "(no '/' or '..', not starting with '.'), at most 255 characters"
    )


async def put_config_files(
    session: AsyncSession,
    factory_id: int,
    scope: ConfigScope,
    scope_key: str,
    files: Mapping[str, ConfigValue],
    *,
    changed_by: str,
    reason: str = "",
) -> ConfigLog:
    """Create or replace ``files`` in one scope and log the change."""
    await _upsert(session, factory_id, scope, scope_key, files, changed_by)
    return await _log(session, factory_id, scope, scope_key, files, changed_by, reason)


async def _upsert(
    session: AsyncSession,
    factory_id: int,
    scope: ConfigScope,
    scope_key: str,
    files: Mapping[str, ConfigValue],
    changed_by: str,
) -> None:
    now = utcnow()
    rows = [
        dict(
            factory_id=factory_id,
            scope=scope,
            scope_key=scope_key,
            name=name,
            value=f.value,
            on_changed=f.on_changed,
            unencrypted=f.unencrypted,
            updated_at=now,
            updated_by=changed_by,
        )
        for name, f in files.items()
    ]
    if rows:
        insert = upsert_insert(session, ConfigFile.__table__).values(rows)
        changed = {column: insert.excluded[column] for column in _CHANGED}
        await session.execute(insert.on_conflict_do_update(index_elements=_KEY, set_=changed))


async def delete_config_files(
    session: AsyncSession,
    factory_id: int,
    scope: ConfigScope,
    scope_key: str,
    names: Iterable[str],
    *,
    changed_by: str,
    reason: str = "",
) -> ConfigLog:
    """Delete the named files from one scope and log the change."""
    names = list(names)
    await session.execute(
        delete(ConfigFile).where(
            ConfigFile.factory_id == factory_id,
            ConfigFile.scope == scope,
            ConfigFile.scope_key == scope_key,
            ConfigFile.name.in_(names),
        )
    )
    return await _log(session, factory_id, scope, scope_key, names, changed_by, reason)


async def list_config_files(
    session: AsyncSession, factory_id: int, scope: ConfigScope, scope_key: str = ""
) -> list[ConfigFile]:
    """The files of one scope, by name."""
    query = select(ConfigFile).where(
        ConfigFile.factory_id == factory_id,
        ConfigFile.scope == scope,
        ConfigFile.scope_key == scope_key,
    )
    return list(await session.scalars(query.order_by(ConfigFile.name)))


async def config_history(
    session: AsyncSession, factory_id: int, scope: ConfigScope, scope_key: str = "", limit: int = 50
) -> list[ConfigLog]:
    """Changes to one scope, newest first."""
    query = select(ConfigLog).where(
        ConfigLog.factory_id == factory_id,
        ConfigLog.scope == scope,
        ConfigLog.scope_key == scope_key,
    )
    return list(await session.scalars(query.order_by(ConfigLog.id.desc()).limit(limit)))


async def _log(
    session: AsyncSession,
    factory_id: int,
    scope: ConfigScope,
    scope_key: str,
    names: Iterable[str],
    changed_by: str,
    reason: str,
) -> ConfigLog:
    entry = ConfigLog(
        factory_id=factory_id,
        scope=scope,
        scope_key=scope_key,
        changed_by=changed_by,
        reason=reason,
        file_names=sorted(names),
    )
    session.add(entry)
    await session.flush()
    return entry


async def move_to_group(
    session: AsyncSession, device: Device, group: str | None, *, changed_by: str, reason: str
) -> ConfigLog | None:
    """Put `device` in `group` (None: in none); None if it was there already (nothing written).

    A move changes which files apply to the device, so it is logged as a
    change of the device's own scope (with no file names): the device's
    config version moves on, and its next check-in fetches the new group's
    files instead of a 304.
    """
    if device.group_name == group:
        return None
    device.group_name = group
    await session.flush()
    return await _log(
        session, device.factory_id, ConfigScope.DEVICE, device.uuid, [], changed_by, reason
    )


def _device_scopes(
    table: type[ConfigFile] | type[ConfigLog], factory_id: int, group: str | None, device_uuid: str
) -> ColumnElement[bool]:
    scopes = [
        and_(table.scope == ConfigScope.FACTORY, table.scope_key == ""),
        and_(table.scope == ConfigScope.DEVICE, table.scope_key == device_uuid),
    ]
    if group:
        scopes.append(and_(table.scope == ConfigScope.GROUP, table.scope_key == group))
    return and_(table.factory_id == factory_id, or_(*scopes))


async def files_for_device(
    session: AsyncSession, factory_id: int, group: str | None, device_uuid: str
) -> list[ConfigFile]:
    """The factory, group and device files that apply to one device (unmerged), by name."""
    query = select(ConfigFile).where(_device_scopes(ConfigFile, factory_id, group, device_uuid))
    return list(await session.scalars(query.order_by(ConfigFile.name, ConfigFile.scope)))


def device_config_changed() -> ScalarSelect[datetime]:
    """When a file applying to the device of the enclosing `devices` row last changed.

    A correlated subquery for a query that selects from `devices`. It reads the
    change log, not the files, so that a deletion counts too; the log's index
    on (factory_id, scope, scope_key) serves it.
    """
    return (
        select(func.max(ConfigLog.changed_at))
        .where(
            ConfigLog.factory_id == Device.factory_id,
            or_(
                and_(ConfigLog.scope == ConfigScope.FACTORY, ConfigLog.scope_key == ""),
                and_(
                    ConfigLog.scope == ConfigScope.GROUP, ConfigLog.scope_key == Device.group_name
                ),
                and_(ConfigLog.scope == ConfigScope.DEVICE, ConfigLog.scope_key == Device.uuid),
            ),
        )
        .scalar_subquery()
    )


async def replace_config_files(
    session: AsyncSession,
    factory_id: int,
    scope: ConfigScope,
    scope_key: str,
    files: Mapping[str, ConfigValue],
    *,
    changed_by: str,
    reason: str = "",
) -> ConfigLog | None:
    """Make ``files`` the whole content of one scope; None if it already was (nothing written)."""
    current = await list_config_files(session, factory_id, scope, scope_key)
    stored = {f.name: ConfigValue(f.value, list(f.on_changed), f.unencrypted) for f in current}
    if stored == dict(files):
        return None
    gone = set(stored) - set(files)
    if gone:
        await session.execute(
            delete(ConfigFile).where(
                ConfigFile.factory_id == factory_id,
                ConfigFile.scope == scope,
                ConfigFile.scope_key == scope_key,
                ConfigFile.name.in_(gone),
            )
        )
    await _upsert(session, factory_id, scope, scope_key, files, changed_by)
    changed = set(files) | gone
    return await _log(session, factory_id, scope, scope_key, changed, changed_by, reason)
