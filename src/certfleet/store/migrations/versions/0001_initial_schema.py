"""Initial schema: every table of certfleet.store.schema as of 0.1.

Started from Alembic autogenerate, then written out by hand: types are plain
SQLAlchemy types (never imported from schema.py, which will change), and the
devices <-> certificates foreign key cycle is closed after both tables exist.
test_store_migrations compares the result with schema.py on SQLite and PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def check(table: str, column: str, *values: str) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{column}"))


def fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    parent = target.split(".")[0]
    return sa.ForeignKeyConstraint([column], [target], name=op.f(f"fk_{table}_{column}_{parent}"))


def pk(table: str, column: str = "id") -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(column, name=op.f(f"pk_{table}"))


def unique(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def index(table: str, *columns: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    op.create_table(
        "factories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        ts("created_at"),
        pk("factories"),
        unique("factories", "name"),
    )
    op.create_table(
        "cas",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("ski", sa.String(128), nullable=True),
        ts("not_before"),
        ts("not_after"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("key_ref", sa.Text(), nullable=True),
        ts("created_at"),
        ts("status_changed_at", nullable=True),
        check("cas", "kind", "root", "online", "local", "gateway-tls", "est-tls"),
        check("cas", "status", "active", "disabled", "revoked"),
        fk("cas", "factory_id", "factories.id"),
        pk("cas"),
        unique("cas", "factory_id", "name"),
        unique("cas", "sha256"),
    )
    op.create_table(
        "devices",
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.String(128), nullable=True),
        sa.Column("current_cert_id", sa.Integer(), nullable=True),
        sa.Column("next_pubkey_pem", sa.Text(), nullable=True),
        sa.Column("next_pubkey_sha256", sa.String(64), nullable=True),
        sa.Column("config_locked", sa.Boolean(), nullable=False),
        ts("last_seen_at", nullable=True),
        ts("created_at"),
        ts("deleted_at", nullable=True),
        sa.Column("registered_via", sa.String(16), nullable=False),
        check("devices", "registered_via", "online", "local-ca", "est"),
        fk("devices", "factory_id", "factories.id"),
        pk("devices", "uuid"),
    )
    index("devices", "factory_id", "group_name")
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("pubkey_sha256", sa.String(64), nullable=False),
        sa.Column("issuer_ca_id", sa.Integer(), nullable=True),
        sa.Column("device_uuid", sa.String(36), nullable=True),
        ts("not_before"),
        ts("not_after"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("issued_by_request", sa.Text(), nullable=True),
        ts("created_at"),
        check("certificates", "status", "active", "superseded", "revoked"),
        fk("certificates", "device_uuid", "devices.uuid"),
        fk("certificates", "issuer_ca_id", "cas.id"),
        pk("certificates"),
        unique("certificates", "issuer_ca_id", "serial"),
        unique("certificates", "sha256"),
    )
    index("certificates", "device_uuid")
    index("certificates", "not_after")
    index("certificates", "pubkey_sha256")
    # On SQLite batch mode rebuilds the (still empty) table; PostgreSQL gets an ALTER.
    with op.batch_alter_table("devices") as batch:
        batch.create_foreign_key(
            op.f("fk_devices_current_cert_id_certificates"),
            "certificates",
            ["current_cert_id"],
            ["id"],
        )
    op.create_table(
        "denylist",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cert_sha256", sa.String(64), nullable=False),
        sa.Column("serial", sa.String(64), nullable=True),
        sa.Column("device_uuid", sa.String(36), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        ts("created_at"),
        pk("denylist"),
        unique("denylist", "cert_sha256"),
    )
    index("denylist", "device_uuid")
    op.create_table(
        "config_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("scope_key", sa.String(128), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("on_changed", sa.JSON(), nullable=False),
        sa.Column("unencrypted", sa.Boolean(), nullable=False),
        ts("updated_at"),
        sa.Column("updated_by", sa.String(255), nullable=False),
        check("config_files", "scope", "factory", "group", "device"),
        fk("config_files", "factory_id", "factories.id"),
        pk("config_files"),
        unique("config_files", "factory_id", "scope", "scope_key", "name"),
    )
    op.create_table(
        "config_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("scope_key", sa.String(128), nullable=False),
        sa.Column("changed_by", sa.String(255), nullable=False),
        ts("changed_at"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("file_names", sa.JSON(), nullable=False),
        check("config_log", "scope", "factory", "group", "device"),
        fk("config_log", "factory_id", "factories.id"),
        pk("config_log"),
    )
    index("config_log", "factory_id", "scope", "scope_key")
    op.create_table(
        "updates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=False),
        sa.Column("device_uuid", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        ts("created_at"),
        ts("updated_at"),
        check("updates", "status", "started", "succeeded", "failed"),
        fk("updates", "device_uuid", "devices.uuid"),
        pk("updates"),
        unique("updates", "device_uuid", "correlation_id"),
    )
    index("updates", "correlation_id")
    op.create_table(
        "update_events",
        sa.Column("id", BigId, nullable=False),
        sa.Column("update_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        ts("device_time", nullable=True),
        ts("received_at"),
        sa.Column("event_type", sa.String(128), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("target_name", sa.String(255), nullable=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("details", sa.Text(), nullable=True),
        fk("update_events", "update_id", "updates.id"),
        pk("update_events"),
        unique("update_events", "update_id", "event_id"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", BigId, nullable=False),
        sa.Column("topic", sa.String(64), nullable=False),
        sa.Column("device_uuid", sa.String(36), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        ts("created_at"),
        ts("delivered_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        ts("next_attempt_at"),
        pk("outbox"),
    )
    index("outbox", "delivered_at", "id")
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        ts("created_at"),
        ts("expires_at"),
        ts("revoked_at", nullable=True),
        ts("last_used_at", nullable=True),
        pk("api_tokens"),
        unique("api_tokens", "token_sha256"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, nullable=False),
        ts("at"),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        pk("audit_log"),
    )
    index("audit_log", "target")
    op.create_table(
        "est_credentials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("bound_subject", sa.Text(), nullable=False),
        ts("expires_at"),
        ts("used_at", nullable=True),
        ts("created_at"),
        fk("est_credentials", "factory_id", "factories.id"),
        pk("est_credentials"),
        unique("est_credentials", "username"),
    )
    op.create_table(
        "est_pending",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("device_uuid", sa.String(36), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("csr_pem", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        ts("created_at"),
        ts("decided_at", nullable=True),
        sa.Column("cert_id", sa.Integer(), nullable=True),
        check("est_pending", "status", "pending", "approved", "rejected"),
        fk("est_pending", "cert_id", "certificates.id"),
        pk("est_pending"),
        unique("est_pending", "request_sha256"),
    )


def downgrade() -> None:
    for table in ("est_pending", "est_credentials", "audit_log", "api_tokens", "outbox"):
        op.drop_table(table)
    for table in ("update_events", "updates", "config_log", "config_files", "denylist"):
        op.drop_table(table)
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint(op.f("fk_devices_current_cert_id_certificates"), type_="foreignkey")
    for table in ("certificates", "devices", "cas", "factories"):
        op.drop_table(table)
