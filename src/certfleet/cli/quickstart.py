"""`certfleet quickstart`: the end-to-end demo behind `make demo`.

It grows with the project. Today it shows what is built: the factory PKI,
device certificates from the online and an offline CA, config encrypted to a
device key, and a breach response on a device CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
import uuid
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from rich.rule import Rule

from certfleet.fleet import pki_admin
from certfleet.pki import ecies
from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.errors import PkiError
from certfleet.pki.files import write_atomic
from certfleet.pki.hierarchy import ServerNames
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pki_dir import ONLINE_CA, PkiDir

from .common import console
from .keys_commands import show_cas

MARKER = ".certfleet-demo"


def _fresh_dir(folder: Path) -> None:
    if folder.exists():
        if not (folder / MARKER).exists():
            raise PkiError(f"{folder} exists and was not made by quickstart; pick another --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    (folder / MARKER).write_text("made by certfleet quickstart; safe to delete\n")


def _device_csr(device_uuid: str, factory: str, folder: Path) -> x509.CertificateSigningRequest:
    key = generate_private_key()
    folder.mkdir(parents=True, mode=0o700)
    write_atomic(folder / "device.key", private_key_pem(key), 0o600)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
        ]
    )
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _issue_devices(pki: PkiDir, devices: Path, factory: str, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        ca_stem = ONLINE_CA if i % 2 == 0 else "local-ca-1"
        device_uuid = str(uuid.uuid4())
        folder = devices / device_uuid
        csr = _device_csr(device_uuid, factory, folder)
        cert = issue_device_certificate(
            csr, pki.read_cert(ca_stem), pki.load_signer(f"file:{ca_stem}.key"), factory
        )
        write_atomic(folder / "client.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        shutil.copy(pki.cert_path(ca_stem), folder / "issuer.pem")
        paths.append(folder)
        console.print(f"  device {device_uuid}  issued by {ca_stem}")
    return paths


def _openssl_verify(pki: PkiDir, device: Path) -> bool:
    done = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(pki.cert_path("root")),
            "-untrusted",
            str(device / "issuer.pem"),
            "-purpose",
            "sslclient",
            str(device / "client.pem"),
        ],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0


def _config_round_trip(device: Path) -> str:
    cert = x509.load_pem_x509_certificate((device / "client.pem").read_bytes())
    sealed = ecies.encrypt_b64(cert.public_key(), b"wifi-password=hunter2")  # type: ignore[arg-type]
    key = serialization.load_pem_private_key((device / "device.key").read_bytes(), None)
    opened = ecies.decrypt_b64(ecies.key_exchange(key), key.curve, sealed)  # type: ignore[union-attr,arg-type]
    return f"{len(sealed)} base64 chars -> {opened.decode()!r}"


@click.command("quickstart")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where the demo keeps its data.",
)
@click.option("--devices", default=4, show_default=True, help="How many device certs to issue.")
def quickstart(folder: Path, devices: int) -> None:
    """Run the end-to-end demo on SQLite in a local folder."""
    factory = "demo"
    _fresh_dir(folder)
    pki_path, db_url = folder / "pki", f"sqlite:///{(folder / 'certfleet.db').resolve()}"
    console.print(Rule("1. factory PKI (file keys, SQLite store)"))
    names = ServerNames(gateway_dns=["localhost"], gateway_ip=["127.0.0.1"])
    show_cas(
        asyncio.run(pki_admin.create_factory(db_url, pki_path, factory, names)),
        False,
        title=f"factory {factory!r} in {pki_path}",
    )
    pki = PkiDir(pki_path)
    console.print(Rule("2. device certificates from the online CA and an offline CA"))
    issued = _issue_devices(pki, folder / "devices", factory, devices)
    verified = sum(_openssl_verify(pki, d) for d in issued)
    console.print(f"  openssl verify (purpose sslclient): {verified}/{len(issued)} OK")
    console.print(Rule("3. a config value encrypted to a device key (go-ecies format)"))
    console.print(f"  {_config_round_trip(issued[0])}")
    console.print(Rule("4. breach response: revoke the offline CA"))
    revoked = asyncio.run(pki_admin.revoke_device_ca(db_url, pki_path, "local-ca-1", factory))
    console.print(
        f"  {revoked.ca.name} revoked at {dt.datetime.now(dt.UTC):%H:%M:%S}; "
        f"root-signed CRL: {revoked.crl_path}"
    )
    console.print(Rule("summary"))
    console.print(f"data: {folder.resolve()}   store: {db_url}")
    console.print(
        "not in this demo yet: EST server, device gateway, rotating agents and "
        "campaigns (they are being built; see README.md, Status)."
    )
    if verified != len(issued):
        raise SystemExit(1)
