"""End to end: a campaign run by the server rotates three devices running the real agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from cryptography import x509

from .campaign_devices import Dev, Fleet, start_fleet
from .cli_run import BIN


def start_agent(device: Dev) -> subprocess.Popen:
    """`certfleet-agent run` for a registered device folder, polling every second."""
    settings = device.folder / "agent.toml"
    settings.write_text(
        f'sota_config = "{device.folder / "sota.toml"}"\n'
        f'state_dir = "{device.folder / "state"}"\n'
        f'secrets_dir = "{device.folder / "secrets"}"\n'
        f'handlers_dir = "{device.folder / "handlers"}"\n'
        "poll_interval = 1.0\npoll_jitter_share = 0.0\nrestart_commands = []\n"
        "[renewal]\nenabled = false\n"
    )
    log = (device.folder / "agent.log").open("w")
    return subprocess.Popen(
        [str(BIN / "certfleet-agent"), "run", "--config", str(settings)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
        start_new_session=True,
    )


def current_serial(fleet: Fleet, device: Dev) -> str:
    status, body = device.call("GET", "/device")
    assert status == 200, body
    return json.loads(body)["cert"]["serial"]


def test_three_agents_rotate_in_a_campaign(tmp_path):
    fleet = start_fleet(
        tmp_path, f"sqlite:///{tmp_path / 'certfleet.db'}", runner="tick_interval = 0.5"
    )
    agents: list[subprocess.Popen] = []
    try:
        devs = fleet.register(3)
        before = {d.uuid: current_serial(fleet, d) for d in devs}
        agents = [start_agent(d) for d in devs]
        est = f"https://127.0.0.1:{fleet.server.port}"
        made = json.loads(
            fleet.cli(
                "campaigns", "create", "--group", "lab", "--reason", "e2e", "--est-server", est,
                "--canary-share", "0.34", "--json",
            ).stdout
        )  # fmt: skip
        campaign = made["campaign"]["id"]
        deadline = time.monotonic() + 180
        while True:
            view = json.loads(fleet.cli("campaigns", "show", str(campaign), "--json").stdout)
            if view["status"] != "running":
                break
            assert time.monotonic() < deadline, (view, _logs(devs))
            time.sleep(2)
        assert view["status"] == "completed", (view, _logs(devs))
        assert view["counts"]["completed"] == 3, (view, _logs(devs))
        for device in devs:
            sota = (device.folder / "sota.toml").read_text()
            cert_name = next(
                line.split('"')[1] for line in sota.splitlines() if "tls_clientcert_path" in line
            )
            cert = x509.load_pem_x509_certificate((device.folder / cert_name).read_bytes())
            assert f"{cert.serial_number:x}" != before[device.uuid]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGTERM)
                agent.wait(timeout=30)
        fleet.server.stop()


def _logs(devs: list[Dev]) -> str:
    return "\n".join((d.folder / "agent.log").read_text()[-2000:] for d in devs)
