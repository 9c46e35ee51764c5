"""A real `certfleet server` and devices played by hand over HTTPS, for campaign tests.

Devices register with `certfleet-agent register` (or come from the offline CA
and register on first use) and rotate the way the agent does: EST
re-enrollment with `certfleet-agent est reenroll`, `PATCH /device` with the
next key, a request with the new certificate, and update events.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem, public_key_pem
from certfleet.pki.pki_dir import PkiDir

from .cli_run import certfleet
from .cli_run import certfleet_agent as agent
from .server_process import ServerProcess, free_port

NAMES = ["--gateway-dns", "localhost", "--gateway-ip", "127.0.0.1"]


class Clock:
    """The campaign runner's clock, moved on by the test instead of waiting."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


@dataclass
class Dev:
    """One device's folder and the HTTPS calls it makes."""

    uuid: str
    folder: Path
    fleet: Fleet
    cert: str = "client.pem"
    key: str = "pkey.pem"
    sent: int = 0

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.fleet.pki / "root.crt"))
        context.load_cert_chain(self.folder / self.cert, self.folder / self.key)
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.fleet.server.gateway_port, context=context, timeout=30
        )
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def rotation_file(self) -> dict[str, str] | None:
        """The fio-rotate-certs lines the gateway serves this device, or None."""
        status, body = self.call("GET", "/config")
        assert status == 200, body
        entry = json.loads(body).get("fio-rotate-certs")
        if entry is None:
            return None
        assert entry["Unencrypted"] is True
        assert entry["OnChanged"][0].endswith("/renew-client-cert")
        return dict(line.split("=", 1) for line in entry["Value"].splitlines())

    def report(self, rotation_id: str, step: str, success: bool | None = None) -> None:
        """POST /events with one step of the rotation."""
        self.sent += 1
        event = {
            "id": f"{self.uuid}-{self.sent}",
            "event": {"correlationId": rotation_id, "success": success},
            "eventType": {"id": step},
        }
        status, body = self.call("POST", "/events", [event])
        assert status == 200, body

    def rotate(self) -> str:
        """Run the rotation the gateway asked for; returns its rotation id."""
        order = self.rotation_file()
        assert order is not None, f"device {self.uuid} has no rotation to run"
        rotation = order["ROTATIONID"]
        self.report(rotation, "CertRotationStarted")
        new_cert, new_key = f"client-{rotation}.pem", f"pkey-{rotation}.pem"
        agent(
            "est", "reenroll", "--server", f"https://127.0.0.1:{self.fleet.server.port}",
            "--trust", str(self.fleet.pki / "root.crt"),
            "--cert", str(self.folder / self.cert), "--key", str(self.folder / self.key),
            "--key-out", str(self.folder / new_key), "--cert-out", str(self.folder / new_cert),
        )  # fmt: skip
        self.report(rotation, "Generate new certificate", True)
        cert = x509.load_pem_x509_certificate((self.folder / new_cert).read_bytes())
        status, body = self.call(
            "PATCH", "/device", {"next_pubkey": public_key_pem(cert.public_key())}
        )
        assert status == 200, body
        self.cert, self.key = new_cert, new_key
        status, body = self.call("GET", "/device")
        assert status == 200, body
        self.report(rotation, "CertRotationCompleted", True)
        return rotation

    def fail_rotation(self) -> str:
        """Start the asked-for rotation and report that it failed."""
        order = self.rotation_file()
        assert order is not None
        rotation = order["ROTATIONID"]
        self.report(rotation, "CertRotationStarted")
        self.report(rotation, "CertRotationCompleted", False)
        return rotation


@dataclass
class Fleet:
    """The server, its PKI and store, and a registration token."""

    pki: Path
    db_url: str
    server: ServerProcess
    token: str
    folder: Path
    devices: list[Dev] = field(default_factory=list)

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        return certfleet(*args, "--pki", str(self.pki), "--database", self.db_url, expect=expect)

    def register(self, count: int, group: str = "lab") -> list[Dev]:
        made = []
        for _ in range(count):
            folder = self.folder / f"dev{len(self.devices)}"
            done = agent(
                "register", "--server", f"https://127.0.0.1:{self.server.gateway_port}",
                "--factory", "acme", "--group", group, "--dir", str(folder),
                "--trust", str(self.pki / "root.crt"),
                env={"CERTFLEET_REGISTER_TOKEN": self.token},
            )  # fmt: skip
            device = Dev(done.stdout.strip(), folder, self)
            self.devices.append(device)
            made.append(device)
        return made

    def offline_device(self, ca: str = "local-ca-1", ca_dir: Path | None = None) -> Dev:
        """A device made at manufacturing with an offline CA; it registers on first use."""
        pki = PkiDir(ca_dir or self.pki)
        device_uuid = str(uuid.uuid4())
        folder = self.folder / f"dev{len(self.devices)}"
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)  # a retry reuses it
        key = generate_private_key()
        write_atomic(folder / "pkey.pem", private_key_pem(key), 0o600)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "acme"),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        cert = issue_device_certificate(
            csr, pki.read_cert(ca), pki.load_signer(f"file:{ca}.key"), "acme"
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        write_atomic(folder / "client.pem", pem, 0o644)
        device = Dev(device_uuid, folder, self)
        status, body = device.call("GET", "/device")
        assert status == 200, body
        self.devices.append(device)
        return device


def start_fleet(tmp_path: Path, db_url: str, *, runner: str = "enabled = false") -> Fleet:
    """keys ca create, a server (its campaign runner off unless `runner` says so), a token."""
    pki = tmp_path / "pki"
    certfleet(
        "keys", "ca", "create", str(pki), "--factory", "acme", *NAMES, "--database", db_url
    )  # fmt: skip
    if db_url.startswith("postgresql"):
        certfleet("db", "upgrade", "--database", db_url, "--pki", str(pki))
    settings = tmp_path / "server.toml"
    settings.write_text(f"[campaigns]\n{runner}\n")
    port = free_port()
    server = ServerProcess(
        "--pki", str(pki), "--database", db_url, "--listen-est", f"127.0.0.1:{port}",
        "--config", str(settings), port=port,
    )  # fmt: skip
    token = json.loads(
        certfleet(
            "tokens", "create", "--name", "line", "--scope", "register",
            "--pki", str(pki), "--database", db_url, "--json",
        ).stdout
    )["token"]  # fmt: skip
    return Fleet(pki, db_url, server, token, tmp_path / "devices")
