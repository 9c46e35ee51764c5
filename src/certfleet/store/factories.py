"""Factories: the top-level tenant every CA, device and config file belongs to."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.errors import StoreError
from certfleet.store.rows import add_unique, found
from certfleet.store.schema import Factory


async def add_factory(session: AsyncSession, name: str) -> Factory:
    """Create factory ``name``; DuplicateError if it exists."""
    return await add_unique(session, Factory(name=name), f"factory '{name}' already exists")


async def get_factory(session: AsyncSession, name: str) -> Factory:
    """The factory called ``name``; NotFoundError if there is none."""
    row = await session.scalar(select(Factory).where(Factory.name == name))
    return found(row, f"no factory named '{name}'; create it first")


async def list_factories(session: AsyncSession) -> list[Factory]:
    """All factories, by name."""
    return list(await session.scalars(select(Factory).order_by(Factory.name)))


async def resolve_factory(session: AsyncSession, name: str | None) -> Factory:
    """The factory called ``name``, or the only one when no name is given."""
    if name:
        return await get_factory(session, name)
    known = await list_factories(session)
    if len(known) == 1:
        return known[0]
    if not known:
        raise StoreError("this store has no factory yet: run `certfleet keys ca create` first")
    names = ", ".join(f.name for f in known)
    raise StoreError(f"this store holds several factories ({names}): pass --factory")
