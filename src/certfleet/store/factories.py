"""Factories: the top-level tenant every CA, device and config file belongs to."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

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
