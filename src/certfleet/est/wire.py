"""EST body framing (RFC 7030 as clarified by RFC 8951), free of any web framework.

Every EST body is base64 of DER. Callers ignore any Content-Transfer-Encoding
header, as RFC 8951 §3.2 says: its value never changes how a body is read.
"""

from __future__ import annotations

import base64
import binascii
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

from cryptography import x509

from ..pki.errors import PkiError
from ..pki.pkcs7 import load_certs_only

PKCS10 = "application/pkcs10"
PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS = "application/csrattrs"
PKCS8 = "application/pkcs8"
MULTIPART_MIXED = "multipart/mixed"

# The delimiter starts with "--" and base64 has no "-", so no body can contain it.
BOUNDARY = "certfleet-est"
LINE_LENGTH = 64

_WHITESPACE = b" \t\r\n"
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/= \t\r\n]")


class EstWireError(ValueError):
    """A body or header does not follow EST framing; `code` for machines, message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_body(raw: bytes) -> bytes:
    """DER from an EST body: base64, white space anywhere ignored, padding checked."""
    if not raw.strip(_WHITESPACE):
        raise EstWireError("empty", "body is empty; EST wants base64 of DER")
    if b"-----BEGIN" in raw:
        raise EstWireError("pem", "body is PEM; EST wants base64 DER without the -----BEGIN line")
    bad = _NOT_BASE64.search(raw)
    if bad:
        raise EstWireError("not-base64", _not_base64_message(raw, bad.start()))
    text = raw.translate(None, _WHITESPACE)
    if len(text) % 4:
        raise EstWireError(
            "bad-padding",
            f"body has {len(text)} base64 characters, not a multiple of 4: "
            "it is truncated or its '=' padding is missing",
        )
    if not text.strip(b"="):
        raise EstWireError("decodes-empty", "body is only '=' padding and decodes to nothing")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise EstWireError("bad-padding", f"body is not valid base64: {exc}") from exc


def _not_base64_message(raw: bytes, offset: int) -> str:
    byte = raw[offset]
    shown = repr(chr(byte)) if 0x20 < byte < 0x7F else f"byte 0x{byte:02x}"
    if raw[:1] == b"0" and byte > 0x7F:
        return "body looks like binary DER; EST wants it base64-encoded (RFC 8951)"
    return f"body has {shown} at offset {offset}, which is not base64; EST wants base64 of DER"


def encode_body(der: bytes) -> bytes:
    """Base64 of `der` in LF-terminated 64-character lines.

    LF rather than CRLF: GNU `base64 -d` refuses CR, and `curl ... | base64 -d`
    is how people read EST answers; every client must accept both (RFC 8951).
    """
    text = base64.b64encode(der)
    return b"".join(text[i : i + LINE_LENGTH] + b"\n" for i in range(0, len(text), LINE_LENGTH))


def check_content_type(header: str | None, expected: str) -> None:
    """Refuse a Content-Type whose media type differs from `expected`'s.

    Case and extra parameters are accepted; a parameter that `expected` also has
    (smime-type) must have the same value.
    """
    want_type, want_params = _media_type(expected)
    if header is None or not header.strip():
        raise EstWireError("bad-content-type", f"Content-Type is missing; send {expected}")
    got_type, got_params = _media_type(header)
    clash = any(got_params.get(k, v) != v for k, v in want_params.items())
    if got_type != want_type or clash:
        raise EstWireError(
            "bad-content-type", f"Content-Type must be {expected}, got {header.strip()}"
        )


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    media, *params = header.split(";")
    parsed = {}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key.strip().lower()] = value.strip().strip('"').lower()
    return media.strip().lower(), parsed


def serverkeygen_multipart(key_pkcs8_der: bytes, cert_pkcs7_der: bytes) -> tuple[bytes, str]:
    """RFC 7030 §4.4.2 response: (body, Content-Type) with the key part, then the cert part."""
    body = b""
    for content_type, der in ((PKCS8, key_pkcs8_der), (PKCS7_CERTS, cert_pkcs7_der)):
        body += (
            f"--{BOUNDARY}\r\n"
            f"Content-Type: {content_type}\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "\r\n"
        ).encode("ascii") + encode_body(der).replace(b"\n", b"\r\n")  # MIME wants CRLF
    body += f"--{BOUNDARY}--\r\n".encode("ascii")
    return body, f"{MULTIPART_MIXED}; boundary={BOUNDARY}"


def parse_serverkeygen_multipart(
    body: bytes, content_type: str
) -> tuple[bytes, list[x509.Certificate]]:
    """Client side: (PKCS#8 DER key, certificates) from a serverkeygen response."""
    check_content_type(content_type, MULTIPART_MIXED)
    if "\r" in content_type or "\n" in content_type:
        raise EstWireError("bad-multipart", "Content-Type header holds a line break")
    # The stdlib parser copes with LF or CRLF framing, quoted boundaries and preambles.
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    parts: dict[str, EmailMessage] = {}
    for part in message.iter_parts() if isinstance(message, EmailMessage) else []:
        parts.setdefault(part.get_content_type(), part)
    key_part, cert_part = parts.get(PKCS8), parts.get("application/pkcs7-mime")
    if key_part is None or cert_part is None:
        raise EstWireError(
            "bad-multipart",
            f"serverkeygen response needs an {PKCS8} part and an application/pkcs7-mime part; "
            f"found: {', '.join(parts) or 'none'}",
        )
    # An encrypted key would come as smime-type=server-generated-key; we ask for none.
    check_content_type(cert_part["Content-Type"], PKCS7_CERTS)
    key_der = _part_der(key_part, "key")
    try:
        certs = load_certs_only(_part_der(cert_part, "certificate"))
    except PkiError as exc:
        raise EstWireError("bad-multipart", f"serverkeygen certificate part: {exc}") from exc
    return key_der, certs


def _part_der(part: EmailMessage, label: str) -> bytes:
    payload = part.get_payload(decode=False)
    if not isinstance(payload, str):
        raise EstWireError("bad-multipart", f"serverkeygen {label} part is itself multipart")
    try:
        return decode_body(payload.encode("latin-1"))
    except EstWireError as exc:
        raise EstWireError(exc.code, f"serverkeygen {label} part: {exc}") from exc
