"""Start and stop a real `certfleet server` process for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now and not handed out before here."""
    while True:
        # The kernel may hand the same free port out twice before anyone binds it.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_listening(
    port: int,
    process: subprocess.Popen,
    timeout: float = 30,
    output: Callable[[], str] | None = None,
) -> None:
    """Wait until the port accepts connections; fail with the server's output if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if output is not None:
                out = output()
            else:
                out = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"server exited with {process.returncode}: {out}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"server did not listen on {port} within {timeout} s")


class ServerProcess:
    """`certfleet server ARGS` in the background, stopped with SIGTERM."""

    def __init__(self, *args: str, port: int, env: dict | None = None) -> None:
        self.port = port
        self.gateway_port = free_port()
        # Flags win over a config file: every test server gets its own gateway port.
        gateway = ["--listen-gateway", f"127.0.0.1:{self.gateway_port}"]
        # The admin API too, unless the test picks its address itself.
        self.api_port = free_port()
        if "--listen-api" not in args:
            gateway += ["--listen-api", f"127.0.0.1:{self.api_port}"]
        # A file, not a pipe: a pipe nobody reads until stop() fills up after
        # 64 KiB of log, and the server then blocks in its next log line.
        self._output = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(BIN / "certfleet"), "-v", "server", *args, *gateway],
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
            start_new_session=True,
        )
        wait_listening(port, self.process, output=self.output)
        wait_listening(self.gateway_port, self.process, output=self.output)
        if "--listen-api" not in args:
            wait_listening(self.api_port, self.process, output=self.output)

    def stop(self, timeout: float = 15) -> tuple[int, str]:
        """SIGTERM, wait, and return (exit code, output)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(
                f"server ignored SIGTERM for {timeout} s: {self.output()}"
            ) from None
        out = self.output()
        self._output.close()
        return self.process.returncode, out

    def output(self) -> str:
        """What the server has written so far."""
        self._output.seek(0)
        return self._output.read()
