"""Server CPU per EST re-enrollment on a new mTLS connection, against openssl s_server.

Each simulated device has its own client certificate, issued and recorded in
the store through certfleet's Python API before anything is measured, and a
re-enrollment request made in advance (new P-256 key, CSR with the subject of
its current cert, base64 DER body). Measured: every device opens a NEW TLS
connection with its client certificate, POSTs /.well-known/est/simplereenroll
with `Connection: close`, and reads the answer to the server's close. Every
response is checked after the phase, off the clock (200, content type, a
certs-only PKCS#7 with one certificate for the device's new key and subject,
signed by the online CA); a row with any failure is INVALID.

Servers: `certfleet -v server --workers N` (openssl4 TLS stack) on SQLite and
on PostgreSQL (a schema made for the run and dropped after it, when
127.0.0.1:5432 answers). Baseline: `openssl s_server -www -Verify 1` with the
same server and device certificates, answering one GET per new mutual-TLS
connection. One more row, certfleet `GET cacerts` on a new connection
(SQLite, 1 worker), is the TLS + HTTP floor of our server without the EST
work. This process is the client, as in bench/tls_handshake.py: pyOpenSSL on
blocking sockets, TCP_NODELAY; with N workers, N client threads keep N
connections in flight. Server CPU is utime+stime from /proc/<pid>/stat of the
server and all its worker processes, before and after each phase, divided by
the operations of the phase whatever the number of workers. Rounds
interleave the servers; the table shows totals over all rounds.

With --profile, one more SQLite server with 1 worker serves n x rounds
re-enrollments under `py-spy record --pid` (pip install py-spy), and the
samples are split by what the server was doing: TLS handshake, HTTP, CSR
checks, signing, PKCS#7, database, logging, event loop. py-spy drops threads
it sees sleeping, but counts a thread that is runnable and waiting for a core
as busy, at the line where it waited (on a loaded 2-core machine, often);
samples whose innermost line is a wait (epoll, a thread's work queue, a lock) are
dropped here too, so the shares are shares of CPU actually used. They are
printed as µs of the unprofiled re-enrollment of the same configuration.

With --floor, two more servers from bench/est_floor_server.py: the least a
Python process can spend, one blocking thread with certfleet's TLS context and
no event loop, HTTP framework, store or log; once answering a fixed 200 (the
handshake floor) and once issuing each re-enrollment in process with
certfleet's own `pki/` calls (the issuing floor; its answers are checked like
certfleet's).

`--loop uvloop` runs certfleet on uvloop instead of asyncio's own loop
(bench/uvloop_launcher.py), to show what that would change.

    .venv/bin/python bench/est_reenroll.py [-n 300] [--rounds 3] [--workers 1,2]
        [--db sqlite,postgresql] [--tls 1.3,1.2] [--profile] [--floor] [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import linecache
import os
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from harness import BIN, HOST, certfleet, free_port, machine, record_online_device, s_server_process
from listeners import LOOPS, listen_args, server_command  # bench/ is on sys.path
from OpenSSL import SSL
from procstat import children, cpu_seconds, stop_process

from certfleet.store.authorities import load_authority
from certfleet.store.engine import open_store
from certfleet.store.factories import get_factory
from certfleet.tls import client_connection, client_context

FACTORY = "bench"
PG_PORT = 5432
PG_BASE = f"postgresql://postgres@{HOST}:{PG_PORT}/test"
RESULTS = Path(__file__).parent / "results" / "est_reenroll.json"
EST = "/.well-known/est"
VERSIONS = {"1.3": SSL.TLS1_3_VERSION, "1.2": SSL.TLS1_2_VERSION}
WARMUP = 20
GO_REFERENCE_RATIO = 0.70  # foundriesio/estserver per re-enrollment (issue 3)


# --- devices: issued and recorded before anything is measured --------------------------


@dataclass
class Device:
    uuid: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    new_public: bytes  # SubjectPublicKeyInfo DER of the key the re-enrollment asks for
    body: bytes  # base64 of the CSR's DER
    contexts: dict[str, SSL.Context] = field(default_factory=dict)  # TLS version -> context


@dataclass
class Pki:
    """One `keys ca create` folder with its store and its devices."""

    db: str  # "sqlite" | "postgresql"
    dir: Path
    url: str
    issuing_ca: x509.Certificate | None = None
    devices: list[Device] = field(default_factory=list)


def make_pki(db: str, where: Path, url: str, n: int, versions: list[str]) -> Pki:
    if db == "postgresql":
        certfleet("db", "upgrade", "--database", url, "--pki", str(where))
    certfleet(
        "keys", "ca", "create", str(where), "--factory", FACTORY,
        "--gateway-dns", "localhost", "--gateway-ip", HOST, "--database", url,
    )  # fmt: skip
    pki = Pki(db, where, url)
    pki.issuing_ca, pki.devices = asyncio.run(_issue_devices(where, url, n))
    root = x509.load_pem_x509_certificate((where / "root.crt").read_bytes())
    for device in pki.devices:
        for version in versions:
            ctx = client_context(device.cert, device.key, root, stack="openssl4")
            assert isinstance(ctx, SSL.Context)
            ctx.set_min_proto_version(VERSIONS[version])
            ctx.set_max_proto_version(VERSIONS[version])
            device.contexts[version] = ctx
    return pki


async def _issue_devices(pki_dir: Path, url: str, n: int) -> tuple[x509.Certificate, list]:
    store = await open_store(url)
    devices = []
    try:
        async with store.transaction() as session:
            authority = await load_authority(session, FACTORY, pki_dir)
            factory_id = (await get_factory(session, FACTORY)).id
            for _ in range(n):
                device_uuid, cert, key = await record_online_device(session, authority, factory_id)
                # The renewal: a new key, and the subject exactly as in the current cert.
                new_key = ec.generate_private_key(ec.SECP256R1())
                renew = x509.CertificateSigningRequestBuilder().subject_name(cert.subject)
                der = renew.sign(new_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
                new_public = new_key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                devices.append(Device(device_uuid, cert, key, new_public, base64.b64encode(der)))
        return authority.issuing_ca, devices
    finally:
        await store.close()


# --- PostgreSQL: a schema of our own for the run ----------------------------------------


def pg_reachable() -> bool:
    try:
        socket.create_connection((HOST, PG_PORT), timeout=1).close()
    except OSError:
        return False
    try:
        pg_admin("SELECT 1")
    except Exception:  # noqa: BLE001 - any failure means no PostgreSQL rows
        return False
    return True


def pg_admin(sql: str) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(host=HOST, port=PG_PORT, user="postgres", database="test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


# --- servers and their CPU ----------------------------------------------------------------


@dataclass
class Server:
    name: str  # "s_server" | "certfleet"
    db: str
    workers: int
    proc: subprocess.Popen
    port: int
    pki: Pki
    pids: list[int] = field(default_factory=list)  # the server, then its workers


def start_certfleet(pki: Pki, workers: int, log_dir: Path, loop: str = "asyncio") -> Server:
    port = free_port()
    args = ["-v", "server", "--pki", str(pki.dir), "--database", pki.url]
    args += listen_args(port, free_port())
    args += ["--workers", str(workers), "--tls-stack", "openssl4"]
    log = log_dir / f"server-{pki.db}-{workers}w-{port}.log"
    with log.open("wb") as out:
        argv = server_command(loop) + args
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    server = Server("certfleet", pki.db, workers, proc, port, pki, [proc.pid])
    wait_ready(server, log)
    for _ in range(100):  # the parent forks the workers once it is ready
        kids = children(proc.pid) if workers > 1 else []
        if len(kids) == (workers if workers > 1 else 0):
            server.pids += kids
            return server
        time.sleep(0.05)
    raise RuntimeError(f"expected {workers} workers under {proc.pid}; see {log}")


def start_floor(pki: Pki, issue: bool, log_dir: Path) -> Server:
    """bench/est_floor_server.py: the least a Python process spends (see its docstring)."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).parent / "est_floor_server.py"), str(pki.dir)]
    argv += [str(port), "--factory", FACTORY] + (["--issue"] if issue else [])
    name = "floor-issue" if issue else "floor"
    log = log_dir / f"{name}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    server = Server(name, "-", 1, proc, port, pki, [proc.pid])
    wait_ready(server, log)
    return server


def start_s_server(pki: Pki) -> Server:
    proc, port = s_server_process(pki.dir, "est-tls")
    server = Server("s_server", "-", 1, proc, port, pki, [proc.pid])
    wait_ready(server, None)
    return server


def wait_ready(server: Server, log: Path | None) -> None:
    ctx = next(iter(server.pki.devices[0].contexts.values()))
    op = "cacerts" if server.name == "certfleet" else "get"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            if b" 200 " in exchange(ctx, server.port, request(op)).split(b"\r\n", 1)[0]:
                return
        except (OSError, SSL.Error):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} on port {server.port} did not start; see {log}")


def stop(server: Server, timeout: float = 15) -> None:
    stop_process(server.proc, timeout)


def cpu_each(server: Server) -> list[float]:
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} ({server.db}, {server.workers} workers) exited")
    if server.workers > 1 and children(server.proc.pid) != server.pids[1:]:
        raise RuntimeError(f"a worker of {server.name} ({server.db}) was replaced mid-run")
    return [cpu_seconds(pid) for pid in server.pids]


# --- client -------------------------------------------------------------------------------


def request(op: str, device: Device | None = None) -> bytes:
    if op == "reenroll":
        assert device is not None
        head = (
            f"POST {EST}/simplereenroll HTTP/1.1\r\nHost: {HOST}\r\n"
            "Content-Type: application/pkcs10\r\n"
            f"Content-Length: {len(device.body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + device.body
    path = f"{EST}/cacerts" if op == "cacerts" else "/"
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


def exchange(ctx: SSL.Context, port: int, data: bytes) -> bytes:
    """New connection, full handshake, one request, read to the server's close."""
    with socket.create_connection((HOST, port)) as sock:
        timeout = struct.pack("ll", 10, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as curl and Go do
        conn = client_connection(ctx, HOST, sock)
        conn.do_handshake()
        conn.sendall(data)
        chunks = []
        while True:
            try:
                chunks.append(conn.recv(65536))
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        return b"".join(chunks)


@dataclass
class Phase:
    cpu: list[float]  # seconds, per server process
    wall: float
    latencies: list[float]
    responses: list[bytes | Exception]


def drive(server: Server, op: str, version: str, devices: list[Device], parallel: int) -> Phase:
    """Each device once, `parallel` connections in flight; server CPU and wall time."""
    jobs = [(d.contexts[version], request(op, d)) for d in devices]
    latencies = [0.0] * len(jobs)
    responses: list[bytes | Exception] = [b""] * len(jobs)
    go = threading.Barrier(parallel + 1)

    def client(first: int) -> None:
        go.wait()
        for i in range(first, len(jobs), parallel):
            t0 = time.perf_counter()
            try:
                responses[i] = exchange(jobs[i][0], server.port, jobs[i][1])
            except (OSError, SSL.Error) as exc:
                responses[i] = exc
            latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=client, args=(k,)) for k in range(parallel)]
    for t in threads:
        t.start()
    before = cpu_each(server)
    t0 = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = cpu_each(server)
    return Phase([a - b for a, b in zip(after, before, strict=True)], wall, latencies, responses)


def failures(server: Server, op: str, phase: Phase, devices: list[Device]) -> list[str]:
    """What was wrong with each bad response."""
    found = (check(server, op, d, r) for d, r in zip(devices, phase.responses, strict=True))
    return [problem for problem in found if problem]


def check(server: Server, op: str, device: Device, response: bytes | Exception) -> str | None:
    if isinstance(response, Exception):
        return f"{type(response).__name__}: {response}"
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        return f"{status.decode(errors='replace')}: {body[:200]!r}"
    if op == "get":
        return None
    if b"content-type: application/pkcs7-mime; smime-type=certs-only" not in head.lower():
        return f"wrong content type: {head!r}"
    try:
        certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    except ValueError as exc:
        return f"body is not a base64 certs-only PKCS#7: {exc}"
    if op == "cacerts":
        return None if len(certs) == 2 else f"{len(certs)} certificates in cacerts"
    if len(certs) != 1:
        return f"{len(certs)} certificates in the PKCS#7, expected 1"
    cert = certs[0]
    public = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != device.new_public or cert.subject != device.cert.subject:
        return "certificate is not for the device's new key and subject"
    assert server.pki.issuing_ca is not None
    try:
        cert.verify_directly_issued_by(server.pki.issuing_ca)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad certificate
        return f"certificate not signed by the online CA: {exc}"
    return None


# --- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    notes = []
    dbs = list(args.db)
    if "postgresql" in dbs and not pg_reachable():
        notes.append(f"PostgreSQL not reachable at {HOST}:{PG_PORT}: no PostgreSQL rows")
        dbs.remove("postgresql")
    if not dbs:
        raise SystemExit("no database to measure")
    schema = f"certfleet_bench_{os.getpid()}"
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="est-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            pkis = {}
            for db in dbs:
                if db == "postgresql":
                    pg_admin(f"CREATE SCHEMA {schema}")
                    url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
                else:
                    url = f"sqlite:///{tmp / 'pki-sqlite' / 'certfleet.db'}"
                print(f"setting up {db}: PKI and {args.n} devices", file=sys.stderr)
                pkis[db] = make_pki(db, tmp / f"pki-{db}", url, args.n, args.tls)
            servers.append(start_s_server(pkis[dbs[0]]))
            for db in dbs:
                for workers in args.workers:
                    servers.append(start_certfleet(pkis[db], workers, tmp, args.loop))
            if args.floor:
                servers += [start_floor(pkis[dbs[0]], issue, tmp) for issue in (False, True)]
            result = measure(servers, args)
            result["server_event_loop"] = args.loop
            if args.profile and "sqlite" in pkis:
                for server in servers:  # a quiet machine for the profile
                    stop(server)
                result["profile"] = profile(pkis["sqlite"], args, tmp)
            elif args.profile:
                result["profile"] = {"error": "the profile needs --db sqlite"}
        finally:
            for server in servers:
                stop(server)
            if "postgresql" in dbs:
                pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    result["notes"] = notes
    return result


def cases(servers: list[Server]) -> list[tuple[Server, str]]:
    """(server, operation) in the order of a round."""
    found = []
    for server in servers:
        if server.name in ("s_server", "floor"):
            found.append((server, "get"))
        elif server.name == "floor-issue":
            found.append((server, "reenroll"))
        else:
            if server.workers == 1 and server.db == servers[1].db:
                found.append((server, "cacerts"))  # the TLS + HTTP floor, once
            found.append((server, "reenroll"))
    return found


def measure(servers: list[Server], args: argparse.Namespace) -> dict:
    n, rounds = args.n, args.rounds
    samples: dict[tuple, list[Phase]] = {}
    bad: dict[tuple, list[str]] = {}
    for r in range(rounds):
        for version in args.tls:
            for server, op in cases(servers):
                devices = server.pki.devices[:n]
                key = (server.name, op, server.db, server.workers, version)
                print(
                    f"round {r + 1}/{rounds}: TLS {version} {' '.join(map(str, key))}",
                    file=sys.stderr,
                )
                warm = drive(server, op, version, devices[:WARMUP], server.workers)
                phase = drive(server, op, version, devices, server.workers)
                bad.setdefault(key, []).extend(failures(server, op, warm, devices[:WARMUP]))
                bad[key].extend(failures(server, op, phase, devices))
                samples.setdefault(key, []).append(phase)
    rows = [row(key, phases, n, bad[key]) for key, phases in samples.items()]
    base = {r["tls"]: r["server_cpu_us"] for r in rows if r["server"] == "s_server"}
    for r in rows:
        r["ratio_to_s_server"] = round(r["server_cpu_us"] / base[r["tls"]], 2)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "devices": n,
        "rounds": rounds,
        "warmup_per_phase": WARMUP,
        "machine": machine(),
        "openssl": {
            "certfleet (pyOpenSSL on cryptography's)": SSL.OpenSSL_version(
                SSL.OPENSSL_VERSION
            ).decode(),
            "s_server": subprocess.run(
                ["openssl", "version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "python ssl": ssl.OPENSSL_VERSION,
        },
        "target": f"certfleet re-enrollment <= {GO_REFERENCE_RATIO} x s_server (issue 3)",
        "rows": rows,
    }


def row(key: tuple, phases: list[Phase], n: int, bad: list[str]) -> dict:
    name, op, db, workers, version = key
    ops = n * len(phases)
    per_process = [sum(p.cpu[i] for p in phases) for i in range(len(phases[0].cpu))]
    latencies = sorted(x for p in phases for x in p.latencies)
    result = {
        "server": name,
        "operation": {"get": "GET / (bare mTLS)", "cacerts": "GET cacerts"}.get(op, op),
        "db": db,
        "workers": workers,
        "tls": version,
        "connections_in_flight": workers,
        "server_cpu_us": round(sum(per_process) / ops * 1e6, 1),
        "cpu_us_per_round": [round(sum(p.cpu) / n * 1e6) for p in phases],
        "throughput_per_s": round(ops / sum(p.wall for p in phases), 1),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3, 2),
        "failures": len(bad),
        "failure_examples": sorted(set(bad))[:3],
        "valid": not bad,
    }
    if workers > 1:  # the supervisor first, then each worker
        result["cpu_share_per_process"] = [round(c / sum(per_process), 3) for c in per_process]
    return result


# --- profile: py-spy on the server, waits left out ---------------------------------------

SITE = sysconfig.get_paths()["purelib"] + "/"
STDLIB = sysconfig.get_paths()["stdlib"] + "/"


def profile(pki: Pki, args: argparse.Namespace, tmp: Path) -> dict:
    """Re-enrollments against a SQLite 1-worker server under py-spy; CPU by category."""
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        return {"error": "py-spy is not installed: .venv/bin/pip install py-spy"}
    server = start_certfleet(pki, 1, tmp, args.loop)
    version = args.tls[0]
    total = len(pki.devices) * args.rounds
    print(f"profile: {total} re-enrollments, TLS {version}", file=sys.stderr)
    out = tmp / "profile.speedscope.json"
    cpu, bad = 0.0, []
    try:
        drive(server, "reenroll", version, pki.devices[:WARMUP], 1)
        spy_argv = [py_spy, "record", "--pid", str(server.proc.pid), "--rate", str(args.rate)]
        spy_argv += ["--format", "speedscope", "--output", str(out)]
        spy = subprocess.Popen(spy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)  # attached
        for _ in range(args.rounds):
            phase = drive(server, "reenroll", version, pki.devices, 1)
            cpu += sum(phase.cpu)
            bad += failures(server, "reenroll", phase, pki.devices)
        spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        _, err = spy.communicate(timeout=120)
        if spy.returncode or not out.exists():
            return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    finally:
        stop(server)
    if args.speedscope:
        shutil.copyfile(out, args.speedscope)
    return {
        "method": (
            f"py-spy record --rate {args.rate} (samples of sleeping threads dropped by "
            "py-spy); samples whose innermost frame is a wait (epoll, work queues, "
            "locks) dropped here: a runnable thread waiting for a core is not using CPU"
        ),
        "server": "certfleet, SQLite, 1 worker",
        "tls": version,
        "re_enrollments": total,
        "failures": len(bad),
        "server_cpu_us_while_profiled": round(cpu / total * 1e6, 1),
        **categorize(json.loads(out.read_text())),
    }


def _where(path: str) -> str:
    if path.startswith(SITE):
        return path[len(SITE) :]
    if "/src/certfleet/" in path:
        return "certfleet/" + path.split("/src/certfleet/", 1)[1]
    if path.startswith(STDLIB):
        return "stdlib/" + path[len(STDLIB) :]
    return path


WAITS = (".poll(", ".get()", ".get(block=True)", ".wait(", ".acquire(", "sleep(")


def _is_wait(path: str, line: int | None) -> bool:
    """True if a leaf frame is a blocking call of the stdlib or aiosqlite (no CPU used there)."""
    if not path.startswith((STDLIB, SITE + "aiosqlite/")):
        return False
    text = linecache.getline(path, line or 0)
    return any(w in text for w in WAITS)


# A sample goes to the category of its innermost frame that matches a rule;
# rules are tried in this order for each frame.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("stdlib/logging/",)),
    ("PKCS#7 response", ("certfleet/pki/pkcs7.py",)),
    ("CSR checks", ("certfleet/pki/csr.py", "certfleet/pki/authority.py:device_uuid_of")),
    ("signing (build + ECDSA)", ("certfleet/pki/authority.py", "certfleet/pki/signer.py",
                                 "certfleet/pki/profiles.py")),
    ("database", ("sqlalchemy/", "aiosqlite/", "asyncpg/", "greenlet", "certfleet/store/",
                  # a store thread wakes the loop through the self-pipe with each result
                  "selector_events.py:BaseSelectorEventLoop._read_from_self",
                  "selector_events.py:BaseSelectorEventLoop._process_self_data")),
    ("TLS handshake", ("OpenSSL/SSL.py:Connection.do_handshake",
                       "transport.py:TLSServerProtocol._handshake", "certfleet/tls/tickets.py")),
    ("TLS records, peer cert, close", ("OpenSSL/", "certfleet/tls/")),
    ("HTTP (aiohttp)", ("aiohttp/", "multidict/", "yarl/")),
    ("EST logic (est/, fingerprints)", ("certfleet/",)),
    ("event loop, sockets", ("stdlib/asyncio/", "stdlib/selectors.py", "stdlib/socket.py")),
]  # fmt: skip


def classify(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for category, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return category
    return "other"


# Steps worth knowing on their own: (label, frames that must all be in the stack).
DETAILS: list[tuple[str, tuple[str, ...]]] = [
    (
        "database: the store's thread (sqlite3 calls, commit)",
        ("hot_sqlite.py:SqliteHotPath._issue",),
    ),
    (
        "database: sqlite3 statements and commit (without decide)",
        ("hot_sqlite.py:SqliteHotPath._issue", "hot_sqlite.py:_record"),
    ),
    ("database: asyncpg (PostgreSQL)", ("asyncpg/",)),
    ("database: handing the request to the store's thread", ("run_in_executor",)),
    ("database: loop wake-ups for the thread's result (self-pipe)", ("_read_from_self",)),
    ("database: deny-list poll (gateway, 4 per second)", ("DenylistCache.poll",)),
    ("CSR: signature verified (once)", ("csr.py:check_csr_signature",)),
    ("CSR: renewal checks (subject, SAN, new key)", ("csr.py:check_reenroll",)),
    ("signing: device profile builder", ("profiles.py:device",)),
    ("signing: ECDSA and DER", ("signer.py:FileSigner.sign_certificate",)),
    ("fingerprints: cert_sha256", ("keys.py:cert_sha256",)),
    ("TLS: client cert to a cryptography object", ("SSL.py:Connection.get_peer_certificate",)),
    ("TLS: socket writes (send syscalls)", ("selector_events.py:_SelectorSocketTransport.write",)),
    ("HTTP: aiohttp RequestHandler per connection", ("web_protocol.py:RequestHandler.__init__",)),
    ("logging: INFO line per issued cert", ("service.py:_log_issued", "stdlib/logging/")),
]


DB_REST = "database: the rest (ORM: the first factory lookup; engine and pool)"


def categorize(speedscope: dict) -> dict:
    frames = speedscope["shared"]["frames"]
    names = [f"{_where(f.get('file') or '')}:{f['name']}" for f in frames]
    total = waits = 0.0
    by_category: Counter[str] = Counter()
    details: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for prof in speedscope["profiles"]:
        for ids, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not ids:
                continue
            leaf = frames[ids[-1]]
            if _is_wait(leaf.get("file") or "", leaf.get("line")):
                waits += weight
                continue
            stack = [names[i] for i in ids]
            total += weight
            category = classify(stack)
            by_category[category] += weight
            matched = [
                label
                for label, needles in DETAILS
                if all(any(n in frame for frame in stack) for n in needles)
            ]
            for label in matched:
                details[label] += weight
            if category == "database" and not any(m.startswith("database") for m in matched):
                details[DB_REST] += weight
            for frame in set(stack):
                if frame.startswith("certfleet/") and not frame.startswith(
                    ("certfleet/cli/", "certfleet/server.py")
                ):
                    functions[frame] += weight
    total = total or 1.0
    return {
        "samples_kept_seconds": round(total, 2),
        "samples_dropped_as_waits_seconds": round(waits, 2),
        "share": {c: round(v / total, 4) for c, v in by_category.most_common()},
        "details": {c: round(details[c] / total, 4) for c in [*(d[0] for d in DETAILS), DB_REST]},
        "certfleet_functions_inclusive": {
            f: round(v / total, 4) for f, v in functions.most_common(30)
        },
    }


# --- output ------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    head = (
        f"{'server':<11} {'operation':<17} {'db':<10} {'wk':>2} {'TLS':<3} {'µs CPU/op':>9} "
        f"{'ratio':>5} {'ops/s':>6} {'p50 ms':>6} {'p99 ms':>6} {'fail':>4}"
    )
    print(head)
    print("-" * len(head))
    dbs = {"-": 0, "sqlite": 1, "postgresql": 2}
    for r in sorted(
        result["rows"],
        key=lambda r: (
            r["tls"] != "1.3",
            dbs[r["db"]],
            r["workers"],
            r["operation"] != "GET cacerts",
        ),
    ):
        print(
            f"{r['server']:<11} {r['operation']:<17} {r['db']:<10} {r['workers']:>2} {r['tls']:<3} "
            f"{r['server_cpu_us']:>9.0f} {r['ratio_to_s_server']:>5.2f} "
            f"{r['throughput_per_s']:>6.0f} {r['p50_ms']:>6.1f} {r['p99_ms']:>6.1f} "
            f"{r['failures']:>4}{'' if r['valid'] else '  INVALID'}"
        )
    print(f"target: re-enrollment ratio <= {GO_REFERENCE_RATIO} (Go estserver, issue 3)")
    print(f"certfleet's event loop: {result.get('server_event_loop', 'asyncio')}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    prof = result.get("profile")
    if not prof:
        return
    if "error" in prof:
        print(f"\nprofile: {prof['error']}")
        return
    # Shares of the profile, in µs of the unprofiled re-enrollment of the same configuration.
    unprofiled = next(
        (
            r["server_cpu_us"]
            for r in result["rows"]
            if r["operation"] == "reenroll" and r["db"] == "sqlite" and r["workers"] == 1
            and r["tls"] == prof["tls"]
        ),
        prof["server_cpu_us_while_profiled"],
    )  # fmt: skip
    kept = prof["samples_kept_seconds"] / prof["re_enrollments"] * 1e6
    print(
        f"\nprofile: {prof['server']}, TLS {prof['tls']}, {prof['re_enrollments']} "
        f"re-enrollments ({prof['failures']} failures); samples kept: {kept:.0f} µs per "
        f"re-enrollment, server CPU while profiled: {prof['server_cpu_us_while_profiled']:.0f} µs."
        f"\nShares of server CPU, and in µs of the {unprofiled:.0f} µs measured above:"
    )
    per_op = unprofiled
    for category, share in prof["share"].items():
        print(f"  {share * 100:5.1f}%  {share * per_op:6.0f} µs  {category}")
    print("  details (overlapping):")
    for label, share in prof["details"].items():
        print(f"  {share * 100:5.1f}%  {share * per_op:6.0f} µs  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def listed(allowed: tuple[str, ...]):
        def parse(text: str) -> list[str]:
            items = [x.strip() for x in text.split(",") if x.strip()]
            if not items or any(x not in allowed for x in items):
                raise argparse.ArgumentTypeError(f"a list of {', '.join(allowed)}")
            return items

        return parse

    parser.add_argument("-n", type=int, default=300, help="devices = re-enrollments per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=listed(("1", "2", "3", "4")), default=["1", "2"])
    parser.add_argument(
        "--db", type=listed(("sqlite", "postgresql")), default=["sqlite", "postgresql"]
    )
    parser.add_argument("--tls", type=listed(("1.3", "1.2")), default=["1.3", "1.2"])
    parser.add_argument("--profile", action="store_true", help="also profile (SQLite, 1 worker)")
    parser.add_argument(
        "--floor", action="store_true",
        help="also measure bench/est_floor_server.py: handshake only, and with in-process issuing",
    )  # fmt: skip
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="the server's event loop")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--speedscope", type=Path, help="keep py-spy's profile here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers]
    if args.n < WARMUP:
        parser.error(f"-n must be at least {WARMUP}")
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
