"""Crash safety of the key rotation, proven with real processes and a real server.

- SIGKILL right after every durable write a rotation makes (journal, key, certificate,
  config copy, sota.toml, removals), then `certfleet-agent rotate --resume`.
- A power cut at every durable write: the write in flight is lost (its temp file is
  written and fsynced, the rename or unlink is not done), then a restart.
- The server killed in the middle of a rotation: the agent reports a pause and waits;
  once the server is back, resume completes.

After each: the rotation is completed, the device's credential works, the old
certificate is deny-listed, every certificate the EST server issued for the device is
its current one, its old one, or one for the new key the journal recorded (only a
lost write can leave that, and the key change deny-lists it), config opens with the
new key, and the gateway recorded each step once, in order, as a success. One server
serves the whole file.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest

from certfleet.agent import rotation
from certfleet.agent.settings import load_settings
from certfleet.pki.files import CRASH_ENV, POWER_CUT_ENV

from .agent_rotation_env import (
    DEVICE_VALUES,
    GROUP_VALUES,
    STEPS,
    DeviceDir,
    Lab,
    current_cert_sha256,
    decrypt_all,
    fingerprint,
    is_denied,
    issued_certificates,
    local_values,
    rotation_events,
)

ALL_VALUES = {**DEVICE_VALUES, **GROUP_VALUES}
# Durable writes of a rotation with file keys and a local config copy: begin, new key,
# EST request, new certificate, 5 step records, local config, sota.toml, 2 removals,
# finish, events delivered.
WRITES = 15


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("crash-lab"))
    yield lab
    lab.close()


class Before:
    """The device's credential (copied) and the certificates issued to it before a rotation."""

    def __init__(self, lab: Lab, device: DeviceDir, into: Path) -> None:
        into.mkdir(parents=True, exist_ok=True)
        cert, key = device.current()
        self.old = (shutil.copy2(cert, into / "old.pem"), shutil.copy2(key, into / "old.key"))
        self.issued = {c["sha256"] for c in lab.store(issued_certificates, device.uuid)}


def assert_device_works(lab: Lab, device: DeviceDir) -> None:
    """Whatever sota.toml names is accepted by the gateway: the device is never cut off."""
    status, _, body = lab.call(device, "GET", "/device")
    assert status == 200, body


def assert_converged(
    lab: Lab, device: DeviceDir, rotation_id: str, before: Before, lost_writes: bool
) -> None:
    old = before.old
    journal = device.journal(rotation_id)
    assert journal["state"] == "completed", journal
    assert [r["step"] for r in journal["results"]] == STEPS[1:-1]
    assert all(r["result"] == "done" for r in journal["results"])
    cert_path, key_path = device.current()
    assert key_path.name == f"pkey-{rotation_id}.pem"
    for name in journal["params"]["old"]["key"], journal["params"]["old"]["cert"]:
        assert not (device.folder / name).exists(), f"old {name} not removed"
    assert_device_works(lab, device)
    current = fingerprint(cert_path)
    assert lab.store(current_cert_sha256, device.uuid) == current
    assert lab.store(is_denied, fingerprint(old[0]))
    status, _, body = lab.call(device, "GET", "/device", old)
    assert status == 403, body

    issued = lab.store(issued_certificates, device.uuid)
    orphans = [c for c in issued if c["sha256"] not in before.issued | {current}]
    if lost_writes:
        recorded = journal["progress"]["est_request"]["key_sha256"]
        assert all(c["pubkey"] == recorded for c in orphans), orphans
        # The key change denied them: none of them works for anyone.
        assert all(c["status"] == "superseded" for c in orphans), orphans
        assert all(lab.store(is_denied, c["sha256"]) for c in orphans), orphans
    else:
        assert orphans == [], "a crash never makes the EST server issue a second certificate"

    status, _, body = lab.call(device, "GET", "/config")
    assert decrypt_all(json.loads(body), key_path) == ALL_VALUES
    assert local_values(device) == ALL_VALUES

    story = lab.store(rotation_events, device.uuid, rotation_id)
    assert story["events"] == [(step, True) for step in STEPS], story
    assert story["status"] == "succeeded"
    leftovers = [p.name for p in device.folder.rglob(".*.tmp-*")]
    assert leftovers == [], leftovers


def crash_and_resume(
    lab: Lab, device: DeviceDir, rotation_id: str, hook: dict[str, str], *restart: str
) -> bool:
    """Run the rotation with a crash hook, then `restart`; False if the hook never fired."""
    crashed = lab.rotate(device, "--rotation-id", rotation_id, env=hook)
    if crashed.returncode == 0:
        return False
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert_device_works(lab, device)
    resumed = lab.rotate(device, *(restart or ["--resume"]))
    assert resumed.returncode == 0, resumed.stderr
    return True


def test_sigkill_after_every_durable_write(lab, tmp_path):
    exercised = []
    for k in range(1, 40):
        device = lab.quick_device()
        before = Before(lab, device, tmp_path / str(k))
        rotation_id = f"certs-{1800000000 + k}"
        if not crash_and_resume(lab, device, rotation_id, {CRASH_ENV: str(k)}):
            break
        assert_converged(lab, device, rotation_id, before, lost_writes=False)
        exercised.append(k)
    assert exercised == list(range(1, WRITES + 1))


def test_power_cut_at_every_durable_write(lab, tmp_path):
    # One device rotating again and again: each rotation starts from the last one's result.
    device = lab.quick_device()
    exercised = []
    for k in range(1, 40):
        before = Before(lab, device, tmp_path / str(k))
        rotation_id = f"certs-{1810000000 + k}"
        # A power cut in the first write loses the request itself: the restarted
        # agent gets it again (the daemon re-reads the config file), as here.
        again = ["--rotation-id", rotation_id]
        if not crash_and_resume(lab, device, rotation_id, {POWER_CUT_ENV: str(k)}, *again):
            break
        assert_converged(lab, device, rotation_id, before, lost_writes=True)
        exercised.append(k)
    assert exercised == list(range(1, WRITES + 1))


def test_a_lost_certificate_write_leaves_no_usable_extra_certificate(lab, tmp_path):
    device = lab.quick_device()
    before = Before(lab, device, tmp_path)
    # Write 4 is the new certificate: the EST server issued it, the device lost it.
    assert crash_and_resume(lab, device, "certs-1820000001", {POWER_CUT_ENV: "4"}, "--resume")
    assert_converged(lab, device, "certs-1820000001", before, lost_writes=True)
    journal = device.journal("certs-1820000001")
    assert journal["progress"]["est_request"]["sent"] == 2
    issued = lab.store(issued_certificates, device.uuid)
    assert len(issued) == 3
    current = fingerprint(device.current()[0])
    new_key = journal["progress"]["est_request"]["key_sha256"]
    (orphan,) = [c for c in issued if c["pubkey"] == new_key and c["sha256"] != current]
    # The key change denied the certificate the device never received.
    assert orphan["status"] == "superseded"
    assert lab.store(is_denied, orphan["sha256"])
    assert [c["sha256"] for c in issued if c["status"] == "active"] == [current]


def test_server_down_before_the_rotation(lab, tmp_path):
    device = lab.quick_device()
    before = Before(lab, device, tmp_path)
    lab.server.kill()
    try:
        paused = lab.rotate(device, "--rotation-id", "certs-1830000001")
        assert paused.returncode == 1
        assert "paused at 'Generate new certificate'" in paused.stderr
        assert "unreachable" in paused.stderr
        journal = device.journal("certs-1830000001")
        assert journal["state"] == "in_progress" and journal["results"] == []
        retry = journal["progress"]["retry"]
        assert retry["step"] == "Generate new certificate" and retry["count"] == 1

        # The daemon's call waits out the backoff and touches nothing.
        snapshot = (device.state / "rotations" / "certs-1830000001.json").read_bytes()
        outcome = rotation.resume_unfinished(load_settings(device.agent_toml))
        assert outcome is not None and outcome.status == "pending"
        assert (device.state / "rotations" / "certs-1830000001.json").read_bytes() == snapshot
        again = lab.rotate(device, "--resume")
        assert again.returncode == 1
        assert device.journal("certs-1830000001")["progress"]["retry"]["count"] == 2
    finally:
        lab.server.start()
    done = lab.rotate(device, "--resume")
    assert done.returncode == 0, done.stderr
    assert_converged(lab, device, "certs-1830000001", before, lost_writes=False)


@pytest.mark.parametrize(
    "k, step",
    [
        (4, "Lock device configuration on server"),  # new certificate stored
        (6, "Update device specific configuration on server with new key"),  # Lock recorded
        (10, "Finalize aktualizr configuration"),  # sota.toml names the new files
    ],
)
def test_server_killed_in_the_middle(lab, tmp_path, k, step):
    device = lab.quick_device()
    before = Before(lab, device, tmp_path)
    rotation_id = f"certs-{1840000000 + k}"
    crashed = lab.rotate(device, "--rotation-id", rotation_id, env={CRASH_ENV: str(k)})
    assert crashed.returncode == -signal.SIGKILL
    lab.server.kill()
    try:
        paused = lab.rotate(device, "--resume")
        assert paused.returncode == 1, paused.stderr
        assert f"paused at '{step}'" in paused.stderr
        journal = device.journal(rotation_id)
        assert journal["state"] == "in_progress"
        assert journal["progress"]["retry"]["step"] == step
        status = lab.rotate(device, "--status")
        assert f"{rotation_id}: in_progress" in status.stdout and "paused" in status.stdout
    finally:
        lab.server.start()
    done = lab.rotate(device, "--resume")
    assert done.returncode == 0, done.stderr
    assert_converged(lab, device, rotation_id, before, lost_writes=False)


def test_server_killed_while_a_step_runs(lab, tmp_path):
    # The restart command of Finalize kills the server: the agent is between the
    # sota.toml switch and the confirmation, and finds nobody to confirm with.
    device = lab.quick_device()
    before = Before(lab, device, tmp_path)
    assert lab.server.process is not None
    kill = f"import os, signal; os.killpg({lab.server.process.pid}, signal.SIGKILL)"
    text = device.agent_toml.read_text()
    killer = json.dumps([sys.executable, "-c", kill])
    device.agent_toml.write_text(
        text.replace("restart_commands = [", f"restart_commands = [{killer}, ")
    )
    try:
        paused = lab.rotate(device, "--rotation-id", "certs-1850000001")
        assert paused.returncode == 1, paused.stderr
        assert "paused at 'Finalize aktualizr configuration'" in paused.stderr
        journal = device.journal("certs-1850000001")
        assert journal["state"] == "in_progress" and len(journal["results"]) == 4
        assert device.current()[1].name == "pkey-certs-1850000001.pem"
    finally:
        lab.server.process.wait(timeout=20)
        lab.server.start()
    device.agent_toml.write_text(text)
    done = lab.rotate(device, "--resume")
    assert done.returncode == 0, done.stderr
    assert_converged(lab, device, "certs-1850000001", before, lost_writes=False)
