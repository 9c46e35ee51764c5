"""PKCS#11 keys (HSMs, SoftHSM2) behind the Signer interface.

A key is named by an RFC 7512 URI such as
``pkcs11:token=factory;object=root?module-path=/usr/lib/softhsm/libsofthsm2.so``.
Object ids are written in hex everywhere ("01", "0a07"); the PIN never appears
in a URI: it comes from the caller, ``CERTFLEET_HSM_PIN``, or a ``pin-source``
file named in the URI.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pkcs11
from asn1crypto.core import OctetString
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from .errors import PkiError
from .keys import curve_by_name, curve_label
from .signer import Signer

PIN_ENV = "CERTFLEET_HSM_PIN"
_CURVE_OIDS = {"P-256": "secp256r1", "P-384": "secp384r1"}
_libs: dict[str, pkcs11.lib] = {}
_libs_lock = threading.Lock()


def parse_hex_id(text: str) -> bytes:
    """Parse a PKCS#11 object id written in hex ("01", "0x07", "0a0b")."""
    cleaned = text.strip().lower().removeprefix("0x")
    if len(cleaned) % 2:
        cleaned = "0" + cleaned
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        value = b""
    if not value:
        raise PkiError(f"bad PKCS#11 object id {text!r}: write it in hex, e.g. 01 or 0a")
    return value


@dataclass(frozen=True)
class Pkcs11Ref:
    """Where a token key lives; never carries the PIN."""

    module: str
    token: str
    label: str | None = None
    key_id: bytes | None = None
    pin_source: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def uri(self) -> str:
        """RFC 7512 URI for this key."""
        path = [f"token={_q(self.token)}"]
        if self.label:
            path.append(f"object={_q(self.label)}")
        if self.key_id:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.key_id))
        query = {"module-path": self.module}
        if self.pin_source:
            query["pin-source"] = self.pin_source
        return "pkcs11:" + ";".join(path) + "?" + urllib.parse.urlencode(query, safe="/:")

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Ref:
        """Parse a pkcs11: URI written by `uri()` or by hand."""
        if not uri.startswith("pkcs11:"):
            raise PkiError(f"not a PKCS#11 URI: {uri!r} (expected pkcs11:token=...;object=...)")
        path, _, query = uri[len("pkcs11:") :].partition("?")
        attrs = dict(_split_attr(p) for p in path.split(";") if p)
        params = dict(urllib.parse.parse_qsl(query))
        if "token" not in attrs or "module-path" not in params:
            raise PkiError(f"PKCS#11 URI {uri!r} needs token=... and ?module-path=...")
        raw_id = urllib.parse.unquote_to_bytes(attrs["id"]) if "id" in attrs else None
        return cls(
            module=params["module-path"],
            token=urllib.parse.unquote(attrs["token"]),
            label=urllib.parse.unquote(attrs["object"]) if "object" in attrs else None,
            key_id=raw_id,
            pin_source=params.get("pin-source"),
        )


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _split_attr(part: str) -> tuple[str, str]:
    name, _, value = part.partition("=")
    return name, value


def resolve_pin(ref: Pkcs11Ref, pin: str | None) -> str:
    """The PIN from the caller, the environment, or the URI's pin-source file."""
    if pin:
        return pin
    if os.environ.get(PIN_ENV):
        return os.environ[PIN_ENV]
    if ref.pin_source:
        source = ref.pin_source.removeprefix("file:")
        try:
            return Path(source).read_text().strip()
        except OSError as exc:
            raise PkiError(f"cannot read PKCS#11 PIN file {source}: {exc.strerror}") from exc
    raise PkiError(f"token {ref.token!r} needs a PIN: pass --hsm-pin or set {PIN_ENV}")


def load_library(module: str) -> pkcs11.lib:
    """Load a PKCS#11 module once per process."""
    with _libs_lock:
        if module not in _libs:
            if not Path(module).exists():
                raise PkiError(f"PKCS#11 module {module} does not exist (is softhsm2 installed?)")
            try:
                _libs[module] = pkcs11.lib(module)
            except pkcs11.PKCS11Error as exc:
                raise PkiError(f"cannot load PKCS#11 module {module}: {exc}") from exc
        return _libs[module]


@dataclass
class TokenSession:
    """The one logged-in session this process keeps per token (login is per process)."""

    session: pkcs11.Session
    pin: str
    lock: threading.Lock = field(default_factory=threading.Lock)


_sessions: dict[tuple[str, str], TokenSession] = {}


def open_token_session(ref: Pkcs11Ref, pin: str | None) -> TokenSession:
    """Log in to the token named by `ref`, or reuse this process's login."""
    pin = resolve_pin(ref, pin)
    with _libs_lock:
        known = _sessions.get((ref.module, ref.token))
    if known is not None:
        if not hmac.compare_digest(known.pin, pin):
            raise PkiError(f"wrong PIN for PKCS#11 token {ref.token!r}")
        return known
    token = _find_token(load_library(ref.module), ref)
    try:
        session = token.open(rw=True, user_pin=pin)
    except (pkcs11.PinIncorrect, pkcs11.PinLenRange) as exc:
        raise PkiError(f"wrong PIN for PKCS#11 token {ref.token!r}") from exc
    with _libs_lock:
        return _sessions.setdefault((ref.module, ref.token), TokenSession(session, pin))


def _find_token(lib: pkcs11.lib, ref: Pkcs11Ref) -> pkcs11.Token:
    try:
        return lib.get_token(token_label=ref.token)
    except pkcs11.NoSuchToken:
        # Tokens created after the module was loaded appear only after a re-scan,
        # which also ends every session this process had with that module.
        lib.reinitialize()
        with _libs_lock:
            for key in [k for k in _sessions if k[0] == ref.module]:
                del _sessions[key]
    try:
        return lib.get_token(token_label=ref.token)
    except pkcs11.NoSuchToken as exc:
        labels = sorted(t.label for t in lib.get_tokens() if t.label)
        raise PkiError(
            f"no PKCS#11 token labelled {ref.token!r} in {ref.module} "
            f"(tokens present: {', '.join(labels) or 'none'})"
        ) from exc


class Pkcs11Signer(Signer):
    """An EC private key that stays inside a PKCS#11 token."""

    def __init__(self, ref: Pkcs11Ref, pin: str | None = None) -> None:
        self.ref = ref
        self.key_ref = ref.uri()
        self._token = open_token_session(ref, pin)
        self._lock = self._token.lock
        self._session = self._token.session
        self._private = self._find_key(ObjectClass.PRIVATE_KEY)
        public = self._find_key(ObjectClass.PUBLIC_KEY)
        self._public = _public_key_of(public)

    def _find_key(self, object_class: ObjectClass) -> pkcs11.Key:
        query: dict = {"object_class": object_class, "key_type": KeyType.EC}
        if self.ref.label:
            query["label"] = self.ref.label
        if self.ref.key_id:
            query["id"] = self.ref.key_id
        try:
            return self._session.get_key(**query)
        except pkcs11.NoSuchKey as exc:
            raise PkiError(f"no EC key {self._describe()} on token {self.ref.token!r}") from exc
        except pkcs11.MultipleObjectsReturned as exc:
            raise PkiError(f"several keys match {self._describe()}: give its id") from exc

    def _describe(self) -> str:
        parts = []
        if self.ref.label:
            parts.append(f"label {self.ref.label!r}")
        if self.ref.key_id:
            parts.append(f"id {self.ref.key_id.hex()}")
        return " and ".join(parts) or "(no label or id given)"

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        # Hash here: SoftHSM2 and many HSMs offer only raw CKM_ECDSA.
        digest = hashlib.new(algorithm.name, data).digest()
        with self._lock:
            raw = self._private.sign(digest, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        return utils.encode_dss_signature(r, s)

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        point = peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        bits = self._public.curve.key_size
        with self._lock:
            secret = self._private.derive_key(
                KeyType.GENERIC_SECRET,
                bits,
                mechanism_param=(KDF.NULL, None, point),
                template={
                    Attribute.TOKEN: False,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
            return bytes(secret[Attribute.VALUE])


def _public_key_of(key: pkcs11.Key) -> ec.EllipticCurvePublicKey:
    point = OctetString.load(key[Attribute.EC_POINT]).native
    params = key[Attribute.EC_PARAMS]
    for label, oid_name in _CURVE_OIDS.items():
        if params == encode_named_curve_parameters(oid_name):
            return ec.EllipticCurvePublicKey.from_encoded_point(curve_by_name(label), point)
    raise PkiError("token key is not on P-256 or P-384; certfleet cannot use it")


def generate_pkcs11_key(
    ref: Pkcs11Ref, pin: str | None = None, curve: str = "P-256"
) -> Pkcs11Signer:
    """Create a non-extractable EC key pair on the token and return its signer."""
    label = curve_label(curve_by_name(curve))
    if not (ref.label or ref.key_id):
        raise PkiError("a new PKCS#11 key needs a label or an id")
    token = open_token_session(ref, pin)
    with token.lock:
        session = token.session
        query: dict = {"object_class": ObjectClass.PRIVATE_KEY}
        if ref.label:
            query["label"] = ref.label
        if ref.key_id:
            query["id"] = ref.key_id
        if list(session.get_objects(_attrs(query))):
            raise PkiError(f"token {ref.token!r} already holds a key like that; refusing to add")
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_OIDS[label])},
            local=True,
        )
        params.generate_keypair(
            store=True,
            label=ref.label,
            id=ref.key_id,
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DERIVE: True,
            },
        )
    return Pkcs11Signer(ref, pin)


def _attrs(query: dict) -> dict:
    names = {"object_class": Attribute.CLASS, "label": Attribute.LABEL, "id": Attribute.ID}
    return {names[k]: v for k, v in query.items()}
