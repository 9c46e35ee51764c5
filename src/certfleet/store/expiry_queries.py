"""Expiry of the fleet's certificates: counts per time bucket, stale devices, short-lived CAs.

A device certificate here is the *current* certificate of a device that is
not deleted: older ones were superseded and no longer matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from certfleet.store.schema import Ca, CaStatus, Certificate, Device, Factory


@dataclass(frozen=True)
class StaleDevice:
    """A device not seen since ``last_seen`` whose certificate expires at ``not_after``."""

    uuid: str
    factory: str
    group: str | None
    last_seen: datetime
    not_after: datetime


@dataclass(frozen=True)
class OutlivedCa:
    """A CA that expires before ``count`` certificates it signed (the latest at ``latest``)."""

    ca: Ca
    factory: str
    count: int
    latest: datetime


def _bucket_sums(column: ColumnElement[datetime], edges: Sequence[datetime]) -> list:
    """SUM(CASE) per half-open bucket: (-inf, edges[0]), [edges[0], edges[1]), ..., [last, +inf)."""
    bounds = [None, *edges, None]
    sums = []
    for low, high in zip(bounds, bounds[1:], strict=False):
        conditions = []
        if low is not None:
            conditions.append(column >= low)
        if high is not None:
            conditions.append(column < high)
        sums.append(func.coalesce(func.sum(case((and_(*conditions), 1), else_=0)), 0))
    return sums


def _live_device_certs() -> ColumnElement[bool]:
    return and_(Device.deleted_at.is_(None), Certificate.id == Device.current_cert_id)


async def device_cert_buckets(session: AsyncSession, edges: Sequence[datetime]) -> list[int]:
    """Current device certificates per bucket of `not_after` (see `_bucket_sums`)."""
    query = select(*_bucket_sums(Certificate.not_after, edges)).select_from(Device)
    query = query.join(Certificate, _live_device_certs())
    return [int(n) for n in (await session.execute(query)).one()]


async def ca_cert_buckets(session: AsyncSession, edges: Sequence[datetime]) -> list[int]:
    """CA and server certificates (not revoked) per bucket of `not_after`."""
    query = select(*_bucket_sums(Ca.not_after, edges)).where(Ca.status != CaStatus.REVOKED)
    return [int(n) for n in (await session.execute(query)).one()]


async def stale_devices(
    session: AsyncSession, *, seen_before: datetime, expiring_before: datetime, limit: int
) -> tuple[int, list[StaleDevice]]:
    """Devices last seen before ``seen_before`` whose certificate expires before
    ``expiring_before``: how many, and the first ``limit`` by expiry.

    A device never seen since registration counts from its registration.
    """
    last_seen = func.coalesce(Device.last_seen_at, Device.created_at)
    conditions = and_(last_seen < seen_before, Certificate.not_after < expiring_before)
    base = select(Device).join(Certificate, _live_device_certs()).where(conditions)
    total = await session.scalar(select(func.count()).select_from(base.subquery()))
    if limit <= 0:  # only the count
        return int(total or 0), []
    query = (
        select(Device.uuid, Factory.name, Device.group_name, last_seen, Certificate.not_after)
        .join(Certificate, _live_device_certs())
        .join(Factory, Factory.id == Device.factory_id)
        .where(conditions)
        .order_by(Certificate.not_after, Device.uuid)
        .limit(limit)
    )
    rows = [StaleDevice(*row) for row in await session.execute(query)]
    return int(total or 0), rows


async def cas_outlived_by_devices(session: AsyncSession) -> list[OutlivedCa]:
    """CAs (not revoked) that expire before current device certificates they signed."""
    query = (
        select(Ca, Factory.name, func.count(Certificate.id), func.max(Certificate.not_after))
        .join(Factory, Factory.id == Ca.factory_id)
        .join(Certificate, Certificate.issuer_ca_id == Ca.id)
        .join(Device, _live_device_certs())
        .where(Ca.status != CaStatus.REVOKED, Certificate.not_after > Ca.not_after)
        .group_by(Ca.id, Factory.name)
        .order_by(Ca.not_after)
    )
    return [OutlivedCa(*row) for row in await session.execute(query)]


async def roots_outlived_by_cas(session: AsyncSession) -> list[OutlivedCa]:
    """Roots (not revoked) that expire before other CA or server certificates of their factory."""
    child = aliased(Ca)
    query = (
        select(Ca, Factory.name, func.count(child.id), func.max(child.not_after))
        .join(Factory, Factory.id == Ca.factory_id)
        .join(child, and_(child.factory_id == Ca.factory_id, child.id != Ca.id))
        .where(
            Ca.kind == "root",
            Ca.status != CaStatus.REVOKED,
            child.status != CaStatus.REVOKED,
            child.not_after > Ca.not_after,
        )
        .group_by(Ca.id, Factory.name)
        .order_by(Ca.not_after)
    )
    return [OutlivedCa(*row) for row in await session.execute(query)]
