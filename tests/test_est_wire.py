"""EST body framing: base64 bodies, content types, CSR attributes, serverkeygen multipart."""

from __future__ import annotations

import base64
import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import load_der_private_key
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from certfleet.est import csrattrs, wire
from certfleet.est.wire import EstWireError
from certfleet.pki.keys import generate_private_key
from certfleet.pki.pkcs7 import certs_only
from tests.pki_checks import openssl

# RFC 7030 §4.5.2 example: challengePassword, an EC key on secp384r1,
# extensionRequest for a MAC address, and ecdsa-with-SHA384.
RFC_EXAMPLE = base64.b64decode(
    "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="
)
CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"
EC_PUBLIC_KEY = "1.2.840.10045.2.1"
SECP256R1 = "1.2.840.10045.3.1.7"
SECP384R1 = "1.3.132.0.34"
ECDSA_SHA256 = "1.2.840.10045.4.3.2"
ECDSA_SHA384 = "1.2.840.10045.4.3.3"
EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
MAC_ADDRESS = "1.3.6.1.1.1.1.22"


def refused(code: str, fragment: str, call, *args) -> EstWireError:
    with pytest.raises(EstWireError) as caught:
        call(*args)
    assert caught.value.code == code
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)
    return caught.value


def oid(dotted: str) -> x509.ObjectIdentifier:
    return x509.ObjectIdentifier(dotted)


# --- base64 bodies (RFC 8951) ----------------------------------------------------


def test_encode_body_lines():
    der = bytes(range(256)) * 2
    body = wire.encode_body(der)
    lines = body.split(b"\n")
    assert lines[-1] == b""  # every line, the last too, ends with LF
    assert b"\r" not in body
    assert all(len(line) == 64 for line in lines[:-2])
    assert 0 < len(lines[-2]) <= 64
    assert b"".join(lines) == base64.b64encode(der)
    assert wire.decode_body(body) == der


def test_decode_body_without_line_breaks():
    assert wire.decode_body(b"MAMCAQA=") == b"\x30\x03\x02\x01\x00"


@given(
    der=st.binary(min_size=1, max_size=400),
    gaps=st.lists(
        st.tuples(st.integers(min_value=0), st.sampled_from([b" ", b"\t", b"\r\n", b"\n", b"\r"])),
        max_size=30,
    ),
    line_breaks=st.booleans(),
)
def test_decode_ignores_white_space_anywhere(der, gaps, line_breaks):
    body = bytearray(wire.encode_body(der) if line_breaks else base64.b64encode(der))
    for position, space in gaps:
        at = position % (len(body) + 1)
        body[at:at] = space
    assert wire.decode_body(bytes(body)) == der


@pytest.mark.parametrize(
    "raw, code, fragment",
    [
        (b"", "empty", "body is empty"),
        (b" \r\n\t", "empty", "body is empty"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nMAMCAQA=\n-----END CERTIFICATE REQUEST-----\n",
            "pem",
            "body is PEM; EST wants base64 DER without the -----BEGIN line",
        ),
        (b"MAMC%QA=", "not-base64", "body has '%' at offset 4, which is not base64"),
        (b"MAMC\x00QA=", "not-base64", "body has byte 0x00 at offset 4"),
        (b"MAMC-_QA", "not-base64", "body has '-' at offset 4"),  # base64url is not base64
        (b"\x30\x82\x01\x0a\x02", "not-base64", "body looks like binary DER"),
        (b"MAMCAQA", "bad-padding", "7 base64 characters, not a multiple of 4"),
        (b"MA==MA==", "bad-padding", "body is not valid base64: Excess data after padding"),
        (b"MA=A", "bad-padding", "body is not valid base64"),
        (b"====", "decodes-empty", "decodes to nothing"),
    ],
    ids=[
        "empty",
        "blank",
        "pem",
        "percent",
        "nul",
        "base64url",
        "binary-der",
        "no-padding",
        "data-after-padding",
        "inner-padding",
        "only-padding",
    ],
)
def test_decode_body_refusals(raw, code, fragment):
    refused(code, fragment, wire.decode_body, raw)


def test_error_is_a_value_error():
    assert issubclass(EstWireError, ValueError)


# --- content types ------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "application/pkcs10",
        "Application/PKCS10",
        "application/pkcs10; charset=binary",
        "  application/pkcs10 ;charset=utf-8 ",
    ],
)
def test_content_type_accepted(header):
    wire.check_content_type(header, wire.PKCS10)


@pytest.mark.parametrize(
    "header",
    [
        "application/pkcs7-mime; smime-type=certs-only",
        'application/pkcs7-mime; smime-type="certs-only"',
        "application/PKCS7-mime;SMIME-Type=Certs-Only",
        "application/pkcs7-mime",  # what the reference server sends
    ],
)
def test_pkcs7_content_type_accepted(header):
    wire.check_content_type(header, wire.PKCS7_CERTS)


def test_content_type_refused():
    refused(
        "bad-content-type",
        "Content-Type must be application/pkcs10, got text/plain",
        wire.check_content_type,
        "text/plain",
        wire.PKCS10,
    )


def test_content_type_prefix_is_not_enough():
    refused(
        "bad-content-type",
        "got application/pkcs10x",
        wire.check_content_type,
        "application/pkcs10x",
        wire.PKCS10,
    )


def test_content_type_other_smime_type_refused():
    refused(
        "bad-content-type",
        "Content-Type must be application/pkcs7-mime; smime-type=certs-only, got "
        "application/pkcs7-mime; smime-type=server-generated-key",
        wire.check_content_type,
        "application/pkcs7-mime; smime-type=server-generated-key",
        wire.PKCS7_CERTS,
    )


@pytest.mark.parametrize("header", [None, "", "  "])
def test_content_type_missing(header):
    refused(
        "bad-content-type",
        "Content-Type is missing; send application/pkcs10",
        wire.check_content_type,
        header,
        wire.PKCS10,
    )


# --- CSR attributes (RFC 7030 §4.5.2) -------------------------------------------------


def asn1parse(tmp_path, der: bytes) -> str:
    path = tmp_path / "csrattrs.der"
    path.write_bytes(der)
    return openssl("asn1parse", "-inform", "DER", "-in", str(path))


def asn1_tree(parsed: str) -> list[tuple[int, str]]:
    """(depth, "TYPE" or "TYPE:value") per line of openssl asn1parse output."""
    tree = []
    for line in parsed.splitlines():
        found = re.search(r"d=(\d+).*(?:prim|cons): (\S+)\s*(:\S.*)?$", line)
        assert found, line
        tree.append((int(found[1]), found[2] + (found[3] or "").rstrip()))
    return tree


def test_device_csrattrs_with_tls_unique(tmp_path):
    der = csrattrs.device_csrattrs(require_tls_unique=True)
    assert csrattrs.parse_csrattrs(der) == [
        CHALLENGE_PASSWORD,
        ECDSA_SHA256,
        f"{EC_PUBLIC_KEY}={SECP256R1}",
    ]
    # The curve is the value of an id-ecPublicKey attribute: a SET inside a SEQUENCE.
    assert asn1_tree(asn1parse(tmp_path, der)) == [
        (0, "SEQUENCE"),
        (1, "OBJECT:challengePassword"),
        (1, "OBJECT:ecdsa-with-SHA256"),
        (1, "SEQUENCE"),
        (2, "OBJECT:id-ecPublicKey"),
        (2, "SET"),
        (3, "OBJECT:prime256v1"),
    ]


def test_device_csrattrs_without_tls_unique(tmp_path):
    der = csrattrs.device_csrattrs(require_tls_unique=False)
    assert CHALLENGE_PASSWORD not in csrattrs.parse_csrattrs(der)
    assert ":challengePassword" not in asn1parse(tmp_path, der)


def test_device_csrattrs_p384(tmp_path):
    der = csrattrs.device_csrattrs(require_tls_unique=False, curve="P-384")
    assert csrattrs.parse_csrattrs(der) == [ECDSA_SHA384, f"{EC_PUBLIC_KEY}={SECP384R1}"]
    parsed = asn1parse(tmp_path, der)
    assert ":secp384r1" in parsed and ":ecdsa-with-SHA384" in parsed


def test_parse_rfc_example():
    assert csrattrs.parse_csrattrs(RFC_EXAMPLE) == [
        CHALLENGE_PASSWORD,
        f"{EC_PUBLIC_KEY}={SECP384R1}",
        f"{EXTENSION_REQUEST}={MAC_ADDRESS}",
        ECDSA_SHA384,
    ]


def test_build_rfc_example_entries(tmp_path):
    der = csrattrs.csrattrs_body(
        [oid(CHALLENGE_PASSWORD), oid(ECDSA_SHA384)],
        {oid(EC_PUBLIC_KEY): [oid(SECP384R1)], oid(EXTENSION_REQUEST): [oid(MAC_ADDRESS)]},
    )
    assert sorted(csrattrs.parse_csrattrs(der)) == sorted(csrattrs.parse_csrattrs(RFC_EXAMPLE))
    assert len(der) == len(RFC_EXAMPLE)  # same entries, oids first: same size
    assert ":Extension Request" in asn1parse(tmp_path, der)


def test_csrattrs_raw_values_sorted_as_der_set():
    utf8 = b"\x0c\x03abc"
    der = csrattrs.csrattrs_body([], {oid("1.2.3.4"): [utf8, oid(SECP256R1)]})
    # DER sorts SET OF members by encoding: the OID (tag 06) before the UTF8String (0c).
    assert csrattrs.parse_csrattrs(der) == [f"1.2.3.4={SECP256R1},#0c03616263"]


def test_csrattrs_empty():
    assert csrattrs.csrattrs_body([]) == b"\x30\x00"
    assert csrattrs.parse_csrattrs(b"\x30\x00") == []
    assert csrattrs.parse_csrattrs(b"") == []


def test_csrattrs_attribute_needs_a_value():
    with pytest.raises(ValueError, match="needs at least one value"):
        csrattrs.csrattrs_body([], {oid("1.2.3.4"): []})


@pytest.mark.parametrize(
    "der",
    [b"junk", RFC_EXAMPLE[:-3], RFC_EXAMPLE + b"\x00\x00", b"\x30\x03\x02\x01\x00"],
    ids=["junk", "truncated", "trailing", "integer-entry"],
)
def test_parse_csrattrs_refuses_malformed(der):
    refused("bad-csrattrs", "CSR attributes are not valid DER", csrattrs.parse_csrattrs, der)


# --- serverkeygen multipart (RFC 7030 §4.4.2) -----------------------------------------


@pytest.fixture(scope="module")
def keygen():
    key = generate_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keygen device")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_der, cert


def test_serverkeygen_round_trip(keygen):
    key_der, cert = keygen
    body, content_type = wire.serverkeygen_multipart(key_der, certs_only([cert]))
    got_key, got_certs = wire.parse_serverkeygen_multipart(body, content_type)
    assert got_key == key_der
    assert got_certs == [cert]
    key = load_der_private_key(got_key, password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_serverkeygen_framing(keygen):
    key_der, cert = keygen
    body, content_type = wire.serverkeygen_multipart(key_der, certs_only([cert]))
    assert content_type == "multipart/mixed; boundary=certfleet-est"
    assert re.search(rb"[^\r]\n", body) is None  # CRLF line ends only
    text = body.decode("ascii")
    assert text.startswith(
        "--certfleet-est\r\nContent-Type: application/pkcs8\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    )
    assert (
        "\r\n--certfleet-est\r\n"
        "Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ) in text
    assert text.endswith("\r\n--certfleet-est--\r\n")
    assert text.count("--certfleet-est") == 3


def test_serverkeygen_parse_tolerates_other_servers(keygen):
    key_der, cert = keygen
    p7 = certs_only([cert])
    key_b64 = base64.b64encode(key_der).decode()
    p7_b64 = base64.b64encode(p7).decode()
    # LF framing, a quoted boundary, a preamble, parts swapped, CTE header absent.
    body = (
        "preamble to ignore\n"
        "--b0und\n"
        "content-type: application/pkcs7-mime; smime-type=certs-only\n\n"
        f"{p7_b64}\n"
        "--b0und\n"
        "Content-Type: application/pkcs8\n"
        "Content-Transfer-Encoding: binary\n\n"
        f"{key_b64[:30]}\n {key_b64[30:]}\n"
        "--b0und--\n"
    ).encode()
    got_key, got_certs = wire.parse_serverkeygen_multipart(
        body, 'Multipart/Mixed ; boundary="b0und"'
    )
    assert got_key == key_der
    assert got_certs == [cert]


def test_serverkeygen_parse_refuses_other_content_type(keygen):
    body, _ = wire.serverkeygen_multipart(keygen[0], certs_only([keygen[1]]))
    refused(
        "bad-content-type",
        "Content-Type must be multipart/mixed, got application/pkcs8",
        wire.parse_serverkeygen_multipart,
        body,
        "application/pkcs8",
    )


def test_serverkeygen_parse_refuses_header_injection(keygen):
    body, content_type = wire.serverkeygen_multipart(keygen[0], certs_only([keygen[1]]))
    refused(
        "bad-multipart",
        "line break",
        wire.parse_serverkeygen_multipart,
        body,
        content_type + "\r\nX-Evil: 1",
    )


def test_serverkeygen_parse_refuses_missing_part(keygen):
    key_der, _ = keygen
    body = (
        b"--b\r\nContent-Type: application/pkcs8\r\n\r\n" + wire.encode_body(key_der) + b"--b--\r\n"
    )
    refused(
        "bad-multipart",
        "needs an application/pkcs8 part and an application/pkcs7-mime part; "
        "found: application/pkcs8",
        wire.parse_serverkeygen_multipart,
        body,
        "multipart/mixed; boundary=b",
    )


def test_serverkeygen_parse_refuses_wrong_boundary(keygen):
    body, _ = wire.serverkeygen_multipart(keygen[0], certs_only([keygen[1]]))
    refused(
        "bad-multipart",
        "found: none",
        wire.parse_serverkeygen_multipart,
        body,
        "multipart/mixed; boundary=other",
    )


def test_serverkeygen_parse_refuses_encrypted_key(keygen):
    body, content_type = wire.serverkeygen_multipart(keygen[0], certs_only([keygen[1]]))
    body = body.replace(b"smime-type=certs-only", b"smime-type=server-generated-key")
    refused(
        "bad-content-type",
        "Content-Type must be application/pkcs7-mime; smime-type=certs-only, got ",
        wire.parse_serverkeygen_multipart,
        body,
        content_type,
    )


def test_serverkeygen_parse_refuses_bad_key_base64(keygen):
    body, content_type = wire.serverkeygen_multipart(keygen[0], certs_only([keygen[1]]))
    head, sep, rest = body.partition(b"base64\r\n\r\n")
    refused(
        "not-base64",
        "serverkeygen key part: body has '%'",
        wire.parse_serverkeygen_multipart,
        head + sep + b"%" + rest,
        content_type,
    )


def test_serverkeygen_parse_refuses_bad_certs(keygen):
    body, content_type = wire.serverkeygen_multipart(keygen[0], b"\x30\x03\x02\x01\x00")
    refused(
        "bad-multipart",
        "serverkeygen certificate part: not a DER PKCS#7",
        wire.parse_serverkeygen_multipart,
        body,
        content_type,
    )
