"""`certfleet quickstart` (behind `make demo`) and `certfleet db upgrade`."""

from __future__ import annotations

import sqlite3
import subprocess

from .cli_run import certfleet


def test_quickstart_runs_and_refuses_foreign_folders(tmp_path):
    folder = tmp_path / "demo"
    wide = {"COLUMNS": "250"}
    # A relative folder, as `make demo` gives it.
    done = certfleet("quickstart", "--dir", "demo", "--devices", "4", env=wide, cwd=tmp_path)
    out = done.stdout
    assert out.count("registered online with a token:") == 2
    assert "2 devices made in the factory with offline-CA certificates" in out
    assert "devices known to the gateway" in out and "4/4" in out
    assert "campaign 1: completed" in out and "'completed': 4, 'failed': 0" in out
    assert "old certificates refused by the gateway: 4/4" in out
    assert "new certificates accepted: 4/4" in out
    assert "devices that had certificates from it: 2" in out
    assert "devices still accepted with their rotated credential: 4/4" in out
    assert "DEVICE_PUBKEY_CHANGE 4" in out and "DENYLIST_ADDED 4" in out
    assert (folder / "pki" / "crl" / "root.crl").exists()
    for agent in (folder / "devices").iterdir():
        assert (agent / "secrets" / "wifi-password").read_text() == "hunter2"
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert left.stdout == "", "every agent and the server are stopped"
    again = certfleet("quickstart", "--dir", str(folder), "--devices", "4", env=wide)
    assert "DEVICE_PUBKEY_CHANGE 4" in again.stdout, "a second run starts afresh"
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
