"""How a benchmark starts `certfleet server`: the command (event loop) and its listeners.

Several servers run side by side in one benchmark, so none may keep a
default port. The admin API listener is switched off when the server has one.
`--loop uvloop` runs the server under bench/uvloop_launcher.py.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
from pathlib import Path

HOST = "127.0.0.1"
CERTFLEET = Path(sys.executable).parent / "certfleet"
LOOPS = ("asyncio", "uvloop")


def server_command(loop: str) -> list[str]:
    """The command that runs `certfleet` with event loop `loop`."""
    if loop == "uvloop":
        return [sys.executable, str(Path(__file__).with_name("uvloop_launcher.py"))]
    return [str(CERTFLEET)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@functools.cache
def _has_api_listener() -> bool:
    usage = subprocess.run(
        [str(CERTFLEET), "server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return "--listen-api" in usage


def listen_args(est_port: int, gateway_port: int) -> list[str]:
    """--listen-est/--listen-gateway on these ports, and no admin API."""
    args = ["--listen-est", f"{HOST}:{est_port}", "--listen-gateway", f"{HOST}:{gateway_port}"]
    if _has_api_listener():
        args += ["--listen-api", "off"]
    return args
