"""EST decisions, free of HTTP: who may have which certificate, and what is recorded.

`app.py` turns requests into calls here and `EstError` into refusals. A refusal
is raised inside the store transaction, so it rolls back: a refused request
writes nothing. An issued certificate is recorded, with an audit row, in the
transaction that commits before the caller gets it.

Renewals and enrollments with a device certificate, the bulk of the traffic,
take the store's hot path: the client's row, deny-list state and both CAs in
one query, then signing and the three inserts, in one transaction and one
thread hop (store/hot_path.py). The CSR is checked before that transaction,
but its refusal is raised after the client checks, so a request with several
faults is refused for the same one as always. Bootstrap credentials and
manual approval, rare and slow anyway (scrypt, an operator), use the ORM.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.pki import profiles
from certfleet.pki.authority import FactoryAuthority, device_uuid_of
from certfleet.pki.csr import (
    CsrError,
    check_csr_signature,
    check_enroll_subject,
    check_key,
    check_reenroll,
    check_tls_unique,
    load_csr,
    name_text,
)
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import cert_sha256, generate_private_key, pubkey_sha256
from certfleet.pki.pkcs7 import certs_only
from certfleet.protocol import CERT_ISSUED, rfc3339
from certfleet.store import audit, cas, denylist, devices, est, factories, outbox
from certfleet.store.engine import Store
from certfleet.store.errors import DuplicateError, NotFoundError
from certfleet.store.hot_rows import ClientLookup, ClientRow, Issue, NewCertificate
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import (
    CaStatus,
    Certificate,
    CertStatus,
    EstCredential,
    EstPending,
    PendingStatus,
    RegisteredVia,
    utcnow,
)

from .csrattrs import device_csrattrs
from .errors import EstError, bad_request, forbidden, unauthorized
from .policy import EstPolicy

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class BasicCredentials:
    """HTTP Basic username and password; the password never appears in a repr or log."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class EstIdentity:
    """Who sent a request: what TLS (or a trusted proxy) and the Authorization header proved."""

    client_cert: x509.Certificate | None = None
    basic: BasicCredentials | None = None
    tls_unique: bytes | None = None
    tls_version: str | None = None
    peer: str = "-"
    request_id: str = "-"


@dataclass(frozen=True)
class Pending:
    """The request waits for the operator: answer 202 with Retry-After."""

    pending_id: int
    retry_after: int


@dataclass(frozen=True)
class _Request:
    """One EST operation as received: where it goes and who sent it."""

    operation: str
    authority: FactoryAuthority
    factory_id: int
    csr_der: bytes
    identity: EstIdentity

    @property
    def fingerprint(self) -> str:
        """What makes two requests identical for manual approval: label, operation, CSR."""
        head = f"{self.authority.factory}\0{self.operation}\0".encode()
        return hashlib.sha256(head + self.csr_der).hexdigest()

    @property
    def name(self) -> str:
        """The request as recorded with the certificate it caused."""
        return f"est:{self.operation}:{self.identity.request_id}"


@dataclass
class _Order:
    """A request that passed authorization and the CSR checks, ready to fill or hold."""

    request: _Request
    csr: x509.CertificateSigningRequest
    device_uuid: str
    make_current: bool = False
    credential: EstCredential | None = None
    # An earlier answer to the same request (idempotent retry).
    previous: x509.Certificate | None = None
    server_key: ec.EllipticCurvePrivateKey | None = None
    # The CSR's key, checked once (signature, type) before the order was made.
    public_key: ec.EllipticCurvePublicKey | None = None


@dataclass(frozen=True)
class _CheckedCsr:
    """A device-certificate request's CSR after every check that needs no store.

    `error` is the first refusal, kept to be raised after the client checks.
    `asked` is the device the CSR names (enrollment only).
    """

    csr: x509.CertificateSigningRequest | None = None
    public_key: ec.EllipticCurvePublicKey | None = None
    asked: str | None = None
    error: EstError | None = None


class EstService:
    """The EST operations for the factories in `authorities` (one CA label each)."""

    def __init__(
        self, store: Store, authorities: Mapping[str, FactoryAuthority], policy: EstPolicy
    ) -> None:
        if not authorities:
            raise ValueError("the EST server needs at least one factory")
        if policy.default_label is not None and policy.default_label not in authorities:
            raise ValueError(f"EST default label {policy.default_label!r} is not a factory here")
        self.store = store
        self.policy = policy
        self._factory_ids: dict[str, int] = {}
        self.use_authorities(authorities)

    def use_authorities(self, authorities: Mapping[str, FactoryAuthority]) -> None:
        """Issue with these from now on: a new online CA, or a CA's status changed."""
        self.authorities = dict(authorities)
        self._cacerts: dict[str, bytes] = {}
        self._issuers = {name: profiles.Issuer.of(a.issuing_ca) for name, a in authorities.items()}

    @property
    def labels(self) -> list[str]:
        """The CA labels served, which are factory names."""
        return sorted(self.authorities)

    def authority(self, label: str | None) -> FactoryAuthority:
        """The factory behind `label` (None: the default one); 404 if there is none."""
        if label is None:
            label = self.policy.default_label or self._only_label()
        found = self.authorities.get(label)
        if found is None:
            known = ", ".join(self.labels)
            raise EstError(404, "unknown-label", f"unknown CA label {label!r} (known: {known})")
        return found

    def _only_label(self) -> str:
        if len(self.authorities) == 1:
            return next(iter(self.authorities))
        raise EstError(
            404,
            "label-needed",
            f"this server has several CA labels ({', '.join(self.labels)}): "
            "use /.well-known/est/<label>/<operation>",
        )

    async def cacerts(self, label: str | None) -> bytes:
        """Certs-only PKCS#7 DER with the issuing CA and the root."""
        authority = self.authority(label)
        if authority.factory not in self._cacerts:
            self._cacerts[authority.factory] = certs_only(authority.chain())
        return self._cacerts[authority.factory]

    async def csrattrs(self, label: str | None) -> bytes:
        """DER CsrAttrs: EC P-256 with ECDSA, and challengePassword if tls-unique is required."""
        self.authority(label)
        return device_csrattrs(self.policy.require_tls_unique)

    async def simpleenroll(
        self, label: str | None, csr_der: bytes, identity: EstIdentity
    ) -> bytes | Pending:
        """Bootstrap (Basic credential) or own-subject (device cert) enrollment: PKCS#7 DER."""
        authority = self.authority(label)
        result = await self._enroll("simpleenroll", authority, csr_der, identity)
        return result if isinstance(result, Pending) else certs_only([result[0]])

    async def simplereenroll(
        self, label: str | None, csr_der: bytes, identity: EstIdentity
    ) -> bytes | Pending:
        """Renewal with the current device cert as TLS client cert: PKCS#7 DER."""
        authority = self.authority(label)
        current = identity.client_cert
        if current is None:
            raise unauthorized(
                "no-client-cert",
                "simplereenroll needs the device's current certificate as TLS client certificate",
            )
        request = await self._request("simplereenroll", authority, csr_der, identity)
        result = await self._by_client_cert(request, current)
        return result if isinstance(result, Pending) else certs_only([result[0]])

    async def serverkeygen(
        self, label: str | None, csr_der: bytes, identity: EstIdentity
    ) -> tuple[bytes, bytes] | Pending:
        """Like simpleenroll, but the key is made here: (PKCS#8 DER key, PKCS#7 DER cert)."""
        authority = self.authority(label)
        if not self.policy.serverkeygen_enabled:
            raise forbidden("serverkeygen-disabled", "serverkeygen is disabled on this server")
        result = await self._enroll("serverkeygen", authority, csr_der, identity)
        if isinstance(result, Pending):
            return result
        cert, key = result
        if key is None:  # _fill makes a key for every serverkeygen order
            raise RuntimeError("serverkeygen issued a certificate without a server key")
        key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_der, certs_only([cert])

    async def _enroll(
        self, operation: str, authority: FactoryAuthority, csr_der: bytes, identity: EstIdentity
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None] | Pending:
        if identity.basic is None and identity.client_cert is None:
            raise unauthorized(
                "no-credentials",
                f"{operation} needs HTTP Basic enrollment credentials "
                "(certfleet est credentials create) or a device certificate as TLS client cert",
            )
        request = await self._request(operation, authority, csr_der, identity)
        if identity.basic is None:
            assert identity.client_cert is not None
            return await self._by_client_cert(request, identity.client_cert)
        async with self.store.transaction() as session:
            order = await self._by_credential(session, request, identity.basic)
            return await self._fill(session, order)

    async def _request(
        self, operation: str, authority: FactoryAuthority, csr_der: bytes, identity: EstIdentity
    ) -> _Request:
        if authority.factory not in self._factory_ids:
            async with self.store.transaction() as session:
                row = await factories.get_factory(session, authority.factory)
            self._factory_ids[authority.factory] = row.id
        factory_id = self._factory_ids[authority.factory]
        return _Request(operation, authority, factory_id, csr_der, identity)

    # -- bootstrap enrollment with an operator-made credential --------------------------------

    async def _by_credential(
        self, session: AsyncSession, request: _Request, basic: BasicCredentials
    ) -> _Order:
        credential = await self._credential(session, basic)
        if credential.factory_id != request.factory_id:
            raise forbidden(
                "credential-other-factory",
                f"EST credential '{basic.username}' belongs to another factory than "
                f"'{request.authority.factory}'; use that factory's CA label",
            )
        csr, public_key = self._csr(request)
        try:
            check_enroll_subject(csr, credential.bound_subject)
        except CsrError as exc:
            raise forbidden(exc.code, str(exc)) from exc
        device_uuid = credential.bound_subject
        await self._check_new_device(session, request, device_uuid)
        order = _Order(request, csr, device_uuid, make_current=True, credential=credential)
        order.public_key = public_key
        if credential.used_at is not None:
            order.previous = await self._previous(session, order)
        return order

    async def _credential(self, session: AsyncSession, basic: BasicCredentials) -> EstCredential:
        row = await est.get_credential(session, basic.username)
        stored = row.secret_hash if row else _unknown_user_hash()
        # scrypt takes tens of milliseconds: keep it off the event loop.
        matches = await asyncio.to_thread(est.check_secret, basic.password, stored)
        if row is None or not matches:
            raise unauthorized("bad-credentials", "EST username or password is wrong")
        if row.expires_at <= utcnow():
            raise unauthorized(
                "credential-expired",
                f"EST credential '{basic.username}' expired at {_when(row.expires_at)}; "
                "ask the operator for a new one (certfleet est credentials create)",
            )
        return row

    async def _check_new_device(
        self, session: AsyncSession, request: _Request, device_uuid: str
    ) -> None:
        try:
            device = await devices.get_device(session, device_uuid, include_deleted=True)
        except NotFoundError:
            return
        if device.deleted_at is not None:
            raise _deleted(device_uuid, device.deleted_at)
        if device.factory_id != request.factory_id:
            owner = await _factory_name(session, device.factory_id)
            raise _other_factory("device", owner, request)

    async def _previous(self, session: AsyncSession, order: _Order) -> x509.Certificate:
        """A used credential may only fetch again what it got, for the same key."""
        if order.request.operation == "simpleenroll":
            key_sha256 = pubkey_sha256(order.csr.public_key())  # type: ignore[arg-type]
            row = await est.enrolled_certificate(
                session, order.device_uuid, key_sha256, order.request.operation
            )
            if row is not None and await self._still_good(session, row):
                return x509.load_pem_x509_certificate(row.cert_pem.encode())
        raise EstError(
            409,
            "credential-used",
            f"credential already used to enroll {order.device_uuid}; "
            "renew with simplereenroll using the device certificate",
        )

    async def _still_good(self, session: AsyncSession, row: Certificate) -> bool:
        if row.status == CertStatus.REVOKED or row.not_after <= utcnow():
            return False
        return not await denylist.is_denied(session, row.sha256)

    # -- enrollment and renewal with a device certificate -----------------------------------

    async def _by_client_cert(
        self, request: _Request, current: x509.Certificate
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None] | Pending:
        """Enrollment or renewal with the device's current certificate as TLS client cert."""
        client_sha256 = cert_sha256(current)
        checked = self._checked_csr(request, current)
        lookup = ClientLookup(client_sha256, request.factory_id, request.authority.issuing_ca_id)
        hot = self.store.hot_path()
        if self.policy.manual_approval:
            order = self._client_order(await hot.client(lookup), request, checked)
            async with self.store.transaction() as session:
                return await self._fill(session, order)
        issued: list[tuple[x509.Certificate, _Order]] = []

        def decide(row: ClientRow | None) -> Issue:
            # Runs inside the store's write transaction (maybe in its thread).
            order = self._client_order(row, request, checked)
            _check_issuing_ca_row(row, request)
            cert = self._sign(order)
            issued.append((cert, order))
            return _issue_rows(order, cert, client_sha256)

        await hot.issue(lookup, decide)
        cert, order = issued[0]
        _log_issued(request, cert, order.device_uuid)
        return cert, order.server_key

    def _client_order(
        self, row: ClientRow | None, request: _Request, checked: _CheckedCsr
    ) -> _Order:
        """The order of a client that may have a certificate in this factory; refusals otherwise."""
        current = request.identity.client_cert
        assert current is not None
        known = _check_client(row, request, current)
        if checked.error is not None:
            raise checked.error
        assert checked.csr is not None
        if checked.asked is not None and checked.asked != known:
            raise forbidden(
                "not-own-subject",
                f"a device certificate may only enroll its own subject CN={known}; "
                f"the CSR asks for {name_text(checked.csr.subject)}",
            )
        return _Order(request, checked.csr, known, public_key=checked.public_key)

    # -- the CSR ---------------------------------------------------------------------------

    def _checked_csr(self, request: _Request, current: x509.Certificate) -> _CheckedCsr:
        """Every check of a device-certificate request's CSR, in the order they are refused."""
        try:
            csr, public_key = self._csr(request)
            if request.operation == "simplereenroll":
                _csr_check(check_reenroll, csr, current, self.policy.allow_same_key)
                return _CheckedCsr(csr, public_key)
            return _CheckedCsr(csr, public_key, _csr_check(device_uuid_of, csr))
        except EstError as exc:
            return _CheckedCsr(error=exc)

    def _csr(
        self, request: _Request
    ) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
        """Parse and check the CSR itself: signature, key type, tls-unique link."""
        csr, public_key = _csr_check(_load_checked_csr, request.csr_der)
        if self.policy.require_tls_unique:
            identity = request.identity
            if not identity.tls_unique:
                raise bad_request(
                    "tls-unique-unavailable",
                    "this server requires the tls-unique link of RFC 7030 §3.5, which only "
                    f"TLS 1.2 has (this connection: {identity.tls_version or 'no TLS 1.2'}); "
                    "connect with TLS 1.2 or ask the operator to turn require_tls_unique off",
                )
            _csr_check(check_tls_unique, csr, identity.tls_unique)
        return csr, public_key

    # -- filling, holding for approval, issuing ---------------------------------------------

    async def _fill(
        self, session: AsyncSession, order: _Order
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None] | Pending:
        if order.previous is not None:
            return order.previous, None
        if not self.policy.manual_approval:
            cert, _ = await self._issue(session, order)
            return cert, order.server_key
        held = await self._held(session, order)
        if held.status == PendingStatus.PENDING:
            return Pending(held.id, self.policy.retry_after)
        if held.status == PendingStatus.REJECTED:
            raise forbidden(
                "rejected",
                f"request {held.id} was rejected by the operator at {_when(held.decided_at)}",
            )
        if held.cert_id is not None:
            return await self._delivered(session, order, held), None
        cert, cert_id = await self._issue(session, order)
        await est.set_pending_certificate(session, held, cert_id)
        return cert, order.server_key

    async def _held(self, session: AsyncSession, order: _Order) -> EstPending:
        fingerprint = order.request.fingerprint
        held = await est.get_pending(session, fingerprint)
        if held is not None:
            return held
        csr_pem = order.csr.public_bytes(serialization.Encoding.PEM).decode()
        try:
            held = await est.add_pending(
                session,
                request_sha256=fingerprint,
                device_uuid=order.device_uuid,
                subject=name_text(order.csr.subject),
                csr_pem=csr_pem,
            )
        except DuplicateError:  # the same request arrived twice at once
            again = await est.get_pending(session, fingerprint)
            if again is None:
                raise
            return again
        log.info(
            "EST %s for %s held for approval as request %d (request id %s)",
            order.request.operation,
            order.device_uuid,
            held.id,
            order.request.identity.request_id,
        )
        return held

    async def _delivered(
        self, session: AsyncSession, order: _Order, held: EstPending
    ) -> x509.Certificate:
        if order.request.operation == "serverkeygen":
            raise EstError(
                409,
                "key-delivered",
                f"request {held.id} already received its server-generated key, which is not "
                "kept; send a newly signed CSR to get another",
            )
        row = await est.get_certificate_by_id(session, held.cert_id or 0)
        return x509.load_pem_x509_certificate(row.cert_pem.encode())

    async def _issue(self, session: AsyncSession, order: _Order) -> tuple[x509.Certificate, int]:
        """Sign, record and audit; returns the certificate and its row id."""
        request = order.request
        authority = request.authority
        await _check_issuing_ca(session, request)
        cert = self._sign(order)
        if order.credential is not None and not await est.claim_credential(
            session, order.credential.id
        ):
            raise EstError(
                409,
                "credential-used",
                f"credential already used to enroll {order.device_uuid}; "
                "renew with simplereenroll using the device certificate",
            )
        row = await record_device_certificate(
            session,
            cert,
            device_uuid=order.device_uuid,
            factory_id=request.factory_id,
            issuer_ca_id=authority.issuing_ca_id,
            request=request.name,
            registered_via=RegisteredVia.EST,
            make_current=order.make_current,
        )
        await outbox.append_event(
            session,
            CERT_ISSUED,
            {
                "uuid": order.device_uuid,
                "serial": f"{cert.serial_number:x}",
                "sha256": row.sha256,
                "not_after": rfc3339(cert.not_valid_after_utc),
                "request": request.name,
            },
            device_uuid=order.device_uuid,
        )
        client = request.identity.client_cert
        await audit.append_audit(
            session,
            actor=f"est:{request.identity.peer}",
            action=f"est.{request.operation}",
            target=order.device_uuid,
            details=_audit_details(order, cert, row.sha256, client and cert_sha256(client)),
        )
        _log_issued(request, cert, order.device_uuid)
        return cert, row.id

    def _sign(self, order: _Order) -> x509.Certificate:
        """Sign the device profile for the order's (checked) CSR; a serverkeygen key is made here.

        The CSR's signature and key were checked when the order was made, so
        this does not check them again.
        """
        authority = order.request.authority
        public_key = order.public_key
        if order.request.operation == "serverkeygen":
            order.server_key = generate_private_key()
            public_key = order.server_key.public_key()
        assert public_key is not None
        try:
            builder = profiles.device(
                device_uuid_of(order.csr),
                authority.factory,
                public_key,
                self._issuers[authority.factory],
                self.policy.validity,
                sans=_sans(_renewed_cert(order.request)),
            )
            return authority.signer.sign_certificate(builder)
        except CsrError as exc:
            raise bad_request(exc.code, str(exc)) from exc
        except PkiError as exc:
            raise EstError(503, "cannot-issue", str(exc)) from exc


def _load_checked_csr(
    der: bytes,
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    csr = load_csr(der)
    check_csr_signature(csr)
    return csr, check_key(csr)


def _csr_check(check: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a pki.csr check; its refusal becomes a 400 with the same code and message."""
    try:
        return check(*args, **kwargs)
    except CsrError as exc:
        raise bad_request(exc.code, str(exc)) from exc


def _check_client(row: ClientRow | None, request: _Request, cert: x509.Certificate) -> str:
    """The device of a client cert that may renew in this factory; 403 otherwise."""
    if row is None or row.device_uuid is None:
        raise forbidden(
            "unknown-cert",
            "device cert is not known to this server; register the device first",
        )
    if row.deleted_at is not None:
        raise _deleted(row.device_uuid, row.deleted_at)
    if row.denied:
        raise forbidden("denied", f"device cert is on the deny-list (serial {row.serial})")
    if row.issuer_name is not None and row.issuer_status != CaStatus.ACTIVE:
        raise forbidden(
            f"ca-{row.issuer_status}",
            f"device cert was issued by device CA '{row.issuer_name}', which was "
            f"{row.issuer_status} at {_when(row.issuer_changed_at)}; enroll again with a "
            "bootstrap credential",
        )
    check_cert_dates(cert)
    if row.device_factory_id != request.factory_id:
        owner = row.device_factory or f"#{row.device_factory_id}"
        raise _other_factory("device cert", owner, request)
    return row.device_uuid


def _check_issuing_ca_row(row: ClientRow | None, request: _Request) -> None:
    """The operator may have disabled the online CA after this process loaded it."""
    if row is not None and row.issuing_name is not None and row.issuing_status != CaStatus.ACTIVE:
        raise _issuing_ca_inactive(row.issuing_name, row.issuing_status)


async def _check_issuing_ca(session: AsyncSession, request: _Request) -> None:
    """The operator may have disabled the online CA after this process loaded it."""
    for ca in await cas.list_cas(session, request.factory_id):
        if ca.id == request.authority.issuing_ca_id and ca.status != CaStatus.ACTIVE:
            raise _issuing_ca_inactive(ca.name, ca.status)


def _issuing_ca_inactive(name: str, status: str | None) -> EstError:
    return EstError(
        503,
        "issuing-ca-inactive",
        f"this server's issuing CA '{name}' is {status}; it issues no "
        "certificates until restarted with an active online CA",
    )


def check_cert_dates(cert: x509.Certificate) -> None:
    """403 with the dates when a client certificate is expired or not valid yet."""
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
            "enroll again with a bootstrap credential",
        )


def _deleted(device_uuid: str, deleted_at: dt.datetime) -> EstError:
    return forbidden(
        "device-deleted",
        f"device {device_uuid} was deleted at {_when(deleted_at)}; it gets no more certificates",
    )


async def _factory_name(session: AsyncSession, factory_id: int) -> str:
    names = {f.id: f.name for f in await factories.list_factories(session)}
    return names.get(factory_id, f"#{factory_id}")


def _other_factory(what: str, owner: str, request: _Request) -> EstError:
    return forbidden(
        "other-factory",
        f"{what} belongs to factory '{owner}', not '{request.authority.factory}'; "
        f"use /.well-known/est/{owner}/",
    )


def _audit_details(
    order: _Order, cert: x509.Certificate, sha256: str, client_sha256: str | None
) -> dict[str, str]:
    identity = order.request.identity
    if identity.basic is not None:
        via = f"basic:{identity.basic.username}"
    else:
        via = f"cert:{client_sha256}" if client_sha256 else "none"
    return {
        "request": order.request.name,
        "label": order.request.authority.factory,
        "serial": f"{cert.serial_number:x}",
        "sha256": sha256,
        "authenticated_by": via,
    }


def _issue_rows(order: _Order, cert: x509.Certificate, client_sha256: str) -> Issue:
    """What the hot path records for a certificate issued to a device-certificate client."""
    request = order.request
    sha256 = cert_sha256(cert)
    serial = f"{cert.serial_number:x}"
    assert order.public_key is not None or order.server_key is not None
    key = order.server_key.public_key() if order.server_key else order.public_key
    record = NewCertificate(
        serial=serial,
        sha256=sha256,
        subject=name_text(cert.subject),
        pubkey_sha256=pubkey_sha256(key),  # type: ignore[arg-type]
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        issuer_ca_id=request.authority.issuing_ca_id,
        device_uuid=order.device_uuid,
        issued_by_request=request.name,
    )
    payload = {
        "uuid": order.device_uuid,
        "serial": serial,
        "sha256": sha256,
        "not_after": rfc3339(cert.not_valid_after_utc),
        "request": request.name,
    }
    return Issue(
        certificate=record,
        topic=CERT_ISSUED,
        payload=payload,
        actor=f"est:{request.identity.peer}",
        action=f"est.{request.operation}",
        details=_audit_details(order, cert, sha256, client_sha256),
    )


def _log_issued(request: _Request, cert: x509.Certificate, device_uuid: str) -> None:
    log.info(
        "EST %s issued serial %x to %s (request id %s)",
        request.operation,
        cert.serial_number,
        device_uuid,
        request.identity.request_id,
    )


def _sans(cert: x509.Certificate | None) -> list[x509.GeneralName] | None:
    if cert is None:
        return None
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return None


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "an unknown time"


@functools.cache
def _unknown_user_hash() -> str:
    # Checking a password against this costs the same as against a real hash.
    return est.hash_secret("certfleet-est-no-such-user")


def _renewed_cert(request: _Request) -> x509.Certificate | None:
    # On renewal the CSR's SAN was checked equal to the current cert's; keep it.
    if request.operation != "simplereenroll":
        return None
    return request.identity.client_cert
