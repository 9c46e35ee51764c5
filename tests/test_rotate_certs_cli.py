"""The reference's rotation verbs: `devices config rotate-certs` and `config rotate-certs`,
on the store and through the admin API of a real server."""

from __future__ import annotations

import asyncio
import json
import re
from subprocess import CompletedProcess

import pytest

from certfleet.fleet import rotate_certs
from certfleet.pki.keys import generate_private_key, public_key_pem

from .campaign_devices import Fleet, start_fleet
from .cli_run import certfleet


@pytest.fixture
def fleet(tmp_path, db_url):
    started = start_fleet(tmp_path, db_url)
    try:
        yield started
    finally:
        started.server.stop()


def test_rotate_one_device_dry_run_then_for_real_then_refused_while_locked(fleet):
    device, other = fleet.register(2)
    est = "https://est.acme.example:8443/.well-known/est"
    verb = ("devices", "config", "rotate-certs")

    dry = fleet.cli(*verb, device.uuid, "--reason", "yearly", "--est-server", est, "--dryrun")
    assert f"dry run: would set config file fio-rotate-certs for device {device.uuid}" in dry.stdout
    assert f"ESTSERVER={est}" in dry.stdout and "nothing was changed" in dry.stdout
    assert device.rotation_file() is None
    assert json.loads(fleet.cli("config", "log", "--device", device.uuid, "--json").stdout) == []

    done = fleet.cli(
        *verb, device.uuid, "--reason", "yearly", "--est-server", est,
        "--hsm-pkey-ids", "01,07", "--hsm-cert-ids", "3,09", "--json",
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["dryrun"] is False and result["rotation_id"].startswith("certs-")
    assert device.rotation_file() == {
        "ESTSERVER": est,
        "ROTATIONID": result["rotation_id"],
        "PKEYIDS": "01,07",
        "CERTIDS": "03,09",
    }
    assert other.rotation_file() is None
    log = json.loads(fleet.cli("config", "log", "--device", device.uuid, "--json").stdout)
    assert [(e["files"], e["reason"]) for e in log] == [(["fio-rotate-certs"], "yearly")]

    order = rotate_certs.make_order(est)
    first, second = (
        asyncio.run(
            rotate_certs.rotate_device(fleet.db_url, device.uuid, order, reason="r", actor="t")
        )
        for _ in range(2)
    )
    assert first.order.rotation_id < second.order.rotation_id  # one second or not: two ids
    assert device.rotation_file()["ROTATIONID"] == second.order.rotation_id

    next_key = public_key_pem(generate_private_key().public_key())
    assert device.call("PATCH", "/device", {"next_pubkey": next_key})[0] == 200
    for extra in ((), ("--dryrun",)):
        refused = fleet.cli(
            *verb, device.uuid, "--reason", "again", "--est-server", est, *extra, expect=2
        )
        assert f"error: device {device.uuid} is in the middle of a key change" in refused.stderr
        assert "it gets no new rotation until it connects with its new key" in refused.stderr
    log = json.loads(fleet.cli("config", "log", "--device", device.uuid, "--json").stdout)
    assert len(log) == 3


def test_rotate_one_device_refuses_bad_input(fleet):
    (device,) = fleet.register(1)
    verb = ("devices", "config", "rotate-certs", device.uuid, "--reason", "r")
    cases = [
        ((), "give --est-server URL"),
        (("--est-server", "http://est.example"), "must be an https:// URL"),
        (
            ("--est-server", "https://e.example", "--hsm-pkey-ids", "01"),
            "--hsm-pkey-ids '01' must be two different hex PKCS#11 object ids",
        ),
        (
            ("--est-server", "https://e.example", "--hsm-pkey-ids", "01,07"),
            "give --hsm-pkey-ids and --hsm-cert-ids together",
        ),
    ]
    for args, message in cases:
        refused = fleet.cli(*verb, *args, expect=2)
        assert message in refused.stderr, refused.stderr
    unknown = fleet.cli(
        "devices", "config", "rotate-certs", "0b7c5a2e-6a43-4d6e-9f5e-0d6c1c1e2f3a",
        "--reason", "r", "--est-server", "https://e.example", expect=2,
    )  # fmt: skip
    assert "no device 0b7c5a2e-6a43-4d6e-9f5e-0d6c1c1e2f3a" in unknown.stderr
    assert device.rotation_file() is None


def test_rotate_a_group_makes_a_campaign(fleet):
    lab = fleet.register(2, group="lab")
    (field,) = fleet.register(1, group="field")
    est = "https://est.acme.example"
    verb = ("config", "rotate-certs", "--group", "lab", "--reason", "lab first")

    dry = fleet.cli(*verb, "--est-server", est, "--dryrun").stdout
    assert "dry run: would rotate 2 device(s), 1 of them canaries first" in dry
    assert all(d.uuid in dry for d in lab) and field.uuid not in dry
    assert json.loads(fleet.cli("campaigns", "list", "--json").stdout) == []

    made = fleet.cli(*verb, "--est-server", est, "--rate", "10/min").stdout
    assert made.startswith("campaign 1 created: 2 device(s), 1 canary first, rotation id certs-")
    listed = json.loads(fleet.cli("campaigns", "list", "--json").stdout)
    assert listed[0]["selector"] == {"group": "lab"} and listed[0]["counts"]["pending"] == 2
    assert listed[0]["settings"]["rate_per_minute"] == 10
    busy = fleet.cli(*verb, "--est-server", est, expect=2)
    assert "every chosen device is already in an open campaign (1)" in busy.stderr
    empty = fleet.cli("config", "rotate-certs", "--group", "none", "--reason", "r",
                      "--est-server", est, expect=2)  # fmt: skip
    assert "group 'none' has no devices" in empty.stderr


class Remote:
    """The rotation verbs as a client of the server's admin API, with a token per scope."""

    def __init__(self, fleet: Fleet) -> None:
        self.where = [
            "--server", f"https://127.0.0.1:{fleet.server.api_port}",
            "--trust", str(fleet.pki / "root.crt"),
        ]  # fmt: skip
        self.tokens = {
            scope: json.loads(
                fleet.cli("tokens", "create", "--name", scope, "--scope", scope, "--json").stdout
            )["token"]
            for scope in ("read", "rotate")
        }

    def cli(self, *args: str, scope: str = "rotate", expect: int = 0) -> CompletedProcess:
        done = certfleet(
            *args, *self.where, env={"CERTFLEET_TOKEN": self.tokens[scope]}, expect=expect
        )
        for token in self.tokens.values():
            assert token not in done.stdout + done.stderr, "a token was printed"
        return done


def _same_second(text: str) -> str:
    # A dry run names a rotation id of the current second; two runs may straddle one.
    return re.sub(r"certs-\d+", "certs-N", text)


def test_rotate_one_device_remotely_prints_what_local_mode_prints(fleet):
    device, busy = fleet.register(2)
    remote = Remote(fleet)
    est = "https://est.acme.example:8443/.well-known/est"
    verb = ("devices", "config", "rotate-certs")
    args = (device.uuid, "--reason", "yearly", "--est-server", est)

    local_dry = fleet.cli(*verb, *args, "--dryrun").stdout
    remote_dry = remote.cli(*verb, *args, "--dryrun").stdout
    assert _same_second(remote_dry) == _same_second(local_dry)
    assert "nothing was changed" in remote_dry and device.rotation_file() is None
    refused = remote.cli(*verb, *args, scope="read", expect=2)
    assert "needs a token with scope 'rotate'" in refused.stderr and "HTTP 403" in refused.stderr
    assert device.rotation_file() is None

    slots = ("--hsm-pkey-ids", "1,07", "--hsm-cert-ids", "03,9")
    result = json.loads(remote.cli(*verb, *args, *slots, "--json").stdout)
    assert result["device"] == device.uuid and result["dryrun"] is False
    assert device.rotation_file() == {
        "ESTSERVER": est,
        "ROTATIONID": result["rotation_id"],
        "PKEYIDS": "01,07",
        "CERTIDS": "03,09",
    }
    text = remote.cli(*verb, *args).stdout
    assert text.startswith(f"set config file fio-rotate-certs for device {device.uuid}")
    assert f"follow it with: certfleet events tail --device {device.uuid}" in text
    log = json.loads(fleet.cli("config", "log", "--device", device.uuid, "--json").stdout)
    assert [(e["reason"], e["changed_by"]) for e in log] == [
        ("yearly", "api:token:3:rotate"),
        ("yearly", "api:token:3:rotate"),
    ]

    next_key = public_key_pem(generate_private_key().public_key())
    assert busy.call("PATCH", "/device", {"next_pubkey": next_key})[0] == 200
    unknown = "0b7c5a2e-6a43-4d6e-9f5e-0d6c1c1e2f3a"
    cases = [
        ((busy.uuid, "--est-server", est), f"device {busy.uuid} is in the middle", 409),
        ((busy.uuid, "--est-server", "http://est.example"), "must be an https:// URL", 400),
        ((unknown, "--est-server", est), f"no device {unknown} (or it was deleted)", 404),
        ((busy.uuid, "--est-server", est, "--hsm-pkey-ids", "01,07"), "together", 400),
    ]
    for given, message, status in cases:
        refused = remote.cli(*verb, *given, "--reason", "r", expect=2)
        assert message in refused.stderr and f"HTTP {status}" in refused.stderr, refused.stderr
    assert busy.rotation_file() is None


def test_rotate_a_group_remotely_makes_a_campaign(fleet):
    lab = fleet.register(2, group="lab")
    fleet.register(1, group="field")
    remote = Remote(fleet)
    verb = ("config", "rotate-certs", "--group", "lab", "--reason", "lab first")
    est = ("--est-server", "https://est.acme.example")

    local_dry = fleet.cli(*verb, *est, "--dryrun").stdout
    remote_dry = remote.cli(*verb, *est, "--dryrun").stdout
    assert _same_second(remote_dry) == _same_second(local_dry)
    assert "dry run: would rotate 2 device(s)" in remote_dry
    refused = remote.cli(*verb, *est, scope="read", expect=2)
    assert "needs a token with scope 'rotate'" in refused.stderr
    assert json.loads(fleet.cli("campaigns", "list", "--json").stdout) == []

    made = remote.cli(*verb, *est, "--rate", "10/min").stdout
    assert made.startswith("campaign 1 created: 2 device(s), 1 canary first, rotation id certs-")
    (listed,) = json.loads(fleet.cli("campaigns", "list", "--json").stdout)
    assert listed["selector"] == {"group": "lab"} and listed["total"] == len(lab)
    assert listed["settings"]["rate_per_minute"] == 10
    factory = remote.cli(*verb, *est, "--factory", "acme", expect=2)
    assert "--factory works on the store only" in factory.stderr
