"""Online device registration, `POST /register`: what `lmp-device-register` does.

A device sends a CSR (CN = its uuid) with an operator token of scope
"register"; the gateway signs it with the factory's online CA and answers with
the client certificate, the root, the issuing CA and a `sota.toml`. The device,
its certificate, an audit row and a DEVICE_REGISTERED event are written in one
transaction before the answer. `RegistrationService` decides (no HTTP in it);
the handler only moves bytes. Every refusal is one line of text, logged (INFO;
WARNING for 5xx) without the token, and stores nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events.names import DEVICE_REGISTERED
from certfleet.pki import profiles
from certfleet.pki.authority import FactoryAuthority, device_uuid_of, issue_device_certificate
from certfleet.pki.csr import CsrError, check_csr_signature, check_key, load_csr_pem_or_der
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import cert_sha256
from certfleet.pki.pkcs11_signer import parse_hex_id
from certfleet.store import audit, cas, devices, factories, outbox, tokens
from certfleet.store.engine import Store
from certfleet.store.errors import DuplicateError, NotFoundError, TokenRejectedError
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import ApiToken, CaStatus, RegisteredVia

from .app import ERROR_HEADER, REQUEST_ID
from .errors import GatewayError, bad_request, conflict, too_large

log = logging.getLogger(__name__)

REGISTER_SCOPE = "register"
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BASE_PATH = "/var/sota"
# The device's files, relative to base_path in sota.toml (as aktualizr reads [import]).
ROOT_FILE = "root.crt"
CLIENT_CERT_FILE = "client.pem"
CLIENT_KEY_FILE = "pkey.pem"
FIELDS = ("csr", "factory", "group", "key_storage", "pkcs11", "base_path")
PKCS11_FIELDS = ("module", "token_label", "key_id", "cert_id")
_REALM = 'Bearer realm="certfleet-gateway"'


def _unauthorized(code: str, message: str, error: str | None = None) -> GatewayError:
    # RFC 6750 §3: every 401 carries a Bearer challenge; error= when a token was sent.
    challenge = _REALM + (f', error="{error}"' if error else "")
    return GatewayError(401, code, message, {hdrs.WWW_AUTHENTICATE: challenge})


def _shown(value: object) -> str:
    """A client-supplied value for a message: quoted, escaped and short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; 401 otherwise."""
    if not header or not header.strip():
        raise _unauthorized(
            "no-token",
            "no Authorization header: send 'Authorization: Bearer <token>' with a token made by "
            "`certfleet tokens create --scope register`",
        )
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise _unauthorized(
            "not-bearer",
            "Authorization header is not a Bearer token: send 'Authorization: Bearer <token>'",
            "invalid_request",
        )
    return value.strip()


# -- the request --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkcs11Slots:
    """Where a device keeps its key and certificate in a PKCS#11 token (ids in hex)."""

    module: str
    token_label: str
    key_id: str
    cert_id: str


@dataclass(frozen=True)
class RegistrationRequest:
    """A registration body, checked: a CSR for a device uuid of a factory."""

    csr: x509.CertificateSigningRequest
    device_uuid: str
    factory: str
    group: str | None
    base_path: str
    pkcs11: Pkcs11Slots | None

    @classmethod
    def from_json(cls, body: bytes) -> RegistrationRequest:
        """Parse and check a JSON body; GatewayError (400) names what to fix."""
        data = _json_object(body)
        factory = _text(data, "factory", 64)
        csr = _csr(_text(data, "csr", MAX_BODY_BYTES, printable=False))
        device_uuid = _device_uuid(csr)
        _check_ou(csr, factory)
        return cls(
            csr=csr,
            device_uuid=device_uuid,
            factory=factory,
            group=_text(data, "group", 128, required=False),
            base_path=_path(data, "base_path", required=False) or DEFAULT_BASE_PATH,
            pkcs11=_key_storage(data),
        )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise bad_request("bad-json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request(
            "bad-json", 'body must be a JSON object like {"csr": PEM, "factory": name}'
        )
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise bad_request(
            "unknown-field",
            f"unknown field {_shown(unknown[0])} (known: {', '.join(FIELDS)})",
        )
    return data


def _text(
    data: Mapping[str, Any],
    name: str,
    max_length: int,
    *,
    required: bool = True,
    printable: bool = True,
) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise bad_request("missing-field", f"field {name!r} is missing")
        return None
    if not isinstance(value, str) or not value:
        raise bad_request("bad-field", f"field {name!r} must be a non-empty string")
    if len(value) > max_length or (printable and not value.isprintable()):
        raise bad_request(
            "bad-field",
            f"field {name!r} must be at most {max_length} printable characters",
        )
    return value


def _path(data: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = _text(data, name, 4096, required=required)
    if value is not None and not value.startswith("/"):
        raise bad_request(
            "bad-field", f"field {name!r} must be an absolute path, not {_shown(value)}"
        )
    return value


def _csr(text: str) -> x509.CertificateSigningRequest:
    if not text.lstrip().startswith("-----BEGIN"):
        raise bad_request(
            "malformed", "field 'csr' must be a PEM request (-----BEGIN CERTIFICATE REQUEST-----)"
        )
    try:
        csr = load_csr_pem_or_der(text.strip().encode())
        check_csr_signature(csr)
        check_key(csr)
        return csr
    except CsrError as exc:
        raise bad_request(exc.code, str(exc)) from exc


def _device_uuid(csr: x509.CertificateSigningRequest) -> str:
    try:
        value = device_uuid_of(csr)
    except CsrError as exc:
        raise bad_request(exc.code, str(exc)) from exc
    canonical = str(uuid.UUID(value))
    if value != canonical:
        # The gateway finds devices by the CN text: one uuid, one spelling.
        raise bad_request("subject", f"CSR CN {_shown(value)} must be written as {canonical}")
    return value


def _check_ou(csr: x509.CertificateSigningRequest, factory: str) -> None:
    units = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if units and units != [factory]:
        raise bad_request(
            "subject",
            f"CSR OU {_shown(', '.join(map(str, units)))} differs from factory {_shown(factory)}; "
            "leave OU out or set it to the factory",
        )


def _key_storage(data: Mapping[str, Any]) -> Pkcs11Slots | None:
    storage = data.get("key_storage", "file")
    if storage not in ("file", "pkcs11"):
        raise bad_request("bad-field", "field 'key_storage' must be file or pkcs11")
    slots = data.get("pkcs11")
    if storage == "file":
        if slots is not None:
            raise bad_request("bad-field", "field 'pkcs11' needs key_storage pkcs11")
        return None
    if not isinstance(slots, dict):
        raise bad_request(
            "bad-field",
            "key_storage pkcs11 needs field 'pkcs11': "
            '{"module", "token_label", "key_id", "cert_id"}',
        )
    unknown = sorted(set(slots) - set(PKCS11_FIELDS))
    if unknown:
        known = ", ".join(PKCS11_FIELDS)
        raise bad_request("unknown-field", f"unknown field pkcs11.{unknown[0]} (known: {known})")
    return Pkcs11Slots(
        module=_path(slots, "module") or "",
        token_label=_text(slots, "token_label", 64) or "",
        key_id=_hex_id(slots, "key_id"),
        cert_id=_hex_id(slots, "cert_id"),
    )


def _hex_id(slots: Mapping[str, Any], name: str) -> str:
    text = _text(slots, name, 64) or ""
    try:
        return parse_hex_id(text).hex()
    except PkiError as exc:
        raise bad_request("bad-field", f"pkcs11.{name}: {exc}") from exc


# -- the answer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What a registered device gets back."""

    uuid: str
    client_pem: str
    root_pem: str
    ca_pem: str
    sota_toml: str

    def as_dict(self) -> dict[str, str]:
        """The JSON answer."""
        return {
            "uuid": self.uuid,
            "client_pem": self.client_pem,
            "root_pem": self.root_pem,
            "ca_pem": self.ca_pem,
            "sota_toml": self.sota_toml,
        }


def sota_toml(gateway_url: str, base_path: str, pkcs11: Pkcs11Slots | None) -> str:
    """The device's aktualizr-style config: the gateway, and where its key and certs are."""
    source = "pkcs11" if pkcs11 else "file"
    lines = [
        "# Device configuration written at registration by certfleet.",
        "[tls]",
        f"server = {_toml(gateway_url)}",
        'ca_source = "file"',
        f"pkey_source = {_toml(source)}",
        f"cert_source = {_toml(source)}",
        "",
        "[import]",
        f"base_path = {_toml(base_path)}",
        f"tls_cacert_path = {_toml(ROOT_FILE)}",
    ]
    if pkcs11 is None:
        lines += [
            f"tls_pkey_path = {_toml(CLIENT_KEY_FILE)}",
            f"tls_clientcert_path = {_toml(CLIENT_CERT_FILE)}",
        ]
    else:
        lines += [
            "",
            "[p11]",
            f"module = {_toml(pkcs11.module)}",
            f"label = {_toml(pkcs11.token_label)}",
            f"tls_pkey_id = {_toml(pkcs11.key_id)}",
            f"tls_clientcert_id = {_toml(pkcs11.cert_id)}",
            "# The token PIN (pass = ...) never reaches the server; add it on the device.",
        ]
    return "\n".join(lines) + "\n"


def _toml(value: str) -> str:
    # Values are checked printable before they get here; only \ and " need escaping.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- the decisions --------------------------------------------------------------------------


class RegistrationService:
    """Registers devices of the factories in `authorities` with their online CAs."""

    def __init__(
        self,
        store: Store,
        authorities: Mapping[str, FactoryAuthority],
        gateway_url: str,
        validity: dt.timedelta = profiles.YEAR,
    ) -> None:
        if not gateway_url.startswith("https://") or not gateway_url.isprintable():
            raise ValueError(f"gateway URL {gateway_url!r} must be https://host:port")
        self.store = store
        self.authorities = dict(authorities)
        self.gateway_url = gateway_url
        self.validity = validity

    async def register(self, token: str, body: bytes, request_id: str) -> Registration:
        """Check the token and the body, then issue and record everything in one transaction."""
        async with self.store.transaction() as session:
            caller = await self._authorize(session, token)
            registration = await self._register(session, caller, body, request_id)
        log.info(
            "registered device %s with token '%s' (request %s)",
            registration.uuid,
            caller.name,
            request_id,
        )
        return registration

    async def _authorize(self, session: AsyncSession, token: str) -> ApiToken:
        try:
            row = await tokens.verify_token(session, token)
        except TokenRejectedError as exc:
            raise _unauthorized("bad-token", str(exc), "invalid_token") from exc
        if REGISTER_SCOPE not in row.scopes:
            has = ", ".join(row.scopes) or "none"
            challenge = f'{_REALM}, error="insufficient_scope", scope="{REGISTER_SCOPE}"'
            raise GatewayError(
                403,
                "scope",
                f"API token '{row.name}' may not register devices (its scopes: {has}); "
                f"create one with `certfleet tokens create --scope {REGISTER_SCOPE}`",
                {hdrs.WWW_AUTHENTICATE: challenge},
            )
        return row

    async def _register(
        self, session: AsyncSession, caller: ApiToken, body: bytes, request_id: str
    ) -> Registration:
        request = RegistrationRequest.from_json(body)
        authority = self._authority(request.factory)
        factory_id = (await factories.get_factory(session, authority.factory)).id
        await _check_online_ca(session, factory_id, authority)
        await self._add_device(session, request, factory_id)
        cert = self._sign(request, authority)
        await record_device_certificate(
            session,
            cert,
            device_uuid=request.device_uuid,
            factory_id=factory_id,
            issuer_ca_id=authority.issuing_ca_id,
            request=f"gateway:register:{request_id}",
            registered_via=RegisteredVia.ONLINE,
            make_current=True,
        )
        await self._record_events(session, request, cert, caller, request_id)
        return Registration(
            uuid=request.device_uuid,
            client_pem=_pem(cert),
            root_pem=_pem(authority.root),
            ca_pem=_pem(authority.issuing_ca),
            sota_toml=sota_toml(self.gateway_url, request.base_path, request.pkcs11),
        )

    def _authority(self, factory: str) -> FactoryAuthority:
        found = self.authorities.get(factory)
        if found is None:
            known = ", ".join(sorted(self.authorities))
            raise GatewayError(
                404,
                "unknown-factory",
                f"this gateway registers devices of factory {known}, not {_shown(factory)}",
            )
        return found

    async def _add_device(
        self, session: AsyncSession, request: RegistrationRequest, factory_id: int
    ) -> None:
        try:
            known = await devices.get_device(session, request.device_uuid, include_deleted=True)
        except NotFoundError:
            known = None
        if known is not None and known.deleted_at is not None:
            raise conflict(
                "device-deleted",
                f"device {request.device_uuid} was deleted; a deleted uuid is never reused: "
                "use another uuid",
            )
        if known is not None:  # in this factory or another: a uuid names one device
            raise _already_registered(request.device_uuid)
        try:
            await devices.add_device(
                session,
                request.device_uuid,
                factory_id=factory_id,
                registered_via=RegisteredVia.ONLINE,
                group_name=request.group,
            )
        except DuplicateError as exc:  # the same uuid registered at the same moment
            raise _already_registered(request.device_uuid) from exc

    def _sign(self, request: RegistrationRequest, authority: FactoryAuthority) -> x509.Certificate:
        try:
            return issue_device_certificate(
                request.csr,
                authority.issuing_ca,
                authority.signer,
                authority.factory,
                self.validity,
            )
        except CsrError as exc:
            raise bad_request(exc.code, str(exc)) from exc
        except PkiError as exc:
            raise GatewayError(503, "cannot-issue", str(exc)) from exc

    async def _record_events(
        self,
        session: AsyncSession,
        request: RegistrationRequest,
        cert: x509.Certificate,
        caller: ApiToken,
        request_id: str,
    ) -> None:
        facts = {
            "factory": request.factory,
            "group": request.group,
            "serial": f"{cert.serial_number:x}",
            "cert_sha256": cert_sha256(cert),
            "key_storage": "pkcs11" if request.pkcs11 else "file",
        }
        await audit.append_audit(
            session,
            actor=f"token:{caller.name}",
            action="device.register",
            target=request.device_uuid,
            details={**facts, "token_id": caller.id, "request": request_id},
        )
        payload = {"uuid": request.device_uuid, "registered_via": RegisteredVia.ONLINE.value}
        await outbox.append_event(
            session, DEVICE_REGISTERED, {**payload, **facts}, device_uuid=request.device_uuid
        )


def _already_registered(device_uuid: str) -> GatewayError:
    return conflict(
        "device-exists",
        f"device {device_uuid} is already registered; delete it first or use another uuid",
    )


async def _check_online_ca(
    session: AsyncSession, factory_id: int, authority: FactoryAuthority
) -> None:
    """The operator may have disabled the online CA after this process loaded it."""
    for ca in await cas.list_cas(session, factory_id):
        if ca.id == authority.issuing_ca_id and ca.status != CaStatus.ACTIVE:
            raise GatewayError(
                503,
                "online-ca-inactive",
                f"the online CA '{ca.name}' of factory {authority.factory} is {ca.status}: "
                "it registers no devices until the gateway restarts with an active online CA",
            )


# -- HTTP ---------------------------------------------------------------------------------


def registration_routes(
    store: Store,
    authorities: Mapping[str, FactoryAuthority],
    *,
    gateway_url: str,
    validity: dt.timedelta = profiles.YEAR,
) -> list[web.RouteDef]:
    """`POST /register`, for the gateway listener (it needs no client certificate)."""
    service = RegistrationService(store, authorities, gateway_url, validity)
    return [web.post("/register", _handler(service))]


def _handler(service: RegistrationService) -> Callable[[web.Request], Awaitable[web.Response]]:
    # Answers its own refusals, so the route works in any app; inside the gateway
    # app it shares that app's request id and error header.
    async def register(request: web.Request) -> web.Response:
        request_id = request.get(REQUEST_ID) or uuid.uuid4().hex
        try:
            token = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
            body = await _read_body(request)
            result = await service.register(token, body, request_id)
        except GatewayError as exc:
            return _refusal(request, request_id, exc)
        except Exception:
            log.exception("register failed (request %s)", request_id)
            message = f"internal error; the server log has details (request {request_id})"
            return _text_response(500, message, request_id)
        headers = {hdrs.CACHE_CONTROL: "no-store", "X-Request-ID": request_id}
        return web.json_response(result.as_dict(), status=201, headers=headers)

    return register


async def _read_body(request: web.Request) -> bytes:
    """The body, up to MAX_BODY_BYTES whatever the app's own limit; 413 beyond."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _too_large(f"request body of {length} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large("chunked request body")
    return bytes(body)


def _too_large(what: str) -> GatewayError:
    return too_large(
        "too-large", f"{what} is over the registration limit of {MAX_BODY_BYTES} bytes"
    )


def _refusal(request: web.Request, request_id: str, exc: GatewayError) -> web.Response:
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    log.log(
        level,
        "register refused %d %s: %s (peer %s, request %s)",
        exc.status,
        exc.code,
        exc.message,
        request.remote,
        request_id,
    )
    response = _text_response(exc.status, exc.message, request_id)
    response.headers.update(exc.headers)
    response.headers[ERROR_HEADER] = exc.code
    return response


def _text_response(status: int, message: str, request_id: str) -> web.Response:
    response = web.Response(status=status, text=message + "\n")
    response.headers["X-Request-ID"] = request_id
    return response
