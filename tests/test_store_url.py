"""Database URL parsing: the accepted forms, and clear errors for the rest."""

import pytest

from certfleet.store import StoreError, open_store
from certfleet.store.url import parse_url


def test_sqlite_url_gets_the_async_driver():
    db = parse_url("sqlite:////var/lib/certfleet/store.db")
    assert db.url.drivername == "sqlite+aiosqlite"
    assert db.is_sqlite
    assert str(db.sqlite_path) == "/var/lib/certfleet/store.db"


def test_postgresql_url_gets_the_async_driver():
    db = parse_url("postgresql://certfleet:s3cret@db.example:5432/fleet")
    assert db.url.drivername == "postgresql+asyncpg"
    assert db.url.database == "fleet"
    assert db.connect_args == {}
    assert "s3cret" not in db.display()


def test_libpq_options_become_server_settings():
    db = parse_url("postgresql://u@h/db?options=-csearch_path%3Dt_1%20-c%20statement_timeout%3D5s")
    assert db.connect_args == {"server_settings": {"search_path": "t_1", "statement_timeout": "5s"}}
    assert "options" not in db.url.query


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@localhost/fleet",
        "postgresql+psycopg2://u@h/db",
        "http://example.com/",
        "store.db",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql://u@h",
        "postgresql://u@h/db?options=search_path%3Dx",
    ],
)
def test_bad_url_is_refused_with_the_accepted_forms(url):
    with pytest.raises(StoreError) as err:
        parse_url(url)
    message = str(err.value)
    assert "\n" not in message
    assert "sqlite:///" in message or "-csearch_path" in message
    assert isinstance(err.value, ValueError)


def test_refusal_does_not_echo_a_password():
    with pytest.raises(StoreError) as err:
        parse_url("mysql://root:hunter2@localhost/fleet")
    assert "hunter2" not in str(err.value)
    assert "'mysql'" in str(err.value)


async def test_open_store_refuses_a_bad_url():
    with pytest.raises(StoreError, match="postgresql://"):
        await open_store("oracle://scott:tiger@host/db")
