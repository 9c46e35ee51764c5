"""Rotation campaigns and their devices' states (decisions live in certfleet.fleet.campaigns)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import found
from certfleet.store.schema import (
    Campaign,
    CampaignDevice,
    CampaignDeviceState,
    CampaignStatus,
    Certificate,
    Device,
    Update,
    utcnow,
)

ACTIVE_STATES = (CampaignDeviceState.TRIGGERED, CampaignDeviceState.IN_PROGRESS)
OPEN_STATES = (CampaignDeviceState.PENDING, *ACTIVE_STATES)
OPEN_CAMPAIGNS = (CampaignStatus.RUNNING, CampaignStatus.PAUSED)
# Any constant works; it only has to be the same in every process.
RUNNER_LOCK_KEY = 0x63666C74_63616D70


@dataclass(frozen=True)
class ActiveDevice:
    """A triggered device with what tells whether it rotated: its certificate and update."""

    row: CampaignDevice
    current_cert_id: int | None
    current_issuer_id: int | None
    update_status: str | None


@dataclass(frozen=True)
class PendingDevice:
    """A device waiting to be triggered, with what decides whether it can be."""

    row: CampaignDevice
    device: Device


async def add_campaign(session: AsyncSession, **values: Any) -> Campaign:
    """Insert a campaign (see schema.Campaign for the fields)."""
    row = Campaign(**values)
    session.add(row)
    await session.flush()
    return row


async def add_campaign_devices(
    session: AsyncSession, campaign_id: int, devices: Iterable[tuple[str, bool]]
) -> int:
    """Add (uuid, canary) pairs as pending devices of a campaign; returns how many."""
    now = utcnow()
    rows = [
        dict(
            campaign_id=campaign_id,
            device_uuid=uuid,
            canary=canary,
            state=CampaignDeviceState.PENDING,
            attempts=0,
            updated_at=now,
        )
        for uuid, canary in devices
    ]
    for start in range(0, len(rows), 1000):
        await session.execute(insert(CampaignDevice), rows[start : start + 1000])
    return len(rows)


async def get_campaign(session: AsyncSession, campaign_id: int, *, lock: bool = False) -> Campaign:
    """Campaign ``campaign_id``; locked until the transaction ends with ``lock`` (PostgreSQL)."""
    query = select(Campaign).where(Campaign.id == campaign_id)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    return found(await session.scalar(query), f"no campaign {campaign_id}")


async def list_campaigns(
    session: AsyncSession, *, factory_id: int | None = None, limit: int = 50
) -> list[Campaign]:
    """Campaigns, newest first."""
    query = select(Campaign).order_by(Campaign.id.desc()).limit(limit)
    if factory_id is not None:
        query = query.where(Campaign.factory_id == factory_id)
    return list(await session.scalars(query))


async def open_or_ended_since(session: AsyncSession, since: datetime) -> list[Campaign]:
    """Running and paused campaigns, and those that finished at `since` or later; newest first."""
    query = (
        select(Campaign)
        .where(or_(Campaign.status.in_(OPEN_CAMPAIGNS), Campaign.finished_at >= since))
        .order_by(Campaign.id.desc())
    )
    return list(await session.scalars(query))


async def rotation_id_taken(session: AsyncSession, rotation_id: str) -> bool:
    """True if a campaign already uses this rotation id."""
    query = select(Campaign.id).where(Campaign.rotation_id == rotation_id)
    return await session.scalar(query) is not None


async def state_counts(
    session: AsyncSession, campaign_ids: Sequence[int]
) -> dict[int, dict[tuple[str, bool], int]]:
    """Per campaign: {(state, canary): devices}."""
    query = (
        select(
            CampaignDevice.campaign_id,
            CampaignDevice.state,
            CampaignDevice.canary,
            func.count(),
        )
        .where(CampaignDevice.campaign_id.in_(list(campaign_ids)))
        .group_by(CampaignDevice.campaign_id, CampaignDevice.state, CampaignDevice.canary)
    )
    counts: dict[int, dict[tuple[str, bool], int]] = {cid: {} for cid in campaign_ids}
    for campaign_id, state, canary, count in await session.execute(query):
        counts[campaign_id][(state, bool(canary))] = count
    return counts


async def campaign_devices(
    session: AsyncSession,
    campaign_id: int,
    *,
    states: Sequence[str] | None = None,
    limit: int = 1000,
) -> list[CampaignDevice]:
    """Devices of a campaign (optionally in some states), canaries first, then by uuid."""
    query = select(CampaignDevice).where(CampaignDevice.campaign_id == campaign_id)
    if states:
        query = query.where(CampaignDevice.state.in_(list(states)))
    query = query.order_by(CampaignDevice.canary.desc(), CampaignDevice.device_uuid)
    return list(await session.scalars(query.limit(limit)))


async def campaigns_to_tick(session: AsyncSession) -> list[int]:
    """Running campaigns, and paused or aborted ones with triggered devices still to watch."""
    query = select(Campaign.id, Campaign.status).where(Campaign.status != CampaignStatus.COMPLETED)
    found = []
    for campaign_id, status in await session.execute(query.order_by(Campaign.id)):
        if status == CampaignStatus.RUNNING or await has_devices_in(
            session, campaign_id, ACTIVE_STATES
        ):
            found.append(campaign_id)
    return found


async def has_devices_in(session: AsyncSession, campaign_id: int, states: Sequence[str]) -> bool:
    """True if any device of the campaign is in one of ``states`` (an index probe)."""
    query = select(CampaignDevice.id).where(
        CampaignDevice.campaign_id == campaign_id, CampaignDevice.state.in_(list(states))
    )
    return await session.scalar(query.limit(1)) is not None


async def active_devices(
    session: AsyncSession, campaign_id: int, *, limit: int = 5000
) -> list[ActiveDevice]:
    """Triggered and in-progress devices with their current certificate and update status."""
    query = (
        select(CampaignDevice, Device.current_cert_id, Certificate.issuer_ca_id, Update.status)
        .join(Device, Device.uuid == CampaignDevice.device_uuid)
        .outerjoin(Certificate, Certificate.id == Device.current_cert_id)
        .outerjoin(
            Update,
            and_(
                Update.device_uuid == CampaignDevice.device_uuid,
                Update.correlation_id == CampaignDevice.rotation_id,
            ),
        )
        .where(
            CampaignDevice.campaign_id == campaign_id,
            CampaignDevice.state.in_(ACTIVE_STATES),
        )
        .order_by(CampaignDevice.id)
        .limit(limit)
    )
    return [ActiveDevice(*row) for row in await session.execute(query)]


async def pending_devices(
    session: AsyncSession, campaign_id: int, *, canary: bool, limit: int
) -> list[PendingDevice]:
    """Pending devices (canaries or the rest) with their device rows, in uuid order."""
    query = (
        select(CampaignDevice, Device)
        .join(Device, Device.uuid == CampaignDevice.device_uuid)
        .where(
            CampaignDevice.campaign_id == campaign_id,
            CampaignDevice.state == CampaignDeviceState.PENDING,
            CampaignDevice.canary.is_(canary),
        )
        .order_by(CampaignDevice.device_uuid)
        .limit(limit)
    )
    return [PendingDevice(*row) for row in await session.execute(query)]


async def triggered_since(session: AsyncSession, campaign_id: int, since: datetime) -> int:
    """How many devices of the campaign were triggered at or after ``since``."""
    query = select(func.count()).where(
        CampaignDevice.campaign_id == campaign_id, CampaignDevice.triggered_at >= since
    )
    return int(await session.scalar(query) or 0)


async def devices_in_open_campaigns(session: AsyncSession, uuids: Sequence[str]) -> dict[str, int]:
    """{uuid: campaign id} for devices not yet done in a running or paused campaign."""
    found_in: dict[str, int] = {}
    for start in range(0, len(uuids), 1000):
        query = (
            select(CampaignDevice.device_uuid, CampaignDevice.campaign_id)
            .join(Campaign, Campaign.id == CampaignDevice.campaign_id)
            .where(
                Campaign.status.in_(OPEN_CAMPAIGNS),
                CampaignDevice.state.in_(OPEN_STATES),
                CampaignDevice.device_uuid.in_(list(uuids[start : start + 1000])),
            )
        )
        found_in.update({uuid: cid for uuid, cid in await session.execute(query)})
    return found_in


async def select_devices(
    session: AsyncSession,
    factory_id: int,
    *,
    group: str | None = None,
    issuer_ca_id: int | None = None,
) -> list[str]:
    """Uuids of live devices of a factory: all, one group's, or those whose current
    certificate was issued by ``issuer_ca_id``."""
    query = select(Device.uuid).where(Device.factory_id == factory_id, Device.deleted_at.is_(None))
    if group is not None:
        query = query.where(Device.group_name == group)
    if issuer_ca_id is not None:
        query = query.join(Certificate, Certificate.id == Device.current_cert_id).where(
            Certificate.issuer_ca_id == issuer_ca_id
        )
    return list(await session.scalars(query.order_by(Device.uuid)))


async def reset_failed(session: AsyncSession, campaign_id: int, rotation_id: str) -> int:
    """Failed devices back to pending with a new rotation id; returns how many."""
    query = (
        update(CampaignDevice)
        .where(
            CampaignDevice.campaign_id == campaign_id,
            CampaignDevice.state == CampaignDeviceState.FAILED,
        )
        .values(
            state=CampaignDeviceState.PENDING,
            rotation_id=rotation_id,
            detail=None,
            triggered_at=None,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    result = await session.execute(query)
    return int(result.rowcount or 0)


async def newest_rotation_id(session: AsyncSession, campaign_id: int) -> str | None:
    """The highest per-device rotation id of a campaign (ids are certs-<unix time>)."""
    query = select(func.max(CampaignDevice.rotation_id)).where(
        CampaignDevice.campaign_id == campaign_id
    )
    return await session.scalar(query)


async def try_runner_lock(session: AsyncSession) -> bool:
    """On PostgreSQL, take the campaign runner's lock for this transaction if it is free.

    SQLite serializes write transactions anyway, so there it is always True.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    query = text("SELECT pg_try_advisory_xact_lock(:key)").bindparams(key=RUNNER_LOCK_KEY)
    return bool(await session.scalar(query))
