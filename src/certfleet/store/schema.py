"""The one schema of the certfleet store (SQLite and PostgreSQL).

Migrations in ``migrations/versions`` must create exactly this; a test compares them.
Fingerprints are lowercase hex SHA-256 strings; serials are lowercase hex.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, UTC-aware."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is stored in UTC and always read back UTC-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # SQLite keeps no zone; everything written is UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class CaKind(StrEnum):
    ROOT = "root"
    ONLINE = "online"
    LOCAL = "local"
    GATEWAY_TLS = "gateway-tls"
    EST_TLS = "est-tls"


class CaStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REVOKED = "revoked"


class CertStatus(StrEnum):
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


class RegisteredVia(StrEnum):
    ONLINE = "online"
    LOCAL_CA = "local-ca"
    EST = "est"


class ConfigScope(StrEnum):
    FACTORY = "factory"
    GROUP = "group"
    DEVICE = "device"


class UpdateStatus(StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PendingStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


def one_of(column: str, values: type[StrEnum]) -> CheckConstraint:
    """A CHECK that ``column`` holds one of the enum's values."""
    allowed = ", ".join(f"'{v.value}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=column)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Factory(Base):
    __tablename__ = "factories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ca(Base):
    __tablename__ = "cas"
    __table_args__ = (
        UniqueConstraint("factory_id", "name"),
        one_of("kind", CaKind),
        one_of("status", CaStatus),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id"))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(Text)
    cert_pem: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    ski: Mapped[str | None] = mapped_column(String(128))
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), default=CaStatus.ACTIVE)
    # A file path or a PKCS#11 URI; the key itself never enters the store.
    key_ref: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status_changed_at: Mapped[datetime | None]


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (
        Index(None, "factory_id", "group_name"),
        one_of("registered_via", RegisteredVia),
    )

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id"))
    group_name: Mapped[str | None] = mapped_column(String(128))
    # devices <-> certificates is a cycle; the migration adds this key after both tables.
    current_cert_id: Mapped[int | None] = mapped_column(
        ForeignKey("certificates.id", use_alter=True)
    )
    next_pubkey_pem: Mapped[str | None] = mapped_column(Text)
    next_pubkey_sha256: Mapped[str | None] = mapped_column(String(64))
    config_locked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]
    registered_via: Mapped[str] = mapped_column(String(16))


class Certificate(Base):
    __tablename__ = "certificates"
    __table_args__ = (UniqueConstraint("issuer_ca_id", "serial"), one_of("status", CertStatus))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    serial: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    subject: Mapped[str] = mapped_column(Text)
    pubkey_sha256: Mapped[str] = mapped_column(String(64), index=True)
    issuer_ca_id: Mapped[int | None] = mapped_column(ForeignKey("cas.id"))
    device_uuid: Mapped[str | None] = mapped_column(ForeignKey("devices.uuid"), index=True)
    not_before: Mapped[datetime]
    not_after: Mapped[datetime] = mapped_column(index=True)
    status: Mapped[str] = mapped_column(String(16), default=CertStatus.ACTIVE)
    cert_pem: Mapped[str] = mapped_column(Text)
    # e.g. "est:simplereenroll:<request id>"
    issued_by_request: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DenylistEntry(Base):
    __tablename__ = "denylist"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cert_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    serial: Mapped[str | None] = mapped_column(String(64))
    device_uuid: Mapped[str | None] = mapped_column(String(36), index=True)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConfigFile(Base):
    __tablename__ = "config_files"
    __table_args__ = (
        UniqueConstraint("factory_id", "scope", "scope_key", "name"),
        one_of("scope", ConfigScope),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id"))
    scope: Mapped[str] = mapped_column(String(8))
    # group name, device uuid, or '' for the factory scope
    scope_key: Mapped[str] = mapped_column(String(128), default="")
    name: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(Text)
    on_changed: Mapped[list[str]] = mapped_column(default=list)
    unencrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(255))


class ConfigLog(Base):
    __tablename__ = "config_log"
    __table_args__ = (Index(None, "factory_id", "scope", "scope_key"), one_of("scope", ConfigScope))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id"))
    scope: Mapped[str] = mapped_column(String(8))
    scope_key: Mapped[str] = mapped_column(String(128), default="")
    changed_by: Mapped[str] = mapped_column(String(255))
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")
    file_names: Mapped[list[str]] = mapped_column(default=list)


class Update(Base):
    """One update (rotation, OTA) of one device; several devices may share a correlation id."""

    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("device_uuid", "correlation_id"),
        one_of("status", UpdateStatus),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    correlation_id: Mapped[str] = mapped_column(String(128), index=True)
    device_uuid: Mapped[str] = mapped_column(ForeignKey("devices.uuid"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=UpdateStatus.STARTED)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UpdateEvent(Base):
    __tablename__ = "update_events"
    __table_args__ = (UniqueConstraint("update_id", "event_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    update_id: Mapped[int] = mapped_column(ForeignKey("updates.id"))
    event_id: Mapped[str] = mapped_column(String(128))
    device_time: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    event_type: Mapped[str] = mapped_column(String(128))
    success: Mapped[bool | None] = mapped_column(Boolean)
    target_name: Mapped[str | None] = mapped_column(String(255))
    version: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[str | None] = mapped_column(Text)


class OutboxEvent(Base):
    __tablename__ = "outbox"
    __table_args__ = (Index(None, "delivered_at", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    topic: Mapped[str] = mapped_column(String(64))
    device_uuid: Mapped[str | None] = mapped_column(String(36))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    # Only the hash; the plain token is shown once at creation.
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EstCredential(Base):
    __tablename__ = "est_credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id"))
    username: Mapped[str] = mapped_column(String(128), unique=True)
    # "scrypt$n$r$p$salt$hash" (see certfleet.store.est)
    secret_hash: Mapped[str] = mapped_column(Text)
    bound_subject: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EstPending(Base):
    __tablename__ = "est_pending"
    __table_args__ = (one_of("status", PendingStatus),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    device_uuid: Mapped[str | None] = mapped_column(String(36))
    subject: Mapped[str] = mapped_column(Text)
    csr_pem: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=PendingStatus.PENDING)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None]
    cert_id: Mapped[int | None] = mapped_column(ForeignKey("certificates.id"))


class ChangeCounter(Base):
    """One row whose generation triggers raise whenever state a server caches per device changes.

    Servers keep each device's check-in state in memory and poll this number
    (see store/hot_path.py). The triggers (migration 0002) fire on the devices
    columns a check-in depends on (deleted_at, current_cert_id, group_name,
    factory_id), on a CA's status, and on every config_log insert, so no writer
    has to remember to bump it.
    """

    __tablename__ = "change_counter"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


metadata = Base.metadata


class CampaignStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"
    COMPLETED = "completed"


class CampaignDeviceState(StrEnum):
    PENDING = "pending"
    TRIGGERED = "triggered"
    IN_PROGRESS = "in_progress"
    # The gateway has seen the device with its new certificate.
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED_OFFLINE = "skipped_offline"


class Campaign(Base):
    """A certificate rotation over many devices, in waves (see certfleet.fleet.campaigns)."""

    __tablename__ = "campaigns"
    __table_args__ = (one_of("status", CampaignStatus),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    factory_id: Mapped[int] = mapped_column(ForeignKey("factories.id"))
    # certs-<unix time>; each device's own id is in campaign_devices (retries get new ones).
    rotation_id: Mapped[str] = mapped_column(String(128), unique=True)
    reason: Mapped[str] = mapped_column(Text)
    # {"group": G} | {"all": true} | {"reissue_from_ca": name, "to_ca": name}
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    from_ca_id: Mapped[int | None] = mapped_column(ForeignKey("cas.id"))
    to_ca_id: Mapped[int | None] = mapped_column(ForeignKey("cas.id"))
    est_server: Mapped[str] = mapped_column(Text)
    pkey_ids: Mapped[str | None] = mapped_column(String(64))
    cert_ids: Mapped[str | None] = mapped_column(String(64))
    canary_share: Mapped[float] = mapped_column(Float)
    rate_per_minute: Mapped[int] = mapped_column(Integer)
    failure_threshold: Mapped[float] = mapped_column(Float)
    canary_deadline_s: Mapped[int] = mapped_column(Integer)
    device_deadline_s: Mapped[int] = mapped_column(Integer)
    offline_after_s: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=CampaignStatus.RUNNING)
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class CampaignDevice(Base):
    __tablename__ = "campaign_devices"
    __table_args__ = (
        UniqueConstraint("campaign_id", "device_uuid"),
        Index(None, "campaign_id", "state"),
        one_of("state", CampaignDeviceState),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    device_uuid: Mapped[str] = mapped_column(ForeignKey("devices.uuid"), index=True)
    canary: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default=CampaignDeviceState.PENDING)
    rotation_id: Mapped[str | None] = mapped_column(String(128))
    # The device's current certificate when it was triggered: a change means it rotated.
    old_cert_id: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    triggered_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)
