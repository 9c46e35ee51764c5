"""Migrations reach head and create exactly what schema.py describes."""

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from certfleet.store import Store, current_revision, head_revision, open_store, upgrade
from certfleet.store.migrate import downgrade_engine
from certfleet.store.schema import metadata


async def differences(store: Store, target: sa.MetaData = metadata) -> list:
    def compare(conn):
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, target)

    async with store.engine.connect() as conn:
        return await conn.run_sync(compare)


async def test_upgrade_reaches_head_and_matches_schema(db_url):
    assert await current_revision(db_url) is None
    await upgrade(db_url)
    assert await current_revision(db_url) == head_revision()
    async with await open_store(db_url) as store:
        assert await differences(store) == []


async def test_comparison_notices_a_difference(store):
    changed = sa.MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["devices"].append_column(sa.Column("nickname", sa.String(40)))
    diff = await differences(store, changed)
    assert [d[0] for d in diff] == ["add_column"]


async def test_upgrade_twice_is_harmless(store):
    await store.upgrade()
    assert await store.current_revision() == head_revision()


async def test_downgrade_to_base_and_back(store):
    await downgrade_engine(store.engine, "base")
    assert await store.current_revision() is None
    async with store.engine.connect() as conn:
        names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
    assert names == ["alembic_version"]
    await store.upgrade()
    assert await differences(store) == []


async def test_version_table_lives_in_the_store_schema(store):
    async with store.engine.connect() as conn:
        default = await conn.run_sync(lambda c: sa.inspect(c).default_schema_name)
        tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names(schema=default))
    assert "alembic_version" in tables
    assert "factories" in tables
    if store.engine.dialect.name == "postgresql":
        assert default.startswith("t_")
