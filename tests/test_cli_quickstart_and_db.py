"""`certfleet quickstart` (behind `make demo`) and `certfleet db upgrade`."""

from __future__ import annotations

import sqlite3

from .cli_run import certfleet


def test_quickstart_runs_and_refuses_foreign_folders(tmp_path):
    folder = tmp_path / "demo"
    done = certfleet("quickstart", "--dir", str(folder), "--devices", "2")
    out = done.stdout
    assert "registered online:" in out and "registered via local-ca" in out
    assert "decrypted with its own key: {'wifi-password': 'hunter2'}" in out
    assert "with If-Modified-Since: 304" in out
    assert "first request with the new certificate: 200" in out
    assert "old certificate now: 403 device cert is on the deny-list" in out
    assert "offline-CA device now: 403" in out and "revoked" in out
    assert "DEVICE_PUBKEY_CHANGE 1" in out
    assert (folder / "pki" / "crl" / "root.crl").exists()
    again = certfleet("quickstart", "--dir", str(folder), "--devices", "2")
    assert "DEVICE_PUBKEY_CHANGE 1" in again.stdout, "a second run starts afresh"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep")
    done = certfleet("quickstart", "--dir", str(foreign), expect=2)
    assert "not made by quickstart" in done.stderr
    assert (foreign / "important.txt").read_text() == "keep"


def test_db_upgrade_creates_schema(tmp_path, db_url):
    done = certfleet("db", "upgrade", "--database", db_url, "--pki", str(tmp_path))
    assert "schema at revision" in done.stdout
    again = certfleet("db", "upgrade", "--database", db_url, "--pki", str(tmp_path))
    assert again.stdout == done.stdout


def test_db_upgrade_default_is_sqlite_beside_the_pki(tmp_path):
    certfleet("db", "upgrade", "--pki", str(tmp_path / "pki"), env={"CERTFLEET_DATABASE_URL": ""})
    tables = (
        sqlite3.connect(tmp_path / "pki" / "certfleet.db")
        .execute("select name from sqlite_master where type='table'")
        .fetchall()
    )
    assert ("cas",) in tables and ("devices",) in tables


def test_bad_database_url_is_a_clear_error(tmp_path):
    done = certfleet("db", "upgrade", "--database", "mysql://x", "--pki", str(tmp_path), expect=2)
    assert "sqlite" in done.stderr and "postgresql" in done.stderr
