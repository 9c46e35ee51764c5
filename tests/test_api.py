"""The admin API of a real `certfleet server` (2 workers) over loopback TLS, on SQLite and
PostgreSQL: tokens and scopes, refusals that change nothing, pagination, the OpenAPI document."""

from __future__ import annotations

import datetime as dt
import http.client
import socket
import ssl
import subprocess
import time
import uuid

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate
from sqlalchemy import select, update

from certfleet.api import auth
from certfleet.api.app import make_api_app
from certfleet.api.openapi import build_document
from certfleet.fleet import tokens_admin
from certfleet.fleet.device_views import encode_cursor
from certfleet.store import config_files, factories, updates
from certfleet.store.schema import (
    ApiToken,
    AuditEntry,
    ConfigScope,
    DenylistEntry,
    Device,
    utcnow,
)

from .api_fixtures import ApiEnv, add_device, api_env  # noqa: F401
from .cli_run import BIN, certfleet
from .server_process import free_port

NOW = utcnow()
LIVE = 23
EST = "https://est.acme.example:8443/.well-known/est"


async def _seed(env: ApiEnv) -> tuple[list[str], str]:
    """LIVE devices (some in group 'kiosk', some expiring soon) and one deleted device."""
    live = []
    for i in range(LIVE):
        days = 10 if i % 3 == 0 else 200
        group = "kiosk" if i % 4 == 0 else "lab"
        live.append(
            await add_device(env.store, not_after=NOW + dt.timedelta(days=days), group=group)
        )
    deleted = await add_device(env.store, not_after=NOW + dt.timedelta(days=10), deleted=True)
    return live, deleted


def _walk(env: ApiEnv, query: str, limit: int) -> tuple[list[str], int]:
    """Every uuid of a listing, page by page; and the number of pages."""
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        suffix = f"&cursor={cursor}" if cursor else ""
        answer = env.call("GET", f"/v1/devices?limit={limit}{query}{suffix}", scope="read")
        assert answer.status == 200, answer.body
        page = answer.json()
        pages += 1
        assert len(page["items"]) <= limit
        seen += [item["uuid"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            return seen, pages


async def _updates_walk(env: ApiEnv, device: str) -> None:
    """Seven updates of a device come back newest first, three to a page."""
    async with env.store.transaction() as session:
        for n in range(7):
            await updates.start_update(
                session, device, f"certs-{1795471560 + n}", kind="cert-rotation"
            )
    seen: list[str] = []
    cursor = ""
    while cursor is not None:
        answer = env.call("GET", f"/v1/devices/{device}/updates?limit=3{cursor}", scope="read")
        assert answer.status == 200, answer.body
        page = answer.json()
        seen += [item["correlation_id"] for item in page["items"]]
        cursor = f"&cursor={page['next']}" if page["next"] else None
    assert seen == [f"certs-{1795471560 + n}" for n in reversed(range(7))]


async def test_scopes_pages_and_workers(api_env: ApiEnv):  # noqa: F811
    env = api_env
    live, deleted = await _seed(env)
    env.start("--workers", "2")

    for scope in ("read", "rotate", "pki-admin"):
        answer = env.call("GET", "/v1/devices?limit=1", scope=scope)
        assert answer.status == 200 and len(answer.json()["items"]) == 1

    seen, pages = _walk(env, "", 5)
    assert seen == sorted(live) and len(set(seen)) == LIVE and pages == 5
    kiosk, _ = _walk(env, "&group=kiosk", 2)
    assert kiosk == sorted(u for i, u in enumerate(live) if i % 4 == 0)
    soon, _ = _walk(env, "&expiring_within=30d&status=active", 3)
    assert soon == sorted(u for i, u in enumerate(live) if i % 3 == 0)
    gone, _ = _walk(env, "&status=deleted", 10)
    assert gone == [deleted]
    await _updates_walk(env, live[2])

    # The kernel hands each new connection to whichever worker accepts first,
    # so it may take a while until both have answered.
    workers: set[str] = set()
    deadline = time.monotonic() + 20
    while len(workers) < 2 and time.monotonic() < deadline:
        workers.add(env.call("GET", "/v1/cas", scope="read").headers["X-Certfleet-Worker"])
    assert len(workers) == 2, "both workers serve the API"

    before = await env.snapshot()
    assert env.call("DELETE", f"/v1/devices/{live[0]}", scope="read").status == 403
    assert (
        env.call(
            "POST", f"/v1/devices/{live[0]}/deny", scope="register", body={"reason": "x"}
        ).status
        == 403
    )
    assert await env.snapshot() == before

    answer = env.call(
        "POST", f"/v1/devices/{live[0]}/deny", scope="rotate", body={"reason": "lost"}
    )
    assert answer.status == 200 and [e["device"] for e in answer.json()] == [live[0]]
    answer = env.call("DELETE", f"/v1/devices/{live[1]}?reason=scrapped", scope="pki-admin")
    assert answer.status == 200 and answer.json()["uuid"] == live[1]
    async with env.store.transaction() as session:
        actors = {
            (row.action, row.actor)
            for row in await session.scalars(
                select(AuditEntry).where(AuditEntry.target.in_(live[:2]))
            )
        }
        assert ("denylist.add", "api:token:2:test-rotate") in actors
        assert ("device.delete", "api:token:3:test-pki-admin") in actors
        denied = await session.scalars(select(DenylistEntry.device_uuid))
        assert set(denied) == {live[0], live[1]}
        row = await session.get(Device, live[1])
        assert row.deleted_at is not None
    env.stop()


async def test_tokens_that_do_not_open_the_api(api_env: ApiEnv):  # noqa: F811
    env = api_env
    revoked = await tokens_admin.create_token(env.store, "gone", ["read"], dt.timedelta(days=1))
    await tokens_admin.revoke_token(env.store, revoked.info.id)
    expired = await tokens_admin.create_token(env.store, "old", ["read"], dt.timedelta(days=1))
    async with env.store.transaction() as session:
        await session.execute(
            update(ApiToken).where(ApiToken.id == expired.info.id).values(expires_at=utcnow())
        )
    env.tokens |= {"revoked": revoked.token, "expired": expired.token}
    env.start()
    before = await env.snapshot()
    cases = [
        ({}, "Authorization: Bearer"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "must be 'Bearer <token>'"),
        ({"Authorization": "Bearer"}, "must be 'Bearer <token>'"),
        ({"Authorization": "Bearer cft_" + "A" * 43}, "unknown API token"),
        ({"Authorization": "Bearer " + "x" * 5000}, "unknown API token"),
        ({"Authorization": f"Bearer {revoked.token}"}, "was revoked"),
        ({"Authorization": f"Bearer {expired.token}"}, "expired"),
    ]
    for headers, reason in cases:
        answer = env.call("GET", "/v1/devices", scope=None, headers=headers)
        assert answer.status == 401, (headers, answer.body)
        assert reason in answer.json()["message"]
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    answer = env.call("GET", "/v1/devices", scope="register")
    assert answer.status == 403 and "scope 'read'" in answer.json()["message"]
    assert await env.snapshot() == before
    out = env.stop()
    assert "refused 401" in out and "refused 403" in out


def _bad_inputs(live: str, deleted: str, locked: str) -> list[tuple[str, str, dict, int, str]]:
    """(method, path, request, status, part of the reason)."""
    unknown = str(uuid.uuid4())
    return [
        *_bad_device_inputs(live, deleted, unknown),
        *_bad_rotations(live, deleted, locked, unknown),
        *_bad_denials(),
        *_bad_campaign_inputs(),
        *_bad_config_inputs(live, deleted, locked),
    ]


def _bad_device_inputs(
    live: str, deleted: str, unknown: str
) -> list[tuple[str, str, dict, int, str]]:
    deny = f"/v1/devices/{live}/deny"
    return [
        ("GET", "/v1/devices?limit=0", {}, 400, "limit='0' must be a whole number from 1 to 1000"),
        ("GET", "/v1/devices?limit=ten", {}, 400, "limit='ten'"),
        ("GET", "/v1/devices?limit=1001", {}, 400, "from 1 to 1000"),
        ("GET", "/v1/devices?status=sleeping", {}, 400, "unknown status 'sleeping'"),
        ("GET", "/v1/devices?expiring_within=soon", {}, 400, "not a positive duration"),
        ("GET", "/v1/devices?expiring_within=0d", {}, 400, "not a positive duration"),
        ("GET", "/v1/devices?expiring_within=545840w", {}, 400, "longer than 36500d"),
        ("GET", "/v1/devices?expiring_within=%D9%A3d", {}, 400, "not a positive duration"),
        ("GET", "/v1/reports/expiry?renewal_window=99999999999d", {}, 400, "longer than 36500d"),
        ("GET", "/v1/devices?cursor=bm9wZQ", {}, 400, "cursor is not one this API gave out"),
        ("GET", "/v1/devices?colour=red", {}, 400, "unknown query parameter 'colour'"),
        ("GET", "/v1/devices?group=%00", {}, 400, "the URL has 'group': a NUL character"),
        ("GET", f"/v1/devices/{live}/updates/a%00b", {}, 400, "a NUL character"),
        ("POST", deny, {"raw": b'{"reason": "x\\ud800"}'}, 400, "an unpaired surrogate"),
        ("GET", "/v1/devices?group=a&group=b", {}, 400, "'group' is given twice"),
        ("GET", "/v1/devices/not-a-uuid", {}, 400, "is not a device uuid"),
        ("GET", f"/v1/devices/{unknown}", {}, 404, f"no device {unknown}"),
        ("GET", f"/v1/devices/{live}/updates/certs-1", {}, 404, "has no update certs-1"),
        ("GET", f"/v1/devices/{live}/updates?cursor={encode_cursor(live)}", {}, 400, "cursor"),
        ("GET", f"/v1/devices/{live}/updates?limit=-1", {}, 400, "limit='-1'"),
        ("GET", "/v1/nope", {}, 404, "is not an API path"),
        ("PUT", "/v1/devices", {}, 405, "takes GET, not PUT"),
        ("GET", "/v1/reports/expiry?not_seen=-3d", {}, 400, "not_seen='-3d'"),
        ("POST", deny, {"raw": b"{not json"}, 400, "the body must be JSON"),
        ("POST", deny, {"body": ["lost"]}, 400, "must be a JSON object"),
        ("POST", deny, {"body": {}}, 400, "field 'reason' is missing"),
        ("POST", deny, {"body": {"reason": 7}}, 400, "field 'reason' is missing or not a str"),
        ("POST", deny, {"body": {"reason": "  "}}, 400, "give a reason"),
        ("POST", deny, {"body": {"reason": "x", "by": "me"}}, 400, "unknown field(s) by"),
        ("POST", deny, {"raw": b"{" + b" " * 70000 + b"}"}, 413, "over this API's limit"),
        ("DELETE", f"/v1/devices/{unknown}", {}, 404, f"no device {unknown}"),
        ("DELETE", f"/v1/devices/{deleted}", {}, 409, "was already deleted"),
        ("DELETE", f"/v1/devices/{live}?reason=", {}, 400, "give a reason"),
        ("DELETE", f"/v1/devices/{live}?why=x", {}, 400, "unknown query parameter 'why'"),
    ]


def _bad_rotations(
    live: str, deleted: str, locked: str, unknown: str
) -> list[tuple[str, str, dict, int, str]]:
    """POST /v1/devices/{uuid}/rotate-certs: each refused before anything is stored."""
    rotate = f"/v1/devices/{live}/rotate-certs"

    def body(**fields: object) -> dict:
        return {"body": {"reason": "yearly", "est_server": EST, **fields}}

    return [
        ("POST", rotate, {"body": {"reason": "yearly"}}, 400, "give 'est_server' URL"),
        ("POST", rotate, body(est_server="http://est.example"), 400, "must be an https:// URL"),
        ("POST", rotate, body(est_server=None), 400, "field 'est_server' must be a str"),
        ("POST", rotate, body(hsm_pkey_ids="01", hsm_cert_ids="03,09"), 400, "two different hex"),
        ("POST", rotate, body(hsm_pkey_ids="01,07"), 400, "give 'hsm_pkey_ids' and 'hsm_cert"),
        ("POST", rotate, body(dryrun="yes"), 400, "field 'dryrun' must be a bool"),
        ("POST", rotate, body(when="now"), 400, "unknown field(s) when"),
        ("POST", rotate, body(reason=" "), 400, "give a reason of 1 to 1000"),
        ("POST", rotate, body(reason="r" * 1001), 400, "give a reason of 1 to 1000"),
        ("POST", rotate, body(reason="two\nlines"), 400, "printable characters on one line"),
        ("POST", rotate, {"body": {"est_server": EST}}, 400, "field 'reason' is missing"),
        ("POST", rotate + "?now=1", body(), 400, "unknown query parameter 'now'"),
        ("POST", "/v1/devices/nope/rotate-certs", body(), 400, "'nope' is not a device uuid"),
        ("POST", f"/v1/devices/{unknown}/rotate-certs", body(), 404, f"no device {unknown}"),
        ("POST", f"/v1/devices/{deleted}/rotate-certs", body(), 404, "(or it was deleted)"),
        ("POST", f"/v1/devices/{locked}/rotate-certs", body(), 409, "in the middle of a key"),
        (
            "POST",
            f"/v1/devices/{locked}/rotate-certs",
            body(dryrun=True),
            409,
            "it gets no new rotation until it connects with its new key",
        ),
        ("GET", rotate, {}, 405, "takes POST, not GET"),
    ]


def _bad_denials() -> list[tuple[str, str, dict, int, str]]:
    """POST /v1/denylist."""
    path = "/v1/denylist"
    return [
        ("POST", path, {"body": {"serial": "ab"}}, 400, "field 'reason' is missing"),
        ("POST", path, {"body": {"reason": "x"}}, 400, "exactly one of the fields 'serial'"),
        (
            "POST",
            path,
            {"body": {"reason": "x", "serial": "ab", "sha256": "cd"}},
            400,
            "exactly one of the fields 'serial' and 'sha256'",
        ),
        (
            "POST",
            path,
            {"body": {"reason": "x", "serial": "zz-1"}},
            400,
            "not a certificate serial",
        ),
        ("POST", path, {"body": {"reason": "x", "serial": "a" * 41}}, 400, "1 to 40 hex digits"),
        ("POST", path, {"body": {"reason": "x", "serial": 12}}, 400, "'serial' must be a str"),
        ("POST", path, {"body": {"reason": "x", "sha256": "abc"}}, 400, "not a SHA-256"),
        ("POST", path, {"body": {"reason": " ", "serial": "ab"}}, 400, "give a reason of 1 to"),
        ("POST", path, {"body": {"reason": "x", "device": "d"}}, 400, "unknown field(s) device"),
        (
            "POST",
            path,
            {"body": {"reason": "x", "serial": "0xABCDEF"}},
            404,
            "no certificate with serial 0xABCDEF is known",
        ),
    ]


def _bad_campaign_inputs() -> list[tuple[str, str, dict, int, str]]:
    """The campaign routes, now declared endpoints, refuse as before."""
    return [
        ("GET", "/v1/campaigns?limit=0", {}, 400, "limit='0' must be a whole number"),
        ("GET", "/v1/campaigns/x", {}, 400, "campaign id 'x' must be a whole number"),
        ("GET", "/v1/campaigns/%C2%B2", {}, 400, "must be a whole number from 1 to 2147483647"),
        ("GET", "/v1/campaigns/" + "9" * 20, {}, 400, "must be a whole number from 1 to"),
        ("GET", "/v1/campaigns/0", {}, 400, "must be a whole number from 1 to"),
        ("GET", "/v1/devices?limit=%C2%B2", {}, 400, "must be a whole number from 1 to 1000"),
        ("GET", "/v1/campaigns/999", {}, 404, "no campaign 999"),
        ("POST", "/v1/campaigns/999/pause", {}, 404, "no campaign 999"),
        ("POST", "/v1/campaigns/1/explode", {}, 404, "is not an API path"),
        ("POST", "/v1/campaigns", {"body": {"group": "lab", "colour": 1}}, 400, "unknown field"),
        (
            "POST",
            "/v1/campaigns",
            {"body": {"group": "lab", "reason": "x" * 1001, "est_server": EST}},
            400,
            "it is kept in the campaign and its events",
        ),
        (
            "POST",
            "/v1/campaigns",
            {"body": {"group": "lab", "reason": "r", "est_server": EST, "rate_per_minute": 0}},
            400,
            "'rate_per_minute' 0/min must be at least 1/min",
        ),
        (
            "POST",
            "/v1/campaigns",
            {"body": {"group": "lab", "reason": "r", "est_server": EST, "offline_after": "9" * 9}},
            400,
            "offline_after='999999999' is not a positive duration",
        ),
        (
            "POST",
            "/v1/campaigns",
            {"body": {"group": "lab", "reason": "r", "est_server": EST, "offline_after": "36500d"}},
            400,
            "'offline_after' must be at most 365 days",
        ),
        (
            "POST",
            "/v1/campaigns",
            {"body": {"group": "lab", "reason": "r", "est_server": EST, "rate_per_minute": 10**12}},
            400,
            "'rate_per_minute' 1000000000000/min must be at most 100000/min",
        ),
        (
            "POST",
            "/v1/campaigns",
            {"body": {"group": "lab", "reason": "r", "est_server": EST, "device_deadline": "1e9w"}},
            400,
            "device_deadline='1e9w' is not a positive duration",
        ),
    ]


def _bad_config_inputs(
    live: str, deleted: str, locked: str
) -> list[tuple[str, str, dict, int, str]]:
    """POST /v1/config, GET /v1/config/log and POST /v1/devices/{uuid}/group."""

    def put(**fields: object) -> dict:
        return {
            "body": {"scope": "group", "key": "lab", "files": {"a": "b"}, "reason": "r", **fields}
        }

    move = f"/v1/devices/{live}/group"
    return [
        ("POST", "/v1/config", put(scope="fleet"), 400, "scope 'fleet' is not one of"),
        ("POST", "/v1/config", put(scope="factory"), 400, "give 'key' (the group or device"),
        ("POST", "/v1/config", put(key=None), 400, "field 'key' must be a str"),
        ("POST", "/v1/config", put(files={}), 400, "give at least one NAME=VALUE"),
        ("POST", "/v1/config", put(files={"a/b": "c"}), 400, "a/b"),
        ("POST", "/v1/config", put(files={"a": 1}), 400, "file 'a': its value must be a string"),
        ("POST", "/v1/config", put(files=["a"]), 400, "field 'files' is missing or not a dict"),
        ("POST", "/v1/config", put(on_changed=[""]), 400, "'on_changed' must be a list"),
        ("POST", "/v1/config", put(reason=" "), 400, "give a reason of 1 to 1000"),
        ("POST", "/v1/config", put(reason="\x1b[31mred"), 400, "it is kept in the config log"),
        ("POST", "/v1/config", put(colour=1), 400, "unknown field(s) colour"),
        ("POST", "/v1/config", put(files={"a": "b\x00"}), 400, "a string with a NUL character"),
        ("POST", "/v1/config", put(key="lab\udc80"), 400, "a string with an unpaired surrogate"),
        ("POST", "/v1/config", put(scope="device", key=deleted), 404, deleted),
        ("POST", "/v1/config", put(scope="device", key=locked), 409, "is rotating its key"),
        ("GET", "/v1/config/log?limit=0", {}, 400, "limit='0' must be a whole number"),
        ("GET", f"/v1/config/log?device={live}&group=lab", {}, 400, "not both"),
        ("POST", move, {"body": {"group": "x" * 129, "reason": "r"}}, 400, "at most 128"),
        ("POST", move, {"body": {"reason": "r"}}, 400, "field 'group' is missing"),
        (
            "POST",
            f"/v1/devices/{deleted}/group",
            {"body": {"group": "g", "reason": "r"}},
            404,
            deleted,
        ),
        ("POST", f"/v1/devices/{locked}/unlock", {"body": {}}, 400, "field 'reason' is missing"),
        ("POST", f"/v1/devices/{locked}/unlock", {"body": {"reason": " "}}, 400, "give a reason"),
        ("POST", f"/v1/devices/{live}/unlock", {"body": {"reason": "é" * 1001}}, 400, "1 to 1000"),
        ("POST", move, {"body": {"group": "g", "reason": "a\tb"}}, 400, "give a reason of"),
        ("POST", f"/v1/devices/{deleted}/unlock", {"body": {"reason": "r"}}, 404, deleted),
        ("POST", "/v1/devices/nope/unlock", {"body": {"reason": "r"}}, 400, "not a device uuid"),
    ]


async def test_bad_input_is_refused_with_a_reason_and_changes_nothing(api_env: ApiEnv):  # noqa: F811
    env = api_env
    live = await add_device(env.store, not_after=NOW + dt.timedelta(days=90))
    deleted = await add_device(env.store, not_after=NOW + dt.timedelta(days=90), deleted=True)
    locked = await add_device(env.store, not_after=NOW + dt.timedelta(days=90), locked=True)
    env.start()
    cases = _bad_inputs(live, deleted, locked)
    assert len(cases) >= 12
    before = await env.snapshot()
    for method, path, request, status, reason in cases:
        answer = env.call(method, path, **request)
        assert answer.status == status, (method, path, answer.body)
        error = answer.json()
        assert reason in error["message"], (path, error)
        assert "\n" not in error["message"]
        assert error["request_id"] == answer.headers["X-Request-ID"]
    assert await env.snapshot() == before
    answer = env.call("GET", "/v1/cas", headers={"X-Request-ID": "trace-42"})
    assert answer.status == 200 and answer.headers["X-Request-ID"] == "trace-42"
    assert answer.headers["Content-Type"].startswith("application/json")
    env.stop()


async def test_rotate_certs_and_deny_by_serial_through_the_api(api_env: ApiEnv):  # noqa: F811
    env = api_env
    device = await add_device(env.store, not_after=NOW + dt.timedelta(days=90))
    other = await add_device(env.store, not_after=NOW + dt.timedelta(days=90))
    env.start()
    path = f"/v1/devices/{device}/rotate-certs"
    body = {"reason": "yearly", "est_server": EST, "hsm_pkey_ids": "1,07", "hsm_cert_ids": "03,9"}

    before = await env.snapshot()
    assert env.call("POST", path, scope="read", body=body).status == 403
    dry = env.call("POST", path, scope="rotate", body={**body, "dryrun": True})
    assert dry.status == 200, dry.body
    planned = dry.json()
    assert planned["dryrun"] is True and planned["device"] == device
    assert planned["file"] == "fio-rotate-certs" and planned["rotation_id"].startswith("certs-")
    assert planned["on_changed"] == ["/usr/share/certfleet-agent/handlers/renew-client-cert"]
    after = await env.snapshot()
    # Only the token's last use moves: a dry run stores nothing.
    assert {**after, "api_tokens": None} == {**before, "api_tokens": None}

    done = env.call("POST", path, scope="rotate", body=body)
    assert done.status == 200, done.body
    result = done.json()
    assert result["dryrun"] is False
    assert result["value"] == (
        f"ESTSERVER={EST}\nROTATIONID={result['rotation_id']}\nPKEYIDS=01,07\nCERTIDS=03,09\n"
    )
    async with env.store.transaction() as session:
        factory = (await factories.get_factory(session, "acme")).id
        files = await config_files.list_config_files(session, factory, ConfigScope.DEVICE, device)
        assert [(f.name, f.value) for f in files] == [("fio-rotate-certs", result["value"])]
        assert not await config_files.list_config_files(session, factory, ConfigScope.DEVICE, other)
        audited = await session.scalars(
            select(AuditEntry).where(AuditEntry.target == f"device:{device}")
        )
        assert [(a.action, a.actor) for a in audited] == [("config.set", "api:token:2:test-rotate")]

    serial = env.call("GET", f"/v1/devices/{other}", scope="read").json()["cert"]["serial"]
    deny = {"serial": serial.upper(), "reason": "stolen"}
    assert env.call("POST", "/v1/denylist", scope="read", body=deny).status == 403
    answer = env.call("POST", "/v1/denylist", scope="rotate", body=deny)
    assert answer.status == 200, answer.body
    assert [(e["serial"], e["device"], e["new"]) for e in answer.json()] == [(serial, other, True)]
    again = env.call("POST", "/v1/denylist", scope="rotate", body={**deny, "reason": "again"})
    assert [(e["new"], e["reason"]) for e in again.json()] == [(False, "stolen")]
    unseen = "ab" * 32
    foreign = env.call("POST", "/v1/denylist", body={"sha256": unseen, "reason": "seen on a bench"})
    assert [(e["sha256"], e["device"]) for e in foreign.json()] == [(unseen, None)]
    async with env.store.transaction() as session:
        denied = {
            row.cert_sha256: row.device_uuid for row in await session.scalars(select(DenylistEntry))
        }
        assert denied == {answer.json()[0]["sha256"]: other, unseen: None}
        actors = await session.scalars(
            select(AuditEntry.actor).where(AuditEntry.action == "denylist.add")
        )
        assert sorted(actors) == ["api:token:2:test-rotate", "api:token:3:test-pki-admin"]
    assert env.call("GET", f"/v1/devices/{other}", scope="read").json()["status"] == "denied"
    env.stop()


async def test_openapi_document_is_valid_and_complete(api_env: ApiEnv):  # noqa: F811
    env = api_env
    env.start()
    answer = env.call("GET", "/openapi.json", scope=None)
    assert answer.status == 200
    document = answer.json()
    validate(document)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in make_api_app(env.store).router.routes()
    }
    listed = {(method, path) for path, item in document["paths"].items() for method in item}
    assert listed == served
    assert ("get", "/v1/devices/{uuid}/updates/{correlation_id}") in listed
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path == "/openapi.json":
                assert "security" not in operation
            else:
                assert operation["security"] == [{"bearer": []}], (method, path)
                assert operation["x-certfleet-scope"] in ("read", "rotate", "pki-admin")
    assert document["paths"]["/v1/devices"]["get"]["x-certfleet-scope"] == "read"
    names = {p["name"] for p in document["paths"]["/v1/devices"]["get"]["parameters"]}
    assert names == {"group", "status", "expiring_within", "limit", "cursor"}
    _check_written_routes(document["paths"], document["components"]["schemas"])
    env.stop()


def _check_written_routes(paths: dict, components: dict) -> None:
    """Routes that change things list their scope, body and answers; campaigns included."""

    def schema(ref: dict) -> dict:
        return components[ref["$ref"].rsplit("/", 1)[1]]

    rotate = paths["/v1/devices/{uuid}/rotate-certs"]["post"]
    assert rotate["x-certfleet-scope"] == "rotate"
    body = schema(rotate["requestBody"]["content"]["application/json"]["schema"])
    assert body["required"] == ["reason"] and set(body["properties"]) == {
        "reason", "est_server", "hsm_pkey_ids", "hsm_cert_ids", "dryrun",
    }  # fmt: skip
    answer = schema(rotate["responses"]["200"]["content"]["application/json"]["schema"])
    assert "rotation_id" in answer["properties"] and {"404", "409"} <= set(rotate["responses"])
    deny = paths["/v1/denylist"]["post"]
    assert deny["x-certfleet-scope"] == "rotate"
    body = schema(deny["requestBody"]["content"]["application/json"]["schema"])
    assert set(body["properties"]) == {"serial", "sha256", "reason"}

    for action in ("pause", "resume", "abort", "retry-failed"):
        change = paths[f"/v1/campaigns/{{id}}/{action}"]["post"]
        assert change["x-certfleet-scope"] == "rotate" and "409" in change["responses"]
        assert [p["name"] for p in change["parameters"]] == ["id"]
    create = paths["/v1/campaigns"]["post"]
    body = schema(create["requestBody"]["content"]["application/json"]["schema"])
    assert {"group", "all", "reissue_from_ca", "to_ca", "dryrun"} <= set(body["properties"])
    assert {"200", "201"} <= set(create["responses"])
    created = schema(create["responses"]["201"]["content"]["application/json"]["schema"])
    assert {"rotation_id", "counts", "settings"} <= set(created["properties"])
    listing = paths["/v1/campaigns"]["get"]
    assert listing["x-certfleet-scope"] == "read"
    assert [p["name"] for p in listing["parameters"]] == ["limit"]
    shown = paths["/v1/campaigns/{id}"]["get"]
    assert [p["name"] for p in shown["parameters"]] == ["id", "devices"]
    assert schema(shown["responses"]["200"]["content"]["application/json"]["schema"]) == created


async def test_extra_routes_get_auth_errors_and_a_document_entry(api_env: ApiEnv):  # noqa: F811
    env = api_env

    @auth.requires("rotate")
    async def start_extra(request: web.Request) -> web.Response:
        """Start something extra."""
        return web.json_response({"started": True})

    app = make_api_app(env.store, extra_routes=[web.post("/v1/extra-test", start_extra)])
    document = build_document(app, [])
    validate(document)
    entry = document["paths"]["/v1/extra-test"]["post"]
    assert entry["summary"] == "Start something extra." and entry["x-certfleet-scope"] == "rotate"
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": f"Bearer {env.tokens['read']}"}
        refused = await client.post("/v1/extra-test", headers=headers)
        assert refused.status == 403 and "scope 'rotate'" in (await refused.json())["message"]
        headers = {"Authorization": f"Bearer {env.tokens['rotate']}"}
        assert (await client.post("/v1/extra-test", headers=headers)).status == 200


def _server(env: ApiEnv, *args: str) -> subprocess.CompletedProcess:
    """`certfleet server ARGS` expected to refuse to start."""
    return subprocess.run(
        [
            str(BIN / "certfleet"),
            "server",
            "--pki",
            str(env.pki),
            "--database",
            env.db_url,
            "--listen-est",
            f"127.0.0.1:{free_port()}",
            "--listen-gateway",
            f"127.0.0.1:{free_port()}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_malformed_request_is_one_info_line_not_a_traceback(api_env: ApiEnv):  # noqa: F811
    env = api_env
    env.start()
    assert env.server is not None
    context = ssl.create_default_context(cafile=str(env.pki / "root.crt"))
    with socket.create_connection(("127.0.0.1", env.server.api_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v1/cas HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n")
            answer = tls.recv(65536)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer
    out = env.stop()
    assert "refused with 400 as malformed HTTP: Invalid header value char" in out, out
    assert "Traceback" not in out and "ERROR" not in out, out


async def test_plain_http_only_on_loopback(api_env: ApiEnv):  # noqa: F811
    env = api_env
    refused = _server(env, "--listen-api", f"0.0.0.0:{free_port()}", "--api-plain-http")
    assert refused.returncode == 2
    assert "plain HTTP only on a loopback address, not 0.0.0.0" in refused.stderr
    clash = _server(env, "--listen-api", "127.0.0.1:1", "--listen-gateway", "127.0.0.1:1")
    assert clash.returncode == 2 and "listen_api must differ" in clash.stderr
    config = env.pki.parent / "server.toml"
    config.write_text('[api]\ntls = "no"\n')
    wrong = _server(env, "--config", str(config))
    assert wrong.returncode == 2 and "api setting tls = 'no' has the wrong type" in wrong.stderr
    config.write_text("[api]\nmax_body = 10\n")
    unknown = _server(env, "--config", str(config))
    assert unknown.returncode == 2 and "unknown api setting(s) max_body" in unknown.stderr
    env.start("--api-plain-http")
    connection = http.client.HTTPConnection("127.0.0.1", env.server.api_port, timeout=30)
    connection.request(
        "GET", "/v1/devices", headers={"Authorization": f"Bearer {env.tokens['read']}"}
    )
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b'{"items":[],"next":null}'
    connection.close()
    env.stop()


def test_cli_in_remote_mode_needs_a_token(tmp_path):
    config = tmp_path / "cli.toml"
    config.write_text('server = "https://127.0.0.1:9"\n')
    env = {"CERTFLEET_CLI_CONFIG": str(config), "CERTFLEET_TOKEN": ""}
    done = certfleet("devices", "list", "--json", env=env, expect=2)
    assert "no API token for https://127.0.0.1:9" in done.stderr
