"""`certfleet config set/log` and `devices move` in local mode and through the admin API of
a real server, checked by what a registered device then fetches from the gateway."""

from __future__ import annotations

import base64
import json
import time

from cryptography.hazmat.primitives import serialization

from certfleet.pki import ecies
from certfleet.pki.keys import generate_private_key, pubkey_sha256, public_key_pem

from .api_fixtures import ApiEnv, api_env  # noqa: F401
from .test_cli_devices import Cli, gateway, gateway_json, register


def _decrypt(folder, value: str) -> str:
    key = serialization.load_pem_private_key((folder / "pkey.pem").read_bytes(), None)
    return ecies.decrypt_with_key(key, base64.b64decode(value)).decode()  # type: ignore[arg-type]


def _config_within(env: ApiEnv, folder, wanted: set[str], seconds: float = 5) -> dict:
    """The device's merged config once it holds the files ``wanted``."""
    deadline = time.monotonic() + seconds
    while True:
        files = gateway_json(env, folder, "/config")
        if wanted <= set(files) or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


async def test_config_and_groups_local_and_remote(api_env: ApiEnv, tmp_path):  # noqa: F811
    env = api_env
    env.start()
    folder = tmp_path / "d1"
    device = register(env, folder, "lab")
    cli = Cli(env)

    said = cli.run(
        "config", "set", "--group", "field", "wifi=field-net", "--reason", "field wifi",
        remote=True,
    ).stdout  # fmt: skip
    assert said == "config wifi set for group field\n"
    said = cli.run(
        "config", "set", "--device", device, "token=s3cret", "--on-changed", "/usr/bin/reload",
        "--reason", "device token", "--json", remote=True,
    ).stdout  # fmt: skip
    done = json.loads(said)
    assert done["scope"] == "device" and done["files"] == ["token"] and done["encrypted_to"]
    local = cli.run(
        "config", "set", "--factory-wide", "motd=hi", "--unencrypted", "--reason", "motd",
        remote=False,
    ).stdout  # fmt: skip
    assert local == "config motd set for factory acme\n"

    log = cli.both_json("config", "log", "--device", device)
    assert [(c["files"], c["reason"], c["changed_by"][:10]) for c in log] == [
        (["token"], "device token", "api:token:")
    ]
    assert [c["reason"] for c in cli.both_json("config", "log", "--group", "field")] == [
        "field wifi"
    ]
    table = cli.run("config", "log", remote=True, scope="read").stdout
    assert "motd" in table and "cli" in table

    files = gateway_json(env, folder, "/config")
    assert "wifi" not in files and files["motd"]["Value"] == "hi"
    assert _decrypt(folder, files["token"]["Value"]) == "s3cret"
    assert files["token"]["OnChanged"] == ["/usr/bin/reload"]

    moved = cli.run(
        "devices", "move", device, "--group", "field", "--reason", "shipped", remote=True
    ).stdout  # fmt: skip
    assert moved == f"device {device} moved to group field\n"
    files = _config_within(env, folder, {"wifi"})
    assert _decrypt(folder, files["wifi"]["Value"]) == "field-net"
    same = cli.run(
        "devices", "move", device, "--group", "field", "--reason", "again", remote=False
    ).stdout  # fmt: skip
    assert same == f"device {device} is in group field already\n"
    assert cli.both_json("devices", "show", device)["group"] == "field"

    refused = [
        (("config", "set", "--device", "nope", "a=b", "--reason", "r"), "HTTP 400"),
        (("config", "set", "--group", "g", "bad/name=b", "--reason", "r"), "HTTP 400"),
        (("devices", "move", device, "--group", "x" * 200, "--reason", "r"), "HTTP 400"),
    ]
    before = cli.both_json("config", "log", "--device", device)
    for args, status in refused:
        done = cli.run(*args, remote=True, expect=2)
        assert status in done.stderr, done.stderr
    assert cli.both_json("config", "log", "--device", device) == before
    read_only = cli.run(
        "config", "set", "--factory-wide", "a=b", "--reason", "r", remote=True, scope="read",
        expect=2,
    )  # fmt: skip
    assert "needs a token with scope 'rotate'" in read_only.stderr
    env.stop()


async def test_devices_unlock_withdraws_the_next_key_local_and_remote(api_env: ApiEnv, tmp_path):  # noqa: F811
    env = api_env
    env.start()
    cli = Cli(env)
    folder = tmp_path / "d1"
    device = register(env, folder, "lab")
    for remote in (True, False):
        key = generate_private_key().public_key()
        assert gateway(env, folder, "PATCH", "/device", {"next_pubkey": public_key_pem(key)}) == 200
        locked = cli.run(
            "config", "set", "--device", device, "a=b", "--reason", "r", remote=remote, expect=2
        )  # fmt: skip
        assert "or `certfleet devices unlock` ends the rotation" in " ".join(locked.stderr.split())

        said = cli.run("devices", "unlock", device, "--reason", "device lost", remote=remote)
        assert said.stdout == (
            f"device {device} unlocked: next key sha256 {pubkey_sha256(key)} withdrawn\n"
        )
        view = gateway_json(env, folder, "/device")
        assert not view["config_locked"] and view["next_pubkey_sha256"] is None
        cli.run("config", "set", "--device", device, "a=b", "--reason", "r", remote=remote)

    again = cli.json("devices", "unlock", device, "--reason", "again", remote=True)
    assert again == {"uuid": device, "unlocked": False, "withdrawn_pubkey_sha256": None}
    nothing = cli.run("devices", "unlock", device, "--reason", "again", remote=False)
    assert "has no next key announced" in nothing.stdout
    refused = [
        (("devices", "unlock", "nope", "--reason", "r"), "HTTP 400"),
        (("devices", "unlock", device, "--reason", " "), "give a reason of 1 to 1000"),
    ]
    for args, reason in refused:
        assert reason in cli.run(*args, remote=True, expect=2).stderr
    read_only = cli.run(
        "devices", "unlock", device, "--reason", "r", remote=True, scope="read", expect=2
    )
    assert "needs a token with scope 'rotate'" in read_only.stderr
    env.stop()
