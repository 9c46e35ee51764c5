"""The change counter: one number that triggers raise when per-device check-in state changes.

Gateway workers answer a device's config check-in from memory and poll this
counter (with the deny-list) to learn that what they hold may be stale. The
triggers are in the database, not in the code that writes, so that every
writer (operator commands, other workers, other machines) bumps it.

SQLite drops a table's triggers when a batch migration copies the table: a
later migration that batch-alters devices, cas or config_log must create the
triggers again (tests/test_store_hot_path_counter.py notices if it does not).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUMP = "UPDATE change_counter SET generation = generation + 1 WHERE id = 1"
DEVICE_COLUMNS = ("deleted_at", "current_cert_id", "group_name", "factory_id")
# (trigger name, event, table, columns whose change counts; none: every row)
TRIGGERS = (
    ("devices_change_counter", "UPDATE", "devices", DEVICE_COLUMNS),
    ("cas_change_counter", "UPDATE", "cas", ("status",)),
    ("config_log_change_counter", "INSERT", "config_log", ()),
)


def upgrade() -> None:
    op.create_table(
        "change_counter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_counter")),
    )
    op.execute("INSERT INTO change_counter (id, generation) VALUES (1, 0)")
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # The function keeps the search_path it was created with, so it finds
        # change_counter whatever the session that fires it has set.
        op.execute(
            "CREATE FUNCTION bump_change_counter() RETURNS trigger LANGUAGE plpgsql "
            f"SET search_path FROM CURRENT AS $$ BEGIN {BUMP}; RETURN NULL; END $$"
        )
    for name, event, table, columns in TRIGGERS:
        op.execute(_trigger(name, event, table, columns, postgresql))


def _trigger(name: str, event: str, table: str, columns: tuple[str, ...], pg: bool) -> str:
    of = f" OF {', '.join(columns)}" if columns else ""
    differs = "IS DISTINCT FROM" if pg else "IS NOT"
    when = " OR ".join(f"OLD.{c} {differs} NEW.{c}" for c in columns)
    if pg:
        condition = f" WHEN ({when})" if when else ""
        return (
            f"CREATE TRIGGER {name} AFTER {event}{of} ON {table} FOR EACH ROW{condition} "
            "EXECUTE FUNCTION bump_change_counter()"
        )
    condition = f" WHEN {when}" if when else ""
    return (
        f"CREATE TRIGGER {name} AFTER {event}{of} ON {table} FOR EACH ROW{condition} "
        f"BEGIN {BUMP}; END"
    )


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name, _, table, _ in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON {table}" if postgresql else f"DROP TRIGGER {name}")
    if postgresql:
        op.execute("DROP FUNCTION bump_change_counter()")
    op.drop_table("change_counter")
