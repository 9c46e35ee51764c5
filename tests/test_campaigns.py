"""Rotation campaigns against a real server and store, devices played over real HTTPS.

The tests drive `CampaignRunner` ticks themselves with a clock they move on,
so that rates and deadlines take no waiting; the server's own runner is off
except in the test that checks the server runs it.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request

import pytest

from certfleet.fleet import campaigns as campaigns_admin
from certfleet.fleet.campaigns import CampaignRunner
from certfleet.store import devices as device_rows
from certfleet.store import open_store
from certfleet.store.campaigns import try_runner_lock
from certfleet.store.schema import Ca, Certificate, Device, OutboxEvent

from .campaign_devices import NAMES, Clock, Fleet, start_fleet
from .cli_run import certfleet


@pytest.fixture
def fleet(tmp_path, db_url):
    started = start_fleet(tmp_path, db_url)
    try:
        yield started
    finally:
        started.server.stop()


@pytest.fixture
async def store(fleet):
    opened = await open_store(fleet.db_url)
    try:
        yield opened
    finally:
        await opened.close()


def create(fleet: Fleet, *args: str, expect: int = 0) -> dict:
    est = f"https://127.0.0.1:{fleet.server.port}/.well-known/est"
    done = fleet.cli(
        "campaigns", "create", "--reason", "yearly rotation", "--est-server", est, "--json", *args,
        expect=expect,
    )  # fmt: skip
    return json.loads(done.stdout) if expect == 0 else {"stderr": done.stderr}


async def states(store, campaign_id: int) -> dict[str, str]:
    view = await campaigns_admin.campaign_view(store, campaign_id, devices=1000)
    return {item["device"]: item["state"] for item in view.devices}


async def status(store, campaign_id: int) -> tuple[str, str | None]:
    view = await campaigns_admin.campaign_view(store, campaign_id)
    return view.status, view.status_reason


async def topics(store, prefix: str = "CAMPAIGN_") -> list[str]:
    from sqlalchemy import select

    async with store.transaction() as session:
        rows = await session.scalars(select(OutboxEvent.topic).order_by(OutboxEvent.id))
        return [topic for topic in rows if topic.startswith(prefix)]


async def test_canaries_go_first_then_waves_at_the_rate(fleet, store):
    devs = fleet.register(5)
    plan = create(fleet, "--group", "lab", "--canary-share", "0.2", "--rate", "2/min")
    campaign = plan["campaign"]["id"]
    assert plan["canaries"] and len(plan["canaries"]) == 1
    canary = next(d for d in devs if d.uuid == plan["canaries"][0])
    others = [d for d in devs if d is not canary]
    clock = Clock()
    runner = CampaignRunner(store, now=clock)

    assert all(d.rotation_file() is None for d in devs)
    await runner.tick()
    assert (await states(store, campaign))[canary.uuid] == "triggered"
    assert [d.rotation_file() is not None for d in others] == [False] * 4
    order = canary.rotation_file()
    assert order["ROTATIONID"] == plan["rotation_id"]
    assert order["ESTSERVER"].endswith("/.well-known/est") and "PKEYIDS" not in order

    clock.advance(seconds=61)
    await runner.tick()  # the canary is not done: the waves wait
    assert sum(d.rotation_file() is not None for d in others) == 0
    canary.rotate()
    await runner.tick()
    seen = await states(store, campaign)
    assert seen[canary.uuid] == "completed"
    first_wave = [d for d in others if seen[d.uuid] == "triggered"]
    assert len(first_wave) == 2  # 2/min: the canary was triggered more than a minute ago

    clock.advance(seconds=30)
    await runner.tick()
    assert sum(s == "triggered" for s in (await states(store, campaign)).values()) == 2
    clock.advance(seconds=31)
    await runner.tick()
    assert set((await states(store, campaign)).values()) == {"completed", "triggered"}

    first_wave[0].report(first_wave[0].rotation_file()["ROTATIONID"], "CertRotationStarted")
    await runner.tick()
    assert (await states(store, campaign))[first_wave[0].uuid] == "in_progress"
    for device in others:
        device.rotate()
    await runner.tick()
    assert set((await states(store, campaign)).values()) == {"completed"}
    assert await status(store, campaign) == ("completed", None)
    assert await topics(store) == ["CAMPAIGN_CREATED", "CAMPAIGN_COMPLETED"]
    shown = fleet.cli("campaigns", "show", str(campaign)).stdout
    assert "completed" in shown and "done" in shown and "5/5" in shown


async def test_a_failed_canary_aborts_and_retry_failed_runs_it_again(fleet, store):
    devs = fleet.register(3)
    plan = create(fleet, "--group", "lab", "--canary-share", "0.3")
    campaign = plan["campaign"]["id"]
    canary = next(d for d in devs if d.uuid in plan["canaries"])
    runner = CampaignRunner(store, now=Clock())
    await runner.tick()
    first = canary.fail_rotation()
    await runner.tick()

    state, why = await status(store, campaign)
    assert state == "aborted" and "1 of 1 devices tried failed" in why
    seen = await states(store, campaign)
    assert seen[canary.uuid] == "failed"
    assert sorted(s for u, s in seen.items() if u != canary.uuid) == ["pending", "pending"]
    assert await topics(store) == [
        "CAMPAIGN_CREATED", "CAMPAIGN_DEVICE_FAILED", "CAMPAIGN_ABORTED",
    ]  # fmt: skip
    await runner.tick()
    assert sum(d.rotation_file() is not None for d in devs) == 1  # aborted: nobody else

    done = fleet.cli("campaigns", "retry-failed", str(campaign))
    assert "is running: 1 failed device(s) pending again" in done.stdout
    await runner.tick()
    second = canary.rotation_file()["ROTATIONID"]
    assert second != first  # a device runs each rotation id once
    canary.rotate()
    await runner.tick()
    await runner.tick()
    for device in devs:
        if device is not canary:
            device.rotate()
    await runner.tick()
    assert await status(store, campaign) == ("completed", None)


async def test_a_canary_that_does_not_come_back_in_time_aborts(fleet, store):
    devs = fleet.register(2)
    plan = create(fleet, "--all", "--canary-share", "0.5", "--canary-deadline", "30m")
    campaign = plan["campaign"]["id"]
    clock = Clock()
    runner = CampaignRunner(store, now=clock)
    await runner.tick()
    clock.advance(minutes=29)
    await runner.tick()
    assert (await status(store, campaign))[0] == "running"
    clock.advance(minutes=2)
    await runner.tick()
    state, why = await status(store, campaign)
    assert state == "aborted"
    assert why == (
        f"canary device {plan['canaries'][0]} did not come back with a new certificate within 30m"
    )
    assert sum(d.rotation_file() is not None for d in devs) == 1


async def test_pause_resume_and_abort(fleet, store):
    devs = fleet.register(3)
    campaign = create(fleet, "--group", "lab", "--canary-share", "0")["campaign"]["id"]
    runner = CampaignRunner(store, now=Clock())
    assert "is paused" in fleet.cli("campaigns", "pause", str(campaign)).stdout
    await runner.tick()
    assert set((await states(store, campaign)).values()) == {"pending"}
    refused = fleet.cli("campaigns", "pause", str(campaign), expect=2)
    assert "campaign" in refused.stderr and "is paused" in refused.stderr
    assert "is running" in fleet.cli("campaigns", "resume", str(campaign)).stdout
    await runner.tick()
    assert set((await states(store, campaign)).values()) == {"triggered"}
    assert "is aborted" in fleet.cli("campaigns", "abort", str(campaign)).stdout
    devs[0].rotate()
    await runner.tick()  # triggered devices are still watched after an abort
    seen = await states(store, campaign)
    assert seen[devs[0].uuid] == "completed"
    assert (await status(store, campaign)) == ("aborted", "aborted by cli")
    again = fleet.cli("campaigns", "resume", str(campaign), expect=2)
    assert "is aborted; it can be running only when paused" in again.stderr
    missing = fleet.cli("campaigns", "show", "999", expect=2)
    assert "no campaign 999" in missing.stderr
    listed = json.loads(fleet.cli("campaigns", "list", "--json").stdout)
    assert [c["id"] for c in listed] == [campaign] and listed[0]["counts"]["completed"] == 1


async def test_devices_not_seen_for_too_long_are_skipped(fleet, store):
    devs = fleet.register(3)
    async with store.transaction() as session:
        await device_rows.mark_seen(session, devs[1].uuid, Clock()() - _days(8))
    plan = create(fleet, "--group", "lab", "--canary-share", "0", "--offline-after", "7d")
    runner = CampaignRunner(store, now=Clock())
    await runner.tick()
    seen = await states(store, plan["campaign"]["id"])
    assert seen[devs[1].uuid] == "skipped_offline"
    assert seen[devs[0].uuid] == seen[devs[2].uuid] == "triggered"
    assert devs[1].rotation_file() is None
    view = await campaigns_admin.campaign_view(store, plan["campaign"]["id"], devices=10)
    detail = next(d["detail"] for d in view.devices if d["device"] == devs[1].uuid)
    assert detail.startswith("last seen ")


async def test_a_device_changing_its_key_waits_and_is_not_triggered(fleet, store):
    from certfleet.pki.keys import generate_private_key, public_key_pem

    devs = fleet.register(2)
    status_code, body = devs[0].call(
        "PATCH", "/device", {"next_pubkey": public_key_pem(generate_private_key().public_key())}
    )
    assert status_code == 200, body
    campaign = create(fleet, "--group", "lab", "--canary-share", "0")["campaign"]["id"]
    runner = CampaignRunner(store, now=Clock())
    await runner.tick()
    view = await campaigns_admin.campaign_view(store, campaign, devices=10)
    locked = next(d for d in view.devices if d["device"] == devs[0].uuid)
    assert locked["state"] == "pending" and locked["detail"].startswith("waiting: ")
    assert devs[0].rotation_file() is None and devs[1].rotation_file() is not None


async def test_breach_campaign_moves_devices_to_the_new_ca(fleet, store):
    online = fleet.register(1)[0]
    breached = [fleet.offline_device(), fleet.offline_device()]
    dry = fleet.cli(
        "campaigns", "create", "--reissue-from-ca", "local-ca-1", "--to-ca", "online-ca",
        "--reason", "local-ca-1 key leaked", "--est-server", "https://est.acme.example",
        "--dryrun",
    ).stdout  # fmt: skip
    assert "would rotate 2 device(s)" in dry and online.uuid not in dry
    assert all(d.uuid in dry for d in breached) and "nothing was changed" in dry
    bad = create(fleet, "--reissue-from-ca", "local-ca-1", "--to-ca", "local-ca-1", expect=2)
    assert "--to-ca must differ" in bad["stderr"]
    plan = create(
        fleet, "--reissue-from-ca", "local-ca-1", "--to-ca", "online-ca", "--canary-share", "0.5"
    )
    campaign = plan["campaign"]["id"]
    assert sorted(plan["devices"]) == sorted(d.uuid for d in breached)
    runner = CampaignRunner(store, now=Clock())
    await runner.tick()
    canary = next(d for d in breached if d.uuid in plan["canaries"])
    canary.rotate()
    await runner.tick()
    other = next(d for d in breached if d is not canary)
    other.rotate()
    await runner.tick()
    assert await status(store, campaign) == ("completed", None)
    assert set((await states(store, campaign)).values()) == {"completed"}
    assert await _issuers(store, [d.uuid for d in breached]) == {"online-ca"}

    revoked = fleet.cli("keys", "ca", "revoke-device-ca", "local-ca-1")
    assert "revoked" in revoked.stdout
    for device in breached:
        assert device.call("GET", "/device")[0] == 200  # they left the revoked CA in time
    late = create(fleet, "--reissue-from-ca", "local-ca-1", "--to-ca", "online-ca", expect=2)
    assert "is revoked" in late["stderr"]


async def test_the_server_runs_the_campaign_runner(tmp_path, db_url):
    started = start_fleet(tmp_path, db_url, runner="tick_interval = 0.2")
    try:
        devs = started.register(2)
        plan = create(started, "--group", "lab", "--canary-share", "0")
        deadline = time.monotonic() + 30
        while sum(d.rotation_file() is not None for d in devs) < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"the server's runner triggered nobody: {started.server.stop()[1]}")
            time.sleep(0.2)
        for device in devs:
            device.rotate()
        token = json.loads(
            started.cli("tokens", "create", "--name", "ops", "--scope", "read", "--json").stdout
        )["token"]
        url = f"https://127.0.0.1:{started.server.api_port}/v1/campaigns/{plan['campaign']['id']}"
        trust = ssl.create_default_context(cafile=str(started.pki / "root.crt"))
        while True:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10, context=trust) as answer:
                view = json.loads(answer.read())
            if view["status"] == "completed":
                break
            assert time.monotonic() < deadline + 20, view
            time.sleep(0.2)
        assert view["counts"]["completed"] == 2
    finally:
        started.server.stop()


async def test_one_runner_ticks_at_a_time_on_postgresql(fleet, store):
    if not fleet.db_url.startswith("postgresql"):
        pytest.skip("SQLite serializes write transactions by itself")
    async with store.transaction() as session:
        assert await try_runner_lock(session)
        other = await open_store(fleet.db_url)
        try:
            assert await CampaignRunner(other).tick() is False
        finally:
            await other.close()
    assert await CampaignRunner(store).tick() is True


def test_server_refuses_bad_campaign_settings(tmp_path):
    pki = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(pki), "--factory", "acme", *NAMES)
    settings = tmp_path / "server.toml"
    settings.write_text("[campaigns]\ntick_interval = 0\n")
    done = certfleet("server", "--pki", str(pki), "--config", str(settings), expect=2)
    assert "[campaigns] settings: campaigns.tick_interval 0 must be between 0.1 and 3600 s" in (
        done.stderr
    )


def _days(count: int):
    import datetime as dt

    return dt.timedelta(days=count)


async def _issuers(store, uuids: list[str]) -> set[str]:
    from sqlalchemy import select

    async with store.transaction() as session:
        query = (
            select(Ca.name)
            .join(Certificate, Certificate.issuer_ca_id == Ca.id)
            .join(Device, Device.current_cert_id == Certificate.id)
            .where(Device.uuid.in_(uuids))
        )
        return set(await session.scalars(query))
