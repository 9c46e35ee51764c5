"""Crash-safe rotation journal of the device agent.

One JSON file per rotation: ``<state_dir>/rotations/<rotation id>.json`` (mode 0600).
Every change is written with :func:`certfleet.pki.files.write_atomic` (temp file,
fsync, rename, fsync of the directory), so a step's result is durable before
``Rotation.record`` returns. The journal holds only small JSON values (file names,
fingerprints, public data); private keys never go in it and PEM private keys are
refused.

A document holds, besides the step results: ``params``, what the rotation was
asked to do and where its old and new credentials live (set once by ``begin``),
and ``progress``, small facts learnt inside a step that a restart must know
(``Rotation.note``), such as a request that may have reached a server.

At most one rotation is unfinished at a time: ``Journal.begin`` with another id
is refused until the unfinished one is finished or abandoned; ``begin`` with the
same id resumes it and never overwrites it.

A 5-step rotation makes 7 durable journal writes: begin, one per step, finish.
The crash-test hooks (SIGKILL after the k-th durable write, or a simulated power
cut) live in :mod:`certfleet.pki.files` and count every durable write of the
process, the journal's included.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from certfleet.pki.files import CRASH_ENV, fsync_dir, write_atomic

__all__ = ["CRASH_ENV", "Journal", "JournalError", "Rotation"]

FORMAT_VERSION = 1
MAX_DETAILS_BYTES = 4096

IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
ABANDONED = "abandoned"
FINAL_STATES = (COMPLETED, FAILED, ABANDONED)

DONE = "done"
STEP_FAILED = "failed"

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PRIVATE_KEY_RE = re.compile(r"PRIVATE KEY-----")  # matches BEGIN and END lines of any PEM key


class JournalError(Exception):
    """A journal operation was refused; the message says why and what to do."""


def _now() -> str:
    """Current UTC time as an ISO 8601 string."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _check_no_private_key(value: Any, where: str) -> None:
    """Refuse any string inside `value` that looks like a PEM private key."""
    if isinstance(value, str):
        if _PRIVATE_KEY_RE.search(value):
            raise JournalError(
                f"{where} looks like a PEM private key; the journal must never hold key "
                "material: store the key in its own 0600 file or HSM slot and record "
                "its file name or fingerprint instead"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_no_private_key(key, where)
            _check_no_private_key(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for item in value:
            _check_no_private_key(item, where)


def _check_details(step: str, details: dict[str, Any]) -> dict[str, Any]:
    """Validate step details: JSON-able, small, no private keys; return a JSON copy."""
    return _checked_json(details, f"details of step {step!r}")


def _checked_json(value: dict[str, Any], what: str) -> dict[str, Any]:
    """A JSON copy of `value` if it is plain JSON, small and free of private keys."""
    _check_no_private_key(value, what)
    try:
        text = json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise JournalError(
            f"{what} are not plain JSON values ({exc}); record names, numbers and fingerprints only"
        ) from exc
    if len(text.encode()) > MAX_DETAILS_BYTES:
        raise JournalError(
            f"{what} are {len(text.encode())} bytes, over the "
            f"{MAX_DETAILS_BYTES}-byte limit; record file names or fingerprints, not contents"
        )
    return json.loads(text)


def stale_temp(path: Path) -> bool:
    """True if `path` (a write_atomic temp file `.<name>.tmp-<pid>`) has no live writer.

    A temp file of a running process is its write in flight: deleting it would
    make that write fail.
    """
    pid = path.name.rpartition(".tmp-")[2]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return int(pid) == os.getpid()


def _check_id(rotation_id: str) -> None:
    """Refuse a rotation id that is not a safe file name."""
    if not isinstance(rotation_id, str) or not _ID_RE.fullmatch(rotation_id):
        raise JournalError(
            f"rotation id {rotation_id!r} is invalid: use 1-128 characters from "
            "A-Z a-z 0-9 . _ - starting with a letter or digit (e.g. certs-1700000000)"
        )


def _load(path: Path) -> dict[str, Any]:
    """Read and validate one journal file; a corrupt file raises JournalError naming it."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise JournalError(
            f"rotation journal {path} is unreadable or corrupt ({exc}); inspect it, "
            "then move it out of the way to let the agent start a new rotation"
        ) from exc
    problem = _validate(doc, path.stem)
    if problem:
        raise JournalError(
            f"rotation journal {path} is corrupt ({problem}); inspect it, then move it "
            "out of the way to let the agent start a new rotation"
        )
    return doc


def _validate(doc: Any, rotation_id: str) -> str | None:
    """Return what is wrong with a journal document, or None if it is well-formed."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("version") != FORMAT_VERSION:
        return f"unknown version {doc.get('version')!r}"
    if doc.get("rotation_id") != rotation_id:
        return f"rotation_id {doc.get('rotation_id')!r} does not match the file name"
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        return "steps is not a non-empty list of names"
    if not isinstance(doc.get("started_at"), str):
        return "started_at missing"
    if doc.get("state") not in (IN_PROGRESS, *FINAL_STATES):
        return f"unknown state {doc.get('state')!r}"
    for optional in ("params", "progress"):
        if not isinstance(doc.get(optional, {}), dict):
            return f"{optional} is not a JSON object"
    results = doc.get("results")
    if not isinstance(results, list) or len(results) > len(steps):
        return "results is not a list no longer than steps"
    for i, res in enumerate(results):
        if not isinstance(res, dict) or res.get("step") != steps[i]:
            return f"result {i} is not for step {steps[i]!r}"
        if res.get("result") not in (DONE, STEP_FAILED):
            return f"result {i} has unknown result {res.get('result')!r}"
        if res.get("result") == STEP_FAILED and i != len(results) - 1:
            return f"step {steps[i]!r} failed but later steps were recorded"
    return None


class Rotation:
    """One rotation's journal entry; every change is durable before the method returns."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        """Wrap a loaded journal document stored at `path`."""
        self._path = path
        self._doc = doc

    @property
    def rotation_id(self) -> str:
        """The rotation id (e.g. certs-1700000000)."""
        return self._doc["rotation_id"]

    @property
    def started_at(self) -> str:
        """When the rotation began (ISO 8601 UTC)."""
        return self._doc["started_at"]

    @property
    def steps(self) -> list[str]:
        """The step names in order."""
        return list(self._doc["steps"])

    @property
    def state(self) -> str:
        """in_progress, completed, failed or abandoned."""
        return self._doc["state"]

    @property
    def results(self) -> list[dict[str, Any]]:
        """Recorded step results in order: step, result (done/failed), time, details."""
        return json.loads(json.dumps(self._doc["results"]))

    @property
    def reason(self) -> str | None:
        """Why the rotation was abandoned, if it was."""
        return self._doc.get("reason")

    @property
    def params(self) -> dict[str, Any]:
        """What the rotation was asked to do, as given to `Journal.begin`."""
        return json.loads(json.dumps(self._doc.get("params", {})))

    @property
    def progress(self) -> dict[str, Any]:
        """Facts recorded inside steps with `note` (a copy)."""
        return json.loads(json.dumps(self._doc.get("progress", {})))

    @property
    def ended_at(self) -> str | None:
        """When the rotation was completed, failed or abandoned."""
        return self._doc.get("ended_at")

    @property
    def summary(self) -> str | None:
        """The one-line account given to `finish`, if any."""
        return self._doc.get("summary")

    @property
    def path(self) -> Path:
        """The journal file of this rotation."""
        return self._path

    @property
    def finished(self) -> bool:
        """True once the rotation is completed, failed or abandoned."""
        return self.state in FINAL_STATES

    def next_step(self) -> str | None:
        """The next step to run, or None if all are recorded, one failed, or it is over."""
        results = self._doc["results"]
        if self.finished or (results and results[-1]["result"] == STEP_FAILED):
            return None
        if len(results) == len(self._doc["steps"]):
            return None
        return self._doc["steps"][len(results)]

    def record(self, step: str, ok: bool, **details: Any) -> None:
        """Durably record the result of the next step (done if ok, else failed)."""
        self._require_unfinished("record a step")
        expected = self.next_step()
        if step != expected:
            recorded = [r["step"] for r in self._doc["results"]]
            if step in recorded:
                why = "it is already recorded"
            elif step not in self._doc["steps"]:
                why = "it is not a step of this rotation"
            elif expected is None:
                why = "no step is pending (a step failed or all are recorded)"
            else:
                why = f"the next step is {expected!r}"
            raise JournalError(f"rotation {self.rotation_id}: cannot record step {step!r}: {why}")
        clean = _check_details(step, details)
        result = {
            "step": step,
            "result": DONE if ok else STEP_FAILED,
            "time": _now(),
            "details": clean,
        }
        self._save({**self._doc, "results": [*self._doc["results"], result]})

    def note(self, **changes: Any) -> None:
        """Durably merge `changes` into progress; a value of None removes that entry.

        Allowed on a finished rotation too: delivery of its events is noted after the end.
        """
        progress = {**self._doc.get("progress", {}), **changes}
        progress = {k: v for k, v in progress.items() if v is not None}
        clean = _checked_json(progress, "rotation progress")
        if clean != self._doc.get("progress", {}):
            self._save({**self._doc, "progress": clean})

    def finish(self, ok: bool, summary: str | None = None) -> None:
        """Durably mark the rotation completed (ok, all steps done) or failed."""
        state = COMPLETED if ok else FAILED
        if self.state == state:
            return
        self._require_unfinished("finish it")
        if ok:
            done = [r for r in self._doc["results"] if r["result"] == DONE]
            if len(done) != len(self._doc["steps"]):
                raise JournalError(
                    f"rotation {self.rotation_id}: cannot finish as completed: "
                    f"{len(done)} of {len(self._doc['steps'])} steps are done; run the "
                    "remaining steps or finish(False)"
                )
        ended = {"state": state, "ended_at": _now()}
        if summary:
            _check_no_private_key(summary, "rotation summary")
            ended["summary"] = summary[:MAX_DETAILS_BYTES]
        self._save({**self._doc, **ended})

    def abandon(self, reason: str) -> None:
        """Durably mark the unfinished rotation abandoned, with the reason."""
        self._require_unfinished("abandon it")
        if not isinstance(reason, str) or not reason.strip():
            raise JournalError("abandon needs a non-empty reason")
        _check_no_private_key(reason, "abandon reason")
        self._save({**self._doc, "state": ABANDONED, "ended_at": _now(), "reason": reason})

    def _require_unfinished(self, action: str) -> None:
        """Refuse to change a rotation that is already over."""
        if self.finished:
            raise JournalError(
                f"rotation {self.rotation_id} is already {self.state}; cannot {action}"
            )

    def _save(self, doc: dict[str, Any]) -> None:
        """Write `doc` durably, then adopt it as the current state."""
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(self._path, data, 0o600)
        self._doc = doc


class Journal:
    """The rotation journals in one agent state directory."""

    def __init__(self, state_dir: Path | str) -> None:
        """Open (creating if needed) `<state_dir>/rotations` and remove leftover temp files."""
        self.dir = Path(state_dir) / "rotations"
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A new directory's own entry must survive a power cut, or its journals vanish.
            fsync_dir(self.dir.parent)
            fsync_dir(self.dir.parent.parent)
        for entry in self.dir.iterdir():
            if entry.name.startswith(".") and ".tmp-" in entry.name and stale_temp(entry):
                entry.unlink(missing_ok=True)

    def _path(self, rotation_id: str) -> Path:
        """The journal file for a rotation id."""
        _check_id(rotation_id)
        return self.dir / f"{rotation_id}.json"

    def get(self, rotation_id: str) -> Rotation | None:
        """The rotation with this id, or None if there is none."""
        path = self._path(rotation_id)
        if not path.exists():
            return None
        return Rotation(path, _load(path))

    def completed(self, rotation_id: str) -> bool:
        """True only if the rotation exists and was finished successfully."""
        rotation = self.get(rotation_id)
        return rotation is not None and rotation.state == COMPLETED

    def all(self) -> list[Rotation]:
        """Every rotation in this journal, oldest start first."""
        found = [
            Rotation(path, _load(path))
            for path in self.dir.glob("*.json")
            if not path.name.startswith(".")
        ]
        return sorted(found, key=lambda r: (r.started_at, r.rotation_id))

    def unfinished(self) -> Rotation | None:
        """The one rotation that is neither completed, failed nor abandoned, if any."""
        found = [r for r in self.all() if r.state == IN_PROGRESS]
        if len(found) > 1:
            names = ", ".join(r.rotation_id for r in found)
            raise JournalError(
                f"several unfinished rotations in {self.dir} ({names}); abandon all but one"
            )
        return found[0] if found else None

    def begin(
        self, rotation_id: str, steps: list[str], params: dict[str, Any] | None = None
    ) -> Rotation:
        """Start a rotation, or resume it if this id exists; refuse while another is unfinished.

        `params` (small JSON, no key material) is stored with a new rotation only;
        a resumed one keeps the params it began with.
        """
        path = self._path(rotation_id)
        steps = list(steps)
        if not steps or not all(isinstance(s, str) and s for s in steps):
            raise JournalError("a rotation needs a non-empty list of non-empty step names")
        if len(set(steps)) != len(steps):
            raise JournalError(f"step names must be unique: {steps}")
        current = self.unfinished()
        if current is not None and current.rotation_id != rotation_id:
            raise JournalError(
                f"rotation {current.rotation_id} is unfinished (next step: "
                f"{current.next_step()!r}); finish or abandon it before starting "
                f"{rotation_id}"
            )
        existing = current if current is not None else self.get(rotation_id)
        if existing is not None:
            if existing.steps != steps:
                raise JournalError(
                    f"rotation {rotation_id} exists with steps {existing.steps}, "
                    f"not {steps}; use a new rotation id"
                )
            return existing
        doc = {
            "version": FORMAT_VERSION,
            "rotation_id": rotation_id,
            "started_at": _now(),
            "steps": steps,
            "results": [],
            "state": IN_PROGRESS,
        }
        if params:
            doc["params"] = _checked_json(params, f"params of rotation {rotation_id}")
        rotation = Rotation(path, {})
        rotation._save(doc)
        return rotation
