"""Test-only launcher: N forked gateway workers sharing one listening socket.

    python -m tests.gateway_workers --database URL --pki DIR [--workers 2]

Prints `listening <port>` once every worker serves, then runs until SIGTERM.
It does what `certfleet server --listen-gateway` will do (contexts and socket
made before the fork, one store per worker), and goes away when that exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web
from cryptography import x509
from sqlalchemy import select

from certfleet.gateway.app import make_gateway_app
from certfleet.gateway.service import GatewayService
from certfleet.pki.pki_dir import GATEWAY_TLS, PkiDir
from certfleet.store import open_store
from certfleet.store.authorities import load_pki_authorities
from certfleet.store.schema import Ca, CaKind
from certfleet.tls import server_context, start_tls_server


async def trusted_cas(database: str) -> list[x509.Certificate]:
    store = await open_store(database)
    try:
        async with store.transaction() as session:
            kinds = (CaKind.ROOT, CaKind.ONLINE, CaKind.LOCAL)
            rows = await session.scalars(select(Ca).where(Ca.kind.in_(kinds)))
            return [x509.load_pem_x509_certificate(r.cert_pem.encode()) for r in rows]
    finally:
        await store.close()


async def worker(database: str, pki: Path, sock: socket.socket, context, ready: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    store = await open_store(database)
    try:
        async with store.transaction() as session:
            authorities = await load_pki_authorities(session, pki)
        runner = web.AppRunner(make_gateway_app(GatewayService(store, authorities)))
        await runner.setup()
        server = await start_tls_server(runner.server, None, None, context, sock=sock)
        os.write(ready, b"r")
        await stop.wait()
        server.close()
        await runner.cleanup()
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    pki = PkiDir(args.pki)
    context = server_context(
        pki.cert_path(GATEWAY_TLS),
        pki.key_path(GATEWAY_TLS),
        asyncio.run(trusted_cas(args.database)),
        require_client_cert=False,
    )
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    sock.setblocking(False)
    ready_read, ready_write = os.pipe()
    children: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 0
            try:
                asyncio.run(worker(args.database, args.pki, sock, context, ready_write))
            except BaseException as exc:
                print(f"worker {os.getpid()} failed: {exc!r}", file=sys.stderr, flush=True)
                os.write(ready_write, b"x")
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    for _ in children:
        if os.read(ready_read, 1) != b"r":
            forward(signal.SIGTERM, None)
            sys.exit(1)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    signal.signal(signal.SIGTERM, forward)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
