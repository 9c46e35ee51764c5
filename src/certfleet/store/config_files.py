"""Config files for devices, per factory, group or device, with a change log.

``scope_key`` is the group name, the device uuid, or '' for the factory scope.
Encrypted values are stored as the ciphertext the caller gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import upsert_insert
from certfleet.store.schema import ConfigFile, ConfigLog, ConfigScope, utcnow

_KEY = ["factory_id", "scope", "scope_key", "name"]
_CHANGED = ["value", "on_changed", "unencrypted", "updated_at", "updated_by"]


@dataclass(frozen=True)
class ConfigValue:
    """One config file's content as a device sees it."""

    value: str
    on_changed: list[str] = field(default_factory=list)
    unencrypted: bool = False


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
    return await _log(session, factory_id, scope, scope_key, files, changed_by, reason)


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
