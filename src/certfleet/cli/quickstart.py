"""`certfleet quickstart`: the end-to-end demo behind `make demo`.

Everything is real and runs on SQLite in one folder: the factory PKI,
`certfleet server` (EST, device gateway, admin API; two workers), N devices
each run by its own `certfleet-agent run` process (half registered online,
half made with an offline-CA certificate that registers on first use),
encrypted group config, a rotation campaign over the whole group during which
some agents are killed and restarted, proof that every old certificate is
refused, a breach response on the offline CA, and the events of it all.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.rule import Rule

from certfleet.fleet import campaigns as fleet_campaigns
from certfleet.fleet import config_admin, pki_admin
from certfleet.pki.errors import PkiError
from certfleet.pki.hierarchy import ServerNames
from certfleet.pki.pki_dir import PkiDir

from .common import console
from .keys_commands import show_cas
from .quickstart_fleet import Agent, manufacture, write_agent_settings
from .quickstart_flow import Device, Server, command, gateway_call, register, start_server

MARKER = ".certfleet-demo"
FACTORY = "demo"
GROUP = "lab"
KILLED = 3
CAMPAIGN_TIMEOUT_S = 600


def _fresh_dir(folder: Path) -> None:
    if folder.exists():
        if not (folder / MARKER).exists():
            raise PkiError(f"{folder} exists and was not made by quickstart; pick another --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    (folder / MARKER).write_text("made by certfleet quickstart; safe to delete\n")


def _say(text: str) -> None:
    console.print(f"  {text}", highlight=False, markup=False)


def _cli(pki: Path, db_url: str, *args: str) -> str:
    return command("certfleet", *args, "--pki", str(pki), "--database", db_url)


def _progress() -> Progress:
    return Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _wait_for(what: str, total: int, count: Callable[[], int], timeout: float = 120) -> None:
    """A progress bar until `count()` reaches `total`; PkiError on timeout."""
    deadline = time.monotonic() + timeout
    with _progress() as bar:
        task = bar.add_task(what, total=total)
        while (done := count()) < total:
            bar.update(task, completed=done)
            if time.monotonic() > deadline:
                raise PkiError(f"{what}: only {done} of {total} after {timeout:.0f} s")
            time.sleep(0.5)
        bar.update(task, completed=total)


def _online(server: Server, pki: Path, db_url: str, folder: Path, count: int) -> list[Agent]:
    token = json.loads(
        _cli(pki, db_url, "tokens", "create", "--name", "quickstart", "--scope", "register",
             "--expires-in", "1h", "--json")
    )["token"]  # fmt: skip
    agents = []
    for n in range(count):
        device = register(server, pki, token, folder / f"online-{n}", GROUP)
        agents.append(Agent(device.uuid, device.folder))
        _say(f"registered online with a token: {device.uuid} (group {GROUP})")
    return agents


def _devices(
    server: Server, pki: Path, db_url: str, folder: Path, count: int, agents: list[Agent]
) -> None:
    """Make `count` devices and start their agents; `agents` gets each as it starts."""
    online = _online(server, pki, db_url, folder, count - count // 2)
    made = [
        manufacture(PkiDir(pki), folder / f"offline-{n}", server, FACTORY)
        for n in range(count // 2)
    ]
    _say(f"{len(made)} devices made in the factory with offline-CA certificates (local-ca-1)")
    est = f"https://127.0.0.1:{server.est_port}"
    for agent in online + made:
        write_agent_settings(agent, est)
        agent.start()
        agents.append(agent)
    _say(f"{len(agents)} agents started (certfleet-agent run, polling every 2 s)")
    _wait_for("devices known to the gateway", count, lambda: _known(pki, db_url))
    for agent in made:
        asyncio.run(
            config_admin.move_to_group(
                db_url, agent.uuid, GROUP, reason="quickstart: factory-made devices", actor="cli"
            )
        )
    _say(f"the factory-made devices registered on first contact; moved to group {GROUP}")


def _known(pki: Path, db_url: str) -> int:
    return len(json.loads(_cli(pki, db_url, "devices", "list", "--local", "--json")))


def _config(pki: Path, db_url: str, agents: list[Agent]) -> None:
    _cli(pki, db_url, "config", "set", "--group", GROUP, "wifi-password=hunter2",
         "--reason", "quickstart")  # fmt: skip
    _say(f"config set for group {GROUP}: wifi-password, encrypted to each device's own key")

    def applied() -> int:
        files = [a.folder / "secrets" / "wifi-password" for a in agents]
        return sum(f.exists() and f.read_text() == "hunter2" for f in files)

    _wait_for("devices that decrypted and applied it", len(agents), applied)


def _campaign(server: Server, pki: Path, db_url: str, agents: list[Agent]) -> dict:
    made = json.loads(
        _cli(pki, db_url, "campaigns", "create", "--group", GROUP,
             "--reason", "quickstart: yearly key rotation",
             "--est-server", f"https://127.0.0.1:{server.est_port}",
             "--canary-share", "0.1", "--rate", "600/min", "--canary-deadline", "5m",
             "--device-deadline", "5m", "--json")
    )  # fmt: skip
    campaign_id = made["campaign"]["id"]
    _say(f"campaign {campaign_id}: canaries first, then waves of at most 600 devices/minute")
    return _watch(db_url, campaign_id, agents)


def _watch(db_url: str, campaign_id: int, agents: list[Agent]) -> dict:
    by_uuid = {a.uuid: a for a in agents}
    killed = False
    deadline = time.monotonic() + CAMPAIGN_TIMEOUT_S
    with _progress() as bar:
        task = bar.add_task("devices rotated", total=len(agents))
        while True:
            view = asyncio.run(
                fleet_campaigns.show_campaign(db_url, campaign_id, devices=len(agents))
            )
            bar.update(task, completed=view.counts.get("completed", 0))
            if view.status != "running" or time.monotonic() > deadline:
                break
            killed = killed or _kill_some(view.devices, by_uuid, bar)
            time.sleep(1)
    return view.as_dict()


def _kill_some(devices: list[dict], by_uuid: dict[str, Agent], bar: Progress) -> bool:
    """SIGKILL a few agents whose rotation is under way, then start them again."""
    busy = [d["device"] for d in devices if d["state"] in ("triggered", "in_progress")]
    if len(busy) < KILLED:
        return False
    victims = [by_uuid[u] for u in busy[-KILLED:]]
    for agent in victims:
        agent.kill()
    bar.console.print(
        f"  killed {len(victims)} agents mid-rotation with SIGKILL; restarting them", markup=False
    )
    time.sleep(1)
    for agent in victims:
        agent.start()
    return True


def _old_refused(server: Server, pki: Path, agents: list[Agent], old: dict[str, Path]) -> int:
    refused = 0
    for agent in agents:
        status, _, _ = gateway_call(
            server, pki, _as_device(agent), "GET", "/device",
            cert=str(old[agent.uuid] / "client.pem"), key=str(old[agent.uuid] / "pkey.pem"),
        )  # fmt: skip
        refused += status in (401, 403)
    return refused


def _new_accepted(server: Server, pki: Path, agents: list[Agent]) -> int:
    accepted = 0
    for agent in agents:
        cert_name = _sota_value(agent, "tls_clientcert_path")
        key_name = _sota_value(agent, "tls_pkey_path")
        status, _, _ = gateway_call(
            server, pki, _as_device(agent), "GET", "/device", cert=cert_name, key=key_name
        )
        accepted += status == 200
    return accepted


def _sota_value(agent: Agent, name: str) -> str:
    for line in (agent.folder / "sota.toml").read_text().splitlines():
        if line.startswith(name):
            return line.split('"')[1]
    raise PkiError(f"{agent.folder / 'sota.toml'} has no {name}")


def _as_device(agent: Agent) -> Device:
    return Device(agent.uuid, agent.folder)


def _keep_old(agents: list[Agent]) -> dict[str, Path]:
    """Copy each device's current credential aside, to prove later that it is refused."""
    kept = {}
    for agent in agents:
        folder = agent.folder / "before-rotation"
        folder.mkdir(mode=0o700)
        shutil.copy2(
            agent.folder / _sota_value(agent, "tls_clientcert_path"), folder / "client.pem"
        )
        shutil.copy2(agent.folder / _sota_value(agent, "tls_pkey_path"), folder / "pkey.pem")
        kept[agent.uuid] = folder
    return kept


def _events(pki: Path, db_url: str) -> str:
    out = _cli(pki, db_url, "events", "tail", "--json", "-n", "10000")
    topics = collections.Counter(json.loads(line)["topic"] for line in out.splitlines() if line)
    return ", ".join(f"{topic} {count}" for topic, count in sorted(topics.items()))


def _breach(server: Server, pki: Path, db_url: str, agents: list[Agent]) -> None:
    revoked = asyncio.run(pki_admin.revoke_device_ca(db_url, pki, "local-ca-1"))
    _say(f"{revoked.ca.name} revoked; CRL {revoked.crl_path}")
    _say(
        f"devices that had certificates from it: {len(revoked.affected_devices)}; "
        f"devices still accepted with their rotated credential: "
        f"{_new_accepted(server, pki, agents)}/{len(agents)}"
    )


@click.command("quickstart")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where the demo keeps its data.",
)
@click.option(
    "--devices",
    default=20,
    show_default=True,
    type=click.IntRange(4, 100),
    help="How many devices (half online, half from the offline CA), each with its own agent.",
)
def quickstart(folder: Path, devices: int) -> None:
    """Run the end-to-end demo on SQLite in a local folder."""
    folder = folder.resolve()  # agents and the server run with other working folders
    _fresh_dir(folder)
    pki, db_url = folder / "pki", f"sqlite:///{(folder / 'certfleet.db').resolve()}"
    console.print(Rule("1. factory PKI (file keys, SQLite store)"))
    names = ServerNames(gateway_dns=["localhost"], gateway_ip=["127.0.0.1"])
    show_cas(
        asyncio.run(pki_admin.create_factory(db_url, pki, FACTORY, names)),
        False,
        title=f"factory {FACTORY!r} in {pki}",
    )
    console.print(Rule("2. certfleet server: EST, device gateway, admin API; 2 workers"))
    server = start_server(pki, db_url, folder / "server.log")
    agents: list[Agent] = []
    try:
        _say(
            f"EST https://127.0.0.1:{server.est_port}  gateway "
            f"https://127.0.0.1:{server.gateway_port}  admin API "
            f"https://127.0.0.1:{server.api_port}  log {folder / 'server.log'}"
        )
        console.print(Rule(f"3. {devices} devices, each with its own agent process"))
        _devices(server, pki, db_url, folder / "devices", devices, agents)
        console.print(Rule("4. encrypted group config"))
        _config(pki, db_url, agents)
        console.print(Rule("5. rotation campaign over the group"))
        old = _keep_old(agents)
        view = _campaign(server, pki, db_url, agents)
        console.print(Rule("summary"))
        _say(f"campaign {view['id']}: {view['status']}, devices per state: {view['counts']}")
        time.sleep(1.5)  # the deny-list reaches every worker within a second
        _say(f"old certificates refused by the gateway: {_old_refused(server, pki, agents, old)}"
             f"/{len(agents)}")  # fmt: skip
        _say(f"new certificates accepted: {_new_accepted(server, pki, agents)}/{len(agents)}")
        console.print(Rule("6. breach response: revoke the offline CA nobody depends on now"))
        _breach(server, pki, db_url, agents)
        _say(f"events: {_events(pki, db_url)}")
    finally:
        for agent in agents:
            agent.stop()
        server.stop()
    _say(f"data: {folder}   store: {db_url}")
    _say(
        f"serve it again: certfleet server --pki {pki}  (admin API and dashboard on "
        f"https://127.0.0.1:8445/dashboard, trusting {pki}/root.crt; make a token with: "
        f"certfleet tokens create --name me --scope read --pki {pki})"
    )
