"""The agent's config daemon (`certfleet-agent run`) against a real `certfleet server`.

Devices are registered with the real `certfleet-agent register`, the operator sets
config with the real `certfleet config set`, and the agent runs as a real process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
import signal
import stat
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certfleet.agent.handlers import resolve_handler, run_handler
from certfleet.agent.settings import AgentSettings, parse_settings
from certfleet.pki import ecies
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.store import factories, open_store
from certfleet.store.config_files import ConfigValue, delete_config_files, put_config_files
from certfleet.store.schema import ConfigScope

from .cli_run import BIN, certfleet
from .cli_run import certfleet_agent as run_agent
from .pki_checks import mode
from .server_process import ServerProcess, free_port

NAMES = ["--gateway-dns", "localhost", "--gateway-ip", "127.0.0.1"]
SECRET = "s3cr3t-api-key"


@dataclass
class Fleet:
    """A factory with a running server: the operator's side."""

    pki: Path
    db_url: str
    server: ServerProcess

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        return certfleet(*args, "--pki", str(self.pki), "--database", self.db_url, expect=expect)

    def config_set(self, scope: list[str], *assignments: str, extra: tuple = ()) -> None:
        self.cli("config", "set", *scope, *assignments, *extra, "--reason", "test")

    def register(self, folder: Path, group: str) -> str:
        token = json.loads(
            self.cli("tokens", "create", "--name", "t", "--scope", "register", "--json").stdout
        )["token"]
        done = run_agent(
            "register",
            "--server",
            f"https://127.0.0.1:{self.server.gateway_port}",
            "--factory",
            "acme",
            "--group",
            group,
            "--dir",
            str(folder),
            "--trust",
            str(self.pki / "root.crt"),
            env={"CERTFLEET_REGISTER_TOKEN": token},
        )
        return done.stdout.strip()

    def applied_versions(self, device: str) -> list[str]:
        out = self.cli(
            "events", "tail", "--json", "--topic", "DEVICE_CONFIG_APPLIED", "--device", device
        ).stdout
        return [json.loads(line)["data"]["version"] for line in out.splitlines() if line]

    def store(self, action, *args, **kwargs) -> None:
        """`action(session, factory_id, *args, **kwargs)` in one store transaction."""
        asyncio.run(_with_store(self.db_url, action, *args, **kwargs))


async def _with_store(url: str, action, *args, **kwargs) -> None:
    store = await open_store(url)
    try:
        async with store.transaction() as session:
            factory = await factories.resolve_factory(session, "acme")
            await action(session, factory.id, *args, **kwargs)
    finally:
        await store.close()


@pytest.fixture
def fleet(tmp_path):
    pki, db_url = tmp_path / "pki", f"sqlite:///{tmp_path / 'certfleet.db'}"
    certfleet("keys", "ca", "create", str(pki), "--factory", "acme", *NAMES, "--database", db_url)
    port = free_port()
    server = ServerProcess(
        "--pki", str(pki), "--database", db_url, "--listen-est", f"127.0.0.1:{port}", port=port
    )
    try:
        yield Fleet(pki, db_url, server)
    finally:
        server.stop()


@dataclass
class Agent:
    """One device's agent.toml and folders."""

    config: Path
    secrets: Path
    state: Path
    handlers: Path
    marks: Path

    def once(self, expect: int) -> str:
        done = run_agent("run", "--config", str(self.config), "--once", expect=expect)
        assert SECRET not in done.stdout + done.stderr, "a decrypted value was logged"
        return done.stderr

    def marks_of(self, name: str) -> list[str]:
        path = self.marks / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []

    def state_of(self, name: str) -> tuple[int, int]:
        info = (self.secrets / name).stat()
        return info.st_ino, info.st_mtime_ns


def marking_script(path: Path, log: Path) -> Path:
    """A handler that appends its CONFIG_FILE, first argument and the file's content to `log`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\nprintf "%s|%s|%s\\n" "$CONFIG_FILE" "$1" "$(cat "$CONFIG_FILE")" >> {log}\n'
    )
    path.chmod(0o755)
    return path


def make_agent(tmp_path: Path, sota: Path, poll_interval: float = 1) -> Agent:
    agent = Agent(
        tmp_path / "agent.toml",
        tmp_path / "secrets",
        tmp_path / "state",
        tmp_path / "handlers",
        tmp_path / "marks",
    )
    agent.marks.mkdir()
    marking_script(agent.handlers / "reload-wifi", agent.marks / "reload-wifi.log")
    marking_script(tmp_path / "elsewhere" / "evil", agent.marks / "evil.log")
    agent.config.write_text(
        f'sota_config = "{sota}"\nstate_dir = "{agent.state}"\n'
        f'secrets_dir = "{agent.secrets}"\nhandlers_dir = "{agent.handlers}"\n'
        f"poll_interval = {poll_interval}\n"
    )
    return agent


def settle() -> None:
    """Let the second of the last config change pass (Last-Modified has whole seconds)."""
    time.sleep(1.1)


# -- the daemon against a real server ----------------------------------------------------------


def test_config_files_flow_from_operator_to_device_files_and_handlers(fleet, tmp_path):
    device = fleet.register(tmp_path / "dev", "lab")
    agent = make_agent(tmp_path, tmp_path / "dev" / "sota.toml")
    evil = str(tmp_path / "elsewhere" / "evil")
    fleet.config_set(["--factory-wide"], "ntp.conf=server pool.ntp.org", extra=("--unencrypted",))
    fleet.config_set(
        ["--group", "lab"],
        "wifi=ssid=lab",
        extra=("--on-changed", str(agent.handlers / "reload-wifi"), "--on-changed", "now"),
    )
    fleet.config_set(["--device", device], f"api-key={SECRET}", extra=("--on-changed", evil))
    settle()

    # First cycle: every file written, the allowed handler run, the other refused.
    log = agent.once(expect=1)
    assert (agent.secrets / "ntp.conf").read_text() == "server pool.ntp.org"
    assert (agent.secrets / "wifi").read_text() == "ssid=lab"
    assert (agent.secrets / "api-key").read_text() == SECRET
    assert {mode(agent.secrets / n) for n in ("ntp.conf", "wifi", "api-key")} == {0o600}
    assert mode(agent.secrets) == 0o700
    assert agent.marks_of("reload-wifi") == [f"{agent.secrets / 'wifi'}|now|ssid=lab"]
    assert agent.marks_of("evil") == [], "a handler outside handlers_dir ran"
    assert "handler of api-key refused" in log and "not inside handlers_dir" in log
    local = json.loads((agent.state / "config.json").read_text())
    version = local["last_modified"]
    assert version and SECRET not in json.dumps(local), "the local copy must stay encrypted"
    assert fleet.applied_versions(device) == [version]

    # Nothing changed: 304, nothing written, no handler.
    before = {n: agent.state_of(n) for n in ("ntp.conf", "wifi", "api-key")}
    log = agent.once(expect=0)
    assert "wrote" not in log and "handler" not in log
    assert {n: agent.state_of(n) for n in before} == before
    assert len(agent.marks_of("reload-wifi")) == 1
    assert fleet.applied_versions(device) == [version]

    # One change: only that file is rewritten and only its handler runs.
    fleet.config_set(
        ["--group", "lab"],
        "wifi=ssid=lab2",
        extra=("--on-changed", str(agent.handlers / "reload-wifi"), "--on-changed", "again"),
    )
    settle()
    log = agent.once(expect=0)
    assert (agent.secrets / "wifi").read_text() == "ssid=lab2"
    assert agent.marks_of("reload-wifi")[1:] == [f"{agent.secrets / 'wifi'}|again|ssid=lab2"]
    assert agent.state_of("ntp.conf") == before["ntp.conf"]
    assert agent.state_of("api-key") == before["api-key"]
    assert "wrote wifi" in log
    assert len(fleet.applied_versions(device)) == 2

    # A deleted file is removed; a file the agent did not write is left alone.
    (agent.secrets / "not-mine").write_text("keep")
    fleet.store(delete_config_files, ConfigScope.FACTORY, "", ["ntp.conf"], changed_by="test")
    settle()
    log = agent.once(expect=0)
    assert not (agent.secrets / "ntp.conf").exists()
    assert (agent.secrets / "not-mine").read_text() == "keep"
    assert "removed ntp.conf" in log


def test_a_value_for_another_key_keeps_the_old_file(fleet, tmp_path):
    device = fleet.register(tmp_path / "dev", "lab")
    agent = make_agent(tmp_path, tmp_path / "dev" / "sota.toml")
    fleet.config_set(["--device", device], f"api-key={SECRET}", "motd=hello")
    settle()
    agent.once(expect=0)
    version = json.loads((agent.state / "config.json").read_text())["last_modified"]

    stranger = generate_private_key().public_key()
    files = {
        "api-key": ConfigValue(ecies.encrypt_b64(stranger, b"not for you")),
        "motd": ConfigValue(ecies.encrypt_b64(stranger, b"hello")),
    }
    fleet.store(put_config_files, ConfigScope.DEVICE, device, files, changed_by="test")
    fleet.config_set(["--group", "lab"], "banner=welcome", extra=("--unencrypted",))
    settle()
    log = agent.once(expect=1)
    assert "config file api-key: cannot decrypt" in log and "another key" in log
    assert (agent.secrets / "api-key").read_text() == SECRET, "the old file must stay"
    assert (agent.secrets / "banner").read_text() == "welcome"
    local = json.loads((agent.state / "config.json").read_text())
    assert local["last_modified"] == version, "a partly applied version is not kept as done"
    assert fleet.applied_versions(device) == [version]


def test_files_lost_with_a_tmpfs_are_written_again_from_the_local_copy(fleet, tmp_path):
    device = fleet.register(tmp_path / "dev", "lab")
    agent = make_agent(tmp_path, tmp_path / "dev" / "sota.toml")
    fleet.config_set(
        ["--device", device], "wifi=psk", extra=("--on-changed", "reload-wifi")
    )  # a bare name is looked up in handlers_dir
    settle()
    agent.once(expect=0)
    assert len(agent.marks_of("reload-wifi")) == 1
    for path in agent.secrets.iterdir():
        path.unlink()  # what a reboot does to /run/secrets
    log = agent.once(expect=0)
    assert "again from the local copy" in log
    assert (agent.secrets / "wifi").read_text() == "psk"
    assert len(agent.marks_of("reload-wifi")) == 2
    assert len(fleet.applied_versions(device)) == 1


def test_a_denied_device_is_told_why_and_not_hammered(fleet, tmp_path):
    device = fleet.register(tmp_path / "dev", "lab")
    agent = make_agent(tmp_path, tmp_path / "dev" / "sota.toml", poll_interval=1)
    agent.once(expect=0)
    fleet.cli("devices", "deny", device, "--reason", "stolen")
    for _ in range(20):
        done = run_agent("run", "--config", str(agent.config), "--once", expect=None)
        if done.returncode != 0:
            break
        time.sleep(0.2)
    assert done.returncode == 2, done.stderr
    assert "refuses this device's certificate" in done.stderr
    assert "deny-list" in done.stderr and "(denied)" in done.stderr
    assert "retrying will not help" in done.stderr

    # The daemon keeps saying why, once per attempt, at the poll interval (not faster).
    stderr = tmp_path / "daemon.log"
    process = start_daemon(agent.config, stderr)
    try:
        lines = wait_for_lines(stderr, "deny-list", 3, timeout=15)
    finally:
        code = stop_daemon(process)
    times = [_log_time(line) for line in lines]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.8, f"attempts {gaps} s apart: the denied device hammers the gateway"
    assert code == 0


# -- the daemon without a gateway ---------------------------------------------------------


def test_run_backs_off_while_the_gateway_is_down_and_stops_on_sigterm(tmp_path):
    sota = offline_device(tmp_path / "dev", port=free_port())
    agent = make_agent(tmp_path, sota, poll_interval=4)
    stderr = tmp_path / "daemon.log"
    process = start_daemon(agent.config, stderr)
    try:
        lines = wait_for_lines(stderr, "retry in", 4, timeout=20)
        stopped_at = time.monotonic()
    finally:
        code = stop_daemon(process)
    assert time.monotonic() - stopped_at < 3, "SIGTERM did not end the backoff sleep"
    assert code == 0
    assert "gateway unreachable" in lines[0]
    ceilings = [float(re.search(r"backoff ceiling ([\d.]+) s", line)[1]) for line in lines]
    assert ceilings == [0.5, 1.0, 2.0, 4.0]
    waits = [float(re.search(r"retry in ([\d.]+) s", line)[1]) for line in lines]
    assert all(0 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert "config daemon stopped" in stderr.read_text()


def test_once_exits_1_when_the_gateway_is_down(tmp_path):
    sota = offline_device(tmp_path / "dev", port=free_port())
    agent = make_agent(tmp_path, sota)
    log = agent.once(expect=1)
    assert "gateway unreachable" in log and "try again later" in log


def test_bad_settings_and_missing_registration_exit_2_with_the_reason(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("poll_intervall = 5\n")
    done = run_agent("run", "--config", str(bad), "--once", expect=2)
    assert "unknown setting 'poll_intervall'" in done.stderr
    agent = make_agent(tmp_path, tmp_path / "nowhere" / "sota.toml")
    assert "register the device first" in agent.once(expect=2)
    same = tmp_path / "same.toml"
    same.write_text(f'state_dir = "{tmp_path}/s"\nsecrets_dir = "{tmp_path}"\n')
    done = run_agent("run", "--config", str(same), "--once", expect=2)
    assert "must not contain state_dir" in done.stderr


def test_install_files_writes_the_unit_and_the_example(tmp_path):
    out = run_agent("install-files", "--dest", str(tmp_path / "etc")).stdout
    unit = (tmp_path / "etc" / "certfleet-agent.service").read_text()
    assert "certfleet-agent.service" in out
    assert "Restart=on-failure" in unit and "StartLimitBurst=" in unit
    assert "RestartPreventExitStatus=2" in unit
    example = (tmp_path / "etc" / "agent.toml.example").read_text()
    assert parse_settings(tomllib.loads(example)) == AgentSettings()
    again = run_agent("install-files", "--dest", str(tmp_path / "etc"), expect=2)
    assert "--force" in again.stderr


# -- handlers ----------------------------------------------------------------------------


def test_handlers_run_only_from_the_handlers_folder(tmp_path):
    handlers, marks = tmp_path / "handlers", tmp_path / "marks"
    marks.mkdir()
    good = marking_script(handlers / "good", marks / "good.log")
    outside = marking_script(tmp_path / "outside" / "x", marks / "x.log")
    (handlers / "link-out").symlink_to(outside)
    loose = marking_script(handlers / "loose", marks / "loose.log")
    loose.chmod(0o777)
    (handlers / "plain").write_text("#!/bin/sh\n")
    settings = AgentSettings(handlers_dir=handlers, secrets_dir=tmp_path)
    target = tmp_path / "file"
    target.write_text("content")

    assert resolve_handler(handlers, "good") == good
    assert resolve_handler(handlers, str(handlers / "sub" / ".." / "good")) == good
    refused = {
        str(outside): "not inside handlers_dir",
        "link-out": "not inside handlers_dir",
        "../outside/x": "not inside handlers_dir",
        "loose": "writable by group or others",
        "plain": "not an executable file",
        "missing": "does not exist",
    }
    for command, why in refused.items():
        result = run_handler(settings, "file", target, [command])
        assert result.refused and not result.ok and why in result.detail, (command, result)
    assert run_handler(settings, "file", target, "good").refused, "argv must be a list"
    assert sorted(p.name for p in marks.iterdir()) == [], "a refused handler ran"

    result = run_handler(settings, "file", target, ["good", "arg"])
    assert result.ok, result
    assert (marks / "good.log").read_text() == f"{target}|arg|content\n"


def test_a_handler_that_fails_or_hangs_is_reported(tmp_path):
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    (handlers / "fails").write_text("#!/bin/sh\nexit 3\n")
    (handlers / "hangs").write_text("#!/bin/sh\nsleep 30 &\nwait\n")
    for name in ("fails", "hangs"):
        (handlers / name).chmod(stat.S_IRWXU)
    settings = AgentSettings(handlers_dir=handlers)
    failed = run_handler(settings, "f", tmp_path / "f", ["fails"])
    assert not failed.ok and not failed.refused and failed.detail == "exited with 3"
    started = time.monotonic()
    hung = run_handler(settings, "f", tmp_path / "f", ["hangs"], timeout=0.5)
    assert not hung.ok and "killed after 0.5 s" in hung.detail
    assert time.monotonic() - started < 5


def test_renew_client_cert_is_built_in_and_never_looked_up_in_the_folder(tmp_path):
    settings = AgentSettings(
        sota_config=tmp_path / "unregistered" / "sota.toml",
        state_dir=tmp_path / "state",
        secrets_dir=tmp_path / "secrets",
        handlers_dir=tmp_path / "handlers",
    )
    target = tmp_path / "fio-rotate-certs"
    target.write_text("ESTSERVER=https://est.example\n")  # no ROTATIONID: refused by rotation
    result = run_handler(settings, "fio-rotate-certs", target, ["/usr/bin/renew-client-cert"])
    assert not result.refused, "the built-in must not need a script in handlers_dir"
    assert result.command == "/usr/bin/renew-client-cert"
    assert not result.ok and result.detail.startswith("key rotation"), result


# -- helpers -------------------------------------------------------------------------------


def offline_device(folder: Path, port: int) -> Path:
    """A device folder with a self-signed identity whose gateway port nobody listens on."""
    folder.mkdir(parents=True)
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offline")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "pkey.pem").write_bytes(private_key_pem(key))
    (folder / "pkey.pem").chmod(0o600)
    (folder / "client.pem").write_bytes(pem)
    (folder / "root.crt").write_bytes(pem)
    sota = folder / "sota.toml"
    sota.write_text(
        f'[tls]\nserver = "https://127.0.0.1:{port}"\n[import]\nbase_path = "{folder}"\n'
        'tls_cacert_path = "root.crt"\ntls_pkey_path = "pkey.pem"\n'
        'tls_clientcert_path = "client.pem"\n'
    )
    return sota


def start_daemon(config: Path, stderr: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "certfleet-agent"), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("w"),
        start_new_session=True,
    )


def wait_for_lines(path: Path, needle: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text().splitlines() if needle in line]
        if len(lines) >= count:
            return lines[:count]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} lines with {needle!r}:\n{path.read_text()}")


def stop_daemon(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError("the agent ignored SIGTERM") from None


def _log_time(line: str) -> float:
    stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def test_polls_resume_the_tls_session_until_the_credential_changes(fleet, tmp_path, caplog):
    from certfleet.agent.config_daemon import ConfigDaemon
    from certfleet.agent.settings import load_settings

    fleet.register(tmp_path / "dev", "lab")
    fleet.config_set(["--factory-wide"], "motd=hello", extra=("--unencrypted",))
    settle()
    agent = make_agent(tmp_path, tmp_path / "dev" / "sota.toml")
    daemon = ConfigDaemon(load_settings(agent.config))
    caplog.set_level(logging.DEBUG, logger="certfleet.agent.config_daemon")

    def poll() -> str:
        caplog.clear()
        report = daemon.cycle()
        assert report.status.name == "DONE", report
        [line] = [r.getMessage() for r in caplog.records if "config unchanged" in r.getMessage()]
        return line

    daemon.cycle()  # the first poll fetches the config and makes the session
    assert poll().endswith("(304, resumed TLS session)")
    assert poll().endswith("(304, resumed TLS session)")
    # A new certificate file (same bytes, new inode) means a new context, and no
    # session of the old one is offered with it.
    cert = tmp_path / "dev" / "client.pem"
    fresh = cert.with_suffix(".new")
    fresh.write_bytes(cert.read_bytes())
    fresh.replace(cert)
    assert poll().endswith("(304, full TLS handshake)")
    assert poll().endswith("(304, resumed TLS session)")
