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
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import hdrs, web
from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events.names import DEVICE_REGISTERED
from certfleet.pki import profiles
from certfleet.pki.authority import FactoryAuthority, issue_device_certificate
from certfleet.pki.csr import CsrError
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import cert_sha256
from certfleet.refusals import log_fault, log_refusal
from certfleet.store import audit, cas, devices, factories, outbox, tokens
from certfleet.store.engine import Store
from certfleet.store.errors import DuplicateError, NotFoundError, TokenRejectedError
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import ApiToken, CaStatus, RegisteredVia

from .app import ERROR_HEADER, REQUEST_ID
from .errors import GatewayError, bad_request, conflict, too_large
from .registration_request import (
    MAX_BODY_BYTES,
    REALM,
    REGISTER_SCOPE,
    RegistrationRequest,
    bearer_token,
    shown,
    unauthorized,
)
from .sota_config import Registration, pem_text, sota_toml

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


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

    def use_authorities(self, authorities: Mapping[str, FactoryAuthority]) -> None:
        """Issue with these from now on (a new online CA)."""
        self.authorities = dict(authorities)

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
            raise unauthorized("bad-token", str(exc), "invalid_token") from exc
        if REGISTER_SCOPE not in row.scopes:
            has = ", ".join(row.scopes) or "none"
            challenge = f'{REALM}, error="insufficient_scope", scope="{REGISTER_SCOPE}"'
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
            client_pem=pem_text(cert),
            root_pem=pem_text(authority.root),
            ca_pem=pem_text(authority.issuing_ca),
            sota_toml=sota_toml(self.gateway_url, request.base_path, request.pkcs11),
        )

    def _authority(self, factory: str) -> FactoryAuthority:
        found = self.authorities.get(factory)
        if found is None:
            known = ", ".join(sorted(self.authorities))
            raise GatewayError(
                404,
                "unknown-factory",
                f"this gateway registers devices of factory {known}, not {shown(factory)}",
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
    return service_routes(RegistrationService(store, authorities, gateway_url, validity))


def service_routes(service: RegistrationService) -> list[web.RouteDef]:
    """`POST /register` served by `service`."""
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
            return _text_response(500, log_fault(log, "gateway", request, request_id), request_id)
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
    log_refusal(log, "gateway", request, exc, "", request_id)
    response = _text_response(exc.status, exc.message, request_id)
    response.headers.update(exc.headers)
    response.headers[ERROR_HEADER] = exc.code
    return response


def _text_response(status: int, message: str, request_id: str) -> web.Response:
    response = web.Response(status=status, text=message + "\n")
    response.headers["X-Request-ID"] = request_id
    return response
