"""Gateway decisions, free of HTTP: what a device may read and change, and what is recorded.

`app.py` turns requests into calls here and `GatewayError` into refusals.
Each call resolves the device from its client certificate (`identity.py`)
and does its work in the same store transaction, so a refused request rolls
back and writes nothing; events for the outbox are appended in that
transaction too. Bodies arrive as bytes and are parsed after the identity
check, so an unknown or refused device learns nothing about its body.

Read-only calls (the config check-in, GET /device) skip the ORM: one read on
the store's hot path, and a config check-in whose answer is 304 is usually
answered from the per-worker cache with no store access at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events import names
from certfleet.pki.authority import FactoryAuthority
from certfleet.protocol import NEXT_KEY_ACTION, NEXT_KEY_WITHDRAWN_ACTION, ROTATION_PREFIXES
from certfleet.store import audit, config_files, devices, outbox, updates
from certfleet.store.config_files import ConfigValue
from certfleet.store.engine import Store
from certfleet.store.schema import ConfigScope, UpdateStatus, utcnow

from . import config, wire
from .denylist_cache import DenylistCache
from .errors import GatewayError, bad_request, conflict
from .identity import Claim, DeviceIdentity, IdentityResolver
from .policy import GatewayPolicy

T = TypeVar("T")
Work = Callable[[AsyncSession, DeviceIdentity], Awaitable[T]]

ROTATION_COMPLETED = "CertRotationCompleted"


@dataclass(frozen=True)
class ConfigAnswer:
    """A config response: 200 with `files`, or 304 (files None); `last_modified` if any."""

    status: int
    last_modified: dt.datetime | None
    files: dict[str, Any] | None


class GatewayService:
    """The device API for the factories in `authorities`, over one store."""

    def __init__(
        self,
        store: Store,
        authorities: Mapping[str, FactoryAuthority],
        policy: GatewayPolicy | None = None,
        denied: DenylistCache | None = None,
    ) -> None:
        if not authorities:
            raise ValueError("the gateway needs at least one factory")
        self.store = store
        self.authorities = dict(authorities)
        self.policy = policy or GatewayPolicy()
        self.denied = denied or DenylistCache(
            store,
            poll_every=self.policy.denylist_poll_seconds,
            reload_every=self.policy.denylist_reload_seconds,
        )
        self.identity = IdentityResolver(
            store, self.authorities, self.denied, seen_every=self.policy.seen_every_seconds
        )

    async def start(self) -> None:
        """Load the deny-list and start keeping it fresh; call before serving."""
        await self.denied.start()
        await self.identity.seen.start()

    async def close(self) -> None:
        """Stop the background work; queued last-seen times are written."""
        await self.denied.stop()
        await self.identity.seen.stop()

    async def identify(self, cert: x509.Certificate | None) -> DeviceIdentity:
        """The device of `cert`, registering it or switching its key if that is due."""
        return await self._checked_in(await self.identity.claim(cert))

    # -- the device itself ------------------------------------------------------------------

    async def device(self, cert: x509.Certificate | None) -> dict[str, Any]:
        """GET /device: the device's own view of itself."""
        return _view(await self.identify(cert))

    async def announce_next_key(self, cert: x509.Certificate | None, body: bytes) -> dict[str, Any]:
        """PATCH /device: record the next key and lock the device's config until it is used."""

        async def work(session: AsyncSession, me: DeviceIdentity) -> dict[str, Any]:
            wanted = wire.next_key_request(wire.parse_json(body))
            if wanted.sha256 == me.pubkey_sha256:
                raise bad_request(
                    "same-key",
                    "next_pubkey is the key of the certificate this request came with; "
                    "announce a newly generated key",
                )
            announced = me.next_pubkey_sha256
            if announced not in (None, wanted.sha256) and not wanted.replace:
                raise conflict(
                    "other-next-key",
                    f"another next key (sha256 {announced[:16]}…) is announced already; "
                    'send "replace": true to announce this one instead',
                )
            if announced != wanted.sha256:
                await devices.set_next_key(session, me.uuid, wanted.pem, wanted.sha256)
                me = dataclasses.replace(me, next_pubkey_sha256=wanted.sha256, config_locked=True)
                await audit.append_audit(
                    session,
                    actor=f"device:{me.uuid}",
                    action=NEXT_KEY_ACTION,
                    target=me.uuid,
                    details={"pubkey_sha256": wanted.sha256, "replaced": announced},
                )
            return await _device_view(session, me)

        return await self._as_device(cert, work)

    async def withdraw_next_key(
        self, cert: x509.Certificate | None, pubkey_sha256: str
    ) -> dict[str, Any]:
        """DELETE /device/next-key: take back the announced next key and unlock the config.

        For a rotation that failed or was abandoned. Naming the key keeps a late
        or repeated withdrawal from undoing a newer announcement; withdrawing
        when nothing is announced changes nothing.
        """

        async def work(session: AsyncSession, me: DeviceIdentity) -> dict[str, Any]:
            announced = me.next_pubkey_sha256
            if announced is None:
                return {**_view(me), "withdrawn": False}
            if announced != pubkey_sha256:
                raise conflict(
                    "other-next-key",
                    f"the announced next key is sha256 {announced[:16]}…, not "
                    f"{pubkey_sha256[:16]}…; nothing withdrawn",
                )
            if not await devices.withdraw_next_key(session, me.uuid, pubkey_sha256):
                raise conflict(
                    "other-next-key", "the announced next key changed meanwhile; nothing withdrawn"
                )
            await audit.append_audit(
                session,
                actor=f"device:{me.uuid}",
                action=NEXT_KEY_WITHDRAWN_ACTION,
                target=me.uuid,
                details={"pubkey_sha256": pubkey_sha256},
            )
            me = dataclasses.replace(me, next_pubkey_sha256=None, config_locked=False)
            return {**_view(me), "withdrawn": True}

        return await self._as_device(cert, work)

    # -- config -----------------------------------------------------------------------------

    async def config(
        self, cert: x509.Certificate | None, if_modified_since: dt.datetime | None
    ) -> ConfigAnswer:
        """GET /config: merged files encrypted for the device, or 304 if it has them."""

        claim = await self.identity.claim(cert)
        known = self.identity.cached(claim)
        if known is not None:
            now = utcnow()
            current = config.version(known.config_changed, now)
            if config.not_modified(if_modified_since, current, now):
                return ConfigAnswer(304, current, None)
        me = await self._checked_in(claim)
        now = utcnow()
        current = config.version(me.config_changed, now)
        if config.not_modified(if_modified_since, current, now):
            return ConfigAnswer(304, current, None)
        hot = self.store.hot_path()
        rows = await hot.config_files(me.factory_id, me.group, me.uuid)
        # ECDH per value: no store connection is held meanwhile.
        return ConfigAnswer(200, current, config.render(config.merge(rows), me.public_key))

    async def device_config(self, cert: x509.Certificate | None) -> ConfigAnswer:
        """GET /config-device: the device-scope files as stored (encrypted to the device)."""

        async def work(session: AsyncSession, me: DeviceIdentity) -> ConfigAnswer:
            rows = await config_files.list_config_files(
                session, me.factory_id, ConfigScope.DEVICE, me.uuid
            )
            newest = max((row.updated_at for row in rows), default=None)
            return ConfigAnswer(200, config.version(newest, utcnow()), config.as_stored(rows))

        return await self._as_device(cert, work)

    async def upload_device_config(
        self, cert: x509.Certificate | None, body: bytes
    ) -> dict[str, Any]:
        """PATCH /config: replace the device-scope files with ones encrypted to the next key."""

        async def work(session: AsyncSession, me: DeviceIdentity) -> dict[str, Any]:
            upload = wire.config_upload(wire.parse_json(body))
            announced = me.next_pubkey_sha256
            if announced is None and upload.next_key.sha256 == me.pubkey_sha256:
                # A retry that arrives after the key change went through is
                # harmless if it would change nothing.
                if await _stored_device_files(session, me) == upload.files:
                    return {"device": me.uuid, "files": sorted(upload.files), "changed": False}
            if announced is None or upload.next_key.sha256 != announced:
                raise _upload_conflict(me, upload)
            log_entry = await config_files.replace_config_files(
                session,
                me.factory_id,
                ConfigScope.DEVICE,
                me.uuid,
                upload.files,
                changed_by=f"device:{me.uuid}",
                reason="device re-encrypted its config for its next key",
            )
            return {"device": me.uuid, "files": sorted(upload.files), "changed": bool(log_entry)}

        return await self._as_device(cert, work)

    async def config_applied(self, cert: x509.Certificate | None, body: bytes) -> dict[str, Any]:
        """POST /config/applied: the device reports which config version it applied."""

        async def work(session: AsyncSession, me: DeviceIdentity) -> dict[str, Any]:
            version = wire.applied_version(wire.parse_json(body))
            payload = {
                "uuid": me.uuid,
                "group": me.group,
                "time": names.rfc3339(utcnow()),
                "version": version,
            }
            await outbox.append_event(
                session, names.DEVICE_CONFIG_APPLIED, payload, device_uuid=me.uuid
            )
            return {"device": me.uuid, "version": version}

        return await self._as_device(cert, work)

    # -- update events ----------------------------------------------------------------------

    async def post_events(self, cert: x509.Certificate | None, body: bytes) -> dict[str, Any]:
        """POST /events: store the device's update events in order, ignoring resent ones."""

        async def work(session: AsyncSession, me: DeviceIdentity) -> dict[str, Any]:
            events = wire.update_events(wire.parse_json(body), self.policy.max_events)
            stored = 0
            for event in events:
                stored += await _store_event(session, me, event)
            return {"device": me.uuid, "stored": stored, "duplicates": len(events) - stored}

        return await self._as_device(cert, work)

    # -- the device behind each request ------------------------------------------------------

    async def _as_device(self, cert: x509.Certificate | None, work: Work[T]) -> T:
        """Run `work` for the device of `cert` in one transaction with the identity check.

        The usual case, a device's current certificate, is one transaction. A
        certificate new to its device (registration, key change) is settled in
        transactions of its own first, then the work runs.
        """
        async with self.store.transaction() as session:
            me = await self.identity.current(session, cert)
            if me is not None:
                return await self._changing(session, me, work)
        await self.identity.first_contact(cert)
        async with self.store.transaction() as session:
            me = await self.identity.current(session, cert)
            if me is None:
                raise _changed_meanwhile()
            return await self._changing(session, me, work)

    async def _changing(self, session: AsyncSession, me: DeviceIdentity, work: Work[T]) -> T:
        # Whatever the work changes, this process reads the device afresh afterwards.
        self.identity.forget(me.sha256)
        try:
            return await work(session, me)
        finally:
            self.identity.forget(me.sha256)

    async def _checked_in(self, claim: Claim) -> DeviceIdentity:
        """The device of `claim` for a read-only request, after first contact if that is due."""
        me = await self.identity.checked_in(claim)
        if me is not None:
            return me
        await self.identity.first_contact(claim.cert)
        me = await self.identity.checked_in(claim)
        if me is None:
            raise _changed_meanwhile()
        return me


def _changed_meanwhile() -> GatewayError:
    return GatewayError(503, "busy", "the device's certificate changed during this request; retry")


async def _device_view(session: AsyncSession, me: DeviceIdentity) -> dict[str, Any]:
    return _view(me)


def _view(me: DeviceIdentity) -> dict[str, Any]:
    return {
        "uuid": me.uuid,
        "factory": me.factory,
        "group": me.group,
        "registered_via": me.registered_via,
        "created_at": names.rfc3339(me.created_at),
        "cert": {
            "serial": me.serial,
            "sha256": me.sha256,
            "pubkey_sha256": me.pubkey_sha256,
            "not_before": names.rfc3339(me.not_before),
            "not_after": names.rfc3339(me.not_after),
        },
        "next_pubkey_announced": me.next_pubkey_sha256 is not None,
        "next_pubkey_sha256": me.next_pubkey_sha256,
        "config_locked": me.config_locked,
    }


async def _stored_device_files(session: AsyncSession, me: DeviceIdentity) -> dict[str, ConfigValue]:
    rows = await config_files.list_config_files(session, me.factory_id, ConfigScope.DEVICE, me.uuid)
    return {row.name: ConfigValue(row.value, list(row.on_changed), row.unencrypted) for row in rows}


def _upload_conflict(me: DeviceIdentity, upload: wire.ConfigUpload) -> GatewayError:
    announced = me.next_pubkey_sha256
    if announced is None and upload.next_key.sha256 == me.pubkey_sha256:
        return conflict(
            "key-changed",
            "the key change to this key is complete; device config is uploaded only while "
            "a next key is announced (GET /config-device shows what is stored)",
        )
    if announced is None:
        return conflict(
            "no-next-key",
            "no next key is announced: PATCH /device with next_pubkey first; device config "
            "is uploaded only during a key change",
        )
    return conflict(
        "not-next-key",
        f"next_pubkey (sha256 {upload.next_key.sha256[:16]}…) is not the announced next key "
        f"(sha256 {announced[:16]}…)",
    )


async def _store_event(session: AsyncSession, me: DeviceIdentity, event: wire.EventIn) -> int:
    """Store one event; 1 if it is new, 0 if the device sent it before."""
    rotation = event.correlation_id.startswith(ROTATION_PREFIXES)
    update = await updates.start_update(
        session, me.uuid, event.correlation_id, kind="cert-rotation" if rotation else "update"
    )
    added = await updates.add_update_event(
        session,
        update.id,
        event_id=event.event_id,
        event_type=event.event_type,
        device_time=event.device_time,
        success=event.success,
        target_name=event.target_name,
        version=event.version,
        details=event.details,
    )
    if not added:
        return 0
    if event.event_type == ROTATION_COMPLETED and event.success is not None:
        outcome = UpdateStatus.SUCCEEDED if event.success else UpdateStatus.FAILED
        await updates.set_update_status(session, update.id, outcome)
    if rotation:
        await outbox.append_event(
            session, names.ROTATION_STEP, _step(me, event), device_uuid=me.uuid
        )
    return 1


def _step(me: DeviceIdentity, event: wire.EventIn) -> dict[str, Any]:
    return {
        "uuid": me.uuid,
        "group": me.group,
        "time": names.rfc3339(utcnow()),
        "device_time": names.rfc3339(event.device_time) if event.device_time else None,
        "rotation_id": event.correlation_id,
        "step": event.event_type,
        "success": event.success,
        "target": event.target_name,
    }
