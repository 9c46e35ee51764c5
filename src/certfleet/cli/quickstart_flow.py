"""The steps of `certfleet quickstart`, each driving real certfleet processes.

The demo talks to the server the way devices and operators do: the
`certfleet` and `certfleet-agent` commands in subprocesses, and plain HTTPS
with the device's client certificate for the gateway calls the agent will
make itself once it exists.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.pki import ecies
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import public_key_pem

BIN = Path(sys.executable).parent


def command(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `certfleet` or `certfleet-agent` ARGS; stdout, or PkiError with stderr."""
    done = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    if done.returncode != 0:
        raise PkiError(f"{' '.join(args[:3])} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A `certfleet server` process of the demo."""

    process: subprocess.Popen
    est_port: int
    gateway_port: int
    api_port: int

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


def start_server(pki: Path, database: str, log: Path) -> Server:
    """Start `certfleet server` and wait until its three listeners accept connections."""
    est, gateway, api = free_port(), free_port(), free_port()
    settings = log.with_name("server.toml")
    # A short campaign tick keeps the demo brisk; production keeps the default.
    settings.write_text("[campaigns]\ntick_interval = 1.0\n")
    process = subprocess.Popen(
        [
            str(BIN / "certfleet"),
            "-v",
            "server",
            "--pki",
            str(pki),
            "--database",
            database,
            "--listen-est",
            f"127.0.0.1:{est}",
            "--listen-gateway",
            f"127.0.0.1:{gateway}",
            "--listen-api",
            f"127.0.0.1:{api}",
            "--config",
            str(settings),
            "--workers",
            "2",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    for port in (est, gateway, api):
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise PkiError(f"the server did not start; see {log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
    return Server(process, est, gateway, api)


@dataclass
class Device:
    """A registered device's folder: pkey.pem, client.pem, root.crt, sota.toml."""

    uuid: str
    folder: Path

    def files(self, cert: str = "client.pem", key: str = "pkey.pem") -> tuple[Path, Path]:
        """(certificate, key) paths."""
        return self.folder / cert, self.folder / key


def register(server: Server, pki: Path, token: str, folder: Path, group: str) -> Device:
    """`certfleet-agent register` one device into `folder`."""
    out = command(
        "certfleet-agent",
        "register",
        "--server",
        f"https://127.0.0.1:{server.gateway_port}",
        "--factory",
        "demo",
        "--group",
        group,
        "--dir",
        str(folder),
        "--trust",
        str(pki / "root.crt"),
        env={"CERTFLEET_REGISTER_TOKEN": token},
    )
    return Device(out.strip(), folder)


def gateway_call(
    server: Server,
    pki: Path,
    device: Device,
    method: str,
    path: str,
    body: Any = None,
    cert: str = "client.pem",
    key: str = "pkey.pem",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request to the gateway with the device's client certificate."""
    context = ssl.create_default_context(cafile=str(pki / "root.crt"))
    cert_path, key_path = device.files(cert, key)
    context.load_cert_chain(cert_path, key_path)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", server.gateway_port, context=context, timeout=30
    )
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if payload else {}
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except (ssl.SSLError, ConnectionError) as exc:
        return 0, {}, str(exc).encode()
    finally:
        conn.close()


def decrypt_config(device: Device, body: bytes) -> dict[str, str]:
    """Decrypt the device's merged config with its own key, as the agent will."""
    key = serialization.load_pem_private_key((device.folder / "pkey.pem").read_bytes(), None)
    exchange = ecies.key_exchange(key)  # type: ignore[arg-type]
    files = json.loads(body)
    return {
        name: entry["Value"]
        if entry["Unencrypted"]
        else ecies.decrypt_b64(exchange, key.curve, entry["Value"]).decode()  # type: ignore[union-attr]
        for name, entry in files.items()
    }


def rotate_by_hand(server: Server, pki: Path, device: Device) -> list[str]:
    """The rotation steps the agent will run, done here one by one; returns what happened."""
    said = []
    command(
        "certfleet-agent",
        "est",
        "reenroll",
        "--server",
        f"https://127.0.0.1:{server.est_port}",
        "--trust",
        str(pki / "root.crt"),
        "--cert",
        str(device.folder / "client.pem"),
        "--key",
        str(device.folder / "pkey.pem"),
        "--key-out",
        str(device.folder / "pkey-2.pem"),
        "--cert-out",
        str(device.folder / "client-2.pem"),
    )
    new_cert = x509.load_pem_x509_certificate((device.folder / "client-2.pem").read_bytes())
    said.append(f"EST re-enrollment: new certificate serial {new_cert.serial_number:x}")
    next_key = public_key_pem(new_cert.public_key())  # type: ignore[arg-type]
    status, _, _ = gateway_call(server, pki, device, "PATCH", "/device", {"next_pubkey": next_key})
    said.append(f"next key announced to the gateway: {status}")
    status, _, body = gateway_call(
        server, pki, device, "GET", "/device", cert="client-2.pem", key="pkey-2.pem"
    )
    said.append(f"first request with the new certificate: {status}")
    time.sleep(1)  # the deny-list reaches every worker within a second
    status, _, body = gateway_call(server, pki, device, "GET", "/device")
    said.append(f"old certificate now: {status} {body.decode().strip()}")
    return said
