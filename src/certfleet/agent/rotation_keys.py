"""The new key and certificate of a rotation, in files or in a PKCS#11 token, and their removal.

Files: the key goes to its own new 0600 file and the certificate to its own
new file, both named after the rotation id, so a restart finds them by name and
nothing else is ever overwritten. The key file is durable before any request
that names its public key leaves the device.

Token: see `rotation_token`; the same three operations, on the object ids of
the slot pair that is not in use.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.pki.files import durable_change, fsync_dir, write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.signer import FileSigner, Signer, load_file_signer

from .journal import stale_temp
from .rotation_context import Credential, RotationContext, log

KEY_MODE = 0o600
CERT_MODE = 0o644


def new_key(ctx: RotationContext) -> Signer:
    """The rotation's new key: the one made before a restart, or a new P-256 key."""
    if ctx.uses_token:
        from . import rotation_token

        return rotation_token.new_key(ctx)
    path = ctx.device.base_path / ctx.new.key
    if path.exists():
        return load_file_signer(path)
    key = generate_private_key()
    write_atomic(path, private_key_pem(key), KEY_MODE)
    log.info("rotation %s: new key written to %s", ctx.rotation_id, path)
    return FileSigner(key, f"file:{path}")


def read_new_cert(ctx: RotationContext, key: Signer) -> x509.Certificate | None:
    """The new certificate if it is stored already and is for `key`."""
    if ctx.uses_token:
        from . import rotation_token

        cert = rotation_token.read_cert(ctx)
    else:
        path = ctx.device.base_path / ctx.new.cert
        cert = x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None
    if cert is not None and cert.public_key() != key.public_key:
        log.warning("rotation %s: stored new certificate is for another key", ctx.rotation_id)
        return None
    return cert


def store_new_cert(ctx: RotationContext, cert: x509.Certificate) -> None:
    """Keep the checked new certificate, durably, where the new credential says."""
    if ctx.uses_token:
        from . import rotation_token

        rotation_token.store_cert(ctx, cert)
        return
    path = ctx.device.base_path / ctx.new.cert
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)


def remove_credential(ctx: RotationContext, credential: Credential) -> list[str]:
    """Delete a key and its certificate for good; returns what was removed."""
    ctx.forget_signer(credential)
    if ctx.uses_token:
        from . import rotation_token

        return rotation_token.remove(ctx, credential)
    removed = []
    for name in (credential.key, credential.cert):
        if remove_durable(ctx.device.base_path / name):
            removed.append(name)
    return removed


def remove_durable(path: Path) -> bool:
    """Unlink `path` and make the removal survive a power cut; False if it was not there."""
    if not path.exists():
        return False
    with durable_change():
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
    return True


def remove_temp_files(paths: list[Path]) -> None:
    """Delete the temp files a crash left behind for `paths` (one may hold a private key)."""
    for path in paths:
        for leftover in path.parent.glob(f".{path.name}.tmp-*"):
            if stale_temp(leftover):
                leftover.unlink(missing_ok=True)
