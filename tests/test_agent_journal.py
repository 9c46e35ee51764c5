"""Rotation journal: API, durability, refusal of key material and the SIGKILL crash proof."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certfleet.agent.journal import CRASH_ENV, Journal, JournalError
from tests.journal_crash_child import ROTATION_ID, STEPS

CHILD = Path(__file__).with_name("journal_crash_child.py")
REPO = Path(__file__).resolve().parent.parent
WRITES_PER_ROTATION = 1 + len(STEPS) + 1  # begin, one per step, finish


def run_child(state: Path, crash_after: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env["PYTHONPATH"] = str(REPO)
    if crash_after is not None:
        env[CRASH_ENV] = str(crash_after)
    return subprocess.run(
        [sys.executable, str(CHILD), str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def journal_doc(state: Path, rotation_id: str = ROTATION_ID) -> dict:
    return json.loads((state / "rotations" / f"{rotation_id}.json").read_text())


def assert_clean_dir(state: Path, expected: set[str]) -> None:
    assert {p.name for p in (state / "rotations").iterdir()} == expected


def test_round_trip(tmp_path):
    journal = Journal(tmp_path)
    rot = journal.begin("certs-1", ["a", "b", "c"])
    assert rot.state == "in_progress" and rot.started_at
    assert journal.completed("certs-1") is False
    for step in ["a", "b", "c"]:
        assert rot.next_step() == step
        rot.record(step, True, cert_file=f"{step}.pem")
        assert journal.completed("certs-1") is False
    assert rot.next_step() is None
    rot.finish(True)
    assert journal.completed("certs-1") is True
    assert journal.unfinished() is None
    again = journal.get("certs-1")
    assert again.state == "completed"
    assert [(r["step"], r["result"], r["details"]) for r in again.results] == [
        ("a", "done", {"cert_file": "a.pem"}),
        ("b", "done", {"cert_file": "b.pem"}),
        ("c", "done", {"cert_file": "c.pem"}),
    ]
    assert all(r["time"] for r in again.results)
    assert journal.get("certs-unknown") is None
    assert journal.completed("certs-unknown") is False


def test_resume_with_same_id_continues_at_next_step(tmp_path):
    rot = Journal(tmp_path).begin("certs-1", ["a", "b", "c"])
    rot.record("a", True)
    resumed = Journal(tmp_path).begin("certs-1", ["a", "b", "c"])
    assert resumed.next_step() == "b"
    assert Journal(tmp_path).unfinished().rotation_id == "certs-1"
    with pytest.raises(JournalError, match="exists with steps"):
        Journal(tmp_path).begin("certs-1", ["a", "x"])


def test_second_rotation_refused_while_one_unfinished(tmp_path):
    journal = Journal(tmp_path)
    rot = journal.begin("certs-1", ["a", "b"])
    rot.record("a", True)
    before = journal_doc(tmp_path, "certs-1")
    with pytest.raises(JournalError, match="certs-1 is unfinished.*finish or abandon"):
        journal.begin("certs-2", ["a", "b"])
    assert journal_doc(tmp_path, "certs-1") == before
    assert journal.get("certs-2") is None


def test_abandon_then_begin_new(tmp_path):
    journal = Journal(tmp_path)
    old = journal.begin("certs-1", ["a", "b"])
    old.record("a", True)
    old.abandon("operator requested a new rotation")
    assert journal.get("certs-1").state == "abandoned"
    assert journal.get("certs-1").reason == "operator requested a new rotation"
    assert journal.completed("certs-1") is False
    new = journal.begin("certs-2", ["a", "b"])
    assert new.next_step() == "a"
    assert journal.unfinished().rotation_id == "certs-2"
    with pytest.raises(JournalError, match="already abandoned"):
        old.record("b", True)


def test_failed_step_and_failed_finish(tmp_path):
    journal = Journal(tmp_path)
    rot = journal.begin("certs-1", ["a", "b"])
    rot.record("a", False, error="EST server said 403")
    assert rot.next_step() is None
    with pytest.raises(JournalError, match="no step is pending"):
        rot.record("b", True)
    with pytest.raises(JournalError, match="0 of 2 steps are done"):
        rot.finish(True)
    rot.finish(False)
    assert journal.get("certs-1").state == "failed"
    assert journal.completed("certs-1") is False
    assert journal.unfinished() is None


def test_out_of_order_and_twice_refused(tmp_path):
    rot = Journal(tmp_path).begin("certs-1", ["a", "b", "c"])
    with pytest.raises(JournalError, match="next step is 'a'"):
        rot.record("b", True)
    rot.record("a", True)
    with pytest.raises(JournalError, match="already recorded"):
        rot.record("a", True)
    with pytest.raises(JournalError, match="not a step"):
        rot.record("zzz", True)
    assert [r["step"] for r in journal_doc(tmp_path, "certs-1")["results"]] == ["a"]


def test_bad_ids_and_values_refused(tmp_path):
    journal = Journal(tmp_path)
    for bad in ["", "../x", ".hidden", "a/b"]:
        with pytest.raises(JournalError, match="rotation id"):
            journal.begin(bad, ["a"])
    rot = journal.begin("certs-1", ["a"])
    with pytest.raises(JournalError, match="not plain JSON"):
        rot.record("a", True, blob=b"bytes")
    with pytest.raises(JournalError, match="limit"):
        rot.record("a", True, blob="x" * 5000)
    assert rot.next_step() == "a"


def test_durability_mode_no_temp_and_parses_after_each_write(tmp_path):
    journal = Journal(tmp_path)
    rot = journal.begin("certs-1", ["a", "b", "c"])
    path = tmp_path / "rotations" / "certs-1.json"

    def check(n_results: int, state: str) -> None:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert_clean_dir(tmp_path, {"certs-1.json"})
        doc = json.loads(path.read_text())
        assert len(doc["results"]) == n_results and doc["state"] == state

    check(0, "in_progress")
    for i, step in enumerate(["a", "b", "c"], 1):
        rot.record(step, True, fingerprint=f"sha256:{i}")
        check(i, "in_progress")
    rot.finish(True)
    check(3, "completed")


def test_private_key_details_refused(tmp_path):
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    rot = Journal(tmp_path).begin("certs-1", ["a"])
    before = (tmp_path / "rotations" / "certs-1.json").read_bytes()
    for details in ({"key": pem}, {"nested": {"keys": [pem]}}, {"key": pem.splitlines()[0]}):
        with pytest.raises(JournalError, match="private key.*never hold key material"):
            rot.record("a", True, **details)
    with pytest.raises(JournalError, match="private key"):
        rot.abandon(f"bad key {pem}")
    assert (tmp_path / "rotations" / "certs-1.json").read_bytes() == before
    assert pem not in before.decode()
    rot.record("a", True, key_file="client-2.key", fingerprint="sha256:ab12")


def test_temp_files_removed_and_corrupt_journal_named(tmp_path):
    rotations = tmp_path / "rotations"
    rotations.mkdir()
    (rotations / ".certs-1.json.tmp-4242").write_bytes(b'{"half')
    journal = Journal(tmp_path)
    assert_clean_dir(tmp_path, set())
    assert journal.unfinished() is None

    (rotations / "certs-9.json").write_bytes(b'{"version": 1, "rotat')
    with pytest.raises(JournalError, match="certs-9.json"):
        journal.unfinished()
    with pytest.raises(JournalError, match="certs-9.json"):
        journal.get("certs-9")
    (rotations / "certs-9.json").write_text(json.dumps({"version": 1, "rotation_id": "x"}))
    with pytest.raises(JournalError, match="certs-9.json.*corrupt"):
        journal.begin("certs-10", ["a"])


def test_writes_per_rotation(tmp_path):
    # k = total writes kills it after the finish; k = total + 1 never fires.
    assert run_child(tmp_path / "a", WRITES_PER_ROTATION).returncode == -signal.SIGKILL
    done = run_child(tmp_path / "b", WRITES_PER_ROTATION + 1)
    assert done.returncode == 0, done.stderr
    assert Journal(tmp_path / "b").completed(ROTATION_ID)


def assert_completed_once_in_order(state: Path) -> None:
    doc = journal_doc(state)
    assert doc["state"] == "completed"
    assert [r["step"] for r in doc["results"]] == STEPS
    assert all(r["result"] == "done" for r in doc["results"])
    assert_clean_dir(state, {f"{ROTATION_ID}.json"})
    assert stat.S_IMODE((state / "rotations" / f"{ROTATION_ID}.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("k", range(1, WRITES_PER_ROTATION + 1))
def test_crash_after_every_write_then_resume(tmp_path, k):
    crashed = run_child(tmp_path, k)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # What survived the kill is exactly the first k writes, and it parses.
    doc = journal_doc(tmp_path)
    assert len(doc["results"]) == min(k - 1, len(STEPS))
    assert doc["state"] == ("completed" if k == WRITES_PER_ROTATION else "in_progress")
    assert_clean_dir(tmp_path, {f"{ROTATION_ID}.json"})

    resumed = run_child(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_completed_once_in_order(tmp_path)


def test_crash_after_first_write_of_every_run(tmp_path):
    # Every restart is killed after one write; the rotation still converges.
    for _ in range(WRITES_PER_ROTATION):
        assert run_child(tmp_path, 1).returncode == -signal.SIGKILL
    assert run_child(tmp_path, 1).returncode == 0  # nothing left to write
    assert_completed_once_in_order(tmp_path)
