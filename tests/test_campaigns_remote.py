"""`certfleet campaigns ...` in remote mode (the admin API of a real server) against local mode
(the store): the same JSON, the same state changes, and a clear refusal for a read-only token."""

from __future__ import annotations

from pathlib import Path

from .api_fixtures import ApiEnv, Cli, api_env  # noqa: F401
from .test_cli_devices import register

EST = "https://est.acme.example"


def create_args() -> list[str]:
    return ["campaigns", "create", "--group", "lab", "--reason", "yearly", "--est-server", EST]


async def test_campaign_commands_remote(api_env: ApiEnv, tmp_path: Path):  # noqa: F811
    env = api_env
    settings = tmp_path / "server.toml"
    settings.write_text("[campaigns]\nenabled = false\n")  # the runner would move the counts on
    env.start("--config", str(settings))
    lab = sorted(register(env, tmp_path / f"d{i}", "lab") for i in range(2))
    register(env, tmp_path / "other", "kiosk")
    cli = Cli(env)

    planned = cli.json(*create_args(), "--dryrun", remote=True)
    assert planned["dryrun"] is True and planned["campaign"] is None
    assert sorted(planned["devices"]) == lab and planned["left_out"] == {}
    assert f"ROTATIONID={planned['rotation_id']}" in planned["value"]
    assert cli.both_json("campaigns", "list") == []
    dry_text = cli.run(*create_args(), "--dryrun", remote=True).stdout
    assert "dry run: would rotate 2 device(s)" in dry_text and "nothing was changed" in dry_text

    refused = cli.run(*create_args(), remote=True, scope="read", expect=2)
    assert "needs a token with scope 'rotate'" in refused.stderr
    assert cli.both_json("campaigns", "list") == []

    made = cli.json(*create_args(), "--canary-share", "0.5", remote=True)
    campaign = made["campaign"]
    assert made["dryrun"] is False and sorted(made["devices"]) == lab
    assert len(made["canaries"]) == 1 and made["canaries"][0] in lab
    assert made["rotation_id"] == campaign["rotation_id"]
    assert made["value"] == f"ESTSERVER={EST}\nROTATIONID={campaign['rotation_id']}\n"
    assert campaign["status"] == "running" and campaign["total"] == 2
    number = str(campaign["id"])

    listed = cli.both_json("campaigns", "list")
    assert [(c["id"], c["status"]) for c in listed] == [(campaign["id"], "running")]
    shown = cli.both_json("campaigns", "show", number)
    assert sorted(d["device"] for d in shown["devices"]) == lab
    assert shown["counts"]["pending"] == 2 and shown["selector"] == {"group": "lab"}
    table = cli.run("campaigns", "show", number, remote=True, scope="read").stdout
    assert f"campaign {number} running" in table and "group lab, 2 device(s)" in table

    def status() -> str:
        return cli.json("campaigns", "show", number, remote=False)["status"]

    assert cli.run("campaigns", "pause", number, remote=True).stdout == (
        f"campaign {number} is paused\n"
    )
    assert status() == "paused"
    cli.run("campaigns", "resume", number, remote=True)
    assert status() == "running"
    no = cli.run("campaigns", "abort", number, remote=True, scope="read", expect=2)
    assert "needs a token with scope 'rotate'" in no.stderr
    assert status() == "running"
    cli.run("campaigns", "abort", number, remote=True)
    assert status() == "aborted"
    # Ended with nothing in flight: --watch draws the view once and stops.
    watched = cli.run("campaigns", "show", number, "--watch", "--every", "0.1", remote=True)
    assert f"campaign {number} aborted" in watched.stdout
    assert cli.both_json("campaigns", "show", number)["status"] == "aborted"

    missing = cli.run("campaigns", "show", "999", remote=True, scope="read", expect=2)
    assert "no campaign 999" in missing.stderr
    env.stop()
