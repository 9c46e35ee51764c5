"""Run the real `certfleet` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def certfleet(
    *args: str, cwd: Path | None = None, env: dict | None = None, expect: int = 0
) -> subprocess.CompletedProcess:
    """Run `certfleet ARGS`; assert the exit code and return the result."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    done = subprocess.run(
        [str(BIN / "certfleet"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == expect, (
        f"certfleet {' '.join(args)} exited {done.returncode}, expected {expect}\n"
        f"stdout: {done.stdout}\nstderr: {done.stderr}"
    )
    return done


def certfleet_agent(
    *args: str, expect: int | None = 0, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `certfleet-agent ARGS`; assert the exit code (unless `expect` is None)."""
    done = subprocess.run(
        [str(BIN / "certfleet-agent"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    if expect is not None:
        assert done.returncode == expect, f"exit {done.returncode}: {done.stdout}\n{done.stderr}"
    return done
