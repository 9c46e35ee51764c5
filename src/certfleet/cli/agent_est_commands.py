"""`certfleet-agent est ...`: talk to an EST server from a device."""

from __future__ import annotations

import os
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from certfleet.est.client import (
    EstClient,
    EstClientError,
    Pending,
    fetch_cacerts_unverified,
    fingerprint,
)
from certfleet.pki.errors import PkiError
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pkcs11_signer import parse_hex_id
from certfleet.pki.signer import FileSigner

from .common import CertfleetGroup, console, run
from .device_keys import (
    client_key,
    current_token_key_option,
    hsm_options,
    make_csr,
    new_key_signer,
    token_client_key_options,
)

PASSWORD_ENV = "CERTFLEET_EST_PASSWORD"


def _server_options(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        [
            click.option("--server", required=True, metavar="URL", help="https://host:port"),
            click.option(
                "--trust",
                type=click.Path(dir_okay=False, exists=True, path_type=Path),
                help="PEM file with the factory root that the server must chain to.",
            ),
            click.option("--label", help="CA label (/.well-known/est/<label>/...)."),
            click.option(
                "--max-wait",
                default=0,
                show_default=True,
                help="Seconds to keep retrying while the server holds the request (202).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _trust(path: Path | None) -> list[x509.Certificate]:
    if path is None:
        raise click.UsageError("give --trust ROOT.pem (get it with `est cacerts --bootstrap`)")
    return x509.load_pem_x509_certificates(path.read_bytes())


def _write_cert(cert: x509.Certificate, out: Path) -> None:
    write_atomic(out, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    console.print(
        f"certificate for {cert.subject.rfc4514_string()} written to {out} "
        f"(valid until {cert.not_valid_after_utc:%Y-%m-%d})"
    )


async def _enroll(
    client: EstClient, op: str, csr: x509.CertificateSigningRequest, max_wait: int
) -> x509.Certificate:
    if max_wait > 0:
        return await client.enroll_waiting(op, csr, max_wait)
    result = await getattr(client, op)(csr)
    if isinstance(result, Pending):
        raise EstClientError(
            202,
            f"the request waits for operator approval; send the same "
            f"request again in {result.retry_after} s (or use --max-wait)",
        )
    return result


@click.group(cls=CertfleetGroup)
def est() -> None:
    """Enroll and renew through an RFC 7030 EST server."""


@est.command("cacerts")
@_server_options
@click.option(
    "--bootstrap",
    is_flag=True,
    help="No trust anchor yet: fetch unverified and confirm the fingerprint.",
)
@click.option(
    "--fingerprint",
    "expected",
    metavar="SHA256",
    help="With --bootstrap: the root fingerprint to accept without asking.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the certificates (PEM) here.",
)
def cacerts(
    server: str,
    trust: Path | None,
    label: str | None,
    max_wait: int,
    bootstrap: bool,
    expected: str | None,
    out: Path | None,
) -> None:
    """Fetch the CA certificates; with --bootstrap, confirm them before trusting them."""
    if bootstrap:
        certs = run(fetch_cacerts_unverified, server, label)
        # PKCS#7 keeps no order: the root is the self-signed one.
        root = next((c for c in certs if c.subject == c.issuer), None)
        if root is None:
            raise EstClientError(0, "the server returned no root (self-signed) CA certificate")
        shown = fingerprint(root)
        console.print(f"root: {root.subject.rfc4514_string()}\nSHA-256 fingerprint: {shown}")
        if expected:
            if expected.replace(":", "").lower() != shown.replace(":", "").lower():
                raise PkiError(
                    "the server's root fingerprint differs from --fingerprint: "
                    "do not trust this server"
                )
        elif not click.confirm("Does this fingerprint match the one your operator gave you?"):
            raise click.Abort()
    else:
        certs = run(EstClient(server, _trust(trust), label=label).cacerts)
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
    if out:
        write_atomic(out, pem.encode(), 0o644)
        console.print(f"{len(certs)} CA certificate(s) written to {out}")
    else:
        click.echo(pem, nl=False)


@est.command("csrattrs")
@_server_options
def csrattrs(server: str, trust: Path | None, label: str | None, max_wait: int) -> None:
    """Show what the server wants in a CSR."""
    for item in run(EstClient(server, _trust(trust), label=label).csrattrs):
        click.echo(item)


@est.command("enroll")
@_server_options
@click.option("--device", "device_uuid", required=True, help="The device uuid (CSR CN).")
@click.option("--user", "username", required=True, help="Enrollment credential user name.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help=f"File with the credential's password (or set {PASSWORD_ENV}).",
)
@click.option(
    "--key-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the device key is (created 0600 if missing).",
)
@click.option("--cert-out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@hsm_options
def enroll(
    server: str,
    trust: Path | None,
    label: str | None,
    max_wait: int,
    device_uuid: str,
    username: str,
    password_file: Path | None,
    key_out: Path | None,
    cert_out: Path,
    hsm_module: str | None,
    hsm_token_label: str | None,
    hsm_key_id: str | None,
    hsm_pin: str | None,
) -> None:
    """First certificate for this device, with an operator-issued credential."""
    password = password_file.read_text().strip() if password_file else os.environ.get(PASSWORD_ENV)
    if not password:
        raise click.UsageError(f"give --password-file or set {PASSWORD_ENV}")
    signer = new_key_signer(key_out, hsm_module, hsm_token_label, hsm_key_id, hsm_pin)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_uuid)])
    client = EstClient(server, _trust(trust), label=label, username=username, password=password)
    _write_cert(run(_enroll, client, "simpleenroll", make_csr(signer, subject), max_wait), cert_out)


@est.command("reenroll")
@_server_options
@click.option(
    "--cert",
    "cert_file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The current device certificate.",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The current device key (authenticates the request); or --hsm-current-key-id.",
)
@click.option(
    "--key-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the new key goes (created 0600 if missing).",
)
@click.option("--cert-out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@hsm_options
@current_token_key_option
def reenroll(
    server: str,
    trust: Path | None,
    label: str | None,
    max_wait: int,
    cert_file: Path,
    key_file: Path | None,
    key_out: Path | None,
    cert_out: Path,
    hsm_module: str | None,
    hsm_token_label: str | None,
    hsm_key_id: str | None,
    hsm_pin: str | None,
    hsm_current_key_id: str | None,
) -> None:
    """Renew this device's certificate with a new key (same subject and SAN)."""
    current_key = client_key(key_file, hsm_module, hsm_token_label, hsm_current_key_id, hsm_pin)
    if current_key is None:
        raise click.UsageError("give --key FILE, or --hsm-current-key-id HEX for a token key")
    if hsm_current_key_id and hsm_key_id and _same_id(hsm_current_key_id, hsm_key_id):
        raise click.UsageError("--hsm-key-id must name another slot: renewal brings a new key")
    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
    # The TLS context first: a token key that cannot authenticate must not
    # leave a new key behind in the token.
    client = EstClient(
        server, _trust(trust), label=label, cert_file=cert_file, key_file=current_key
    )
    signer = new_key_signer(key_out, hsm_module, hsm_token_label, hsm_key_id, hsm_pin)
    try:
        sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    csr = make_csr(signer, current.subject, sans)
    _write_cert(run(_enroll, client, "simplereenroll", csr, max_wait), cert_out)


def _same_id(first: str, second: str) -> bool:
    return parse_hex_id(first) == parse_hex_id(second)


@est.command("serverkeygen")
@_server_options
@click.option("--device", "device_uuid", required=True)
@click.option("--user", "username", help="Enrollment credential (or use --cert/--key).")
@click.option("--password-file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key-out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--cert-out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@token_client_key_options
def serverkeygen(
    server: str,
    trust: Path | None,
    label: str | None,
    max_wait: int,
    device_uuid: str,
    username: str | None,
    password_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    key_out: Path,
    cert_out: Path,
    hsm_module: str | None,
    hsm_token_label: str | None,
    hsm_current_key_id: str | None,
    hsm_pin: str | None,
) -> None:
    """Have the server generate the key (only if the server allows it)."""
    password = password_file.read_text().strip() if password_file else os.environ.get(PASSWORD_ENV)
    current_key = client_key(key_file, hsm_module, hsm_token_label, hsm_current_key_id, hsm_pin)
    if current_key is not None and cert_file is None:
        raise click.UsageError("--key (or --hsm-current-key-id) needs --cert")
    client = EstClient(
        server,
        _trust(trust),
        label=label,
        username=username,
        password=password,
        cert_file=cert_file,
        key_file=current_key,
    )
    # The CSR only names the subject; a throwaway key signs it.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_uuid)])
    result = run(client.serverkeygen, make_csr(FileSigner(generate_private_key()), subject))
    if isinstance(result, Pending):
        raise EstClientError(202, f"pending approval; retry in {result.retry_after} s")
    key = serialization.load_der_private_key(result.key_pkcs8_der, None)
    wanted = key.public_key().public_numbers()
    leaf = next((c for c in result.certs if c.public_key().public_numbers() == wanted), None)
    if leaf is None:
        raise EstClientError(0, "the server's certificate is not for the key it sent")
    write_atomic(key_out, private_key_pem(key), 0o600)  # type: ignore[arg-type]
    _write_cert(leaf, cert_out)
