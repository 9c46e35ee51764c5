"""Rotation campaigns: campaigns and their per-device state.

Types are plain SQLAlchemy types, written out by hand like 0001.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
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


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("factory_id", sa.Integer(), nullable=False),
        sa.Column("rotation_id", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("from_ca_id", sa.Integer(), nullable=True),
        sa.Column("to_ca_id", sa.Integer(), nullable=True),
        sa.Column("est_server", sa.Text(), nullable=False),
        sa.Column("pkey_ids", sa.String(64), nullable=True),
        sa.Column("cert_ids", sa.String(64), nullable=True),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=False),
        sa.Column("failure_threshold", sa.Float(), nullable=False),
        sa.Column("canary_deadline_s", sa.Integer(), nullable=False),
        sa.Column("device_deadline_s", sa.Integer(), nullable=False),
        sa.Column("offline_after_s", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(255), nullable=False),
        ts("created_at"),
        ts("updated_at"),
        ts("finished_at", nullable=True),
        check("campaigns", "status", "running", "paused", "aborted", "completed"),
        fk("campaigns", "factory_id", "factories.id"),
        fk("campaigns", "from_ca_id", "cas.id"),
        fk("campaigns", "to_ca_id", "cas.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
        sa.UniqueConstraint("rotation_id", name=op.f("uq_campaigns_rotation_id")),
    )
    op.create_table(
        "campaign_devices",
        sa.Column("id", BigId, nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("device_uuid", sa.String(36), nullable=False),
        sa.Column("canary", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("rotation_id", sa.String(128), nullable=True),
        sa.Column("old_cert_id", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        ts("triggered_at", nullable=True),
        ts("updated_at"),
        sa.Column("detail", sa.Text(), nullable=True),
        check(
            "campaign_devices",
            "state",
            "pending",
            "triggered",
            "in_progress",
            "completed",
            "failed",
            "skipped_offline",
        ),
        fk("campaign_devices", "campaign_id", "campaigns.id"),
        fk("campaign_devices", "device_uuid", "devices.uuid"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_devices")),
        sa.UniqueConstraint(
            "campaign_id", "device_uuid", name=op.f("uq_campaign_devices_campaign_id_device_uuid")
        ),
    )
    op.create_index(
        op.f("ix_campaign_devices_campaign_id_state"), "campaign_devices", ["campaign_id", "state"]
    )
    op.create_index(op.f("ix_campaign_devices_device_uuid"), "campaign_devices", ["device_uuid"])


def downgrade() -> None:
    op.drop_table("campaign_devices")
    op.drop_table("campaigns")
