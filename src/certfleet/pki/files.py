"""Durable, permission-aware file writes shared by the server and the agent."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import PkiError


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
