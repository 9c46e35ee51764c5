"""Rotation campaigns: many devices rotate their certificates in waves, with abort rules.

A campaign snapshots its devices when it is created (all of a factory, one
group, or those whose current certificate a given CA issued) and marks a share
of them as canaries. `CampaignRunner` then moves each device through

    pending -> triggered -> in_progress -> completed | failed
    pending -> skipped_offline

triggered: its `fio-rotate-certs` file was set; in_progress: it reported a
step of the rotation (an update with the rotation id); completed: the gateway
switched it to a new certificate; failed: it reported CertRotationCompleted
with success false, or its deadline passed.

Canaries go first; the others wait until every canary is done, then go at
most `rate_per_minute` a minute. The runner aborts the campaign when the
failed share of the devices tried so far passes `failure_threshold`, or when a
canary has not come back with a new certificate within `canary_deadline`.
Every state lives in the store, so any process can run the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet import protocol
from certfleet.events import names
from certfleet.fleet import config_admin, rotate_certs
from certfleet.fleet.reasons import checked_reason
from certfleet.fleet.rotate_certs import RotationOrder
from certfleet.store import audit, cas, factories, outbox
from certfleet.store import campaigns as rows
from certfleet.store.authorities import issuing_online_ca
from certfleet.store.campaigns import ActiveDevice, PendingDevice
from certfleet.store.engine import Store
from certfleet.store.engine import opened as use_store
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import (
    Ca,
    CaKind,
    Campaign,
    CampaignDeviceState,
    CampaignStatus,
    CaStatus,
    utcnow,
)

log = logging.getLogger(__name__)

State = CampaignDeviceState
DONE_STATES = (State.COMPLETED, State.FAILED, State.SKIPPED_OFFLINE)
TRIED_STATES = (State.TRIGGERED, State.IN_PROGRESS, State.COMPLETED, State.FAILED)
RATE_WINDOW = dt.timedelta(minutes=1)
LATE = "no new certificate within"


# Bounds that keep every setting meaningful and inside its store column (seconds
# and rates are 32-bit integers).
MAX_RATE_PER_MINUTE = 100_000
LONGEST_WAIT = dt.timedelta(days=365)


class CampaignError(StoreError):
    """An operator request about a campaign cannot be done; the message says why."""


class UnknownCampaign(CampaignError, NotFoundError):
    """No campaign has this id (the API answers 404)."""


class CampaignStateError(CampaignError):
    """The campaign's state does not allow the request (HTTP 409)."""

    status = 409


@dataclass(frozen=True)
class Selector:
    """Which devices a campaign takes: all, one group, or a breached CA's devices."""

    group: str | None = None
    all_devices: bool = False
    reissue_from_ca: str | None = None
    to_ca: str | None = None

    def check(self) -> None:
        """Exactly one way of choosing devices; a breach needs both CAs."""
        chosen = [self.group is not None, self.all_devices, self.reissue_from_ca is not None]
        if sum(chosen) != 1:
            raise CampaignError(
                "choose the devices with one of --group G, --all, --reissue-from-ca"
            )
        if (self.reissue_from_ca is None) != (self.to_ca is None):
            raise CampaignError("--reissue-from-ca CA needs --to-ca NEW (and the other way round)")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored with the campaign."""
        if self.group is not None:
            return {"group": self.group}
        if self.all_devices:
            return {"all": True}
        return {"reissue_from_ca": self.reissue_from_ca, "to_ca": self.to_ca}


@dataclass(frozen=True)
class CampaignSettings:
    """How a campaign runs."""

    canary_share: float = 0.05
    rate_per_minute: int = 60
    failure_threshold: float = 0.1
    canary_deadline: dt.timedelta = dt.timedelta(minutes=30)
    device_deadline: dt.timedelta = dt.timedelta(hours=2)
    offline_after: dt.timedelta = dt.timedelta(days=7)

    def check(self) -> None:
        """Refuse values that cannot work, naming the option."""
        if not 0 <= self.canary_share <= 1:
            raise CampaignError(f"--canary-share {self.canary_share} must be between 0 and 1")
        if self.rate_per_minute < 1:
            raise CampaignError(f"--rate {self.rate_per_minute}/min must be at least 1/min")
        if self.rate_per_minute > MAX_RATE_PER_MINUTE:
            raise CampaignError(
                f"--rate {self.rate_per_minute}/min must be at most {MAX_RATE_PER_MINUTE}/min"
            )
        if not 0 <= self.failure_threshold <= 1:
            raise CampaignError(
                f"--failure-threshold {self.failure_threshold} must be between 0 and 1"
            )
        for option, value in (
            ("--canary-deadline", self.canary_deadline),
            ("--device-deadline", self.device_deadline),
            ("--offline-after", self.offline_after),
        ):
            if value.total_seconds() < 1:
                raise CampaignError(f"{option} must be at least one second")
            if value > LONGEST_WAIT:
                raise CampaignError(f"{option} must be at most {LONGEST_WAIT.days} days")


@dataclass(frozen=True)
class CampaignView:
    """A campaign and how many of its devices are in each state."""

    id: int
    rotation_id: str
    status: str
    status_reason: str | None
    reason: str
    selector: dict[str, Any]
    settings: dict[str, Any]
    created_at: dt.datetime
    finished_at: dt.datetime | None
    counts: dict[str, int]
    canary_counts: dict[str, int]
    devices: list[dict[str, Any]] = field(default_factory=list)
    # Set by retry_failed: how many failed devices went back to pending.
    retried: int = 0

    @property
    def total(self) -> int:
        """Devices in the campaign."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "id": self.id,
            "rotation_id": self.rotation_id,
            "status": self.status,
            "status_reason": self.status_reason,
            "reason": self.reason,
            "selector": self.selector,
            "settings": self.settings,
            "created_at": names.rfc3339(self.created_at),
            "finished_at": names.rfc3339(self.finished_at) if self.finished_at else None,
            "total": self.total,
            "counts": self.counts,
            "canary_counts": self.canary_counts,
            "devices": self.devices,
        }


@dataclass(frozen=True)
class Plan:
    """What `create_campaign` chose; `campaign` is None on a dry run."""

    devices: list[str]
    canaries: list[str]
    left_out: dict[str, int]
    order: RotationOrder
    campaign: CampaignView | None


# -- operator actions ---------------------------------------------------------------------


async def create_campaign(
    store: Store | str,
    selector: Selector,
    settings: CampaignSettings,
    order: RotationOrder,
    *,
    reason: str,
    actor: str,
    factory: str | None = None,
    dryrun: bool = False,
) -> Plan:
    """Choose the devices and store the campaign; the runner in the server does the rest.

    Devices already waiting in another open campaign are left out (a device
    runs one rotation at a time); ``left_out`` says where they are.
    """
    selector.check()
    settings.check()
    reason = checked_reason(reason, "the campaign and its events")
    async with use_store(store) as opened, opened.transaction() as session:
        fact = await factories.resolve_factory(session, factory)
        from_ca, to_ca = await _breach_cas(session, fact.id, selector)
        chosen = await rows.select_devices(
            session,
            fact.id,
            group=selector.group,
            issuer_ca_id=from_ca.id if from_ca else None,
        )
        busy = await rows.devices_in_open_campaigns(session, chosen)
        chosen = [uuid for uuid in chosen if uuid not in busy]
        if not chosen:
            raise CampaignError(_nothing_to_do(selector, busy))
        canaries = _pick_canaries(chosen, settings.canary_share)
        if dryrun:
            return Plan(chosen, canaries, busy, order, None)
        order = await _unique_rotation(session, order)
        campaign = await rows.add_campaign(
            session,
            factory_id=fact.id,
            rotation_id=order.rotation_id,
            reason=reason,
            selector=selector.as_dict(),
            from_ca_id=from_ca.id if from_ca else None,
            to_ca_id=to_ca.id if to_ca else None,
            est_server=order.est_server,
            pkey_ids=order.pkey_ids,
            cert_ids=order.cert_ids,
            canary_share=settings.canary_share,
            rate_per_minute=settings.rate_per_minute,
            failure_threshold=settings.failure_threshold,
            canary_deadline_s=int(settings.canary_deadline.total_seconds()),
            device_deadline_s=int(settings.device_deadline.total_seconds()),
            offline_after_s=int(settings.offline_after.total_seconds()),
            status=CampaignStatus.RUNNING,
            created_by=actor,
        )
        marked = set(canaries)
        await rows.add_campaign_devices(
            session, campaign.id, [(uuid, uuid in marked) for uuid in chosen]
        )
        await _changed(session, campaign, protocol.CAMPAIGN_CREATED, actor, devices=len(chosen))
        view = await _view(session, campaign)
        return Plan(chosen, canaries, busy, order, view)


async def list_campaigns(
    store: Store | str, *, factory: str | None = None, limit: int = 50
) -> list[CampaignView]:
    """Campaigns, newest first, with their counts."""
    async with use_store(store) as opened, opened.transaction() as session:
        fact = await factories.resolve_factory(session, factory)
        found = await rows.list_campaigns(session, factory_id=fact.id, limit=limit)
        counts = await rows.state_counts(session, [c.id for c in found])
        return [_view_of(c, counts[c.id]) for c in found]


async def show_campaign(store: Store | str, campaign_id: int, *, devices: int = 0) -> CampaignView:
    """One campaign with its counts and (up to ``devices``) its devices."""
    async with use_store(store) as opened:
        return await campaign_view(opened, campaign_id, devices=devices)


async def campaign_view(store: Store, campaign_id: int, *, devices: int = 0) -> CampaignView:
    """`show_campaign` on an open store (the watch loop and the API reuse one)."""
    async with store.transaction() as session:
        campaign = await _campaign(session, campaign_id)
        return await _view(session, campaign, devices=devices)


async def pause(store: Store | str, campaign_id: int, *, actor: str) -> CampaignView:
    """Trigger no more devices; triggered ones are still watched."""
    return await _transition(
        store,
        campaign_id,
        actor,
        protocol.CAMPAIGN_PAUSED,
        CampaignStatus.PAUSED,
        allowed=(CampaignStatus.RUNNING,),
    )


async def resume(store: Store | str, campaign_id: int, *, actor: str) -> CampaignView:
    """Carry on with a paused campaign."""
    return await _transition(
        store,
        campaign_id,
        actor,
        protocol.CAMPAIGN_RESUMED,
        CampaignStatus.RUNNING,
        allowed=(CampaignStatus.PAUSED,),
    )


async def abort(store: Store | str, campaign_id: int, *, actor: str, why: str = "") -> CampaignView:
    """Stop for good: pending devices are not triggered; retry-failed can restart failed ones."""
    return await _transition(
        store,
        campaign_id,
        actor,
        protocol.CAMPAIGN_ABORTED,
        CampaignStatus.ABORTED,
        allowed=(CampaignStatus.RUNNING, CampaignStatus.PAUSED),
        why=why or f"aborted by {actor}",
    )


async def retry_failed(store: Store | str, campaign_id: int, *, actor: str) -> CampaignView:
    """Failed devices go back to pending under a new rotation id; the campaign runs again."""
    async with use_store(store) as opened, opened.transaction() as session:
        campaign = await _campaign(session, campaign_id, lock=True)
        newest = await rows.newest_rotation_id(session, campaign.id)
        rotation = rotate_certs.next_rotation_id(max(newest or "", campaign.rotation_id))
        count = await rows.reset_failed(session, campaign.id, rotation)
        if not count:
            raise CampaignStateError(f"campaign {campaign.id} has no failed devices to retry")
        if campaign.status != CampaignStatus.PAUSED:
            _set_status(campaign, CampaignStatus.RUNNING, None)
        campaign.finished_at = None
        await _changed(
            session, campaign, protocol.CAMPAIGN_RETRIED, actor, devices=count, rotation_id=rotation
        )
        return dataclasses.replace(await _view(session, campaign), retried=count)


async def _transition(
    store: Store | str,
    campaign_id: int,
    actor: str,
    topic: str,
    status: CampaignStatus,
    *,
    allowed: tuple[CampaignStatus, ...],
    why: str | None = None,
) -> CampaignView:
    async with use_store(store) as opened, opened.transaction() as session:
        campaign = await _campaign(session, campaign_id, lock=True)
        if campaign.status not in allowed:
            raise CampaignStateError(
                f"campaign {campaign.id} is {campaign.status}; it can be {status} only when "
                f"{' or '.join(allowed)}"
            )
        _set_status(campaign, status, why)
        await _changed(session, campaign, topic, actor)
        return await _view(session, campaign)


# -- the runner ---------------------------------------------------------------------------


class CampaignRunner:
    """Moves every open campaign on by one step per tick; all state is in the store.

    ``now`` is the clock the runner judges deadlines and rates by (tests pass a
    faster one). On PostgreSQL each tick takes an advisory lock, so however
    many processes run a runner, one tick runs at a time.
    """

    def __init__(
        self,
        store: Store,
        *,
        tick_interval: float = 5.0,
        now: Callable[[], dt.datetime] = utcnow,
        actor: str = "campaign-runner",
        batch: int = 5000,
    ) -> None:
        self.store = store
        self.tick_interval = tick_interval
        self.now = now
        self.actor = actor
        self.batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; a failed tick is logged and retried next time."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("campaign tick failed; trying again in %.1f s", self.tick_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_interval)

    async def tick(self) -> bool:
        """One step for every open campaign; False if another process holds the tick."""
        async with self.store.transaction() as session:
            if not await rows.try_runner_lock(session):
                return False
            for campaign_id in await rows.campaigns_to_tick(session):
                await self._step(session, await rows.get_campaign(session, campaign_id, lock=True))
        return True

    async def _step(self, session: AsyncSession, campaign: Campaign) -> None:
        now = self.now()
        late_canary = await self._observe(session, campaign, now)
        if campaign.status != CampaignStatus.RUNNING:
            return
        counts = (await rows.state_counts(session, [campaign.id]))[campaign.id]
        why = late_canary or _failure_rate_exceeded(campaign, counts)
        if why:
            _set_status(campaign, CampaignStatus.ABORTED, why, now)
            await _changed(session, campaign, protocol.CAMPAIGN_ABORTED, self.actor, automatic=True)
            log.warning("campaign %d aborted: %s", campaign.id, why)
            return
        await self._trigger_due(session, campaign, counts, now)
        await self._finish_if_done(session, campaign, now)

    # Watching triggered devices.

    async def _observe(self, session: AsyncSession, campaign: Campaign, now: dt.datetime) -> str:
        """Move triggered devices on; returns why to abort if a canary came back too late."""
        late = ""
        for active in await rows.active_devices(session, campaign.id, limit=self.batch):
            verdict = _verdict(campaign, active, now)
            if verdict is None:
                continue
            state, detail = verdict
            await self._set_state(session, campaign, active, state, detail, now)
            if state == State.FAILED and active.row.canary and (detail or "").startswith(LATE):
                late = late or (
                    f"canary device {active.row.device_uuid} did not come back with a new "
                    f"certificate within {_span(campaign.canary_deadline_s)}"
                )
        return late

    async def _set_state(
        self,
        session: AsyncSession,
        campaign: Campaign,
        active: ActiveDevice,
        state: str,
        detail: str | None,
        now: dt.datetime,
    ) -> None:
        row = active.row
        row.state, row.detail, row.updated_at = state, detail, now
        if state == State.FAILED:
            payload = _payload(campaign, device=row.device_uuid, detail=detail, canary=row.canary)
            await outbox.append_event(
                session, protocol.CAMPAIGN_DEVICE_FAILED, payload, device_uuid=row.device_uuid
            )

    # Triggering.

    async def _trigger_due(
        self,
        session: AsyncSession,
        campaign: Campaign,
        counts: dict[tuple[str, bool], int],
        now: dt.datetime,
    ) -> None:
        budget = campaign.rate_per_minute - await rows.triggered_since(
            session, campaign.id, now - RATE_WINDOW
        )
        if budget <= 0:
            return
        canaries = await rows.pending_devices(session, campaign.id, canary=True, limit=budget)
        if canaries:
            await self._trigger(session, campaign, canaries, now)
            return
        if _canaries_out(counts):
            return  # the waves wait until every canary is done
        others = await rows.pending_devices(session, campaign.id, canary=False, limit=budget)
        await self._trigger(session, campaign, others, now)

    async def _trigger(
        self,
        session: AsyncSession,
        campaign: Campaign,
        pending: list[PendingDevice],
        now: dt.datetime,
    ) -> None:
        offline_before = now - dt.timedelta(seconds=campaign.offline_after_s)
        base = _order(campaign)
        for item in pending:
            row, device = item.row, item.device
            seen = device.last_seen_at or device.created_at
            if device.deleted_at is not None or seen < offline_before:
                row.state, row.updated_at = State.SKIPPED_OFFLINE, now
                row.detail = "deleted" if device.deleted_at else f"last seen {names.rfc3339(seen)}"
                continue
            order = base.with_rotation_id(row.rotation_id or campaign.rotation_id)
            try:
                async with session.begin_nested():
                    order = await rotate_certs.trigger(
                        session, device, order, reason=_reason(campaign), actor=self.actor
                    )
            except config_admin.ConfigLockedError:
                # Mid key change: it must not get another rotation now; try on a later tick.
                row.detail, row.updated_at = "waiting: the device is changing its key", now
                continue
            row.state, row.detail = State.TRIGGERED, None
            row.rotation_id, row.old_cert_id = order.rotation_id, device.current_cert_id
            row.attempts += 1
            row.triggered_at = row.updated_at = now

    async def _finish_if_done(
        self, session: AsyncSession, campaign: Campaign, now: dt.datetime
    ) -> None:
        if await rows.has_devices_in(session, campaign.id, rows.OPEN_STATES):
            return
        counts = (await rows.state_counts(session, [campaign.id]))[campaign.id]
        _set_status(campaign, CampaignStatus.COMPLETED, None, now)
        done = {state.value: 0 for state in DONE_STATES}
        for (state, _), n in counts.items():
            done[state] = done.get(state, 0) + n
        await _changed(session, campaign, protocol.CAMPAIGN_COMPLETED, self.actor, counts=done)


def _failure_rate_exceeded(campaign: Campaign, counts: dict[tuple[str, bool], int]) -> str:
    """Why to abort if the failed share of the devices tried is above the threshold."""
    failed = sum(n for (state, _), n in counts.items() if state == State.FAILED)
    tried = sum(n for (state, _), n in counts.items() if state in TRIED_STATES)
    if failed and failed / tried > campaign.failure_threshold:
        return (
            f"{failed} of {tried} devices tried failed ({failed / tried:.0%}), more than "
            f"the failure threshold of {campaign.failure_threshold:.0%}"
        )
    return ""


def _canaries_out(counts: dict[tuple[str, bool], int]) -> bool:
    """True while a canary is still pending, triggered or in progress."""
    return any(n for (state, canary), n in counts.items() if canary and state in rows.OPEN_STATES)


def _verdict(
    campaign: Campaign, active: ActiveDevice, now: dt.datetime
) -> tuple[str, str | None] | None:
    """The state a triggered device moves to now, with why; None if it stays."""
    row = active.row
    if active.current_cert_id is not None and active.current_cert_id != row.old_cert_id:
        if campaign.to_ca_id is not None and active.current_issuer_id != campaign.to_ca_id:
            return State.FAILED, "its new certificate is not from the campaign's new CA"
        return State.COMPLETED, None
    if active.update_status == "failed":
        return State.FAILED, "the device reported the rotation failed"
    deadline = campaign.canary_deadline_s if row.canary else campaign.device_deadline_s
    if row.triggered_at is not None and now - row.triggered_at > dt.timedelta(seconds=deadline):
        return State.FAILED, f"{LATE} {_span(deadline)}"
    if active.update_status is not None and row.state == State.TRIGGERED:
        return State.IN_PROGRESS, None
    return None


# -- helpers --------------------------------------------------------------------------------


async def _breach_cas(
    session: AsyncSession, factory_id: int, selector: Selector
) -> tuple[Ca | None, Ca | None]:
    """(old CA, new CA) rows of a breach campaign, checked; (None, None) otherwise."""
    if selector.reissue_from_ca is None or selector.to_ca is None:
        return None, None
    old = await _ca(session, factory_id, selector.reissue_from_ca)
    new = await _ca(session, factory_id, selector.to_ca)
    if old.kind not in (CaKind.ONLINE, CaKind.LOCAL):
        raise CampaignError(f"{old.name} is a {old.kind} certificate, not a device CA")
    if old.status != CaStatus.ACTIVE:
        raise CampaignError(
            f"device CA {old.name} is {old.status}: the EST server refuses renewals from its "
            "devices, so they cannot rotate away from it; run the campaign before disabling "
            "or revoking the CA (its devices now need a bootstrap credential)"
        )
    if new.id == old.id:
        raise CampaignError("--to-ca must differ from --reissue-from-ca")
    issuing = issuing_online_ca(await cas.list_cas(session, factory_id))
    if issuing is None or new.id != issuing.id:
        now_issuing = f"; it issues with {issuing.name} now" if issuing else ""
        raise CampaignError(
            f"--to-ca {new.name}: devices renew with the online CA the server issues with "
            f"(the newest active one, made by `keys ca new-online-ca`){now_issuing}"
        )
    return old, new


async def _ca(session: AsyncSession, factory_id: int, name: str) -> Ca:
    try:
        return await cas.get_ca_by_name(session, factory_id, name)
    except NotFoundError as exc:
        known = ", ".join(c.name for c in await cas.list_cas(session, factory_id))
        raise CampaignError(f"no CA named {name!r} (known: {known})") from exc


def _pick_canaries(devices: list[str], share: float) -> list[str]:
    """A share of the devices (at least one when the share is above 0), spread over the fleet.

    Chosen by a hash of the uuid, not at random, so that a dry run shows the
    canaries the real run will take.
    """
    if share <= 0:
        return []
    count = min(len(devices), max(1, math.ceil(len(devices) * share)))
    ranked = sorted(devices, key=lambda uuid: hashlib.sha256(uuid.encode()).digest())
    return sorted(ranked[:count])


def _nothing_to_do(selector: Selector, busy: dict[str, int]) -> str:
    if busy:
        ids = ", ".join(str(c) for c in sorted(set(busy.values())))
        return f"every chosen device is already in an open campaign ({ids}); wait or abort it"
    if selector.group is not None:
        return f"group {selector.group!r} has no devices"
    if selector.reissue_from_ca is not None:
        return f"no device's current certificate was issued by {selector.reissue_from_ca}"
    return "the factory has no devices"


async def _unique_rotation(session: AsyncSession, order: RotationOrder) -> RotationOrder:
    # Two campaigns created in the same second would share certs-<second>.
    rotation = order.rotation_id
    while await rows.rotation_id_taken(session, rotation):
        rotation = rotate_certs.next_rotation_id(rotation)
    return order.with_rotation_id(rotation)


async def _campaign(session: AsyncSession, campaign_id: int, *, lock: bool = False) -> Campaign:
    try:
        return await rows.get_campaign(session, campaign_id, lock=lock)
    except NotFoundError as exc:
        raise UnknownCampaign(
            f"no campaign {campaign_id} (see `certfleet campaigns list`)"
        ) from exc


def _set_status(
    campaign: Campaign, status: CampaignStatus, why: str | None, now: dt.datetime | None = None
) -> None:
    moment = now or utcnow()
    campaign.status, campaign.status_reason, campaign.updated_at = status, why, moment
    if status in (CampaignStatus.ABORTED, CampaignStatus.COMPLETED):
        campaign.finished_at = moment


async def _changed(
    session: AsyncSession, campaign: Campaign, topic: str, actor: str, **details: Any
) -> None:
    """Outbox event and audit entry for a campaign change, in the caller's transaction."""
    payload = _payload(campaign, actor=actor, **details)
    await outbox.append_event(session, topic, payload)
    action = "campaign." + topic.removeprefix("CAMPAIGN_").lower()
    await audit.append_audit(
        session, actor=actor, action=action, target=f"campaign:{campaign.id}", details=payload
    )


def _payload(campaign: Campaign, **details: Any) -> dict[str, Any]:
    return {
        "campaign": campaign.id,
        "rotation_id": campaign.rotation_id,
        "status": campaign.status,
        "reason": campaign.status_reason,
        "time": names.rfc3339(utcnow()),
        **details,
    }


def _order(campaign: Campaign) -> RotationOrder:
    return RotationOrder(
        campaign.est_server, campaign.rotation_id, campaign.pkey_ids, campaign.cert_ids
    )


def _reason(campaign: Campaign) -> str:
    return f"campaign {campaign.id}: {campaign.reason}"


def _span(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


async def _view(session: AsyncSession, campaign: Campaign, *, devices: int = 0) -> CampaignView:
    counts = (await rows.state_counts(session, [campaign.id]))[campaign.id]
    view = _view_of(campaign, counts)
    if devices:
        listed = await rows.campaign_devices(session, campaign.id, limit=devices)
        view.devices.extend(
            {
                "device": d.device_uuid,
                "canary": d.canary,
                "state": d.state,
                "rotation_id": d.rotation_id,
                "attempts": d.attempts,
                "triggered_at": names.rfc3339(d.triggered_at) if d.triggered_at else None,
                "detail": d.detail,
            }
            for d in listed
        )
    return view


def _view_of(campaign: Campaign, counts: dict[tuple[str, bool], int]) -> CampaignView:
    totals = {state.value: 0 for state in State}
    canaries = {state.value: 0 for state in State}
    for (state, canary), n in counts.items():
        totals[state] += n
        if canary:
            canaries[state] += n
    settings = {
        "canary_share": campaign.canary_share,
        "rate_per_minute": campaign.rate_per_minute,
        "failure_threshold": campaign.failure_threshold,
        "canary_deadline": _span(campaign.canary_deadline_s),
        "device_deadline": _span(campaign.device_deadline_s),
        "offline_after": _span(campaign.offline_after_s),
        "est_server": campaign.est_server,
        "pkey_ids": campaign.pkey_ids,
        "cert_ids": campaign.cert_ids,
    }
    return CampaignView(
        campaign.id,
        campaign.rotation_id,
        campaign.status,
        campaign.status_reason,
        campaign.reason,
        dict(campaign.selector),
        settings,
        campaign.created_at,
        campaign.finished_at,
        totals,
        canaries,
    )


@dataclass(frozen=True)
class RunnerSettings:
    """The [campaigns] table of the server's settings."""

    enabled: bool = True
    tick_interval: float = 5.0


def runner_settings(table: dict[str, Any] | None) -> RunnerSettings:
    """Read [campaigns]; ValueError names a setting that cannot work."""
    values = dict(table or {})
    unknown = sorted(set(values) - {"enabled", "tick_interval"})
    if unknown:
        raise ValueError(f"unknown setting(s) in [campaigns]: {', '.join(unknown)}")
    enabled = values.get("enabled", True)
    interval = values.get("tick_interval", 5.0)
    if not isinstance(enabled, bool):
        raise ValueError("campaigns.enabled must be true or false")
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        raise ValueError("campaigns.tick_interval must be a number of seconds")
    if not 0.1 <= interval <= 3600:
        raise ValueError(f"campaigns.tick_interval {interval} must be between 0.1 and 3600 s")
    return RunnerSettings(enabled, float(interval))
