"""Helpers that check PKI output with the real openssl command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str) -> str:
    """Run openssl; return stdout, failing the test with stderr on a non-zero exit."""
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def verify(root: Path, cert: Path, purpose: str | None = None) -> None:
    """openssl verify `cert` against `root` (and a purpose such as sslserver)."""
    args = ["verify", "-CAfile", str(root)]
    if purpose:
        args += ["-purpose", purpose]
    assert openssl(*args, str(cert)).strip().endswith(": OK")


def text(cert: Path) -> str:
    """openssl x509 -text of a PEM certificate."""
    return openssl("x509", "-in", str(cert), "-noout", "-text")


def mode(path: Path) -> int:
    """Permission bits of a file."""
    return path.stat().st_mode & 0o777
