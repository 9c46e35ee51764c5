"""Server CPU per new mTLS connection (handshake + one GET), by TLS stack, against openssl s_server.

Each server runs in its own process: our aiohttp app on the "openssl4" and
"stdlib" stacks, under asyncio and uvloop, and `openssl s_server -www -Verify 1`
as the baseline. This process is the client: pyOpenSSL on blocking sockets,
one connection after another, TCP_NODELAY like curl and Go. It costs about
3 ms of wall time per connection here, against about 15 ms for an `openssl
s_client` and 18 ms for a `curl` process per connection. Server CPU is
utime+stime from /proc/<pid>/stat before and after N connections. Rounds
interleave the servers, and the table shows the total over all rounds divided
by the connections, since /proc counts 10 ms ticks.

    .venv/bin/python bench/tls_handshake.py [-n 300] [--rounds 5] [--loops asyncio,uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import platform
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from certfleet.tls import (
    TicketKeys,
    client_connection,
    client_context,
    server_context,
    start_tls_server,
)
from certfleet.tls.transport import session_reused

HOST = "127.0.0.1"
RESULTS = Path(__file__).parent / "results" / "tls_handshake.json"
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
VERSIONS = {"TLSv1.3": SSL.TLS1_3_VERSION, "TLSv1.2": SSL.TLS1_2_VERSION}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- certificates: P-256 root -> device CA -> client; root -> server ---------


def _cert(cn, key, issuer_name, issuer_key, *, ca=False, eku=None, san=None):
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, Path]:
    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def write(name, *items):
        pem = b""
        for item in items:
            if isinstance(item, x509.Certificate):
                pem += item.public_bytes(serialization.Encoding.PEM)
            else:
                pem += item.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
        (d / name).write_bytes(pem)
        return d / name

    root_key, ca_key, server_key, client_key = key(), key(), key(), key()
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    root = _cert("bench root", root_key, root_name, root_key, ca=True)
    device_ca = _cert("bench device CA", ca_key, root.subject, root_key, ca=True)
    san = [x509.IPAddress(ipaddress.ip_address(HOST))]
    server = _cert("bench server", server_key, root.subject, root_key, san=san)
    client = _cert("bench device", client_key, device_ca.subject, ca_key)
    return {
        "root": write("root.pem", root),
        "device_ca": write("device-ca.pem", device_ca),
        "server": write("server.pem", server),
        "server_key": write("server.key", server_key),
        "client": write("client.pem", client, device_ca),
        "client_key": write("client.key", client_key),
    }


# --- servers ----------------------------------------------------------------


def serve(stack: str, loop_name: str, certs: Path) -> None:
    """Run one aiohttp server answering 200 on GET /; print its port; serve until killed."""
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        context = server_context(
            certs / "server.pem", certs / "server.key", certs / "root.pem", stack=stack
        )
        app = web.Application()
        app.router.add_get("/", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tickets = TicketKeys(os.urandom(32)) if stack == "openssl4" else None
        server = await start_tls_server(runner.server, HOST, 0, context, ticket_keys=tickets)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def start_server(argv: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def start_s_server(pki: dict[str, Path]) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    argv = ["openssl", "s_server", "-quiet", "-www", "-accept", f"{HOST}:{port}"]
    argv += ["-cert", str(pki["server"]), "-key", str(pki["server_key"])]
    argv += ["-CAfile", str(pki["root"]), "-Verify", "1", "-verify_return_error"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection((HOST, port)).close()
            return proc, port
        except ConnectionRefusedError:
            time.sleep(0.05)
    raise RuntimeError("openssl s_server did not start")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- client -----------------------------------------------------------------


def client_ctx(pki: dict[str, Path], version: str) -> SSL.Context:
    ctx = client_context(pki["client"], pki["client_key"], pki["root"], stack="openssl4")
    assert isinstance(ctx, SSL.Context)
    ctx.set_min_proto_version(VERSIONS[version])
    ctx.set_max_proto_version(VERSIONS[version])
    return ctx


def one_connection(ctx: SSL.Context, port: int, session: SSL.Session | None) -> SSL.Session:
    """Handshake, GET /, read to the server's close; returns the session for the next one."""
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        # As curl and Go do; with Nagle on, a TLS 1.2 resumption waits 40 ms
        # for the server's delayed ACK before the request leaves.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = client_connection(ctx, HOST, sock)
        if session is not None:
            conn.set_session(session)
        conn.do_handshake()
        conn.sendall(REQUEST)
        response = b""
        while True:
            try:
                response += conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
        if not response.startswith(b"HTTP/1.") or b" 200 " not in response[:20]:
            raise RuntimeError(f"bad response {response[:80]!r}")
        # Mark the close clean without sending, or OpenSSL drops the session.
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        if session is not None and not session_reused(conn):
            raise RuntimeError("server did not resume the session")
        return conn.get_session()


def measure(pid: int, port: int, ctx: SSL.Context, n: int, resumed: bool) -> tuple[float, float]:
    """Server CPU seconds and client wall seconds over n connections."""
    session = one_connection(ctx, port, None) if resumed else None
    before, started = cpu_seconds(pid), time.perf_counter()
    for _ in range(n):
        new = one_connection(ctx, port, session)
        session = new if resumed else None
    return cpu_seconds(pid) - before, time.perf_counter() - started


# --- the run ------------------------------------------------------------------


def run(n: int, rounds: int, loops: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        servers = {("s_server", "-"): start_s_server(pki)}
        for stack in ("openssl4", "stdlib"):
            for loop_name in loops:
                argv = [sys.executable, __file__, "--serve", stack, "--loop", loop_name]
                servers[(stack, loop_name)] = start_server(argv + ["--certs", tmp])
        try:
            return _run_rounds(servers, pki, n, rounds)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)


def _run_rounds(servers, pki, n, rounds) -> dict:
    cases = [(v, r) for v in VERSIONS for r in (False, True)]
    samples: dict[tuple, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for version, resumed in cases:
            ctx = client_ctx(pki, version)
            for (stack, loop_name), (proc, port) in servers.items():
                for _ in range(20):  # warm up: imports, caches, first tickets
                    one_connection(ctx, port, None)
                key = (stack, loop_name, version, resumed)
                samples.setdefault(key, []).append(measure(proc.pid, port, ctx, n, resumed))
    rows = []
    for (stack, loop_name, version, resumed), runs in samples.items():
        cpu = sum(r[0] for r in runs) / (n * len(runs))
        wall = sum(r[1] for r in runs) / (n * len(runs))
        rows.append(
            {
                "stack": stack,
                "loop": loop_name,
                "tls": version,
                "handshake": "resumed" if resumed else "full",
                "server_cpu_us": round(cpu * 1e6, 1),
                "client_wall_ms": round(wall * 1e3, 2),
                "cpu_us_per_round": [round(r[0] / n * 1e6) for r in runs],
            }
        )
    base = {
        (r["tls"], r["handshake"]): r["server_cpu_us"] for r in rows if r["stack"] == "s_server"
    }
    for r in rows:
        r["ratio_to_s_server"] = round(r["server_cpu_us"] / base[(r["tls"], r["handshake"])], 2)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "connections_per_round": n,
        "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "openssl": {
            "openssl4 stack (pyOpenSSL)": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
            "stdlib stack and s_server": ssl.OPENSSL_VERSION,
        },
        "rows": rows,
    }


def print_table(result: dict) -> None:
    head = f"{'stack':<9} {'loop':<8} {'tls':<8} {'handshake':<9} {'µs CPU/conn':>11} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    order = {"s_server": 0, "openssl4": 1, "stdlib": 2}
    for r in sorted(result["rows"], key=lambda r: (r["tls"], r["handshake"], order[r["stack"]])):
        print(
            f"{r['stack']:<9} {r['loop']:<8} {r['tls']:<8} {r['handshake']:<9} "
            f"{r['server_cpu_us']:>11.0f} {r['ratio_to_s_server']:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="connections per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", default="asyncio,uvloop", help="event loops to try")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve", choices=["openssl4", "stdlib"], help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.loop, args.certs)
        return
    result = run(args.n, args.rounds, args.loops.split(","))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
