"""CSR attributes (RFC 7030 §4.5.2): the DER body of `csrattrs`, made and read.

Its own module because it needs asn1crypto, which nothing else on the agent's
rotation path loads (about 18 ms of CPU at start-up on a device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from asn1crypto import core
from cryptography import x509
from cryptography.x509.oid import AttributeOID, SignatureAlgorithmOID

from ..pki.keys import curve_by_name, curve_label
from .wire import EstWireError

EC_PUBLIC_KEY = x509.ObjectIdentifier("1.2.840.10045.2.1")
_CURVE_OIDS = {"P-256": "1.2.840.10045.3.1.7", "P-384": "1.3.132.0.34"}
_SIGNATURES = {
    "P-256": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    "P-384": SignatureAlgorithmOID.ECDSA_WITH_SHA384,
}


# CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID (RFC 7030 §4.5.2)
class _AttributeValues(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AttributeValues)]


class _AttrOrOid(core.Choice):
    _alternatives = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]


class _CsrAttrs(core.SequenceOf):
    _child_spec = _AttrOrOid


AttributeValue = x509.ObjectIdentifier | bytes


def csrattrs_body(
    oids: Sequence[x509.ObjectIdentifier],
    attributes: Mapping[x509.ObjectIdentifier, Sequence[AttributeValue]] | None = None,
) -> bytes:
    """DER CsrAttrs: bare `oids` first, then `attributes` (values: OIDs or raw DER)."""
    items = [_AttrOrOid(name="oid", value=oid.dotted_string) for oid in oids]
    for attr_type, values in (attributes or {}).items():
        if not values:
            raise ValueError(f"attribute {attr_type.dotted_string} needs at least one value")
        # DER orders a SET OF by encoding.
        encoded = sorted(_value_der(v) for v in values)
        attribute = _Attribute(
            {"type": attr_type.dotted_string, "values": [core.Any.load(v) for v in encoded]}
        )
        items.append(_AttrOrOid(name="attribute", value=attribute))
    return _CsrAttrs(items).dump()


def _value_der(value: AttributeValue) -> bytes:
    if isinstance(value, x509.ObjectIdentifier):
        return core.ObjectIdentifier(value.dotted_string).dump()
    return bytes(value)


def device_csrattrs(require_tls_unique: bool, curve: str = "P-256") -> bytes:
    """The CsrAttrs certfleet's EST server sends: EC key on `curve`, matching ECDSA hash."""
    label = curve_label(curve_by_name(curve))
    oids = [AttributeOID.CHALLENGE_PASSWORD] if require_tls_unique else []
    oids.append(_SIGNATURES[label])
    curve_oid = x509.ObjectIdentifier(_CURVE_OIDS[label])
    return csrattrs_body(oids, {EC_PUBLIC_KEY: [curve_oid]})


def parse_csrattrs(der: bytes) -> list[str]:
    """Client side: one string per CsrAttrs entry, "oid" or "type=value,value".

    OID values are dotted; other values are "#" and the hex of their DER, as in RFC 4514.
    An empty body means the server asks for nothing.
    """
    if not der:
        return []
    try:
        parsed = _CsrAttrs.load(der, strict=True)
        return [_attr_or_oid_text(item) for item in parsed]
    except (ValueError, TypeError) as exc:
        raise EstWireError("bad-csrattrs", f"CSR attributes are not valid DER: {exc}") from exc


def _attr_or_oid_text(item: _AttrOrOid) -> str:
    if item.name == "oid":
        return item.chosen.dotted
    values = []
    for value in item.chosen["values"]:
        encoded = value.dump()
        if encoded[:1] == b"\x06":
            values.append(core.ObjectIdentifier.load(encoded).dotted)
        else:
            values.append("#" + encoded.hex())
    return f"{item.chosen['type'].dotted}={','.join(values)}"
