"""The first four steps of a rotation; each can be run again after a crash at any point.

Each step function returns the details the journal records for it, raises
`Retry` when a server could not be reached (or is busy) and `Fail` when the
step cannot succeed. How each step finds out what a run before a crash did:

- Generate: the new key file (or token slot) and the new certificate are
  looked up by name; a certificate for the new key is never asked for again.
  Without one, the CSR recorded in the journal is sent again, so a repeat
  request is identical (the EST server issues another certificate for the
  same key; both keys and requests are recorded, see the docs).
- Lock: announcing the same next key again changes nothing on the gateway.
- Config steps: every value is opened with the old key, and if that fails
  with the new key, so a value already re-encrypted is left as it is.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.pki import ecies
from certfleet.pki.keys import cert_sha256, pubkey_sha256, public_key_pem
from certfleet.pki.signer import Signer

from . import https, rotation_keys
from .est_reenroll import EstPending, EstRefused, EstServer
from .gateway_client import GatewayClient, GatewayRefused
from .local_config import LocalConfig, LocalConfigError, load_local_config, save_local_config
from .rotation_context import GENERATE, Fail, Retry, RotationContext, log
from .rotation_verify import verify_new_certificate

# -- Generate new certificate ----------------------------------------------------------------


def generate(ctx: RotationContext) -> dict[str, Any]:
    """New key, CSR with the current subject, simplereenroll, checks, new certificate stored."""
    key = rotation_keys.new_key(ctx)
    cert = rotation_keys.read_new_cert(ctx, key)
    if cert is None:
        cert = _enroll(ctx, key)
        rotation_keys.store_new_cert(ctx, cert)
    return {
        "key": ctx.new.key,
        "cert": ctx.new.cert,
        "serial": f"{cert.serial_number:x}",
        "cert_sha256": cert_sha256(cert),
        "key_sha256": pubkey_sha256(key.public_key),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "est_requests": ctx.rotation.progress.get("est_request", {}).get("sent", 0),
    }


def _enroll(ctx: RotationContext, key: Signer) -> x509.Certificate:
    old_device = ctx.device_for(ctx.old)
    old_cert = old_device.certificate()
    csr = _csr(ctx, key, old_cert)
    sent = ctx.rotation.progress.get("est_request", {}).get("sent", 0)
    # Durable before sending: a certificate issued for an answer we never got is accounted for.
    ctx.note(
        est_request={
            "key_sha256": pubkey_sha256(key.public_key),
            "csr": base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode(),
            "sent": sent + 1,
        }
    )
    try:
        with EstServer(ctx.params["est_server"], ctx.tls_context(ctx.old)) as est:
            chain = est.cacerts()
            answer = est.simplereenroll(csr)
        if isinstance(answer, EstPending):
            raise Retry("the EST server holds the request for approval", answer.retry_after)
    except https.Unreachable as exc:
        raise Retry(f"EST server unreachable: {exc}") from None
    except EstRefused as exc:
        if exc.retryable:
            raise Retry(str(exc)) from None
        raise Fail(str(exc)) from None
    verify_new_certificate(answer, key.public_key, old_cert, old_device.roots(), chain)
    log.info("rotation %s: new certificate serial %x", ctx.rotation_id, answer.serial_number)
    return answer


def _csr(
    ctx: RotationContext, key: Signer, old_cert: x509.Certificate
) -> x509.CertificateSigningRequest:
    """The CSR sent before a restart if it is for this key (a repeat is identical), or a new one."""
    recorded = ctx.rotation.progress.get("est_request", {})
    if recorded.get("key_sha256") == pubkey_sha256(key.public_key) and recorded.get("csr"):
        return x509.load_der_x509_csr(base64.b64decode(recorded["csr"]))
    builder = x509.CertificateSigningRequestBuilder().subject_name(old_cert.subject)
    try:
        sans = old_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(sans.value, critical=sans.critical)
    except x509.ExtensionNotFound:
        pass
    return key.sign_csr(builder)


# -- Lock device configuration on server -------------------------------------------------------


def lock(ctx: RotationContext) -> dict[str, Any]:
    """Announce the new key (PATCH /device); the gateway then locks the device's config."""
    public_key = ctx.signer(ctx.new).public_key
    pem, wanted = public_key_pem(public_key), pubkey_sha256(public_key)
    gateway = ctx.gateway(ctx.old)
    replaced = None
    try:
        try:
            view = gateway.announce_next_key(pem)
        except GatewayRefused as exc:
            if exc.code != "other-next-key":
                raise
            replaced = _announced_key_we_may_replace(ctx, gateway)
            view = gateway.announce_next_key(pem, replace=True)
    except GatewayRefused as exc:
        raise gateway_failure(exc) from None
    except https.Unreachable as exc:
        raise Retry(f"gateway unreachable: {exc}") from None
    if view.get("next_pubkey_sha256") != wanted:
        raise Fail("the gateway did not record the new key as the next key")
    return {"next_pubkey_sha256": wanted, "replaced_next_key": replaced}


def _announced_key_we_may_replace(ctx: RotationContext, gateway: GatewayClient) -> str:
    """The key announced before ours, if an earlier rotation of this device made it."""
    announced = gateway.device().get("next_pubkey_sha256") or ""
    if announced in own_earlier_keys(ctx) or ctx.params.get("replace_next_key"):
        log.info("rotation %s: replacing earlier next key %.16s…", ctx.rotation_id, announced)
        return announced
    raise Fail(
        f"another next key (sha256 {announced[:16]}…) is announced for this device and no "
        "rotation in this device's journal made it; if the journal was lost, run "
        "`certfleet-agent rotate --replace-next-key`, otherwise someone else may hold this "
        "device's key: ask the operator to deny its certificate"
    )


def own_earlier_keys(ctx: RotationContext) -> set[str]:
    """Public key fingerprints of the new keys of this device's other rotations."""
    found = set()
    for rotation in ctx.journal.all():
        if rotation.rotation_id == ctx.rotation_id:
            continue
        found.add(rotation.progress.get("est_request", {}).get("key_sha256"))
        for result in rotation.results:
            if result["step"] == GENERATE:
                found.add(result["details"].get("key_sha256"))
    found.discard(None)
    return found


def gateway_failure(exc: GatewayRefused) -> Retry | Fail:
    """Busy or broken gateway: try later; any other refusal: the step failed."""
    if exc.status >= 500 or exc.status == 429:
        return Retry(str(exc))
    return Fail(str(exc))


# -- Update local configuration with new key ---------------------------------------------------


def local_config(ctx: RotationContext) -> dict[str, Any]:
    """Re-encrypt the local copy of the config for the new key, durably."""
    return reencrypt_local(ctx, ctx.signer(ctx.old), ctx.signer(ctx.new))


def reencrypt_local(ctx: RotationContext, source: Signer, target: Signer) -> dict[str, Any]:
    """The local copy's values moved from `source`'s key to `target`'s (also for rollback)."""
    state_dir = ctx.settings.state_dir
    try:
        config = load_local_config(state_dir)
    except LocalConfigError as exc:
        raise Fail(str(exc)) from None
    files, counts = reencrypt_files(config.files, source, target)
    if counts.changed:
        save_local_config(state_dir, LocalConfig(config.last_modified, files))
    return counts.as_details()


@dataclasses.dataclass
class Counts:
    """How many config values were re-encrypted, were already right, or open with neither key."""

    changed: int = 0
    kept: int = 0
    unreadable: list[str] = dataclasses.field(default_factory=list)

    def as_details(self) -> dict[str, Any]:
        """For the journal."""
        return {"reencrypted": self.changed, "already": self.kept, "unreadable": self.unreadable}


def reencrypt_files(
    files: dict[str, Any], source: Signer, target: Signer
) -> tuple[dict[str, Any], Counts]:
    """Config files with every encrypted value re-encrypted from `source`'s key to `target`'s."""
    counts = Counts()
    result = {}
    for name, entry in files.items():
        result[name] = entry
        if not isinstance(entry, dict) or entry.get("Unencrypted"):
            continue
        value = entry.get("Value", "")
        clear = _open(source, value)
        if clear is not None:
            result[name] = {**entry, "Value": ecies.encrypt_b64(target.public_key, clear)}
            counts.changed += 1
        elif _open(target, value) is not None:
            counts.kept += 1
        else:
            counts.unreadable.append(name)
    if counts.unreadable:
        log.warning("config values that open with neither key: %s", ", ".join(counts.unreadable))
    return result, counts


def _open(key: Signer, value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return ecies.decrypt_b64(key.exchange, key.public_key.curve, value)
    except ValueError:
        return None


# -- Update device specific configuration on server with new key ------------------------------


def server_config(ctx: RotationContext) -> dict[str, Any]:
    """GET /config-device, re-encrypt for the new key, PATCH /config with the new key."""
    return reencrypt_server(ctx, ctx.signer(ctx.old), ctx.signer(ctx.new))


def reencrypt_server(ctx: RotationContext, source: Signer, target: Signer) -> dict[str, Any]:
    """The device-scope files on the gateway moved from `source`'s key to `target`'s.

    Always uploaded with the announced (new) key as next_pubkey: the gateway takes
    device files only while that key is announced, also when rollback puts them back.
    """
    gateway = ctx.gateway(ctx.old)
    next_pem = public_key_pem(ctx.signer(ctx.new).public_key)
    try:
        files, counts = reencrypt_files(gateway.device_config(), source, target)
        details = {"files": len(files), **counts.as_details()}
        if not counts.changed:
            return details
        try:
            details["changed"] = gateway.upload_device_config(files, next_pem)
        except GatewayRefused as exc:
            if exc.code != "key-changed":
                raise
            details["changed"] = False  # a repeat after the key change went through
    except GatewayRefused as exc:
        raise gateway_failure(exc) from None
    except https.Unreachable as exc:
        raise Retry(f"gateway unreachable: {exc}") from None
    return details
