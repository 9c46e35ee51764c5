"""Which device a verified client certificate is, and whether it may connect now.

Checks, in this order (every refusal is a 403 with its reason):

1. the certificate is on the deny-list (the in-memory set: no query);
2. its device CA was revoked;
3. it is the device's current certificate: accepted (one query);
4. it is new to a known device: accepted only if its key is the next key the
   device announced (PATCH /device); then, in one transaction, it becomes
   current, the old one and any other active certificate of the device (issued
   for a rotation that never finished) are superseded and deny-listed, and the
   config lock is lifted. Any other key is refused, and an alert event is
   committed on its own;
5. its device is unknown: registered on first use if an active device CA of
   the factory issued it; a disabled CA registers nothing;
6. a deleted device is refused whatever it presents.

TLS already refused expired and untrusted certificates; dates, subject and
factory are checked again so that nothing here depends on how TLS was set up.

Check-ins read the device with the store's hot path (`checked_in`, one query
that takes no write lock) and leave the result in a per-worker cache
(`recent`), which a 304 answer reads instead of the store until the store's
change counter moves (see config.CheckinCache). last_seen_at is queued and
written in batches (store/seen_writer.py). Requests that change the device
use `current` inside their own ORM transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events import names
from certfleet.pki.authority import FactoryAuthority
from certfleet.pki.csr import name_text
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import check_public_key, pubkey_sha256, public_key_pem
from certfleet.store import audit, cas, certificates, denylist, devices, factories, outbox
from certfleet.store.authorities import DEVICE_CA_KINDS
from certfleet.store.engine import Store
from certfleet.store.errors import DuplicateError, NotFoundError
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import (
    Ca,
    CaKind,
    CaStatus,
    Certificate,
    CertStatus,
    Device,
    RegisteredVia,
    utcnow,
)
from certfleet.store.seen_writer import SeenWriter

from .config import CachedCheckin, CheckinCache
from .denylist_cache import DenylistCache
from .errors import GatewayError, forbidden, no_client_cert

log = logging.getLogger(__name__)

ACTOR = "gateway"
# A device that keeps presenting a refused key raises one alert a minute, not one per request.
ALERT_EVERY_SECONDS = 60.0
ATTEMPTS = 3


@dataclass(frozen=True)
class DeviceIdentity:
    """The device a request comes from, as stored when the request began.

    `cert` is the device's current certificate: the one it connected with.
    """

    uuid: str
    factory: str
    factory_id: int
    group: str | None
    cert: x509.Certificate
    cert_id: int
    serial: str
    sha256: str
    pubkey_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    registered_via: str
    created_at: dt.datetime
    next_pubkey_sha256: str | None
    config_locked: bool
    # When a config file that applies to the device last changed; read only when asked for.
    config_changed: dt.datetime | None = None

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The device's current public key (EC: checked when the certificate was first seen)."""
        return cast(ec.EllipticCurvePublicKey, self.cert.public_key())


@dataclass(frozen=True)
class Claim:
    """What a client certificate says about itself, before the store is asked."""

    cert: x509.Certificate
    digest: bytes
    uuid: str
    factory: str
    factory_id: int

    @property
    def sha256(self) -> str:
        return self.digest.hex()

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:x}"

    @property
    def pubkey_sha256(self) -> str:
        return pubkey_sha256(self.cert.public_key())  # type: ignore[arg-type]


class _Refused(Exception):
    """A refusal whose alert event is committed although the request's transaction is not."""

    def __init__(
        self, error: GatewayError, topic: str, payload: dict[str, Any], device_uuid: str
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.topic = topic
        self.payload = payload
        self.device_uuid = device_uuid


class _Raced(Exception):
    """Another request changed the device first; resolve again."""


class IdentityResolver:
    """Resolves client certificates to devices of the factories in `authorities`."""

    def __init__(
        self,
        store: Store,
        authorities: Mapping[str, FactoryAuthority],
        denied: DenylistCache,
        *,
        seen_every: float = 60.0,
    ) -> None:
        self.store = store
        self.factories = sorted(authorities)
        self.denied = denied
        self.seen_every = dt.timedelta(seconds=seen_every)
        self.seen = SeenWriter(store)
        self.recent = CheckinCache()
        self._factory_ids: dict[str, int] = {}
        self._ca_certs: dict[str, x509.Certificate] = {}
        self._alerted: dict[str, float] = {}

    async def current(
        self, session: AsyncSession, cert: x509.Certificate | None, *, with_config: bool = False
    ) -> DeviceIdentity | None:
        """The device whose current certificate `cert` is, or None if it is not current yet.

        None means `first_contact` decides (registration or key change); refusals
        raise GatewayError. One query in the caller's transaction, and
        `with_config` adds the config's last change to it.
        """
        claim = await self.claim(cert, session)
        row = await certificates.checkin(session, claim.sha256, with_config=with_config)
        me = _identity(claim, row, with_config)
        if me is not None and row is not None:
            await self._seen(session, claim.uuid, row.last_seen_at)
        return me

    async def checked_in(self, claim: Claim) -> DeviceIdentity | None:
        """`current` for a check-in: one read through the hot path; the result is cached."""
        row = await self.store.hot_path().checkin(claim.sha256)
        me = _identity(claim, row, with_config=True)
        if me is None or row is None:
            return None
        last_seen = self._mark_seen(claim.uuid, row.last_seen_at)
        self.recent.put(claim.digest, CachedCheckin(row.config_changed, last_seen, row.generation))
        return me

    def cached(self, claim: Claim) -> CachedCheckin | None:
        """What the last check-in of `claim`'s certificate read, if nothing changed since.

        The device counts as seen now, as after any check-in.
        """
        entry = self.recent.get(claim.digest, self.denied.generation)
        if entry is not None:
            entry.last_seen = self._mark_seen(claim.uuid, entry.last_seen)
        return entry

    def forget(self, sha256: str) -> None:
        """This process changed the device of certificate `sha256`: read it again next time."""
        self.recent.drop(bytes.fromhex(sha256))

    async def first_contact(self, cert: x509.Certificate | None) -> None:
        """Register the device of `cert`, or move it to the key of `cert`; GatewayError if not."""
        for _ in range(ATTEMPTS):
            try:
                async with self.store.transaction() as session:
                    claim = await self.claim(cert, session)
                    newly_denied = await self._first_contact(session, claim)
            except _Refused as refused:
                await self._alert(refused)
                raise refused.error from None
            except (_Raced, DuplicateError):
                continue  # a parallel request of the same device won; look again
            for sha256 in newly_denied:
                self.denied.add(sha256)
            return
        raise GatewayError(
            503, "busy", "the device's identity changed during this request several times; retry"
        )

    # -- what the certificate says ------------------------------------------------------

    async def claim(
        self, cert: x509.Certificate | None, session: AsyncSession | None = None
    ) -> Claim:
        """What `cert` says about itself; refusals that need no store (401, 403) are raised here.

        `session`: the caller's transaction, if it has one (used once per factory).
        """
        if cert is None:
            raise no_client_cert()
        digest = cert.fingerprint(hashes.SHA256())
        if self.denied.is_denied(digest):
            raise forbidden(
                "denied", f"device cert is on the deny-list (serial {cert.serial_number:x})"
            )
        _check_dates(cert)
        device_uuid, factory = _subject(cert)
        factory_id = await self._factory_id(factory, session)
        return Claim(cert, digest, device_uuid, factory, factory_id)

    async def _factory_id(self, factory: str, session: AsyncSession | None) -> int:
        if factory not in self.factories:
            served = ", ".join(f"'{name}'" for name in self.factories)
            raise forbidden(
                "other-factory",
                f"device cert is for factory '{factory}' (its OU); this gateway serves {served}",
            )
        if factory not in self._factory_ids:
            if session is None:
                async with self.store.transaction() as own:
                    row = await factories.get_factory(own, factory)
            else:
                row = await factories.get_factory(session, factory)
            self._factory_ids[factory] = row.id
        return self._factory_ids[factory]

    # -- first contact: registration or key change -----------------------------------------

    async def _first_contact(self, session: AsyncSession, claim: Claim) -> list[str]:
        """Decide about a certificate that is not its device's current one.

        Returns the fingerprints this deny-listed, for the caller to deny in
        memory once the transaction committed.
        """
        holder = await certificates.get_holder(session, claim.sha256)
        row, device, ca = holder if holder is not None else (None, None, None)
        if row is not None:
            device = _own_device(claim, row, device)
        else:
            device = await _find_device(session, claim.uuid)
        if device is not None:
            _check_device(claim, device.uuid, device.deleted_at, device.factory_id)
        if ca is None:
            ca = await self._issuer(session, claim)
        _check_issuer(ca.name, ca.status, ca.status_changed_at)
        _check_key(claim)
        if device is None:
            await self._register(session, claim, ca)
            return []
        if row is not None and device.current_cert_id == row.id:
            return []  # a parallel request made it current already
        if row is not None and row.status != CertStatus.ACTIVE:
            raise forbidden(
                "cert-replaced",
                f"device cert (serial {row.serial}) was {row.status}; "
                "connect with the device's current certificate",
            )
        if claim.pubkey_sha256 != device.next_pubkey_sha256:
            raise self._wrong_key(claim, device)
        return await self._change_key(session, claim, device, row, ca)

    async def _issuer(self, session: AsyncSession, claim: Claim) -> Ca:
        for ca in await cas.list_cas(session, claim.factory_id):
            if ca.kind in DEVICE_CA_KINDS and _issued_by(claim.cert, self._ca_cert(ca)):
                return ca
        raise forbidden(
            "unknown-issuer",
            f"device cert (issuer {name_text(claim.cert.issuer)}) was not issued by a device CA "
            f"of factory '{claim.factory}'",
        )

    def _ca_cert(self, ca: Ca) -> x509.Certificate:
        if ca.sha256 not in self._ca_certs:
            self._ca_certs[ca.sha256] = x509.load_pem_x509_certificate(ca.cert_pem.encode())
        return self._ca_certs[ca.sha256]

    async def _register(self, session: AsyncSession, claim: Claim, ca: Ca) -> None:
        if ca.status == CaStatus.DISABLED:
            raise forbidden(
                "ca-disabled", f"device CA {ca.name} is disabled: it registers no new devices"
            )
        via = RegisteredVia.LOCAL_CA if ca.kind == CaKind.LOCAL else RegisteredVia.ONLINE
        await record_device_certificate(
            session,
            claim.cert,
            device_uuid=claim.uuid,
            factory_id=claim.factory_id,
            issuer_ca_id=ca.id,
            request="gateway:first-use",
            registered_via=via,
            make_current=True,
        )
        now = utcnow()
        await devices.mark_seen(session, claim.uuid, now)
        details = {"ca": ca.name, "serial": claim.serial, "sha256": claim.sha256}
        payload = {
            "uuid": claim.uuid,
            "factory": claim.factory,
            "group": None,
            "time": names.rfc3339(now),
            "registered_via": str(via),
            **details,
        }
        await outbox.append_event(session, names.DEVICE_REGISTERED, payload, device_uuid=claim.uuid)
        await audit.append_audit(
            session, actor=ACTOR, action="device.register", target=claim.uuid, details=details
        )
        log.info("device %s registered on first use (CA %s)", claim.uuid, ca.name)

    async def _change_key(
        self,
        session: AsyncSession,
        claim: Claim,
        device: Device,
        row: Certificate | None,
        ca: Ca,
    ) -> list[str]:
        old_id = device.current_cert_id
        old = await certificates.get_certificate_by_id(session, old_id) if old_id else None
        if row is None:
            row = await record_device_certificate(
                session,
                claim.cert,
                device_uuid=claim.uuid,
                factory_id=claim.factory_id,
                issuer_ca_id=ca.id,
                request="gateway:key-change",
            )
        switched = await devices.switch_current_certificate(
            session, claim.uuid, old_cert_id=old_id, new_cert_id=row.id
        )
        if not switched:
            raise _Raced
        now = utcnow()
        await devices.mark_seen(session, claim.uuid, now)
        denied: list[str] = []
        kept = [row.id]
        if old is not None:
            denied.append(await _supersede(session, old, claim.uuid, "replaced by key change"))
            kept.append(old.id)
        # What EST issued for rotations that never finished (a lost answer's repeat, a
        # key the device dropped). After the switch, so only the request that won does it.
        unused = await certificates.active_device_certificates(
            session, claim.uuid, kept, valid_at=now
        )
        reason = f"unused: issued for a rotation, replaced by key change to {claim.serial}"
        denied += [await _supersede(session, cert, claim.uuid, reason) for cert in unused]
        payload = {
            "uuid": claim.uuid,
            "group": device.group_name,
            "time": names.rfc3339(now),
            "old_pubkey": _pubkey_pem(old),
            "new_pubkey": public_key_pem(claim.cert.public_key()),  # type: ignore[arg-type]
        }
        await outbox.append_event(
            session, names.DEVICE_PUBKEY_CHANGE, payload, device_uuid=claim.uuid
        )
        await audit.append_audit(
            session,
            actor=ACTOR,
            action="device.key-change",
            target=claim.uuid,
            details={
                "old_sha256": old.sha256 if old else None,
                "new_sha256": claim.sha256,
                "unused_serials": [cert.serial for cert in unused],
            },
        )
        log.info(
            "device %s changed its key (cert serial %s); %d unused certificate(s) denied",
            claim.uuid,
            claim.serial,
            len(unused),
        )
        return denied

    def _wrong_key(self, claim: Claim, device: Device) -> _Refused:
        announced = device.next_pubkey_sha256
        if announced:
            detail = f"announced key sha256 {announced[:16]}…, this key {claim.pubkey_sha256[:16]}…"
        else:
            detail = "the device announced no next key with PATCH /device"
        error = forbidden(
            "not-next-key",
            f"this certificate's key is not the next key the device announced ({detail})",
        )
        payload = {
            "uuid": claim.uuid,
            "group": device.group_name,
            "time": names.rfc3339(utcnow()),
            "serial": claim.serial,
            "sha256": claim.sha256,
            "pubkey_sha256": claim.pubkey_sha256,
            "announced_pubkey_sha256": announced,
            "reason": error.message,
        }
        return _Refused(error, names.NEXT_KEY_REFUSED, payload, claim.uuid)

    async def _alert(self, refused: _Refused) -> None:
        key = refused.payload.get("sha256", "")
        now = time.monotonic()
        if now - self._alerted.get(key, -ALERT_EVERY_SECONDS) < ALERT_EVERY_SECONDS:
            return
        if len(self._alerted) > 10000:
            self._alerted.clear()
        self._alerted[key] = now
        async with self.store.transaction() as session:
            await outbox.append_event(
                session, refused.topic, refused.payload, device_uuid=refused.device_uuid
            )
        log.warning("alert %s for device %s: %s", refused.topic, refused.device_uuid, refused)

    async def _seen(
        self, session: AsyncSession, device_uuid: str, last_seen: dt.datetime | None
    ) -> None:
        # A write on every request would make each 304 check-in a write transaction;
        # a minute is all the precision the fleet view needs, and the time was just
        # read with the device, so deciding costs nothing. Several processes may
        # each write once.
        now = utcnow()
        if last_seen is None or now - last_seen >= self.seen_every:
            await devices.mark_seen(session, device_uuid, now)

    def _mark_seen(self, device_uuid: str, last_seen: dt.datetime | None) -> dt.datetime | None:
        """Queue a last_seen_at write if one is due (see _seen); the time it will hold."""
        now = utcnow()
        if last_seen is None or now - last_seen >= self.seen_every:
            self.seen.mark(device_uuid, now)
            return now
        return last_seen


def _identity(claim: Claim, row: Any, with_config: bool) -> DeviceIdentity | None:
    """The device of `claim` from its check-in row, None if the certificate is not current.

    `row` has the columns of store.certificates.checkin (an ORM row or a
    hot_rows.CheckinRow).
    """
    if row is None or row.factory_id is None or row.device_uuid != claim.uuid:
        return None  # first_contact refuses a certificate of another device
    _check_device(claim, claim.uuid, row.deleted_at, row.factory_id)
    _check_issuer(row.ca_name, row.ca_status, row.ca_status_changed_at)
    if row.current_cert_id != row.cert_id:
        return None
    return DeviceIdentity(
        uuid=claim.uuid,
        factory=claim.factory,
        factory_id=claim.factory_id,
        group=row.group_name,
        cert=claim.cert,
        cert_id=row.cert_id,
        serial=row.serial,
        sha256=claim.sha256,
        pubkey_sha256=row.pubkey_sha256,
        not_before=row.not_before,
        not_after=row.not_after,
        registered_via=row.registered_via,
        created_at=row.created_at,
        next_pubkey_sha256=row.next_pubkey_sha256,
        config_locked=row.config_locked,
        config_changed=row.config_changed if with_config else None,
    )


def _subject(cert: x509.Certificate) -> tuple[str, str]:
    """(device uuid, factory) from `CN=<uuid>, OU=<factory>`; 403 if the subject is not that."""
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(common_names) != 1 or len(units) != 1:
        raise forbidden(
            "subject",
            f"device cert subject {name_text(cert.subject)} must have one CN (the device uuid) "
            "and one OU (the factory)",
        )
    value = str(common_names[0].value)
    try:
        canonical = str(uuid_module.UUID(value))
    except ValueError:
        canonical = None
    if canonical != value:
        raise forbidden("subject", f"device cert CN {value!r} is not a device uuid")
    return value, str(units[0].value)


def _check_dates(cert: x509.Certificate) -> None:
    now = utcnow()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise forbidden(
            "cert-not-yet-valid",
            f"device cert is not valid yet: valid from {_when(start)} to {_when(end)}; "
            "check the device's clock",
        )
    if now > end:
        raise forbidden(
            "cert-expired",
            f"device cert expired at {_when(end)} (valid from {_when(start)}); "
            "the device needs a new certificate",
        )


def _check_key(claim: Claim) -> None:
    try:
        check_public_key(claim.cert.public_key())
    except PkiError as exc:
        raise forbidden("key-type", f"device cert: {exc}") from exc


def _own_device(claim: Claim, row: Certificate, device: Device | None) -> Device:
    if device is None or row.device_uuid != claim.uuid:
        owner = row.device_uuid or "no device"
        raise forbidden(
            "not-this-device",
            f"device cert (serial {row.serial}) is recorded for {owner}, not for CN {claim.uuid}",
        )
    return device


def _check_device(
    claim: Claim, device_uuid: str, deleted_at: dt.datetime | None, factory_id: int
) -> None:
    if deleted_at is not None:
        raise forbidden(
            "device-deleted",
            f"device {device_uuid} was deleted at {_when(deleted_at)}; it may not connect any more",
        )
    if factory_id != claim.factory_id:
        raise forbidden(
            "other-factory",
            f"device {device_uuid} belongs to another factory than '{claim.factory}'",
        )


def _check_issuer(name: str | None, status: str | None, changed_at: dt.datetime | None) -> None:
    if status == CaStatus.REVOKED:
        raise forbidden(
            "ca-revoked",
            f"device cert was issued by device CA '{name}', which was revoked at "
            f"{_when(changed_at)}; the device needs a certificate from an active CA",
        )


async def _find_device(session: AsyncSession, device_uuid: str) -> Device | None:
    try:
        return await devices.get_device(session, device_uuid, include_deleted=True)
    except NotFoundError:
        return None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


async def _supersede(
    session: AsyncSession, cert: Certificate, device_uuid: str, reason: str
) -> str:
    """Mark `cert` superseded and deny-list it (DENYLIST_ADDED if new); its fingerprint."""
    await certificates.set_certificate_status(session, cert.id, CertStatus.SUPERSEDED)
    await denylist.deny_with_event(
        session, cert.sha256, reason=reason, serial=cert.serial, device_uuid=device_uuid
    )
    return cert.sha256


def _pubkey_pem(row: Certificate | None) -> str | None:
    if row is None:
        return None
    cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
    return public_key_pem(cert.public_key())  # type: ignore[arg-type]


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "an unknown time"
