"""What a rotation is asked to do, from the `fio-rotate-certs` config file or the CLI.

The file is the reference's: one ``NAME=value`` per line, white space around
names and values ignored, blank lines and lines starting with ``#`` skipped::

    ESTSERVER=https://est.example:8443/.well-known/est
    ROTATIONID=certs-1700000000
    PKEYIDS=01,07
    CERTIDS=03,09

``ESTSERVER`` and ``ROTATIONID`` are required. ``PKEYIDS``/``CERTIDS`` name the
two PKCS#11 object ids the key and certificate alternate between; each id is
hex, parsed only by :func:`certfleet.pki.pkcs11_signer.parse_hex_id` (``01``,
``0x01`` and ``1`` are the same id) and written back as lower-case hex. They
are parsed when a device with its key in a token uses them; devices with file
keys ignore them (so a file-key device never loads the PKCS#11 library).
Unknown or repeated names are refused: a typo must not pass silently.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from certfleet.pki.errors import PkiError

ROTATE_FILE = "fio-rotate-certs"
NAMES = ("ESTSERVER", "ROTATIONID", "PKEYIDS", "CERTIDS")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RequestError(ValueError):
    """The rotation request is malformed; the message names the line or value."""


@dataclass(frozen=True)
class RotationRequest:
    """One rotation to run: its id, where to renew, and the token slots to alternate."""

    rotation_id: str
    est_server: str
    pkey_ids: str | None = None
    cert_ids: str | None = None
    origin: str = "cli"
    replace_next_key: bool = False


def parse_rotate_file(text: str) -> RotationRequest:
    """The request in a `fio-rotate-certs` file; RequestError if it is malformed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in NAMES:
            raise RequestError(
                f"{ROTATE_FILE} line {number}: expected NAME=value with NAME one of "
                f"{', '.join(NAMES)}, got {line[:60]!r}"
            )
        if name in values:
            raise RequestError(f"{ROTATE_FILE} line {number}: {name} is given twice")
        values[name] = value
    for required in ("ESTSERVER", "ROTATIONID"):
        if not values.get(required):
            raise RequestError(f"{ROTATE_FILE} has no {required}=... line")
    return make_request(
        values["ROTATIONID"],
        values["ESTSERVER"],
        pkey_ids=values.get("PKEYIDS"),
        cert_ids=values.get("CERTIDS"),
        origin=ROTATE_FILE,
    )


def make_request(
    rotation_id: str,
    est_server: str,
    *,
    pkey_ids: str | None = None,
    cert_ids: str | None = None,
    origin: str = "cli",
    replace_next_key: bool = False,
) -> RotationRequest:
    """A checked request; RequestError names the bad value."""
    if not _ID_RE.fullmatch(rotation_id):
        raise RequestError(
            f"rotation id {rotation_id!r} is invalid: use 1-128 characters from "
            "A-Z a-z 0-9 . _ - starting with a letter or digit (e.g. certs-1700000000)"
        )
    return RotationRequest(
        rotation_id=rotation_id,
        est_server=check_est_server(est_server),
        pkey_ids=pkey_ids.strip() if pkey_ids and pkey_ids.strip() else None,
        cert_ids=cert_ids.strip() if cert_ids and cert_ids.strip() else None,
        origin=origin,
        replace_next_key=replace_next_key,
    )


def check_est_server(url: str) -> str:
    """An https:// EST URL, without a trailing slash."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise RequestError(
            f"EST server {url!r} is not an https:// URL like https://est.example:8443"
        )
    return url.strip().rstrip("/")


def id_pair(text: str | None, name: str) -> tuple[str, str]:
    """The two PKCS#11 ids of PKEYIDS or CERTIDS as lower-case hex; RequestError if bad."""
    from certfleet.pki.pkcs11_signer import parse_hex_id

    if text is None:
        raise RequestError(f"a device with its key in a PKCS#11 token needs {name}=<id>,<id>")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise RequestError(f"{name}={text!r}: give exactly two hex ids, e.g. {name}=01,07")
    try:
        first, second = (parse_hex_id(p).hex() for p in parts)
    except PkiError as exc:
        raise RequestError(f"{name}={text!r}: {exc}") from None
    if first == second:
        raise RequestError(f"{name}={text!r}: the two ids must differ")
    return first, second
