"""GET /metrics of a real `certfleet server` over loopback TLS, on SQLite and PostgreSQL: every
gauge against what the API answers or what the test put in, curl as Prometheus, refusals."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from certfleet.store import outbox
from certfleet.store.schema import Campaign, CampaignDevice, OutboxEvent, utcnow

from .api_fixtures import ApiEnv, add_device, api_env  # noqa: F401

EST = "https://est.acme.example"
DAY = dt.timedelta(days=1)
OLD_EVENT_AGE = 600.0


def scrape(env: ApiEnv, scope: str = "read") -> dict[str, dict[tuple, float]]:
    """One scrape, parsed: family name -> {sorted label pairs: value}."""
    answer = env.call("GET", "/metrics", scope=scope)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(answer.body.decode())


def parse(text: str) -> dict[str, dict[tuple, float]]:
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = found.setdefault(family.name, {})
        for sample in family.samples:
            samples[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _labels(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


async def _seed_devices(env: ApiEnv) -> None:
    """Devices in every expiry bucket, one deleted, one locked, one that will miss renewal."""
    now = utcnow()
    for days, group in ((3, "lab"), (5, "lab"), (20, "lab"), (60, "kiosk"), (200, "kiosk")):
        await add_device(env.store, not_after=now + days * DAY, group=group)
    await add_device(env.store, not_after=now + 200 * DAY, group="old")
    await add_device(env.store, not_after=now - DAY, group="gone")
    await add_device(env.store, not_after=now + 10 * DAY, deleted=True)
    await add_device(env.store, not_after=now + 100 * DAY, locked=True)
    await add_device(env.store, not_after=None, group=None)
    await add_device(env.store, not_after=now + 10 * DAY, last_seen=now - 40 * DAY, group=None)


def _campaign(env: ApiEnv, group: str) -> int:
    body = {"group": group, "reason": "metrics test", "est_server": EST}
    answer = env.call("POST", "/v1/campaigns", scope="rotate", body=body)
    assert answer.status == 201, answer.body
    return answer.json()["id"]


async def _seed_campaigns(env: ApiEnv) -> tuple[int, int, int]:
    """Running (one failed, one completed device), aborted now, aborted two days ago."""
    running, recent, old = _campaign(env, "lab"), _campaign(env, "kiosk"), _campaign(env, "old")
    for number in (recent, old):
        assert env.call("POST", f"/v1/campaigns/{number}/abort", scope="rotate").status == 200
    async with env.store.transaction() as session:
        await session.execute(
            update(Campaign).where(Campaign.id == old).values(finished_at=utcnow() - 2 * DAY)
        )
        devices = list(
            await session.scalars(
                select(CampaignDevice.id).where(CampaignDevice.campaign_id == running)
            )
        )
        for row, state in zip(devices, ("failed", "completed"), strict=False):
            await session.execute(
                update(CampaignDevice).where(CampaignDevice.id == row).values(state=state)
            )
    return running, recent, old


async def _seed_rest(env: ApiEnv) -> None:
    """Two deny-list entries through the API and an outbox event queued ten minutes ago."""
    for _ in range(2):
        body = {"sha256": secrets.token_hex(32), "reason": "metrics test"}
        assert env.call("POST", "/v1/denylist", scope="rotate", body=body).status == 200
    async with env.store.transaction() as session:
        event = await outbox.append_event(session, "test.old", {})
        event.created_at = utcnow() - dt.timedelta(seconds=OLD_EVENT_AGE)


def _count_devices(env: ApiEnv, query: str) -> int:
    answer = env.call("GET", f"/v1/devices?limit=1000&{query}", scope="read")
    assert answer.status == 200 and answer.json()["next"] is None, answer.body
    return len(answer.json()["items"])


def _check_devices(env: ApiEnv, got: dict[str, dict[tuple, float]]) -> None:
    statuses = {labels[0][1]: value for labels, value in got["certfleet_devices"].items()}
    assert statuses == {
        status: _count_devices(env, f"status={status}")
        for status in ("deleted", "no-cert", "denied", "expired", "rotating", "active")
    }
    put_in = {"deleted": 1, "no-cert": 1, "denied": 0, "expired": 1, "rotating": 1, "active": 7}
    assert statuses == put_in
    report = env.call("GET", "/v1/reports/expiry", scope="read").json()
    buckets = report["device_certs"]
    expiring = {
        labels[0][1]: v for labels, v in got["certfleet_device_certificates_expiring"].items()
    }
    assert expiring == {
        "expired": buckets["expired"],
        "7d": buckets["week"],
        "30d": buckets["week"] + buckets["month"],
        "90d": buckets["week"] + buckets["month"] + buckets["quarter"],
    }
    # What the test put in: -1d; 3d, 5d; 10d, 20d; 60d (the deleted device's 10d not counted).
    assert expiring == {"expired": 1, "7d": 2, "30d": 4, "90d": 5}
    assert expiring["30d"] == _count_devices(env, "expiring_within=30d")
    assert got["certfleet_devices_missing_renewal"][()] == report["will_miss_renewal"]["count"] == 1


def _check_cas(env: ApiEnv, got: dict[str, dict[tuple, float]]) -> None:
    cas = env.call("GET", "/v1/cas", scope="read").json()["items"]
    expected = {
        _labels(ca=ca["name"], factory=ca["factory"], kind=ca["kind"], status=ca["status"]): (
            dt.datetime.fromisoformat(ca["not_after"]).timestamp()
        )
        for ca in cas
    }
    assert got["certfleet_ca_certificate_expiry_timestamp_seconds"] == expected
    assert len(expected) >= 3


def _check_campaigns(env: ApiEnv, got: dict[str, dict[tuple, float]], shown: list[int]) -> None:
    info = got["certfleet_campaign_info"]
    expected_info = {}
    expected_devices = {}
    for number in shown:
        campaign = env.call("GET", f"/v1/campaigns/{number}", scope="read").json()
        expected_info[(("campaign", str(number)), ("status", campaign["status"]))] = 1
        for state, count in campaign["counts"].items():
            expected_devices[(("campaign", str(number)), ("state", state))] = count
    assert info == expected_info
    assert got["certfleet_campaign_devices"] == expected_devices
    running = str(shown[0])
    assert expected_info[(("campaign", running), ("status", "running"))] == 1
    assert expected_devices[(("campaign", running), ("state", "failed"))] == 1
    assert expected_devices[(("campaign", running), ("state", "completed"))] == 1


async def _check_store_gauges(env: ApiEnv, got: dict[str, dict[tuple, float]]) -> None:
    assert got["certfleet_denylist_entries"][()] == 2
    async with env.store.transaction() as session:
        undelivered = await session.scalar(
            select(func.count()).where(OutboxEvent.delivered_at.is_(None))
        )
    assert got["certfleet_outbox_undelivered_events"][()] == undelivered
    assert undelivered >= 3  # the campaigns', the deny-list's and the test's events
    age = got["certfleet_outbox_oldest_undelivered_age_seconds"][()]
    assert OLD_EVENT_AGE <= age < OLD_EVENT_AGE + 120
    assert 0 < got["certfleet_metrics_scrape_duration_seconds"][()] < 30


async def test_metrics_match_the_api(api_env: ApiEnv, tmp_path: Path):  # noqa: F811
    env = api_env
    await _seed_devices(env)
    settings = tmp_path / "server.toml"
    settings.write_text("[campaigns]\nenabled = false\n")  # the runner would move the counts on
    env.start("--workers", "2", "--config", str(settings))
    running, recent, _old = await _seed_campaigns(env)
    await _seed_rest(env)

    got = scrape(env)
    _check_devices(env, got)
    _check_cas(env, got)
    _check_campaigns(env, got, [running, recent])
    await _check_store_gauges(env, got)
    env.stop()


async def test_an_open_campaign_shows_behind_any_number_of_newer_ended_ones(
    api_env: ApiEnv,  # noqa: F811
    tmp_path: Path,
):
    env = api_env
    await add_device(env.store, not_after=utcnow() + 200 * DAY, group="lab")
    settings = tmp_path / "server.toml"
    settings.write_text("[campaigns]\nenabled = false\n")
    env.start("--config", str(settings))
    running = _campaign(env, "lab")
    async with env.store.transaction() as session:
        template = await session.get(Campaign, running)
        assert template is not None
        ended = utcnow() - 2 * DAY
        session.add_all(
            Campaign(
                factory_id=template.factory_id,
                rotation_id=f"certs-ended-{i}",
                reason="ended long ago",
                selector={"group": "lab"},
                est_server=EST,
                canary_share=0.0,
                rate_per_minute=1,
                failure_threshold=0.1,
                canary_deadline_s=60,
                device_deadline_s=60,
                offline_after_s=60,
                status="aborted",
                created_by="test",
                finished_at=ended,
            )
            for i in range(600)
        )
    info = scrape(env)["certfleet_campaign_info"]
    assert info == {_labels(campaign=str(running), status="running"): 1}
    env.stop()


async def test_metrics_when_nothing_is_queued(api_env: ApiEnv):  # noqa: F811
    env = api_env
    env.start()
    got = scrape(env, scope="pki-admin")
    assert got["certfleet_outbox_undelivered_events"][()] == 0
    assert got["certfleet_outbox_oldest_undelivered_age_seconds"][()] == 0
    assert got["certfleet_campaign_info"] == {} and got["certfleet_denylist_entries"][()] == 0
    assert set(got["certfleet_devices"].values()) == {0}
    env.stop()


async def test_curl_scrapes_with_a_bearer_token(api_env: ApiEnv):  # noqa: F811
    env = api_env
    await add_device(env.store, not_after=utcnow() + 3 * DAY)
    env.start()
    done = subprocess.run(
        [
            "curl", "-sS", "--fail", "--cacert", str(env.pki / "root.crt"),
            "-H", f"Authorization: Bearer {env.tokens['read']}",
            f"{env.api_url}/metrics",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = parse(done.stdout)
    assert got["certfleet_device_certificates_expiring"][(("within", "7d"),)] == 1
    assert got["certfleet_devices"][(("status", "active"),)] == 1
    env.stop()


async def test_metrics_refusals_change_nothing_and_log_no_token(api_env: ApiEnv):  # noqa: F811
    env = api_env
    env.start()
    before = await env.snapshot()
    missing = env.call("GET", "/metrics", scope=None)
    assert missing.status == 401 and missing.json()["error"] == "unauthorized"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = env.call("GET", "/metrics", scope="register")
    assert wrong.status == 403 and "scope 'read'" in wrong.json()["message"]
    bad = env.call("GET", "/metrics?x=1", scope="read")
    assert bad.status == 400 and "unknown query parameter 'x'" in bad.json()["message"]
    assert env.call("POST", "/metrics", scope="pki-admin").status == 405
    assert await env.snapshot() == before

    operation = env.call("GET", "/openapi.json", scope=None).json()["paths"]["/metrics"]["get"]
    assert operation["x-certfleet-scope"] == "read"
    assert set(operation["responses"]["200"]["content"]) == {"text/plain"}
    assert {"400", "401", "403"} <= set(operation["responses"])
    out = env.stop()  # and stop() checks no token reached the log
    assert "GET /metrics" in out
