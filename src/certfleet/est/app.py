"""The RFC 7030 HTTP front-end on aiohttp: routes, body framing and status codes.

Decisions live in `service.py`; this module only turns HTTP into calls there
and answers. Every refusal is a one-line text/plain body, logged at INFO with
the peer and reason (never a password or key).
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from certfleet.refusals import framework_refusal, log_fault, log_refusal, method_not_allowed
from certfleet.storable_text import unstorable

from .errors import EstError, bad_request, unauthorized
from .peer import PeerGetter, PeerReader
from .policy import EstPolicy
from .service import BasicCredentials, EstIdentity, EstService, Pending
from .wire import (
    CSRATTRS,
    PKCS7_CERTS,
    PKCS10,
    EstWireError,
    check_content_type,
    decode_body,
    encode_body,
    serverkeygen_multipart,
)

log = logging.getLogger(__name__)

PREFIX = "/.well-known/est"
OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen", "fullcmc")
REQUEST_ID = web.RequestKey("est_request_id", str)
IDENTITY = web.RequestKey("est_identity", EstIdentity)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_est_app(
    service: EstService, policy: EstPolicy, peer: PeerGetter | None = None
) -> web.Application:
    """The EST application, to serve at / of the EST listener.

    `peer` reads the client's identity from a request; by default a PeerReader
    of `policy` that trusts the device CAs of the service's factories.
    """
    app = web.Application(client_max_size=policy.max_body_bytes, middlewares=[_refusals])
    handlers = _Handlers(service, policy, peer or PeerReader(policy, service.authorities))
    for prefix in (PREFIX, PREFIX + "/{label}"):
        app.router.add_get(f"{prefix}/cacerts", handlers.cacerts)
        app.router.add_get(f"{prefix}/csrattrs", handlers.csrattrs)
        app.router.add_post(f"{prefix}/simpleenroll", handlers.simpleenroll)
        app.router.add_post(f"{prefix}/simplereenroll", handlers.simplereenroll)
        app.router.add_post(f"{prefix}/serverkeygen", handlers.serverkeygen)
        app.router.add_post(f"{prefix}/fullcmc", handlers.fullcmc)
    return app


class _Handlers:
    def __init__(self, service: EstService, policy: EstPolicy, peer: PeerGetter) -> None:
        self.service = service
        self.policy = policy
        self.peer = peer

    async def cacerts(self, request: web.Request) -> web.Response:
        return _der_response(await self.service.cacerts(_label(request)), PKCS7_CERTS)

    async def csrattrs(self, request: web.Request) -> web.Response:
        return _der_response(await self.service.csrattrs(_label(request)), CSRATTRS)

    async def simpleenroll(self, request: web.Request) -> web.Response:
        label, identity, csr_der = await self._enrollment(request)
        return _certs(await self.service.simpleenroll(label, csr_der, identity))

    async def simplereenroll(self, request: web.Request) -> web.Response:
        label, identity, csr_der = await self._enrollment(request)
        return _certs(await self.service.simplereenroll(label, csr_der, identity))

    async def serverkeygen(self, request: web.Request) -> web.Response:
        label, identity, csr_der = await self._enrollment(request)
        result = await self.service.serverkeygen(label, csr_der, identity)
        if isinstance(result, Pending):
            return _pending(result)
        body, content_type = serverkeygen_multipart(*result)
        # The body holds a private key: no cache may keep it.
        return web.Response(
            body=body, headers={hdrs.CONTENT_TYPE: content_type, hdrs.CACHE_CONTROL: "no-store"}
        )

    async def fullcmc(self, request: web.Request) -> web.Response:
        raise EstError(501, "fullcmc", "fullcmc is not supported; use simpleenroll/simplereenroll")

    async def _enrollment(self, request: web.Request) -> tuple[str | None, EstIdentity, bytes]:
        """Label, identity and CSR DER of a POST, in the order a client can fix them."""
        label = _label(request)
        self.service.authority(label)
        identity = self._identity(request)
        request[IDENTITY] = identity
        return label, identity, await self._csr_body(request)

    def _identity(self, request: web.Request) -> EstIdentity:
        peer = self.peer(request)
        return EstIdentity(
            client_cert=peer.client_cert,
            basic=_basic(request),
            tls_unique=peer.tls_unique,
            tls_version=peer.tls_version,
            peer=peer.address,
            request_id=request[REQUEST_ID],
        )

    async def _csr_body(self, request: web.Request) -> bytes:
        try:
            check_content_type(request.headers.get(hdrs.CONTENT_TYPE), PKCS10)
        except EstWireError as exc:
            raise EstError(415, exc.code, str(exc)) from exc
        length = request.content_length
        if length is not None and length > self.policy.max_body_bytes:
            raise self._too_large(f"request body of {length} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:  # chunked bodies have no Content-Length
            raise self._too_large("chunked request body") from exc
        try:
            return decode_body(raw)
        except EstWireError as exc:
            raise bad_request(exc.code, str(exc)) from exc

    def _too_large(self, what: str) -> EstError:
        limit = self.policy.max_body_bytes
        return EstError(413, "too-large", f"{what} is over this server's limit of {limit} bytes")


def _label(request: web.Request) -> str | None:
    return request.match_info.get("label")


def _basic(request: web.Request) -> BasicCredentials | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return None
    # Hand-written because aiohttp 3.14 deprecates BasicAuth (and its decode) for 4.0.
    scheme, _, encoded = header.strip().partition(" ")
    try:
        if scheme.lower() != "basic":
            raise ValueError(scheme)
        username, colon, password = (
            base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        )
        if not colon:
            raise ValueError("no colon")
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise unauthorized(
            "bad-authorization",
            "Authorization header is not HTTP Basic: send 'Basic base64(username:password)'",
        ) from exc
    # No stored username has one, and the store could not even look it up.
    problem = unstorable(username)
    if problem:
        raise unauthorized("bad-authorization", f"the EST username has {problem}")
    return BasicCredentials(username, password)


def _der_response(der: bytes, content_type: str) -> web.Response:
    # RFC 8951 makes the header meaningless, but some clients still look for it.
    headers = {hdrs.CONTENT_TYPE: content_type, hdrs.CONTENT_TRANSFER_ENCODING: "base64"}
    return web.Response(body=encode_body(der), headers=headers)


def _certs(result: bytes | Pending) -> web.Response:
    return _pending(result) if isinstance(result, Pending) else _der_response(result, PKCS7_CERTS)


def _pending(pending: Pending) -> web.Response:
    text = (
        f"request {pending.pending_id} is waiting for operator approval "
        f"(certfleet est pending approve {pending.pending_id}); "
        f"retry the same request after {pending.retry_after} s\n"
    )
    return web.Response(status=202, text=text, headers={hdrs.RETRY_AFTER: str(pending.retry_after)})


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every refusal into one logged line of text; 500 only for real faults."""
    request[REQUEST_ID] = secrets.token_hex(16)
    try:
        response = await handler(request)
    except EstError as exc:
        response = _refusal(request, exc)
    except web.HTTPException as exc:
        response = _refusal(request, _from_http(request, exc))
    except Exception:
        response = _text(500, log_fault(log, "EST", request, request[REQUEST_ID]))
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    return response


def _refusal(request: web.Request, exc: EstError) -> web.Response:
    identity = request.get(IDENTITY)
    user = f", user {identity.basic.username}" if identity and identity.basic else ""
    log_refusal(log, "EST", request, exc, user, request[REQUEST_ID])
    response = _text(exc.status, exc.message)
    response.headers.update(exc.headers)
    return response


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


def _from_http(request: web.Request, exc: web.HTTPException) -> EstError:
    """Routing and framework refusals, reworded so a person knows what to change."""
    operation = request.path.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return method_not_allowed(EstError, request, exc, operation)
    if isinstance(exc, web.HTTPNotFound):
        if not request.path.startswith(PREFIX + "/"):
            return EstError(404, "not-est", f"{request.path} is not an EST path; use {PREFIX}/")
        if operation in OPERATIONS:
            where = f"{PREFIX}/{operation} or {PREFIX}/<label>/{operation}"
            return EstError(404, "not-est", f"{request.path} is not an EST path; use {where}")
        known = ", ".join(OPERATIONS)
        return EstError(
            404, "unknown-operation", f"unknown EST operation {operation!r} (known: {known})"
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return EstError(413, "too-large", "request body is larger than this server's limit")
    return framework_refusal(EstError, exc)
