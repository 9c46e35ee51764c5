"""Device keys and CSRs for the device commands: a key in a file or in a PKCS#11 slot.

Shared by `certfleet-agent est` and `certfleet-agent register`. A token key is
made inside the token and never leaves it; PKCS#11 object ids are hex ("01").
"""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509

from certfleet.pki.errors import PkiError
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pkcs11_signer import (
    Pkcs11Ref,
    Pkcs11Signer,
    generate_pkcs11_key,
    parse_hex_id,
)
from certfleet.pki.signer import FileSigner, Signer, load_file_signer
from certfleet.pki.tls_client import TokenKey

KEY_FILE_MODE = 0o600


def hsm_options(fn: click.decorators.FC) -> click.decorators.FC:
    """`--hsm-module/--hsm-token-label/--hsm-key-id/--hsm-pin` for a key kept in a token."""
    return _add_options(
        fn,
        [
            click.option(
                "--hsm-module", metavar="PATH", help="PKCS#11 module holding the new key."
            ),
            click.option("--hsm-token-label", metavar="LABEL"),
            click.option("--hsm-key-id", metavar="HEX", help="Object id of the key, in hex (01)."),
            click.option("--hsm-pin", envvar="CERTFLEET_HSM_PIN", help="Or set CERTFLEET_HSM_PIN."),
        ],
    )


def current_token_key_option(fn: click.decorators.FC) -> click.decorators.FC:
    """`--hsm-current-key-id`: the current key, in the --hsm-module token, authenticates TLS."""
    return click.option(
        "--hsm-current-key-id",
        metavar="HEX",
        help="Object id (hex) of the current key in the --hsm-module token; "
        "it authenticates the request instead of --key.",
    )(fn)


def token_client_key_options(fn: click.decorators.FC) -> click.decorators.FC:
    """Options naming a current key in a token, for commands whose new key is not there."""
    return _add_options(
        fn,
        [
            click.option("--hsm-module", metavar="PATH", help="PKCS#11 module with the key."),
            click.option("--hsm-token-label", metavar="LABEL"),
            current_token_key_option,
            click.option("--hsm-pin", envvar="CERTFLEET_HSM_PIN", help="Or set CERTFLEET_HSM_PIN."),
        ],
    )


def _add_options(fn: click.decorators.FC, options: list) -> click.decorators.FC:
    for option in reversed(options):
        fn = option(fn)
    return fn


def client_key(
    key_file: Path | None,
    module: str | None,
    token: str | None,
    current_key_id: str | None,
    pin: str | None,
) -> Path | TokenKey | None:
    """The key that authenticates the TLS connection: a key file, or a slot of the token."""
    if not current_key_id:
        return key_file
    if key_file is not None:
        raise click.UsageError("give --key FILE or --hsm-current-key-id, not both")
    if not (module and token):
        raise click.UsageError("--hsm-current-key-id needs --hsm-module and --hsm-token-label")
    return TokenKey(Pkcs11Ref(module, token, key_id=parse_hex_id(current_key_id)), pin)


def token_key(module: str, token: str | None, key_id: str | None, pin: str | None) -> Signer:
    """The EC key in slot `key_id` of the token; made inside the token if the slot is empty."""
    if not (token and key_id):
        raise click.UsageError("--hsm-module needs --hsm-token-label and --hsm-key-id")
    raw_id = parse_hex_id(key_id)
    try:
        return Pkcs11Signer(Pkcs11Ref(module, token, key_id=raw_id), pin)
    except PkiError as exc:
        if "no EC key" not in str(exc):
            raise
    ref = Pkcs11Ref(module, token, label=f"certfleet-key-{raw_id.hex()}", key_id=raw_id)
    return generate_pkcs11_key(ref, pin)


def file_key(path: Path) -> Signer:
    """The key in `path`, or a new one written there (0600, durably) if there is none."""
    if path.exists():
        return load_file_signer(path)
    key = generate_private_key()
    write_atomic(path, private_key_pem(key), KEY_FILE_MODE)
    return FileSigner(key, f"file:{path}")


def new_key_signer(
    key_out: Path | None,
    module: str | None,
    token: str | None,
    key_id: str | None,
    pin: str | None,
) -> Signer:
    """The key a CSR is for: a token key (with --hsm-module) or a key file (--key-out)."""
    if module:
        return token_key(module, token, key_id, pin)
    if key_out is None:
        raise click.UsageError("give --key-out FILE (or --hsm-module ...) for the new key")
    return file_key(key_out)


def make_csr(
    signer: Signer, subject: x509.Name, sans: x509.SubjectAlternativeName | None = None
) -> x509.CertificateSigningRequest:
    """A CSR for the signer's key, signed by that key wherever it lives."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    return signer.sign_csr(builder)
