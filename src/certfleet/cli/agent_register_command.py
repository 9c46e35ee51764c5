"""`certfleet-agent register`: a device registers itself online with an operator token.

The device makes its key (a file, or inside a PKCS#11 token where it stays),
sends a CSR `CN=<uuid>, OU=<factory>` to the gateway's `POST /register`, checks
the answer, and writes its certificate, the factory root and `sota.toml`
durably. The token is never logged or printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import tomllib
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from certfleet.est.client import fingerprint, tls_context
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pkcs11_signer import parse_hex_id
from certfleet.pki.signer import FileSigner, Signer
from certfleet.pki.token_certificates import store_token_certificate, token_has_certificate

from .common import run
from .device_keys import (
    hsm_options,
    make_csr,
    token_key,
)

TOKEN_ENV = "CERTFLEET_REGISTER_TOKEN"
KEY_FILE, CERT_FILE, ROOT_FILE, CONFIG_FILE = "pkey.pem", "client.pem", "root.crt", "sota.toml"
PUBLIC_MODE = 0o644
TIMEOUT_S = 60


class RegistrationFailed(Exception):
    """Registration was refused or its answer cannot be used; the message says what to do."""


@dataclass(frozen=True)
class TokenSlots:
    """Where the key and certificate go in a PKCS#11 token (ids in hex)."""

    module: str
    label: str
    key_id: str
    cert_id: str
    pin: str | None = field(repr=False)


@dataclass(frozen=True)
class Plan:
    """One registration: who the device is, where it talks to, where its files go."""

    server: str
    device_uuid: str
    factory: str
    group: str | None
    directory: Path
    slots: TokenSlots | None

    def subject(self) -> x509.Name:
        """`CN=<uuid>, OU=<factory>`."""
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, self.device_uuid),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.factory),
            ]
        )

    def body(self, csr: x509.CertificateSigningRequest) -> dict[str, Any]:
        """The JSON the gateway expects."""
        body: dict[str, Any] = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "factory": self.factory,
            "base_path": str(self.directory),
        }
        if self.group:
            body["group"] = self.group
        if self.slots:
            body["key_storage"] = "pkcs11"
            body["pkcs11"] = {
                "module": self.slots.module,
                "token_label": self.slots.label,
                "key_id": self.slots.key_id,
                "cert_id": self.slots.cert_id,
            }
        return body


@dataclass(frozen=True)
class Answer:
    """The gateway's 201 answer, parsed, with the TLS certificate it presented."""

    client: x509.Certificate
    root: x509.Certificate
    ca: x509.Certificate
    sota_toml: str
    gateway_cert: x509.Certificate | None


@click.command("register")
@click.option("--server", required=True, metavar="URL", help="The gateway, https://host:port.")
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    metavar="TOKEN",
    help=f"Operator token of scope register; better set {TOKEN_ENV} (command lines are public).",
)
@click.option("--factory", required=True, help="The factory this device belongs to.")
@click.option("--group", help="Device group to put the device in.")
@click.option("--uuid", "device_uuid", metavar="UUID", help="Device uuid (default: a new one).")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where pkey.pem, client.pem, root.crt and sota.toml go.",
)
@click.option(
    "--trust",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM factory root the gateway's TLS certificate must chain to.",
)
@click.option(
    "--insecure-first-contact",
    is_flag=True,
    help="No --trust: send the token unverified, then check the gateway against the root it "
    "returns.",
)
@click.option("--force", is_flag=True, help="Replace a registration already in --dir.")
@hsm_options
@click.option("--hsm-cert-id", metavar="HEX", help="Object id for the certificate (default 03).")
def register(
    server: str,
    token: str | None,
    factory: str,
    group: str | None,
    device_uuid: str | None,
    directory: Path,
    trust: Path | None,
    insecure_first_contact: bool,
    force: bool,
    hsm_module: str | None,
    hsm_token_label: str | None,
    hsm_key_id: str | None,
    hsm_pin: str | None,
    hsm_cert_id: str | None,
) -> None:
    """Register this device with the gateway's online CA; prints the device uuid."""
    slots = _slots(hsm_module, hsm_token_label, hsm_key_id, hsm_cert_id, hsm_pin)
    plan = Plan(_url(server), _uuid(device_uuid), factory, group, directory.absolute(), slots)
    secret = _token(token)
    roots = _roots(trust, insecure_first_contact)
    _check_free(plan, force)
    signer = _signer(slots)
    csr = make_csr(signer, plan.subject())
    answer = _checked(run(_post, plan, csr, secret, roots), plan, signer)
    if roots is None:
        _check_first_contact(answer, plan)
    _install(plan, answer, signer)
    click.echo(plan.device_uuid)


def _signer(slots: TokenSlots | None) -> Signer:
    """A new key in memory (written only once registered), or the token's key slot."""
    if slots is None:
        return FileSigner(generate_private_key())
    # A key already in the slot is reused: it is what a refused attempt leaves behind.
    return token_key(slots.module, slots.label, slots.key_id, slots.pin)


# -- the inputs ---------------------------------------------------------------------------


def _slots(
    module: str | None,
    label: str | None,
    key_id: str | None,
    cert_id: str | None,
    pin: str | None,
) -> TokenSlots | None:
    if not (module or label or key_id or cert_id):
        return None
    if not (module and label):
        raise click.UsageError("a key in a token needs --hsm-module and --hsm-token-label")
    return TokenSlots(
        module,
        label,
        parse_hex_id(key_id or "01").hex(),
        parse_hex_id(cert_id or "03").hex(),
        pin,
    )


def _url(server: str) -> str:
    parts = urllib.parse.urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise click.UsageError(f"--server must be https://host:port, not {server!r}")
    return server.rstrip("/")


def _uuid(text: str | None) -> str:
    if text is None:
        return str(uuid.uuid4())
    try:
        return str(uuid.UUID(text))
    except ValueError as exc:
        raise click.UsageError(f"--uuid {text!r} is not a uuid") from exc


def _token(token: str | None) -> str:
    token = (token or "").strip()
    if not token:
        raise click.UsageError(f"give the operator's token: set {TOKEN_ENV} (or --token)")
    if not token.isprintable() or " " in token:
        # Never repeat the token itself in a message.
        raise click.UsageError("the token has spaces or control characters; copy it whole")
    return token


def _roots(trust: Path | None, insecure_first_contact: bool) -> list[x509.Certificate] | None:
    if trust is not None:
        return x509.load_pem_x509_certificates(trust.read_bytes())
    if not insecure_first_contact:
        raise click.UsageError(
            "give --trust ROOT.pem so the gateway is checked before the token is sent, or "
            "--insecure-first-contact to check it only against the root it returns"
        )
    return None


def _check_free(plan: Plan, force: bool) -> None:
    """Refuse to overwrite a registration unless --force; checked before anything is sent."""
    if force:
        return
    present = [n for n in (CONFIG_FILE, CERT_FILE, KEY_FILE) if (plan.directory / n).exists()]
    if present:
        raise RegistrationFailed(
            f"{plan.directory} already holds a registration ({', '.join(present)}); "
            "use another --dir, or --force to replace it"
        )
    slots = plan.slots
    if slots and token_has_certificate(slots.module, slots.label, slots.cert_id, slots.pin):
        raise RegistrationFailed(
            f"token {slots.label!r} already holds a certificate with id {slots.cert_id}; "
            "use another --hsm-cert-id, or --force to replace it"
        )


# -- the request --------------------------------------------------------------------------


async def _post(
    plan: Plan,
    csr: x509.CertificateSigningRequest,
    token: str,
    roots: list[x509.Certificate] | None,
) -> tuple[int, bytes, bytes | None]:
    """POST /register; returns status, body and the gateway's certificate (DER)."""
    context, seen = _recording(tls_context(roots))
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{plan.server}/register"
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.post(url, json=plan.body(csr), headers=headers) as response,
        ):
            body = await response.read()
    except aiohttp.ClientConnectorCertificateError as exc:
        raise RegistrationFailed(
            f"the gateway at {plan.server} is not trusted: {exc.certificate_error}; "
            "check --trust is this factory's root"
        ) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RegistrationFailed(f"cannot reach the gateway at {plan.server}: {exc}") from exc
    return response.status, body, seen[-1] if seen else None


def _recording(context: ssl.SSLContext) -> tuple[ssl.SSLContext, list[bytes]]:
    """`context`, made to keep the certificate each TLS handshake is shown.

    aiohttp hands a connection back to its pool before the caller sees the
    response, so the handshake is the one place to read the peer of *this* request.
    """
    seen: list[bytes] = []

    class Recording(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            if der:
                seen.append(der)

    context.sslobject_class = Recording
    return context, seen


# -- the answer ---------------------------------------------------------------------------


def _checked(reply: tuple[int, bytes, bytes | None], plan: Plan, signer: Signer) -> Answer:
    """The answer, if it is a usable identity for our key; RegistrationFailed otherwise."""
    status, body, peer = reply
    if status != 201:
        lines = body.decode("utf-8", "replace").strip().splitlines()
        reason = lines[0] if lines else "(no reason given)"
        raise RegistrationFailed(f"the gateway refused the registration ({status}): {reason}")
    answer = _parse(body, peer)
    _check_identity(answer, plan, signer)
    _check_config(answer.sota_toml, plan)
    return answer


def _parse(body: bytes, peer: bytes | None) -> Answer:
    try:
        data = _json(body)
        return Answer(
            client=x509.load_pem_x509_certificate(data["client_pem"].encode()),
            root=x509.load_pem_x509_certificate(data["root_pem"].encode()),
            ca=x509.load_pem_x509_certificate(data["ca_pem"].encode()),
            sota_toml=data["sota_toml"],
            gateway_cert=x509.load_der_x509_certificate(peer) if peer else None,
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise RegistrationFailed(f"the gateway's answer is not a registration: {exc}") from exc


def _json(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _check_identity(answer: Answer, plan: Plan, signer: Signer) -> None:
    """Our key, our uuid, a chain client <- CA <- root, valid now: checked before use."""
    problems = []
    if answer.client.public_key() != signer.public_key:
        problems.append("the certificate is for another key")
    cns = answer.client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [plan.device_uuid]:
        problems.append(f"the certificate is for {answer.client.subject.rfc4514_string()}")
    for cert, issuer in ((answer.client, answer.ca), (answer.ca, answer.root)):
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception:  # InvalidSignature, ValueError, TypeError
            problems.append(f"{cert.subject.rfc4514_string()} is not issued by the CA sent")
    now = dt.datetime.now(dt.UTC)
    if not answer.client.not_valid_before_utc <= now <= answer.client.not_valid_after_utc:
        problems.append("the certificate is not valid now (check this device's clock)")
    if problems:
        raise _unusable(plan, "; ".join(problems))


def _check_config(text: str, plan: Plan) -> None:
    """sota.toml must point at the files and token slots this command fills."""
    try:
        config = tomllib.loads(text)
        found = config["import"]
        if Path(found["base_path"]) != plan.directory or found["tls_cacert_path"] != ROOT_FILE:
            raise ValueError(f"[import] is {found}")
        if plan.slots is None:
            wanted = {"tls_pkey_path": KEY_FILE, "tls_clientcert_path": CERT_FILE}
            if any(found.get(k) != v for k, v in wanted.items()):
                raise ValueError(f"[import] is {found}")
        elif config["p11"]["tls_pkey_id"] != plan.slots.key_id:
            raise ValueError(f"[p11] is {config['p11']}")
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise _unusable(plan, f"its sota.toml does not match this device ({exc})") from exc


def _check_first_contact(answer: Answer, plan: Plan) -> None:
    """Without --trust: the gateway's TLS certificate must chain to the root it returned."""
    host = urllib.parse.urlsplit(plan.server).hostname or ""
    try:
        if answer.gateway_cert is None:
            raise verification.VerificationError("the connection had no TLS certificate")
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store([answer.root]))
            .build_server_verifier(_host_name(host))
        )
        verifier.verify(answer.gateway_cert, [answer.ca])
    except verification.VerificationError as exc:
        raise _unusable(
            plan,
            f"the gateway's TLS certificate does not chain to the root it returned ({exc}): "
            "something may sit between this device and the gateway",
        ) from exc
    click.echo(
        f"first contact: trusting root {answer.root.subject.rfc4514_string()}, "
        f"SHA-256 {fingerprint(answer.root)}; compare it with the one your operator gave you",
        err=True,
    )


def _host_name(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _unusable(plan: Plan, why: str) -> RegistrationFailed:
    return RegistrationFailed(
        f"the gateway's answer cannot be used: {why}. Nothing was written; device "
        f"{plan.device_uuid} is registered on the server, so ask the operator to delete it"
    )


# -- the files ----------------------------------------------------------------------------


def _install(plan: Plan, answer: Answer, signer: Signer) -> None:
    """Key, certificate, root, then sota.toml last: its presence marks a whole registration."""
    directory = plan.directory
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    client_pem = answer.client.public_bytes(serialization.Encoding.PEM)
    if plan.slots is None:
        assert isinstance(signer, FileSigner)
        write_atomic(directory / KEY_FILE, private_key_pem(signer.private_key), 0o600)
        write_atomic(directory / CERT_FILE, client_pem, PUBLIC_MODE)
    else:
        slots = plan.slots
        store_token_certificate(slots.module, slots.label, slots.cert_id, slots.pin, answer.client)
    root_pem = answer.root.public_bytes(serialization.Encoding.PEM)
    write_atomic(directory / ROOT_FILE, root_pem, PUBLIC_MODE)
    write_atomic(directory / CONFIG_FILE, answer.sota_toml.encode(), PUBLIC_MODE)
    where = f"token {plan.slots.label!r}" if plan.slots else str(directory / CERT_FILE)
    group = f", group {plan.group}" if plan.group else ""
    click.echo(
        f"registered device {plan.device_uuid} (factory {plan.factory}{group}): "
        f"certificate in {where}, config in {directory / CONFIG_FILE}",
        err=True,
    )
