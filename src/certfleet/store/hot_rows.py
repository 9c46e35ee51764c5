"""The rows the hot-path queries return and the rows an issuing request writes.

Plain frozen dataclasses, built straight from driver tuples: the hot path skips
the ORM on purpose (see hot_path.py). Field order is the column order of the
matching query in hot_sql.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

Row = TypeVar("Row")
DecodeTime = Callable[[Any], dt.datetime | None]


def build(cls: type[Row], values: Sequence[Any], when: DecodeTime) -> Row:
    """A row of `cls` from one result tuple; `when` turns the driver's timestamps into datetimes.

    SQLite hands back booleans as 0/1 and timestamps as text; both become what
    the field says.
    """
    kinds = cls.KINDS  # type: ignore[attr-defined]
    return cls(*(_decode(kinds[i], v, when) for i, v in enumerate(values)))


def _decode(kind: str, value: Any, when: DecodeTime) -> Any:
    if kind == "time":
        return when(value)
    if kind == "bool" and value is not None:
        return bool(value)
    return value


def _decoded(cls: type) -> type:
    """Record each field's kind (time, bool or other), by position, for `build`."""
    kinds = []
    for f in fields(cls):
        kind = str(f.type)
        kinds.append("time" if "datetime" in kind else "bool" if kind == "bool" else "")
    cls.KINDS = tuple(kinds)  # type: ignore[attr-defined]
    return cls


@_decoded
@dataclass(frozen=True, slots=True)
class ClientRow:
    """A client certificate as EST renewal checks it: its row, device, deny-list entry, CAs.

    `issuer_*` is the CA that issued it, if that CA belongs to the device's
    factory; `issuing_*` is this server's issuing CA, if it belongs to the
    factory of the request.
    """

    cert_id: int
    serial: str
    device_uuid: str | None
    device_factory_id: int | None
    device_factory: str | None
    deleted_at: dt.datetime | None
    denied: bool
    issuer_name: str | None
    issuer_status: str | None
    issuer_changed_at: dt.datetime | None
    issuing_name: str | None
    issuing_status: str | None


@dataclass(frozen=True, slots=True)
class ClientLookup:
    """What identifies a renewal: the client certificate and where the request was sent."""

    sha256: str
    factory_id: int
    issuing_ca_id: int


@dataclass(frozen=True, slots=True)
class NewCertificate:
    """A certificate row to insert (status active)."""

    serial: str
    sha256: str
    subject: str
    pubkey_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    cert_pem: str
    issuer_ca_id: int | None
    device_uuid: str
    issued_by_request: str


@dataclass(frozen=True, slots=True)
class Issue:
    """Everything an issuing request writes, in one transaction: certificate, event, audit row."""

    certificate: NewCertificate
    topic: str
    payload: dict[str, Any]
    actor: str
    action: str
    details: dict[str, Any]


@_decoded
@dataclass(frozen=True, slots=True)
class CheckinRow:
    """A client certificate with its device's and issuer's state (certificates.checkin's columns).

    `config_changed` is the newest change to a config file that applies to the
    device; `generation` is the change counter read in the same statement.
    """

    cert_id: int
    serial: str
    cert_status: str
    pubkey_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    device_uuid: str | None
    factory_id: int | None
    group_name: str | None
    current_cert_id: int | None
    next_pubkey_sha256: str | None
    config_locked: bool
    last_seen_at: dt.datetime | None
    deleted_at: dt.datetime | None
    created_at: dt.datetime | None
    registered_via: str | None
    ca_name: str | None
    ca_status: str | None
    ca_status_changed_at: dt.datetime | None
    config_changed: dt.datetime | None
    generation: int


@dataclass(frozen=True, slots=True)
class Seen:
    """A device to mark seen at `at` after a check-in."""

    device_uuid: str
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class ConfigFileRow:
    """One config file that applies to a device, as gateway/config.py merges it."""

    name: str
    scope: str
    value: str
    on_changed: list[str]
    unencrypted: bool


@dataclass(frozen=True, slots=True)
class DenylistPoll:
    """Deny-list entries (id, fingerprint) and the change counter, read together."""

    rows: list[tuple[int, str]]
    generation: int
