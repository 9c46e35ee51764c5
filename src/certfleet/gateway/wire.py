"""What devices send the gateway, parsed and checked: JSON bodies, keys, config files, events.

Every check raises a 400 GatewayError that names the field, so a developer of
device software can fix the request from the message alone. Nothing here
touches the store.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certfleet.pki.errors import PkiError
from certfleet.pki.keys import check_public_key, pubkey_sha256, public_key_pem, sha256_hex
from certfleet.storable_text import unstorable
from certfleet.store.config_files import ConfigValue, bad_file_name

from .errors import bad_request, too_large

# Column sizes of the store, so that PostgreSQL never has to refuse a value.
MAX_EVENT_ID = 128
MAX_CORRELATION_ID = 128
MAX_EVENT_TYPE = 128
MAX_TARGET_NAME = 255
MAX_VERSION = 64
MAX_DETAILS = 16 * 1024
MAX_FILES = 1000
MAX_PEM = 4096


@dataclass(frozen=True)
class NextKey:
    """A public key a device announced, as canonical PEM and fingerprint."""

    key: ec.EllipticCurvePublicKey
    pem: str
    sha256: str
    replace: bool = False


@dataclass(frozen=True)
class ConfigUpload:
    """Device-scope files a device re-encrypted for its next key."""

    files: dict[str, ConfigValue]
    next_key: NextKey


@dataclass(frozen=True)
class EventIn:
    """One update event as reported by a device (the reference's envelope)."""

    event_id: str
    device_time: dt.datetime | None
    correlation_id: str
    event_type: str
    success: bool | None
    target_name: str | None
    version: str | None
    details: str | None


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body; 400 with the parser's reason if it is not JSON."""
    if not body.strip():
        raise bad_request("empty-body", "request body is empty: send a JSON object")
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request("not-utf8", f"request body is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise bad_request("malformed-json", f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise bad_request("malformed-json", "request body is JSON nested too deeply") from exc
    problem = unstorable(value)
    if problem:
        raise bad_request("unstorable-text", f"request body has a string with {problem}")
    return value


def next_key_request(value: Any) -> NextKey:
    """The body of PATCH /device: `{"next_pubkey": PEM, "replace": bool}`."""
    body = _object(value, "request body")
    _only(body, {"next_pubkey", "replace"}, "request body")
    replace = _optional(body, "replace", bool, "replace", default=False)
    return dataclasses.replace(_next_key(body), replace=replace)


def withdrawn_key(value: str | None) -> str:
    """The `sha256` query of DELETE /device/next-key: the next key's fingerprint, in hex."""
    if not value:
        raise bad_request(
            "missing-sha256",
            "give ?sha256=<hex SHA-256 of the next key's SubjectPublicKeyInfo> to withdraw",
        )
    fingerprint = sha256_hex(value)
    if fingerprint is None:
        raise bad_request("sha256", "sha256 must be 64 hex digits (SHA-256 of the public key)")
    return fingerprint


def config_upload(value: Any) -> ConfigUpload:
    """The body of PATCH /config: `{"files": {name: file}, "next_pubkey": PEM}`."""
    body = _object(value, "request body")
    _only(body, {"files", "next_pubkey"}, "request body")
    files = _object(_required(body, "files", "request body"), "files")
    if len(files) > MAX_FILES:
        raise too_large("too-many-files", f"{len(files)} files: at most {MAX_FILES} per device")
    return ConfigUpload(
        {name: config_file(name, raw) for name, raw in files.items()}, _next_key(body)
    )


def config_file(name: str, value: Any) -> ConfigValue:
    """One file: `{"Value": str, "OnChanged": [str], "Unencrypted": bool}`, as the reference."""
    problem = bad_file_name(name)
    if problem:
        raise bad_request("file-name", problem)
    where = f"files[{name!r}]"
    body = _object(value, where)
    _only(body, {"Value", "OnChanged", "Unencrypted"}, where)
    text = _typed(_required(body, "Value", where), str, f"{where}.Value")
    on_changed = _optional(body, "OnChanged", list, f"{where}.OnChanged", default=[])
    for index, command in enumerate(on_changed):
        _typed(command, str, f"{where}.OnChanged[{index}]")
    unencrypted = _optional(body, "Unencrypted", bool, f"{where}.Unencrypted", default=False)
    if not unencrypted:
        _check_ciphertext(text, where)
    return ConfigValue(text, list(on_changed), unencrypted)


def applied_version(value: Any) -> str:
    """The body of POST /config/applied: `{"version": "<the Last-Modified it applied>"}`."""
    body = _object(value, "request body")
    _only(body, {"version"}, "request body")
    return _text(_required(body, "version", "request body"), "version", MAX_VERSION)


def update_events(value: Any, limit: int) -> list[EventIn]:
    """The body of POST /events: a JSON list of the reference's event envelopes."""
    if not isinstance(value, list):
        raise bad_request(
            "wrong-type", f"request body must be a JSON list of events, not {_kind(value)}"
        )
    if len(value) > limit:
        raise too_large(
            "too-many-events",
            f"{len(value)} events in one request; send at most {limit} per request",
        )
    return [_event(item, f"events[{index}]") for index, item in enumerate(value)]


def _event(value: Any, where: str) -> EventIn:
    envelope = _object(value, where)
    event = _object(_required(envelope, "event", where), f"{where}.event")
    event_type = _object(_required(envelope, "eventType", where), f"{where}.eventType")
    _optional(event_type, "version", int, f"{where}.eventType.version", default=None)
    return EventIn(
        event_id=_text(_required(envelope, "id", where), f"{where}.id", MAX_EVENT_ID),
        device_time=_device_time(envelope.get("deviceTime"), f"{where}.deviceTime"),
        correlation_id=_text(
            _required(event, "correlationId", f"{where}.event"),
            f"{where}.event.correlationId",
            MAX_CORRELATION_ID,
        ),
        event_type=_text(
            _required(event_type, "id", f"{where}.eventType"),
            f"{where}.eventType.id",
            MAX_EVENT_TYPE,
        ),
        success=_optional(event, "success", bool, f"{where}.event.success", default=None),
        target_name=_optional_text(event, "targetName", f"{where}.event", MAX_TARGET_NAME),
        version=_optional_text(event, "version", f"{where}.event", MAX_VERSION),
        details=_optional_text(event, "details", f"{where}.event", MAX_DETAILS),
    )


def _next_key(body: dict[str, Any]) -> NextKey:
    pem = _typed(_required(body, "next_pubkey", "request body"), str, "next_pubkey")
    if len(pem) > MAX_PEM:
        raise bad_request(
            "next-pubkey", f"next_pubkey is {len(pem)} characters: not a P-256/P-384 key"
        )
    try:
        loaded = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise bad_request(
            "next-pubkey",
            "next_pubkey is not a PEM public key (-----BEGIN PUBLIC KEY-----): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        ) from exc
    try:
        key = check_public_key(loaded)
    except PkiError as exc:
        raise bad_request("next-pubkey", f"next_pubkey: {exc}") from exc
    return NextKey(key, public_key_pem(key), pubkey_sha256(key))


def _check_ciphertext(text: str, where: str) -> None:
    try:
        base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(
            "not-ciphertext",
            f"{where}.Value is not base64 ECIES ciphertext; set Unencrypted for a clear value",
        ) from exc


def _device_time(value: Any, where: str) -> dt.datetime | None:
    if value is None:
        return None
    text = _typed(value, str, where)
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise bad_request(
            "device-time",
            f"{where} {text[:40]!r} is not an RFC 3339 time like 2025-01-31T12:00:00Z",
        ) from exc
    # A device without a zone reports UTC, as the reference's agents do.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError as exc:  # e.g. year 1 east of Greenwich
        raise bad_request(
            "device-time", f"{where} {text[:40]!r} is out of range in UTC (years 1 to 9999)"
        ) from exc


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request("wrong-type", f"{where} must be a JSON object, not {_kind(value)}")
    return value


def _only(body: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise bad_request(
            "unknown-field", f"{where} has unknown field(s) {', '.join(unknown)} (known: {known})"
        )


def _required(body: dict[str, Any], name: str, where: str) -> Any:
    if name not in body:
        raise bad_request("missing-field", f"{where} needs the field {name}")
    return body[name]


def _optional(body: dict[str, Any], name: str, kind: type, where: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else _typed(value, kind, where)


def _optional_text(body: dict[str, Any], name: str, where: str, limit: int) -> str | None:
    value = body.get(name)
    return None if value is None else _text(value, f"{where}.{name}", limit, shortest=0)


def _text(value: Any, where: str, limit: int, shortest: int = 1) -> str:
    text = _typed(value, str, where)
    if not shortest <= len(text) <= limit:
        raise bad_request(
            "length", f"{where} must be {shortest} to {limit} characters, not {len(text)}"
        )
    return text


def _typed(value: Any, kind: type, where: str) -> Any:
    # bool is an int in Python, but a JSON true is no number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(
            "wrong-type", f"{where} must be a JSON {_KINDS[kind]}, not {_kind(value)}"
        )
    return value


_KINDS = {str: "string", bool: "boolean", int: "integer", list: "list", dict: "object"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
