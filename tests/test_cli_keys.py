"""`certfleet keys ...` end to end: real processes, real files, openssl checks."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .cli_run import certfleet
from .pki_checks import mode, openssl, text, verify

NAMES = ["--gateway-dns", "gw.acme.test", "--gateway-ip", "127.0.0.1"]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def pki(tmp_path, db_url):
    folder = tmp_path / "pki"
    certfleet(
        "keys", "ca", "create", str(folder), "--factory", "acme", *NAMES, "--database", db_url
    )
    return folder, db_url


def _show(folder, db_url):
    out = certfleet("keys", "ca", "show", "--pki", str(folder), "--database", db_url, "--json")
    return {ca["name"]: ca for ca in json.loads(out.stdout)}


def test_create_writes_a_verifiable_hierarchy(pki):
    folder, db_url = pki
    root = folder / "root.crt"
    for stem in ("online-ca", "local-ca-1"):
        verify(root, folder / f"{stem}.crt")
    verify(root, folder / "gateway-tls.crt", "sslserver")
    assert all(mode(k) == 0o400 for k in folder.glob("*.key"))
    cas = _show(folder, db_url)
    assert set(cas) == {"root", "online-ca", "local-ca-1", "gateway-tls", "est-tls"}
    assert cas["root"]["subject"] == "CN=Factory-CA,OU=acme"
    assert all(ca["status"] == "active" for ca in cas.values())
    fingerprint = openssl("x509", "-in", str(root), "-noout", "-fingerprint", "-sha256")
    assert fingerprint.split("=")[1].strip().replace(":", "").lower() == cas["root"]["sha256"]


def test_second_create_fails_and_changes_nothing(pki, tmp_path):
    folder, db_url = pki
    before = _snapshot(folder)
    done = certfleet(
        "keys",
        "ca",
        "create",
        str(folder),
        "--factory",
        "acme",
        *NAMES,
        "--database",
        db_url,
        expect=2,
    )
    assert "already has a root of trust" in done.stderr
    assert done.stderr.count("\n") == 1, "one line, no traceback"
    other = tmp_path / "elsewhere"
    done = certfleet(
        "keys",
        "ca",
        "create",
        str(other),
        "--factory",
        "acme",
        *NAMES,
        "--database",
        db_url,
        expect=2,
    )
    assert not other.exists() or not any(other.glob("*.crt"))
    assert {k: v for k, v in _snapshot(folder).items() if k != "certfleet.db"} == {
        k: v for k, v in before.items() if k != "certfleet.db"
    }


def test_new_local_ca_goes_to_its_own_folder(pki, tmp_path):
    folder, db_url = pki
    line2 = tmp_path / "line2"
    certfleet("keys", "ca", "new-local-ca", str(line2), "--pki", str(folder), "--database", db_url)
    verify(folder / "root.crt", line2 / "local-ca-2.crt")
    assert "CA:TRUE, pathlen:0" in text(line2 / "local-ca-2.crt")
    assert mode(line2 / "local-ca-2.key") == 0o400
    assert not (folder / "local-ca-2.key").exists()
    assert _show(folder, db_url)["local-ca-2"]["key"] == "offline"


def test_disable_then_revoke_writes_root_signed_crl(pki):
    folder, db_url = pki
    certfleet(
        "keys", "ca", "disable-device-ca", "local-ca-1", "--pki", str(folder), "--database", db_url
    )
    assert _show(folder, db_url)["local-ca-1"]["status"] == "disabled"
    certfleet(
        "keys", "ca", "revoke-device-ca", "local-ca-1", "--pki", str(folder), "--database", db_url
    )
    cas = _show(folder, db_url)
    assert cas["local-ca-1"]["status"] == "revoked"
    crl = folder / "crl" / "root.crl"
    done = subprocess.run(
        ["openssl", "crl", "-in", str(crl), "-CAfile", str(folder / "root.crt"), "-noout", "-text"],
        capture_output=True,
        text=True,
    )
    assert "verify OK" in done.stderr + done.stdout
    assert cas["local-ca-1"]["serial"].upper() in done.stdout.replace(":", "")
    done = certfleet(
        "keys",
        "ca",
        "disable-device-ca",
        "local-ca-1",
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "already revoked" in done.stderr


def test_revoke_refuses_root_and_unknown(pki):
    folder, db_url = pki
    done = certfleet(
        "keys",
        "ca",
        "revoke-device-ca",
        "root",
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "not a device CA" in done.stderr
    done = certfleet(
        "keys",
        "ca",
        "revoke-device-ca",
        "nope",
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "no CA named 'nope'" in done.stderr
    assert _show(folder, db_url)["root"]["status"] == "active"


def test_add_device_ca_checks_chain_and_ca_flag(pki, tmp_path):
    folder, db_url = pki
    other = tmp_path / "other"
    certfleet(
        "keys",
        "ca",
        "create",
        str(other),
        "--factory",
        "evil",
        *NAMES,
        "--database",
        f"sqlite:///{tmp_path}/other.db",
    )
    done = certfleet(
        "keys",
        "ca",
        "add-device-ca",
        str(other / "local-ca-1.crt"),
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "does not chain to the factory root" in done.stderr
    done = certfleet(
        "keys",
        "ca",
        "add-device-ca",
        str(folder / "gateway-tls.crt"),
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "not a CA certificate" in done.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    done = certfleet(
        "keys",
        "ca",
        "add-device-ca",
        str(garbage),
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "not a PEM or DER X.509 certificate" in done.stderr
    assert len(_show(folder, db_url)) == 5


def test_add_device_ca_from_the_same_root(pki, tmp_path):
    folder, db_url = pki
    line = tmp_path / "line"
    certfleet("keys", "ca", "new-local-ca", str(line), "--pki", str(folder), "--database", db_url)
    done = certfleet(
        "keys",
        "ca",
        "add-device-ca",
        str(line / "local-ca-2.crt"),
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "already a CA of this factory" in done.stderr


def test_est_authorize_replaces_certificate(pki):
    folder, db_url = pki
    before = _show(folder, db_url)["est-tls"]
    certfleet(
        "keys",
        "est",
        "authorize",
        "--pki",
        str(folder),
        "--database",
        db_url,
        "--est-dns",
        "est.acme.test",
    )
    after = _show(folder, db_url)["est-tls"]
    assert after["sha256"] != before["sha256"]
    verify(folder / "root.crt", folder / "est-tls.crt", "sslserver")
    assert "DNS:est.acme.test" in text(folder / "est-tls.crt")
    assert mode(folder / "est-tls.key") == 0o400
    from_key = openssl("pkey", "-in", str(folder / "est-tls.key"), "-pubout")
    assert from_key == openssl("x509", "-in", str(folder / "est-tls.crt"), "-noout", "-pubkey")


def test_readable_root_key_is_refused(pki, tmp_path):
    folder, db_url = pki
    os.chmod(folder / "root.key", 0o644)
    done = certfleet(
        "keys",
        "ca",
        "new-local-ca",
        str(tmp_path / "x"),
        "--pki",
        str(folder),
        "--database",
        db_url,
        expect=2,
    )
    assert "chmod 400" in done.stderr
    assert len(_show(folder, db_url)) == 5


def test_root_passphrase(tmp_path):
    folder, secret = tmp_path / "pki", tmp_path / "secret"
    secret.write_text("correct horse\n")
    certfleet(
        "keys",
        "ca",
        "create",
        str(folder),
        "--factory",
        "acme",
        *NAMES,
        "--root-passphrase-file",
        str(secret),
    )
    assert "ENCRYPTED PRIVATE KEY" in (folder / "root.key").read_text()
    assert "ENCRYPTED" not in (folder / "online-ca.key").read_text()
    done = certfleet(
        "keys", "ca", "new-local-ca", str(tmp_path / "l"), "--pki", str(folder), expect=2
    )
    assert "encrypted" in done.stderr
    certfleet(
        "keys",
        "ca",
        "new-local-ca",
        str(tmp_path / "l"),
        "--pki",
        str(folder),
        "--root-passphrase-file",
        str(secret),
    )


def test_missing_names_and_bad_ip_are_usage_errors(tmp_path):
    done = certfleet("keys", "ca", "create", str(tmp_path / "p"), "--factory", "acme", expect=2)
    assert "--gateway-dns" in done.stderr
    done = certfleet(
        "keys",
        "ca",
        "create",
        str(tmp_path / "p"),
        "--factory",
        "acme",
        "--gateway-ip",
        "300.1.1.1",
        expect=2,
    )
    assert "not an IP address" in done.stderr
    assert not any((tmp_path / "p").glob("*.crt"))


def test_show_without_factory_says_what_to_do(tmp_path):
    done = certfleet("keys", "ca", "show", "--pki", str(tmp_path / "empty"), expect=2)
    assert "keys ca create" in done.stderr


def test_root_in_softhsm(tmp_path, softhsm_token):
    folder = tmp_path / "pki"
    hsm = ["--hsm-module", softhsm_token.module, "--hsm-token-label", softhsm_token.label]
    certfleet(
        "keys",
        "ca",
        "create",
        str(folder),
        "--factory",
        "acme",
        *NAMES,
        *hsm,
        env={"CERTFLEET_HSM_PIN": softhsm_token.pin},
    )
    assert not (folder / "root.key").exists()
    verify(folder / "root.crt", folder / "online-ca.crt")
    verify(folder / "root.crt", folder / "gateway-tls.crt", "sslserver")
    root = _show(folder, f"sqlite:///{folder}/certfleet.db")["root"]
    assert root["key"] == "pkcs11" and softhsm_token.pin not in json.dumps(root)
    certfleet(
        "keys",
        "ca",
        "new-local-ca",
        str(tmp_path / "line"),
        "--pki",
        str(folder),
        "--hsm-pin",
        softhsm_token.pin,
    )
    verify(folder / "root.crt", tmp_path / "line" / "local-ca-2.crt")
    done = certfleet(
        "keys",
        "ca",
        "revoke-device-ca",
        "local-ca-2",
        "--pki",
        str(folder),
        "--hsm-pin",
        "9999",
        expect=2,
    )
    assert "wrong PIN" in done.stderr
    assert _show(folder, f"sqlite:///{folder}/certfleet.db")["local-ca-2"]["status"] == "active"
    certfleet(
        "keys",
        "ca",
        "revoke-device-ca",
        "local-ca-2",
        "--pki",
        str(folder),
        "--hsm-pin",
        softhsm_token.pin,
    )
    done = subprocess.run(
        [
            "openssl",
            "crl",
            "-in",
            str(folder / "crl" / "root.crl"),
            "-CAfile",
            str(folder / "root.crt"),
            "-noout",
        ],
        capture_output=True,
        text=True,
    )
    assert "verify OK" in done.stderr + done.stdout


def test_hsm_errors_are_one_line(tmp_path, softhsm_token):
    base = ["keys", "ca", "create", str(tmp_path / "p"), "--factory", "acme", *NAMES]
    done = certfleet(
        *base,
        "--hsm-module",
        "/nonexistent/lib.so",
        "--hsm-token-label",
        "x",
        "--hsm-pin",
        "1",
        expect=2,
    )
    assert "does not exist" in done.stderr
    done = certfleet(
        *base,
        "--hsm-module",
        softhsm_token.module,
        "--hsm-token-label",
        softhsm_token.label,
        "--hsm-pin",
        "0000",
        expect=2,
    )
    assert "wrong PIN" in done.stderr
    done = certfleet(
        *base,
        "--hsm-module",
        softhsm_token.module,
        "--hsm-token-label",
        "absent",
        "--hsm-pin",
        "0000",
        expect=2,
    )
    assert "no PKCS#11 token labelled 'absent'" in done.stderr
    assert not any((tmp_path / "p").glob("*.crt"))


def test_ca_changes_are_events(pki, tmp_path):
    folder, db_url = pki
    certfleet(
        "keys",
        "ca",
        "new-local-ca",
        str(tmp_path / "l2"),
        "--pki",
        str(folder),
        "--database",
        db_url,
    )
    certfleet(
        "keys", "ca", "disable-device-ca", "local-ca-1", "--pki", str(folder), "--database", db_url
    )
    certfleet(
        "keys", "ca", "revoke-device-ca", "local-ca-2", "--pki", str(folder), "--database", db_url
    )
    out = certfleet("events", "tail", "--json", "--pki", str(folder), "--database", db_url)
    events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    seen = [(e["topic"], e["data"]["name"], e["data"]["status"]) for e in events]
    assert seen == [
        ("CA_ADDED", "local-ca-2", "active"),
        ("CA_DISABLED", "local-ca-1", "disabled"),
        ("CA_REVOKED", "local-ca-2", "revoked"),
    ]
    assert all(e["time"].endswith("Z") for e in events)
