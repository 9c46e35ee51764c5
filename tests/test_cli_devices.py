"""`certfleet devices ...` in local mode (the store) and remote mode (the admin API of a real
server) on devices registered with the real agent and reporting through the real gateway."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import time
from pathlib import Path

from .api_fixtures import ApiEnv, Cli, api_env  # noqa: F401
from .cli_run import BIN

ROTATION = "certs-1795471560"
STEPS = [
    ("CertRotationStarted", None),
    ("Generate new certificate", True),
    ("Lock device configuration on server", True),
    ("Update local configuration with new key", False),
    ("CertRotationCompleted", False),
]


def register(env: ApiEnv, folder: Path, group: str) -> str:
    """`certfleet-agent register` against the server's gateway; the device uuid."""
    done = subprocess.run(
        [
            str(BIN / "certfleet-agent"),
            "register",
            "--server",
            env.gateway_url,
            "--factory",
            "acme",
            "--group",
            group,
            "--dir",
            str(folder),
            "--trust",
            str(env.pki / "root.crt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CERTFLEET_REGISTER_TOKEN": env.tokens["register"]},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _device_request(
    env: ApiEnv, folder: Path, method: str, path: str, body: object = None
) -> tuple[int, bytes]:
    """One request as the device in ``folder`` makes it: status and body."""
    context = ssl.create_default_context(cafile=str(env.pki / "root.crt"))
    context.load_cert_chain(folder / "client.pem", folder / "pkey.pem")
    connection = http.client.HTTPSConnection(
        "127.0.0.1", env.server.gateway_port, context=context, timeout=30
    )
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def gateway(env: ApiEnv, folder: Path, method: str, path: str, body: object = None) -> int:
    """One request as the device in ``folder`` makes it; the status."""
    return _device_request(env, folder, method, path, body)[0]


def gateway_json(env: ApiEnv, folder: Path, path: str) -> dict:
    """GET ``path`` as the device in ``folder``; the JSON answer (200 expected)."""
    status, body = _device_request(env, folder, "GET", path)
    assert status == 200, body
    return json.loads(body)


def rotation_events(correlation: str = ROTATION, prefix: str = "e") -> list[dict]:
    return [
        {
            "id": f"{prefix}{i}",
            "deviceTime": f"2026-11-23T22:10:0{i}Z",
            "event": {"correlationId": correlation, "success": success, "targetName": "lmp-123"},
            "eventType": {"id": step},
        }
        for i, (step, success) in enumerate(STEPS)
    ]


async def test_devices_commands_local_and_remote(api_env: ApiEnv, tmp_path):  # noqa: F811
    env = api_env
    env.start()
    folders = {name: tmp_path / name for name in ("d1", "d2", "d3")}
    uuids = {
        name: register(env, folder, "lab" if name != "d3" else "kiosk")
        for name, folder in folders.items()
    }
    assert gateway(env, folders["d1"], "POST", "/events", rotation_events()) == 200
    cli = Cli(env)

    listed = cli.both_json("devices", "list")
    assert sorted(item["uuid"] for item in listed) == sorted(uuids.values())
    assert {item["status"] for item in listed} == {"active"}
    kiosk = cli.both_json("devices", "list", "--group", "kiosk")
    assert [item["uuid"] for item in kiosk] == [uuids["d3"]]
    soon = cli.run("devices", "list", "--expiring-within", "30d", "--json", remote=True)
    assert json.loads(soon.stdout) == []
    some = cli.run(
        "devices", "list", "--expiring-within", "400d", "--limit", "2", "--json", remote=False
    )
    assert len(json.loads(some.stdout)) == 2

    shown = cli.both_json("devices", "show", uuids["d1"])
    assert shown["cert"]["issuer"] == "online-ca" and shown["cert"]["days_left"] in (364, 365)
    assert shown["rotation"]["id"] == ROTATION and shown["rotation"]["status"] == "failed"
    assert shown["last_seen_at"] is not None and shown["config_locked"] is False
    people = cli.run("devices", "show", uuids["d1"], remote=True, scope="read").stdout
    assert "online-ca" in people and ROTATION in people

    updates = cli.both_json("devices", "updates", uuids["d1"])
    assert [(u["correlation_id"], u["events"]) for u in updates] == [(ROTATION, 5)]
    timeline = cli.both_json("devices", "updates", uuids["d1"], ROTATION)
    assert [event["step"] for event in timeline["events"]] == [step for step, _ in STEPS]
    lines = cli.run("devices", "updates", uuids["d1"], ROTATION, remote=True, scope="read")
    assert lines.stdout.splitlines() == [
        "2026-11-23T22:10:00Z : CertRotationStarted(lmp-123)",
        "2026-11-23T22:10:01Z : Generate new certificate(lmp-123) -> Succeed",
        "2026-11-23T22:10:02Z : Lock device configuration on server(lmp-123) -> Succeed",
        "2026-11-23T22:10:03Z : Update local configuration with new key(lmp-123) -> Failed!",
        "2026-11-23T22:10:04Z : CertRotationCompleted(lmp-123) -> Failed!",
    ]

    _show_renewal_by_the_agent(env, cli, folders["d1"], uuids["d1"])

    refused = cli.run(
        "devices", "deny", uuids["d1"], "--reason", "x", remote=True, scope="read", expect=2
    )
    assert "needs a token with scope 'rotate'" in refused.stderr
    _deny_by_serial_and_fingerprint(cli, uuids["d3"])

    denied = json.loads(
        cli.run("devices", "deny", uuids["d1"], "--reason", "lost", "--json", remote=True).stdout
    )
    assert [(e["device"], e["new"]) for e in denied] == [(uuids["d1"], True)]
    again = cli.run("devices", "deny", uuids["d1"], "--reason", "again", remote=False).stdout
    assert again.startswith("already denied (lost)")
    deadline = time.monotonic() + 5
    while gateway(env, folders["d1"], "GET", "/device") != 403:
        assert time.monotonic() < deadline, "the gateway still takes the denied certificate"
        time.sleep(0.2)
    assert cli.both_json("devices", "show", uuids["d1"])["status"] == "denied"

    deleted = json.loads(
        cli.run(
            "devices", "delete", uuids["d2"], "--yes", "--reason", "scrapped", "--json", remote=True
        ).stdout
    )
    assert deleted["uuid"] == uuids["d2"] and len(deleted["denied"]) == 1
    gone = cli.both_json("devices", "list", "--status", "deleted")
    assert [item["uuid"] for item in gone] == [uuids["d2"]]
    twice = cli.run("devices", "delete", uuids["d2"], "--yes", remote=False, expect=2)
    assert "was already deleted" in twice.stderr
    assert gateway(env, folders["d2"], "GET", "/device") == 403

    table = cli.run("devices", "list", remote=True, scope="read").stdout
    assert uuids["d3"] in table and "denied" in table and uuids["d2"] not in table
    env.stop()


def _show_renewal_by_the_agent(env: ApiEnv, cli: Cli, folder: Path, device: str) -> None:
    """An agent's renewal before expiry (auto-<time>) after an operator rotation is the
    device's last rotation, in both modes."""
    renewal = "auto-1795471600"
    assert gateway(env, folder, "POST", "/events", rotation_events(renewal, "r")[:2]) == 200
    shown = cli.both_json("devices", "show", device)
    assert shown["rotation"]["id"] == renewal
    assert shown["rotation"]["last_step"] == "Generate new certificate"
    text = cli.run("devices", "show", device, remote=True, scope="read").stdout
    assert renewal in text and ROTATION not in text


def _deny_by_serial_and_fingerprint(cli: Cli, device: str) -> None:
    """`devices deny --serial/--sha256` through the API prints what local mode prints."""
    cert = cli.both_json("devices", "show", device)["cert"]
    serial = ("devices", "deny", "--serial", cert["serial"])
    line = f"certificate serial {cert['serial']} (sha256 {cert['sha256']}) of device {device}"
    read = cli.run(*serial, "--reason", "x", remote=True, scope="read", expect=2)
    assert "needs a token with scope 'rotate'" in read.stderr and "HTTP 403" in read.stderr
    denied = cli.run(*serial, "--reason", "stolen", remote=True).stdout
    assert denied == f"denied: {line}\n"
    again = [cli.run(*serial, "--reason", "x", remote=remote).stdout for remote in (True, False)]
    assert again == [f"already denied (stolen): {line}\n"] * 2
    unseen = "cd" * 32
    by_sha = cli.run("devices", "deny", "--sha256", unseen, "--reason", "bench", remote=True)
    assert by_sha.stdout == f"denied: certificate (sha256 {unseen})\n"
    cases = [
        ("zz", "'zz' is not a certificate serial", 400),
        ("abcdef", "no certificate with serial abcdef is known", 404),
    ]
    for given, message, status in cases:
        refused = cli.run("devices", "deny", "--serial", given, "--reason", "x", remote=True,
                          expect=2)  # fmt: skip
        assert message in refused.stderr and f"HTTP {status}" in refused.stderr, refused.stderr
