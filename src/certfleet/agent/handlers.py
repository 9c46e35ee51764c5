"""OnChanged handlers: what runs when a config file changes.

A config file's `OnChanged` is a command as a list of arguments. The server's
operators choose it, so the device decides what may run: only executables
inside `handlers_dir` (after resolving symlinks) that group and others cannot
rewrite. Anything else is refused and reported, never run.

`renew-client-cert` (by its base name, wherever the operator's list says it
lives, as in the reference system) is built in: it starts a key rotation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import rotation_hooks
from .settings import AgentSettings

log = logging.getLogger(__name__)

ROTATE_HANDLER = "renew-client-cert"
CONFIG_FILE_ENV = "CONFIG_FILE"
TIMEOUT_S = 300.0


class HandlerRefused(Exception):
    """The handler may not run here; the message says why and what to change."""


@dataclass(frozen=True)
class HandlerResult:
    """How one file's handler went; `detail` is for the log (never file contents)."""

    file: str
    command: str
    ok: bool
    refused: bool = False
    detail: str = ""


def run_handler(
    settings: AgentSettings, file: str, path: Path, argv: Any, timeout: float = TIMEOUT_S
) -> HandlerResult:
    """Run `argv` for the changed config file `file` (written at `path`)."""
    command = str(argv[0]) if isinstance(argv, list) and argv else repr(argv)
    try:
        args = _checked_argv(argv)
        if os.path.basename(args[0]) == ROTATE_HANDLER:
            return _rotate(settings, file, path, command)
        executable = resolve_handler(settings.handlers_dir, args[0])
    except HandlerRefused as exc:
        return HandlerResult(file, command, ok=False, refused=True, detail=str(exc))
    return _execute(file, command, [str(executable), *args[1:]], path, timeout)


def resolve_handler(handlers_dir: Path, command: str) -> Path:
    """The executable `command` names, if it is allowed to run; HandlerRefused otherwise."""
    root = Path(os.path.realpath(handlers_dir))
    candidate = Path(command) if os.path.isabs(command) else handlers_dir / command
    real = Path(os.path.realpath(candidate))
    if root not in real.parents:
        shown = command if str(real) == command else f"{command} (resolved: {real})"
        raise HandlerRefused(
            f"{shown} is not inside handlers_dir {root}; install the handler into {root} "
            "(a symlink pointing out of it is refused too)"
        )
    try:
        info = real.stat()
    except OSError:
        raise HandlerRefused(f"{command}: {real} does not exist; install it into {root}") from None
    if not stat.S_ISREG(info.st_mode) or not os.access(real, os.X_OK):
        raise HandlerRefused(f"{command}: {real} is not an executable file; chmod +x it")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Anyone who can rewrite the handler can run code as the agent.
        raise HandlerRefused(f"{command}: {real} is writable by group or others; chmod go-w it")
    return real


def _checked_argv(argv: Any) -> list[str]:
    ok = isinstance(argv, list) and argv and all(isinstance(a, str) and a for a in argv)
    if not ok:
        raise HandlerRefused(f"OnChanged must be a list of non-empty strings, not {argv!r}")
    return argv


def _rotate(settings: AgentSettings, file: str, path: Path, command: str) -> HandlerResult:
    try:
        done = rotation_hooks.rotate_from_config_file(settings, path.read_text())
    except rotation_hooks.RotationNotDone as exc:
        # Reported like a failed handler; the daemon carries on, and resumes a
        # paused rotation at its next cycles.
        return HandlerResult(file, command, ok=False, detail=f"key {exc}")
    except Exception as exc:
        log.debug("rotation for %s failed", file, exc_info=True)
        return HandlerResult(file, command, ok=False, detail=f"key rotation failed: {exc}")
    return HandlerResult(file, command, ok=True, detail=f"key {done}")


def _execute(file: str, command: str, args: list[str], path: Path, timeout: float) -> HandlerResult:
    env = {**os.environ, CONFIG_FILE_ENV: str(path)}
    try:
        # Own session: a timeout kills the handler's children too.
        process = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        return HandlerResult(file, command, ok=False, detail=f"cannot start: {exc}")
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return HandlerResult(file, command, ok=False, detail=f"killed after {timeout:g} s")
    if code != 0:
        return HandlerResult(file, command, ok=False, detail=f"exited with {code}")
    return HandlerResult(file, command, ok=True, detail="exited with 0")
