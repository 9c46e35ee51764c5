"""The demo's devices: folders made online or in "manufacturing", each run by a real agent.

Every device is a folder with its key, certificate, root, `sota.toml` and an
`agent.toml`, and a `certfleet-agent run` process polling the gateway. The
demo kills and restarts some of them to show that a rotation survives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certfleet.gateway.sota_config import sota_toml
from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pki_dir import PkiDir

from .quickstart_flow import BIN, Server

POLL_SECONDS = 2.0


@dataclass
class Agent:
    """One device folder and the `certfleet-agent run` process that looks after it."""

    uuid: str
    folder: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def settings(self) -> Path:
        """The agent's agent.toml."""
        return self.folder / "agent.toml"

    def certificate(self) -> x509.Certificate:
        """The certificate sota.toml points at now (it changes with each rotation)."""
        for line in (self.folder / "sota.toml").read_text().splitlines():
            if line.startswith("tls_clientcert_path"):
                name = line.split('"')[1]
                return x509.load_pem_x509_certificate((self.folder / name).read_bytes())
        raise ValueError(f"{self.folder / 'sota.toml'} names no client certificate")

    def start(self) -> None:
        """Start (or restart) the agent; its output goes to agent.log."""
        log = (self.folder / "agent.log").open("a")
        self.process = subprocess.Popen(
            [str(BIN / "certfleet-agent"), "run", "--config", str(self.settings)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL, as a power cut would stop it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: the agent finishes its step and exits."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def write_agent_settings(agent: Agent, est_url: str) -> None:
    """agent.toml for a demo device: everything inside its folder, a short poll."""
    folder = agent.folder
    (folder / "handlers").mkdir(mode=0o700, exist_ok=True)
    agent.settings.write_text(
        f'sota_config = "{folder / "sota.toml"}"\n'
        f'state_dir = "{folder / "state"}"\n'
        f'secrets_dir = "{folder / "secrets"}"\n'
        f'handlers_dir = "{folder / "handlers"}"\n'
        f"poll_interval = {POLL_SECONDS}\n"
        "restart_commands = []\n"
        "[renewal]\n"
        f'est_server = "{est_url}"\n'
    )


def manufacture(pki: PkiDir, folder: Path, server: Server, factory: str) -> Agent:
    """A device made in the factory: key and certificate from the offline CA, no registration.

    It registers itself on its first request to the gateway (trust on first use).
    """
    device_uuid = str(uuid.uuid4())
    key = generate_private_key()
    folder.mkdir(parents=True, mode=0o700)
    write_atomic(folder / "pkey.pem", private_key_pem(key), 0o600)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    cert = issue_device_certificate(
        csr, pki.read_cert("local-ca-1"), pki.load_signer("file:local-ca-1.key"), factory
    )
    write_atomic(folder / "client.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    root = pki.read_cert("root").public_bytes(serialization.Encoding.PEM)
    write_atomic(folder / "root.crt", root, 0o644)
    gateway = f"https://127.0.0.1:{server.gateway_port}"
    write_atomic(folder / "sota.toml", sota_toml(gateway, str(folder), None).encode(), 0o644)
    return Agent(device_uuid, folder)
