"""`certfleet server`: compose the apps, bind the sockets, run the workers.

The parent process prepares everything that is the same for every worker
(schema, TLS contexts, listening sockets, the session-ticket secret) and then
forks; workers share the sockets and hold no state of their own: everything
lives in the store, so more workers or more machines scale it out. Keys in a
PKCS#11 token are opened in each worker, after the fork, as PKCS#11 requires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509
from OpenSSL import SSL
from sqlalchemy import select

from certfleet.api.app import make_api_app
from certfleet.api.settings import ApiSettings
from certfleet.est.app import make_est_app
from certfleet.est.policy import EstPolicy
from certfleet.est.service import EstService
from certfleet.events.config import EventsSettings, delivery_loop, parse_events_settings
from certfleet.fleet.campaigns import CampaignRunner, runner_settings
from certfleet.gateway.app import make_gateway_app
from certfleet.gateway.policy import GatewayPolicy
from certfleet.gateway.registration import RegistrationService, service_routes
from certfleet.gateway.service import GatewayService
from certfleet.pki.errors import PkiError
from certfleet.pki.pki_dir import EST_TLS, GATEWAY_TLS, PkiDir
from certfleet.refusals import quiet_malformed_requests
from certfleet.server_ca_watch import CaWatcher
from certfleet.server_config import ServerConfig, parse_listen, public_gateway_url
from certfleet.store.authorities import load_pki_authorities
from certfleet.store.engine import Store, open_store
from certfleet.store.migrate import head_revision
from certfleet.store.schema import Ca, CaKind
from certfleet.tls.contexts import server_context
from certfleet.tls.server import start_tls_server
from certfleet.tls.tickets import TicketKeys

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 10


@dataclass
class Prepared:
    """What the parent hands every worker."""

    est_socket: socket.socket
    est_context: SSL.Context | ssl.SSLContext
    gateway_socket: socket.socket
    gateway_context: SSL.Context | ssl.SSLContext
    ticket_keys: TicketKeys | None
    policy: EstPolicy
    events: EventsSettings
    gateway_policy: GatewayPolicy
    # The admin API; no socket when it is switched off, no context for plain HTTP.
    api_socket: socket.socket | None = None
    api_context: SSL.Context | ssl.SSLContext | None = None
    api_settings: ApiSettings | None = None


async def _check_schema(config: ServerConfig) -> list[x509.Certificate]:
    """Migrate SQLite (nothing to install there); ask for `db upgrade` on PostgreSQL."""
    is_sqlite = config.database_url.startswith("sqlite")
    store = await open_store(config.database_url, upgrade=is_sqlite)
    try:
        revision = await store.current_revision()
        if revision != head_revision():
            raise PkiError(
                f"the database schema is at {revision or 'nothing'}, this server needs "
                f"{head_revision()}: run `certfleet db upgrade --database ...`"
            )
        return await _trusted_for_clients(store)
    finally:
        await store.close()


async def _trusted_for_clients(store: Store) -> list[x509.Certificate]:
    # Revoked and disabled CAs stay trusted at the TLS layer on purpose: the
    # apps then refuse their devices with a message, not a bare handshake error.
    kinds = (CaKind.ROOT, CaKind.ONLINE, CaKind.LOCAL)
    async with store.transaction() as session:
        rows = await session.scalars(select(Ca).where(Ca.kind.in_(kinds)))
        return [x509.load_pem_x509_certificate(r.cert_pem.encode()) for r in rows]


def _bind(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    try:
        sock = socket.create_server((host, port), backlog=1024, reuse_port=False)
    except OSError as exc:
        raise PkiError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def prepare(config: ServerConfig) -> Prepared:
    """Everything shared by the workers; done once, before they start."""
    config.check()
    trusted = asyncio.run(_check_schema(config))
    pki = PkiDir(config.pki)
    # Client certs are optional on both listeners: EST bootstrap uses HTTP
    # Basic and gateway registration a bearer token; every other route
    # refuses a request without a verified device certificate.
    contexts = [
        server_context(
            pki.cert_path(stem),
            pki.key_path(stem),
            trusted,
            require_client_cert=False,
            stack=config.tls_stack,  # type: ignore[arg-type]
        )
        for stem in (EST_TLS, GATEWAY_TLS)
    ]
    tickets = TicketKeys(os.urandom(32)) if config.tls_stack == "openssl4" else None
    try:
        policy = EstPolicy.from_settings(config.est)
    except ValueError as exc:
        raise PkiError(f"[est] settings: {exc}") from exc
    try:
        events = parse_events_settings({"events": config.events})
    except ValueError as exc:
        raise PkiError(f"[events] settings: {exc}") from exc
    try:
        gateway_policy = GatewayPolicy.from_settings(config.gateway)
    except ValueError as exc:
        raise PkiError(f"[gateway] settings: {exc}") from exc
    try:
        runner_settings(config.campaigns)
    except ValueError as exc:
        raise PkiError(f"[campaigns] settings: {exc}") from exc
    return Prepared(
        _bind(config.listen_est),
        contexts[0],
        _bind(config.listen_gateway),
        contexts[1],
        tickets,
        policy,
        events,
        gateway_policy,
        *_prepare_api(config, pki, trusted),
    )


def _prepare_api(
    config: ServerConfig, pki: PkiDir, trusted: list[x509.Certificate]
) -> tuple[socket.socket | None, SSL.Context | ssl.SSLContext | None, ApiSettings | None]:
    """The admin API's socket, TLS context (the gateway's certificate) and settings."""
    if not config.listen_api:
        return None, None, None
    try:
        settings = ApiSettings.from_settings(config.api)
        settings.check_listen(parse_listen(config.listen_api)[0])
    except ValueError as exc:
        raise PkiError(f"[api] settings: {exc}") from exc
    context = None
    if settings.tls:
        context = server_context(
            pki.cert_path(GATEWAY_TLS),
            pki.key_path(GATEWAY_TLS),
            trusted,
            require_client_cert=False,
            stack=config.tls_stack,  # type: ignore[arg-type]
        )
    return _bind(config.listen_api), context, settings


async def run_worker(config: ServerConfig, prepared: Prepared, index: int = 0) -> None:
    """One worker: serve until SIGTERM or SIGINT, then close cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    store = await open_store(config.database_url)
    try:
        async with store.transaction() as session:
            authorities = await load_pki_authorities(session, config.pki, config.hsm_pin)
        est = EstService(store, authorities, prepared.policy)
        est_app = make_est_app(est, prepared.policy)
        registration = RegistrationService(store, authorities, public_gateway_url(config))
        gateway_app = make_gateway_app(
            GatewayService(store, authorities, prepared.gateway_policy),
            extra_routes=service_routes(registration),
        )
        watcher = CaWatcher(
            store,
            config.pki,
            config.hsm_pin,
            [prepared.est_context, prepared.gateway_context],
            [est.use_authorities, registration.use_authorities],
        )
        await watcher.start()
        sites = [
            await _serve(est_app, prepared.est_socket, prepared.est_context, prepared),
            await _serve(gateway_app, prepared.gateway_socket, prepared.gateway_context, prepared),
        ]
        if prepared.api_socket is not None and prepared.api_settings is not None:
            api_app = make_api_app(store, max_body_bytes=prepared.api_settings.max_body_bytes)
            sites.append(await _serve(api_app, prepared.api_socket, prepared.api_context, prepared))
        log.info("worker %d serving EST and the device gateway", os.getpid())
        delivery = _delivery_task(config, prepared, store, index, stop)
        campaigns = _campaign_task(config, store, index, stop)
        await stop.wait()
        await watcher.stop()
        if delivery is not None:
            await delivery
        if campaigns is not None:
            await campaigns
        for server, runner in sites:
            server.close()
            await server.wait_closed()
            await runner.cleanup()
    finally:
        await store.close()


async def _serve(
    app: web.Application,
    sock: socket.socket,
    context: SSL.Context | ssl.SSLContext | None,
    prepared: Prepared,
) -> tuple[asyncio.AbstractServer, web.AppRunner]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    if context is None:  # the admin API on loopback, allowed without TLS
        server = await asyncio.get_running_loop().create_server(runner.server, sock=sock)
        return server, runner
    server = await start_tls_server(
        runner.server, None, None, context, sock=sock, ticket_keys=prepared.ticket_keys
    )
    return server, runner


def _delivery_task(
    config: ServerConfig, prepared: Prepared, store: Store, index: int, stop: asyncio.Event
) -> asyncio.Task | None:
    # SQLite runs one delivery loop per database (worker 0); on PostgreSQL every
    # worker runs one and SKIP LOCKED keeps them from sending an event twice.
    if index > 0 and config.database_url.startswith("sqlite"):
        return None
    loop = delivery_loop(store, prepared.events)
    if loop is None:
        return None
    log.info("worker %d delivers events", os.getpid())
    return asyncio.create_task(loop.run(stop))


def _campaign_task(
    config: ServerConfig, store: Store, index: int, stop: asyncio.Event
) -> asyncio.Task | None:
    # Like delivery: worker 0 on SQLite; on PostgreSQL every worker, and an
    # advisory lock per tick lets only one of them tick at a time.
    settings = runner_settings(config.campaigns)
    if not settings.enabled or (index > 0 and config.database_url.startswith("sqlite")):
        return None
    runner = CampaignRunner(store, tick_interval=settings.tick_interval)
    return asyncio.create_task(runner.run(stop))


def _spawn(config: ServerConfig, prepared: Prepared, index: int) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            signal.signal(signal.SIGTERM, _stop_before_serving)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            asyncio.run(run_worker(config, prepared, index))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            log.exception("worker %d failed", os.getpid())
            code = 1
        finally:
            os._exit(code)
    return pid


def _stop_before_serving(_signum: int, _frame: object) -> None:
    # SIGTERM while starting up (the sockets listen before the workers serve)
    # is a clean stop too; once a worker serves, its loop handles SIGTERM.
    raise SystemExit(0)


def serve(config: ServerConfig, announce: Any = print) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C."""
    signal.signal(signal.SIGTERM, _stop_before_serving)
    quiet_malformed_requests()
    prepared = prepare(config)
    host, port = prepared.est_socket.getsockname()[:2]
    gw_host, gw_port = prepared.gateway_socket.getsockname()[:2]
    announce(
        f"EST server on https://{host}:{port}/.well-known/est/ and device gateway on "
        f"https://{gw_host}:{gw_port}/ ({config.workers} worker(s), TLS stack "
        f"{config.tls_stack}, store {config.database_url.split('?')[0]})"
    )
    if prepared.api_socket is not None:
        api_host, api_port = prepared.api_socket.getsockname()[:2]
        scheme = "https" if prepared.api_context is not None else "http"
        announce(f"admin API on {scheme}://{api_host}:{api_port}/ (document at /openapi.json)")
    if config.workers == 1:
        asyncio.run(run_worker(config, prepared))
        return
    _supervise(config, prepared)


def _supervise(config: ServerConfig, prepared: Prepared) -> None:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children = {_spawn(config, prepared, index): index for index in range(config.workers)}
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if not stopping and index is not None:
            log.error("worker %d exited (status %d); starting another", pid, status)
            time.sleep(1)
            children[_spawn(config, prepared, index)] = index
    _reap(set(children))


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap(children: set[int]) -> None:
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while children and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            children.discard(pid)
        else:
            time.sleep(0.05)
    for pid in children:
        _kill(pid, signal.SIGKILL)
