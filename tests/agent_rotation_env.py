"""A factory, a real `certfleet server` and registered devices, for the rotation tests.

Everything runs as real processes: `certfleet keys ca create`, `certfleet
server` (SQLite, one worker), `certfleet tokens create`, `certfleet-agent
register`, `certfleet config set` and `certfleet-agent rotate`. The server can
be killed and started again on the same ports (devices keep their sota.toml).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certfleet.agent.device import Device, load_device
from certfleet.agent.local_config import LocalConfig, load_local_config, save_local_config
from certfleet.fleet import config_admin
from certfleet.pki import ecies
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import cert_sha256, generate_private_key, private_key_pem
from certfleet.store import certificates, denylist, devices, open_store, updates
from certfleet.store.config_files import ConfigValue
from certfleet.store.schema import ConfigScope

from .cli_run import certfleet
from .server_process import free_port, wait_listening

BIN = Path(sys.executable).parent
FACTORY = "acme"
GROUP = "lab"
STEPS = [
    "CertRotationStarted",
    "Generate new certificate",
    "Lock device configuration on server",
    "Update local configuration with new key",
    "Update device specific configuration on server with new key",
    "Finalize aktualizr configuration",
    "CertRotationCompleted",
]
DEVICE_VALUES = {"api-key": "s3cr3t", "ntp-token": "t0k3n"}
GROUP_VALUES = {"wifi": "ssid=lab psk=lab-psk"}


class Server:
    """`certfleet server` on fixed ports, so it can be killed and started again."""

    def __init__(self, pki: Path, db_url: str, log: Path) -> None:
        self.pki, self.db_url, self.log = pki, db_url, log
        self.est_port, self.gateway_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def est_url(self) -> str:
        return f"https://127.0.0.1:{self.est_port}"

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    def start(self) -> None:
        args = [
            str(BIN / "certfleet"),
            "-v",
            "server",
            "--pki",
            str(self.pki),
            "--database",
            self.db_url,
            "--listen-est",
            f"127.0.0.1:{self.est_port}",
            "--listen-gateway",
            f"127.0.0.1:{self.gateway_port}",
            "--listen-api",
            "off",
            "--workers",
            "1",
        ]
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_listening(self.est_port, self.process)
        wait_listening(self.gateway_port, self.process)

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class DeviceDir:
    """A registered device: its folder (sota.toml, keys) and its agent.toml."""

    uuid: str
    folder: Path
    agent_toml: Path
    pin: str | None = None

    def agent_device(self) -> Device:
        """The device as the agent sees it (file or token key)."""
        return load_device(self.sota, self.pin)

    @property
    def sota(self) -> Path:
        return self.folder / "sota.toml"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    def current(self) -> tuple[Path, Path]:
        """(certificate, key) files sota.toml names now."""
        device = load_device(self.sota)
        assert device.cert_path is not None and device.key_path is not None
        return device.cert_path, device.key_path

    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.current()[0].read_bytes())

    def journal(self, rotation_id: str) -> dict[str, Any]:
        return json.loads((self.state / "rotations" / f"{rotation_id}.json").read_text())


class Lab:
    """One factory and its server; devices are added with `device()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.db_url = f"sqlite:///{root / 'certfleet.db'}"
        certfleet(
            "keys",
            "ca",
            "create",
            str(self.pki),
            "--factory",
            FACTORY,
            "--gateway-dns",
            "localhost",
            "--gateway-ip",
            "127.0.0.1",
            "--database",
            self.db_url,
        )
        self.server = Server(self.pki, self.db_url, root / "server.log")
        self.server.start()
        self._token: str | None = None
        self._count = 0

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        return certfleet(*args, "--pki", str(self.pki), "--database", self.db_url)

    def token(self) -> str:
        if self._token is None:
            made = self.admin("tokens", "create", "--name", "lab", "--scope", "register", "--json")
            self._token = json.loads(made.stdout)["token"]
        return self._token

    def _register(self, *extra: str, env: dict[str, str] | None = None) -> tuple[Path, str]:
        """`certfleet-agent register` a new device folder; (folder, uuid)."""
        self._count += 1
        folder = self.root / f"device-{self._count}"
        done = subprocess.run(
            [
                str(BIN / "certfleet-agent"), "register", "--server", self.server.gateway_url,
                "--factory", FACTORY, "--group", GROUP, "--dir", str(folder),
                "--trust", str(self.pki / "root.crt"), *extra,
            ],
            env={**os.environ, "CERTFLEET_REGISTER_TOKEN": self.token(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return folder, done.stdout.strip()

    def device(self, restart_log: Path | None = None) -> DeviceDir:
        """Register a device with file keys, give it config, and write its agent.toml."""
        folder, uuid = self._register()
        device = DeviceDir(uuid, folder, folder / "agent.toml")
        values = [f"{name}={value}" for name, value in DEVICE_VALUES.items()]
        self.admin("config", "set", "--device", device.uuid, *values, "--reason", "test")
        if self._count == 1:
            wifi = [f"{name}={value}" for name, value in GROUP_VALUES.items()]
            self.admin("config", "set", "--group", GROUP, *wifi, "--reason", "test")
        self.write_agent_toml(device, restart_log)
        self.fetch_local_config(device)
        return device

    def quick_device(self) -> DeviceDir:
        """Like `device()`, but registered and configured from this process (no CLI start-up).

        The same `POST /register` and config store calls the commands make, for
        tests that need many devices.
        """
        self._count += 1
        folder = self.root / f"device-{self._count}"
        folder.mkdir(mode=0o700)
        device_uuid = str(uuid.uuid4())
        key = generate_private_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, FACTORY),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        body = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "factory": FACTORY,
            "group": GROUP,
            "base_path": str(folder),
        }
        answer = self._post_register(body)
        write_atomic(folder / "pkey.pem", private_key_pem(key), 0o600)
        write_atomic(folder / "client.pem", answer["client_pem"].encode(), 0o644)
        write_atomic(folder / "root.crt", answer["root_pem"].encode(), 0o644)
        write_atomic(folder / "sota.toml", answer["sota_toml"].encode(), 0o644)
        device = DeviceDir(device_uuid, folder, folder / "agent.toml")
        self.set_config(ConfigScope.DEVICE, device_uuid, DEVICE_VALUES)
        if self._count == 1:
            self.set_config(ConfigScope.GROUP, GROUP, GROUP_VALUES)
        self.write_agent_toml(device)
        self.fetch_local_config(device)
        return device

    def _post_register(self, body: dict[str, Any]) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.pki / "root.crt"))
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.server.gateway_port, context=context, timeout=30
        )
        try:
            conn.request(
                "POST",
                "/register",
                body=json.dumps(body),
                headers={"Authorization": f"Bearer {self.token()}"},
            )
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        assert response.status == 201, data
        return json.loads(data)

    def set_config(self, scope: ConfigScope, key: str, values: dict[str, str]) -> None:
        files = {name: ConfigValue(value, []) for name, value in values.items()}
        asyncio.run(
            config_admin.set_config(
                self.db_url, scope, key, files, reason="test", actor="test", factory=FACTORY
            )
        )

    def token_device(self, module: str, label: str, pin: str) -> DeviceDir:
        """Register a device whose key is made in slot 01 of a PKCS#11 token (cert in 03)."""
        hsm = ["--hsm-module", module, "--hsm-token-label", label]
        slots = ["--hsm-key-id", "01", "--hsm-cert-id", "03"]
        folder, uuid = self._register(*hsm, *slots, env={"CERTFLEET_HSM_PIN": pin})
        device = DeviceDir(uuid, folder, folder / "agent.toml", pin)
        write_atomic(folder / "pin", f"{pin}\n".encode(), 0o600)
        self.set_config(ConfigScope.DEVICE, device.uuid, DEVICE_VALUES)
        if self._count == 1:
            self.set_config(ConfigScope.GROUP, GROUP, GROUP_VALUES)
        self.write_agent_toml(device, pin_file=folder / "pin")
        self.fetch_local_config(device)
        return device

    def write_agent_toml(
        self, device: DeviceDir, restart_log: Path | None = None, pin_file: Path | None = None
    ) -> None:
        restart = restart_log or device.folder / "restarts.log"
        command = [sys.executable, "-c", f"open({str(restart)!r}, 'a').write('restart\\n')"]
        pin = f'hsm_pin_file = "{pin_file}"\n' if pin_file else ""
        device.agent_toml.write_text(
            f'sota_config = "{device.sota}"\n'
            f'state_dir = "{device.state}"\n'
            f"restart_commands = [{json.dumps(command)}]\n"
            f"{pin}"
            "[renewal]\n"
            f'est_server = "{self.server.est_url}"\n'
        )

    def fetch_local_config(self, device: DeviceDir) -> None:
        """What the config daemon keeps: GET /config as received, values encrypted."""
        status, headers, body = self.call(device, "GET", "/config")
        assert status == 200, body
        files = json.loads(body)
        save_local_config(device.state, LocalConfig(headers.get("last-modified"), files))

    def call(
        self,
        device: DeviceDir,
        method: str,
        path: str,
        cert_key: tuple[Path, Path] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One gateway request with the device's current (or the given) credential."""
        if cert_key is None:
            context = device.agent_device().tls_context()
        else:
            context = ssl.create_default_context(cafile=str(self.pki / "root.crt"))
            context.load_cert_chain(*cert_key)
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.server.gateway_port, context=context, timeout=30
        )
        try:
            conn.request(method, path)
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, response.read()
        except (ssl.SSLError, ConnectionError) as exc:
            return 0, {}, str(exc).encode()
        finally:
            conn.close()

    def rotate(
        self, device: DeviceDir, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """`certfleet-agent -v rotate --config agent.toml ARGS` as a real process."""
        return subprocess.run(
            [
                str(BIN / "certfleet-agent"),
                "-v",
                "rotate",
                "--config",
                str(device.agent_toml),
                *args,
            ],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def store(self, action: Any, *args: Any) -> Any:
        """Run `action(session, *args)` in a store transaction (the server's SQLite file)."""

        async def go() -> Any:
            store = await open_store(self.db_url)
            try:
                async with store.transaction() as session:
                    return await action(session, *args)
            finally:
                await store.close()

        return asyncio.run(go())

    def close(self) -> None:
        self.server.stop()


# -- what the store says -------------------------------------------------------------------------


async def issued_certificates(session, device_uuid: str) -> list[dict[str, Any]]:
    rows = await certificates.list_device_certificates(session, device_uuid)
    return [
        {"sha256": r.sha256, "serial": r.serial, "status": str(r.status), "pubkey": r.pubkey_sha256}
        for r in rows
    ]


async def current_cert_sha256(session, device_uuid: str) -> str:
    device = await devices.get_device(session, device_uuid)
    row = await certificates.get_certificate_by_id(session, device.current_cert_id)
    return row.sha256


async def is_denied(session, sha256: str) -> bool:
    return await denylist.is_denied(session, sha256)


async def rotation_events(session, device_uuid: str, rotation_id: str) -> dict[str, Any]:
    update = await updates.get_update(session, device_uuid, rotation_id)
    events = await updates.list_update_events(session, update.id)
    return {
        "status": str(update.status),
        "kind": update.kind,
        "events": [(e.event_type, e.success) for e in events],
        "details": [e.details for e in events],
    }


def decrypt_all(files: dict[str, Any], key_path: Path) -> dict[str, str]:
    """Every value of a config answer, opened with the key in `key_path`."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return decrypt_with(files, ecies.key_exchange(key), key.curve)  # type: ignore[arg-type,union-attr]


def decrypt_with(files: dict[str, Any], exchange: Any, curve: Any) -> dict[str, str]:
    return {
        name: entry["Value"]
        if entry["Unencrypted"]
        else ecies.decrypt_b64(exchange, curve, entry["Value"]).decode()
        for name, entry in files.items()
    }


def device_values(device: DeviceDir, files: dict[str, Any]) -> dict[str, str]:
    """Config values opened with the device's current key, wherever it lives."""
    signer = device.agent_device().signer()
    return decrypt_with(files, signer.exchange, signer.public_key.curve)


def local_values(device: DeviceDir) -> dict[str, str]:
    """The device's local config copy, opened with its current key."""
    return device_values(device, load_local_config(device.state).files)


def fingerprint(path: Path) -> str:
    return cert_sha256(x509.load_pem_x509_certificate(path.read_bytes()))
