"""The new key and certificate of a rotation in a PKCS#11 token: slot alternation.

PKEYIDS=01,07 and CERTIDS=03,09 name two key slots and two certificate slots;
the device uses one of each (`sota.toml [p11]`), the rotation fills the other
and switches `sota.toml` to it, and the next rotation goes back. The slot a
rotation fills may hold the key of the rotation before last: it is destroyed
and a new key made inside the token (the key never leaves it). A key found in
the slot after a restart is reused only if the journal recorded it as this
rotation's new key (it is recorded before the CSR is sent); otherwise it was
never used, and it is replaced.

Each token change (key made, certificate stored, objects destroyed) counts as
one durable change for the crash-test hooks of `pki.files`.
"""

from __future__ import annotations

import pkcs11
from cryptography import x509
from pkcs11 import Attribute, ObjectClass

from certfleet.pki.errors import PkiError
from certfleet.pki.files import durable_change
from certfleet.pki.keys import pubkey_sha256
from certfleet.pki.pkcs11_signer import (
    Pkcs11Ref,
    Pkcs11Signer,
    TokenSession,
    generate_pkcs11_key,
    open_token_session,
    parse_hex_id,
)
from certfleet.pki.signer import Signer
from certfleet.pki.token_certificates import replace_certificate

from .device import TokenSlots
from .rotation_context import Credential, RotationContext, log

KEY_CLASSES = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)


def new_key(ctx: RotationContext) -> Signer:
    """The key in the unused key slot if this rotation made it, else a new one made there."""
    slots = _slots(ctx)
    raw_id = parse_hex_id(ctx.new.key)
    recorded = ctx.rotation.progress.get("est_request", {}).get("key_sha256")
    found = _signer(slots, raw_id)
    if found is not None and pubkey_sha256(found.public_key) == recorded:
        return found
    session = _session(slots)
    with durable_change(), session.lock:
        destroyed = _destroy(session, raw_id, KEY_CLASSES)
    if destroyed:
        log.info("rotation %s: cleared key slot %s", ctx.rotation_id, ctx.new.key)
    ref = Pkcs11Ref(slots.module, slots.label, label=f"certfleet-key-{raw_id.hex()}", key_id=raw_id)
    with durable_change():
        signer = generate_pkcs11_key(ref, slots.pin)
    log.info("rotation %s: new key made in token slot %s", ctx.rotation_id, ctx.new.key)
    return signer


def read_cert(ctx: RotationContext) -> x509.Certificate | None:
    """The certificate in the unused certificate slot that is for the new key, if any."""
    slots = _slots(ctx)
    wanted = ctx.signer(ctx.new).public_key
    session = _session(slots)
    with session.lock:
        objects = list(_objects(session, parse_hex_id(ctx.new.cert), (ObjectClass.CERTIFICATE,)))
        ders = [bytes(obj[Attribute.VALUE]) for obj in objects]
    for der in ders:
        cert = x509.load_der_x509_certificate(der)
        if cert.public_key() == wanted:
            return cert
    return None


def store_cert(ctx: RotationContext, cert: x509.Certificate) -> None:
    """Put the new certificate in the unused certificate slot, replacing what is there."""
    with durable_change():
        replace_certificate(_session(_slots(ctx)), parse_hex_id(ctx.new.cert), cert)


def remove(ctx: RotationContext, credential: Credential) -> list[str]:
    """Destroy the key and certificate of `credential`'s slots."""
    slots = _slots(ctx)
    session = _session(slots)
    removed = []
    for what, slot, classes in (
        ("key", credential.key, KEY_CLASSES),
        ("certificate", credential.cert, (ObjectClass.CERTIFICATE,)),
    ):
        with durable_change(), session.lock:
            if _destroy(session, parse_hex_id(slot), classes):
                removed.append(f"{what} {slot}")
    return removed


def _slots(ctx: RotationContext) -> TokenSlots:
    if ctx.device.token is None:
        raise PkiError("sota.toml has no [p11] table, but this rotation keeps its keys in a token")
    return ctx.device.token


def _session(slots: TokenSlots) -> TokenSession:
    return open_token_session(Pkcs11Ref(slots.module, slots.label), slots.pin)


def _signer(slots: TokenSlots, raw_id: bytes) -> Pkcs11Signer | None:
    try:
        return Pkcs11Signer(Pkcs11Ref(slots.module, slots.label, key_id=raw_id), slots.pin)
    except PkiError as exc:
        # An empty slot, or leftovers of a key made before a crash: both are replaced.
        if "no EC key" in str(exc) or "several keys" in str(exc):
            return None
        raise


def _objects(
    session: TokenSession, raw_id: bytes, classes: tuple[ObjectClass, ...]
) -> list[pkcs11.Object]:
    found: list[pkcs11.Object] = []
    for object_class in classes:
        query = {Attribute.CLASS: object_class, Attribute.ID: raw_id}
        found.extend(session.session.get_objects(query))
    return found


def _destroy(session: TokenSession, raw_id: bytes, classes: tuple[ObjectClass, ...]) -> int:
    objects = _objects(session, raw_id, classes)
    for obj in objects:
        obj.destroy()
    return len(objects)
