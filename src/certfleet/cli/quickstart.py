"""`certfleet quickstart`: the end-to-end demo behind `make demo`.

It runs what is built so far with real processes on SQLite: the factory PKI,
`certfleet server` with two workers, devices registered online and devices
with offline-CA certificates registering on first use, encrypted group
config, one key rotation done step by step (EST renewal, next-key
announcement, switch, old certificate deny-listed), a breach response on the
offline CA, and the events all of it produced. The rotating agent and
campaigns will replace the hand-driven steps as they land.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import uuid
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from rich.rule import Rule

from certfleet.fleet import pki_admin
from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.errors import PkiError
from certfleet.pki.files import write_atomic
from certfleet.pki.hierarchy import ServerNames
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pki_dir import PkiDir

from .common import console
from .keys_commands import show_cas
from .quickstart_flow import (
    Device,
    Server,
    command,
    decrypt_config,
    gateway_call,
    register,
    rotate_by_hand,
    start_server,
)

MARKER = ".certfleet-demo"
FACTORY = "demo"
GROUP = "lab"


def _fresh_dir(folder: Path) -> None:
    if folder.exists():
        if not (folder / MARKER).exists():
            raise PkiError(f"{folder} exists and was not made by quickstart; pick another --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    (folder / MARKER).write_text("made by certfleet quickstart; safe to delete\n")


def _offline_device(pki: PkiDir, folder: Path) -> Device:
    """A device made in manufacturing: key and certificate from the offline CA."""
    device_uuid = str(uuid.uuid4())
    key = generate_private_key()
    folder.mkdir(parents=True, mode=0o700)
    write_atomic(folder / "pkey.pem", private_key_pem(key), 0o600)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, FACTORY),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    cert = issue_device_certificate(
        csr, pki.read_cert("local-ca-1"), pki.load_signer("file:local-ca-1.key"), FACTORY
    )
    write_atomic(folder / "client.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Device(device_uuid, folder)


def _say(text: str) -> None:
    console.print(f"  {text}", highlight=False)


def _devices(server: Server, pki_path: Path, db_url: str, folder: Path, count: int) -> list[Device]:
    token = json.loads(
        command(
            "certfleet",
            "tokens",
            "create",
            "--name",
            "quickstart",
            "--scope",
            "register",
            "--expires-in",
            "1h",
            "--pki",
            str(pki_path),
            "--database",
            db_url,
            "--json",
        )
    )["token"]
    online = [
        register(server, pki_path, token, folder / f"online-{n}", GROUP)
        for n in range(count - count // 2)
    ]
    for device in online:
        _say(f"registered online: {device.uuid} (group {GROUP})")
    offline = [
        _offline_device(PkiDir(pki_path), folder / f"offline-{n}") for n in range(count // 2)
    ]
    for device in offline:
        status, _, body = gateway_call(server, pki_path, device, "GET", "/device")
        via = json.loads(body).get("registered_via") if status == 200 else body.decode()
        _say(f"offline-CA device {device.uuid}: first request {status}, registered via {via}")
    return online + offline


def _config(server: Server, pki_path: Path, db_url: str, device: Device) -> None:
    command(
        "certfleet",
        "config",
        "set",
        "--group",
        GROUP,
        "wifi-password=hunter2",
        "--reason",
        "quickstart",
        "--pki",
        str(pki_path),
        "--database",
        db_url,
    )
    status, headers, body = gateway_call(server, pki_path, device, "GET", "/config")
    _say(
        f"device fetches /config: {status}, decrypted with its own key: "
        f"{decrypt_config(device, body)}"
    )
    again = gateway_call(server, pki_path, device, "GET", "/config", None)
    _say(
        f"plain re-fetch {again[0]}; with If-Modified-Since: "
        f"{_if_modified(server, pki_path, device, headers.get('Last-Modified', ''))}"
    )


def _if_modified(server: Server, pki_path: Path, device: Device, since: str) -> int:
    import http.client
    import ssl

    context = ssl.create_default_context(cafile=str(pki_path / "root.crt"))
    context.load_cert_chain(*device.files())
    conn = http.client.HTTPSConnection("127.0.0.1", server.gateway_port, context=context)
    try:
        conn.request("GET", "/config", headers={"If-Modified-Since": since})
        return conn.getresponse().status
    finally:
        conn.close()


def _events(pki_path: Path, db_url: str) -> str:
    out = command(
        "certfleet",
        "events",
        "tail",
        "--json",
        "-n",
        "1000",
        "--pki",
        str(pki_path),
        "--database",
        db_url,
    )
    topics = collections.Counter(json.loads(line)["topic"] for line in out.splitlines() if line)
    return ", ".join(f"{topic} {count}" for topic, count in sorted(topics.items()))


@click.command("quickstart")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where the demo keeps its data.",
)
@click.option(
    "--devices",
    default=4,
    show_default=True,
    type=click.IntRange(2, 50),
    help="How many devices (half online, half from the offline CA).",
)
def quickstart(folder: Path, devices: int) -> None:
    """Run the end-to-end demo on SQLite in a local folder."""
    _fresh_dir(folder)
    pki_path, db_url = folder / "pki", f"sqlite:///{(folder / 'certfleet.db').resolve()}"
    console.print(Rule("1. factory PKI (file keys, SQLite store)"))
    names = ServerNames(gateway_dns=["localhost"], gateway_ip=["127.0.0.1"])
    show_cas(
        asyncio.run(pki_admin.create_factory(db_url, pki_path, FACTORY, names)),
        False,
        title=f"factory {FACTORY!r} in {pki_path}",
    )
    console.print(Rule("2. certfleet server: EST and device gateway, 2 workers"))
    server = start_server(pki_path, db_url, folder / "server.log")
    try:
        _say(
            f"EST https://127.0.0.1:{server.est_port}  gateway "
            f"https://127.0.0.1:{server.gateway_port}  log {folder / 'server.log'}"
        )
        console.print(Rule("3. devices: online registration and offline-CA first use"))
        fleet = _devices(server, pki_path, db_url, folder / "devices", devices)
        console.print(Rule("4. encrypted group config"))
        _config(server, pki_path, db_url, fleet[0])
        console.print(Rule("5. one key rotation, step by step"))
        for line in rotate_by_hand(server, pki_path, fleet[0]):
            _say(line)
        console.print(Rule("6. breach response: revoke the offline CA"))
        revoked = asyncio.run(pki_admin.revoke_device_ca(db_url, pki_path, "local-ca-1"))
        _say(
            f"{revoked.ca.name} revoked ({len(revoked.affected_devices)} devices); "
            f"CRL {revoked.crl_path}"
        )
        status, _, body = gateway_call(server, pki_path, fleet[-1], "GET", "/device")
        _say(f"offline-CA device now: {status} {body.decode().strip()}")
        console.print(Rule("summary"))
        _say(f"events: {_events(pki_path, db_url)}")
    finally:
        server.stop()
    _say(f"data: {folder.resolve()}   store: {db_url}")
    _say("next in this demo: the rotating agent and campaigns (see README.md, Status)")
