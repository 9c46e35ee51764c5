"""Durable, permission-aware file writes shared by the server and the agent.

Crash-test hooks (environment variables, read at each durable change; they
exist only for the agent's crash-safety tests): every durable change this
process makes (`write_atomic`, and removals wrapped in `durable_change`) is
counted from 1.

- ``CERTFLEET_CRASH_AFTER_WRITE=k``: SIGKILL right after the k-th change is
  durable (a process crash: everything before is on disk, nothing after).
- ``CERTFLEET_POWER_CUT_AT_WRITE=k``: SIGKILL right before the k-th change
  becomes visible (its temp file is written and fsynced, the rename or unlink
  is not done). This is what a power cut can lose under the discipline below:
  every earlier change was followed by an fsync of its directory, so only the
  change in flight can be lost, and it is lost whole.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PkiError

CRASH_ENV = "CERTFLEET_CRASH_AFTER_WRITE"
POWER_CUT_ENV = "CERTFLEET_POWER_CUT_AT_WRITE"

_changes_done = 0


def _hook_wants(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


@contextmanager
def durable_change() -> Iterator[None]:
    """Wrap the rename or unlink that makes one durable change visible (crash-test hooks)."""
    global _changes_done
    _changes_done += 1
    if _hook_wants(POWER_CUT_ENV) == _changes_done:
        os.kill(os.getpid(), signal.SIGKILL)
    yield
    if _hook_wants(CRASH_ENV) == _changes_done:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry so that a rename in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` via temp file, fsync, rename and fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # O_EXCL with the final mode from the start: the secret is never readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with durable_change():
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Like write_atomic, but refuse to replace an existing file."""
    if Path(path).exists():
        raise PkiError(f"{path} already exists; refusing to overwrite it")
    write_atomic(path, data, mode)


def check_private_file_mode(path: Path) -> None:
    """Refuse a key file that group or others can read or write."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise PkiError(
            f"key file {path} has mode {mode:04o}; it must be private: run chmod 400 {path}"
        )
