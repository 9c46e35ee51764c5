"""The read-only dashboard of a real `certfleet server` (loopback TLS, real tokens), on SQLite
and PostgreSQL: cookie sign-in, pages that match the API, HTML refusals, nothing logged."""

from __future__ import annotations

import datetime as dt
import html
import http.client
import logging
import re
import ssl
import subprocess
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.cookies import SimpleCookie

from aiohttp.test_utils import TestClient, TestServer

from certfleet.api.app import make_api_app
from certfleet.fleet import tokens_admin
from certfleet.store import updates
from certfleet.store.schema import utcnow

from .api_fixtures import ApiEnv, add_device, add_short_ca, api_env  # noqa: F401

NOW = utcnow()
EST = "https://est.acme.example:8443/.well-known/est"
SCRIPT_GROUP = "<script>alert(1)</script>"
COOKIE = "certfleet_dashboard"
REASON = "certfleet_dashboard_reason"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class Page:
    status: int
    headers: http.client.HTTPMessage
    text: str

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []

    def cookie(self, name: str) -> str | None:
        """The raw Set-Cookie header for ``name``, if the answer sets it."""
        return next((c for c in self.set_cookies if c.startswith(f"{name}=")), None)


@dataclass
class Browser:
    """A client that keeps cookies by hand and never follows redirects."""

    env: ApiEnv
    plain: bool = False
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Page:
        assert self.env.server is not None
        port = self.env.server.api_port
        if self.plain:
            connection: http.client.HTTPConnection = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=30
            )
        else:
            context = ssl.create_default_context(cafile=str(self.env.pki / "root.crt"))
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        sent = dict(headers)
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            page = Page(response.status, response.headers, response.read().decode())
        finally:
            connection.close()
        assert page.status < 500, (method, path, page.text)
        for raw in page.set_cookies:
            for name, morsel in SimpleCookie(raw).items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return page

    def get(self, path: str) -> Page:
        return self.request("GET", path)

    def login(self, token: str, **headers: str) -> Page:
        body = urllib.parse.urlencode({"token": token}).encode()
        return self.request("POST", "/dashboard/login", body, **FORM, **headers)


def reason(page: Page) -> str:
    """The one-line reason an error or login page shows."""
    found = re.search(r'id="reason">([^<]*)<', page.text)
    assert found, page.text
    return html.unescape(found.group(1))


def figure(page: Page, name: str) -> str:
    found = re.search(rf'id="{name}">([^<]*)<', page.text)
    assert found, (name, page.text)
    return found.group(1)


def uuids(page: Page) -> list[str]:
    return re.findall(r'href="/dashboard/devices/([0-9a-f-]{36})"', page.text)


def all_devices(env: ApiEnv, query: str = "") -> list[str]:
    """Every uuid /v1/devices lists for ``query``."""
    seen: list[str] = []
    cursor = ""
    while cursor is not None:
        answer = env.call("GET", f"/v1/devices?limit=1000{query}{cursor}", scope="read")
        assert answer.status == 200, answer.body
        seen += [item["uuid"] for item in answer.json()["items"]]
        cursor = f"&cursor={answer.json()['next']}" if answer.json()["next"] else None
    return seen


async def _seed(env: ApiEnv) -> dict[str, list[str]]:
    """Devices in groups lab and kiosk, with a range of expiries and states."""
    made: dict[str, list[str]] = {"lab": [], "kiosk": [], "script": [], "other": []}
    short = await add_short_ca(env.store, "short-ca", NOW + dt.timedelta(days=20))
    for days in (5, 20, 60, 200, 400):
        made["lab"].append(await add_device(env.store, not_after=NOW + dt.timedelta(days=days)))
    for days in (45, 300):
        kiosk = await add_device(env.store, not_after=NOW + dt.timedelta(days=days), group="kiosk")
        made["kiosk"].append(kiosk)
    made["script"].append(
        await add_device(env.store, not_after=NOW + dt.timedelta(days=90), group=SCRIPT_GROUP)
    )
    old = NOW - dt.timedelta(days=60)
    made["other"] += [
        await add_device(env.store, not_after=NOW - dt.timedelta(days=3)),
        await add_device(env.store, not_after=None),
        await add_device(env.store, not_after=NOW + dt.timedelta(days=10), last_seen=old),
        await add_device(env.store, not_after=NOW + dt.timedelta(days=100), deleted=True),
        # Outlives the CA that signed it: the report's "CAs expiring before their certs".
        await add_device(
            env.store, not_after=NOW + dt.timedelta(days=200), issuer_ca_id=short.id, group="b"
        ),
    ]
    return made


def start(env: ApiEnv, *extra: str) -> None:
    """The server without its campaign runner, so that campaign counts stay put."""
    settings = env.pki.parent / "server.toml"
    settings.write_text("[campaigns]\nenabled = false\n")
    env.start("--config", str(settings), *extra)


async def test_sign_in_and_every_page_shows_what_the_api_says(api_env: ApiEnv):  # noqa: F811
    env = api_env
    made = await _seed(env)
    start(env)
    created = env.call(
        "POST",
        "/v1/campaigns",
        scope="rotate",
        body={"group": "kiosk", "reason": "yearly <rotation>", "est_server": EST},
    )
    assert created.status == 201, created.body
    campaign = created.json()
    browser = Browser(env)

    # No cookie: to the login page, which says why.
    page = browser.get("/dashboard")
    assert page.status == 303 and page.headers["Location"] == "/dashboard/login"
    assert browser.cookies.get(REASON) and COOKIE not in browser.cookies
    page = browser.get("/dashboard/login")
    assert page.status == 200 and "read scope" in reason(page)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert REASON not in browser.cookies, "the reason is shown once"

    # Bad tokens: the login page with the reason, and no cookie.
    for token, status, why in (
        ("cft_" + "A" * 43, 401, "unknown API token"),
        (env.tokens["register"], 403, "needs a token with scope 'read'"),
    ):
        page = browser.login(token)
        assert page.status == status and why in reason(page), page.text
        assert '<form method="post" action="/dashboard/login">' in page.text
        assert "Sign out" not in page.text, "a refused sign-in shows no signed-in header"
        assert page.cookie(COOKIE) is None and COOKIE not in browser.cookies

    page = browser.login(env.tokens["read"])
    assert page.status == 303 and page.headers["Location"] == "/dashboard"
    flags = [part.strip().lower() for part in page.cookie(COOKIE).split(";")]
    assert {"httponly", "secure", "samesite=strict", "path=/dashboard"} <= set(flags), flags
    assert browser.cookies[COOKIE] == env.tokens["read"]

    _check_overview(env, browser.get("/dashboard"), campaign["id"])
    _check_devices(env, browser, made)
    await _check_device_page(env, browser, made["lab"][0])
    _check_campaigns(env, browser, campaign["id"])
    assert "/dashboard" not in str(env.call("GET", "/openapi.json", scope=None).json()["paths"])
    env.stop()


def _check_overview(env: ApiEnv, page: Page, campaign: int) -> None:
    assert page.status == 200, page.text
    assert '<meta http-equiv="refresh" content="15">' in page.text
    for status in ("active", "rotating", "expired", "no-cert", "denied", "deleted"):
        listed = all_devices(env, f"&status={status}")
        assert figure(page, f"count-{status}") == str(len(listed)), status
    assert figure(page, "count-active") == "10" and figure(page, "count-deleted") == "1"
    report = env.call("GET", "/v1/reports/expiry", scope="read").json()
    certs = report["device_certs"]
    assert figure(page, "expiry-expired") == str(certs["expired"]) == "1"
    assert figure(page, "expiry-30d") == str(certs["week"] + certs["month"]) == "3"
    within_90 = certs["week"] + certs["month"] + certs["quarter"]
    assert figure(page, "expiry-90d") == str(within_90) == "6"
    assert figure(page, "expiry-not-seen") == str(report["will_miss_renewal"]["count"]) == "1"
    outlived = report["cas_expiring_before_their_certs"]
    assert figure(page, "expiry-cas-outlived") == str(len(outlived)) and outlived
    assert f'id="campaign-{campaign}"' in page.text
    assert "0 completed · 0 failed · 0 skipped · 0 in flight · 2 pending of 2" in page.text


def _check_devices(env: ApiEnv, browser: Browser, made: dict[str, list[str]]) -> None:
    page = browser.get("/dashboard/devices")
    assert page.status == 200 and sorted(uuids(page)) == sorted(all_devices(env))
    assert set(made["lab"] + made["kiosk"]) <= set(uuids(page))
    page = browser.get("/dashboard/devices?group=kiosk&status=&expiring_within=")
    assert uuids(page) == sorted(made["kiosk"])
    page = browser.get("/dashboard/devices?expiring_within=30d&status=active")
    assert uuids(page) == all_devices(env, "&expiring_within=30d&status=active")

    # Paging: the next-page link carries the filters and the cursor.
    first = browser.get("/dashboard/devices?group=lab&limit=2")
    following = re.search(r'id="next" href="([^"]+)"', first.text)
    assert following and "group=lab" in following.group(1)
    second = browser.get(html.unescape(following.group(1)))
    seen = uuids(first) + uuids(second)
    lab = all_devices(env, "&group=lab")
    assert seen == lab[:4] and len(lab) > 4 and set(made["lab"]) <= set(lab)

    # A group name is text, never markup.
    query = urllib.parse.urlencode({"group": SCRIPT_GROUP})
    page = browser.get(f"/dashboard/devices?{query}")
    assert uuids(page) == made["script"]
    assert SCRIPT_GROUP not in page.text and html.escape(SCRIPT_GROUP) in page.text


async def _check_device_page(env: ApiEnv, browser: Browser, device: str) -> None:
    async with env.store.transaction() as session:
        await updates.start_update(session, device, "certs-1795471560", kind="cert-rotation")
    api = env.call("GET", f"/v1/devices/{device}", scope="read").json()
    page = browser.get(f"/dashboard/devices/{device}")
    assert page.status == 200, page.text
    assert figure(page, "serial") == api["cert"]["serial"]
    expires = dt.datetime.fromisoformat(api["cert"]["not_after"])
    assert figure(page, "expires").startswith(expires.strftime("%Y-%m-%d %H:%M:%S UTC"))
    link = f"/dashboard/devices/{device}/updates/certs-1795471560"
    assert f'href="{link}"' in page.text
    timeline = browser.get(link)
    assert timeline.status == 200 and "certs-1795471560" in timeline.text


def _check_campaigns(env: ApiEnv, browser: Browser, campaign: int) -> None:
    page = browser.get("/dashboard/campaigns")
    assert page.status == 200 and f'href="/dashboard/campaigns/{campaign}"' in page.text
    assert '<meta http-equiv="refresh" content="15">' in page.text
    assert "yearly &lt;rotation&gt;" in page.text
    api = env.call("GET", f"/v1/campaigns/{campaign}?devices=100", scope="read").json()
    page = browser.get(f"/dashboard/campaigns/{campaign}")
    assert page.status == 200 and figure(page, "status") == "running"
    assert sorted(uuids(page)) == sorted(d["device"] for d in api["devices"])
    assert f"pending of {api['total']}" in page.text


async def test_refusals_are_html_pages_and_change_nothing(api_env: ApiEnv):  # noqa: F811
    env = api_env
    device = await add_device(env.store, not_after=NOW + dt.timedelta(days=90))
    start(env)
    browser = Browser(env)
    assert browser.login(env.tokens["read"]).status == 303
    unknown = str(uuid.uuid4())
    before = await env.snapshot()
    cases = [
        (f"/dashboard/devices/{unknown}", 404, f"no device {unknown}"),
        ("/dashboard/devices/not-a-uuid", 400, "is not a device uuid"),
        ("/dashboard/devices?expiring_within=abc", 400, "not a positive duration"),
        ("/dashboard/devices?status=asleep", 400, "unknown status 'asleep'"),
        ("/dashboard/devices?limit=%C2%B2", 400, "must be a whole number"),
        ("/dashboard/devices?cursor=bm9wZQ", 400, "cursor is not one this API gave out"),
        ("/dashboard/devices?colour=red", 400, "unknown query parameter 'colour'"),
        (f"/dashboard/devices/{device}/updates/certs-1", 404, "has no update certs-1"),
        (f"/dashboard/devices/{device}/updates/a%2Fb", 404, "has no update a/b"),
        ("/dashboard/campaigns/999", 404, "no campaign 999"),
        ("/dashboard/campaigns/%C2%B2", 400, "must be a whole number"),
        ("/dashboard/campaigns/99999999999999999999", 400, "must be a whole number"),
        ("/dashboard/campaigns?limit=0", 400, "limit='0'"),
        ("/dashboard/nope", 404, "not a dashboard page"),
    ]
    for path, status, why in cases:
        page = browser.get(path)
        assert page.status == status, (path, page.text)
        assert page.headers["Content-Type"].startswith("text/html"), path
        assert why in reason(page), (path, reason(page))
    page = browser.request("GET", "/dashboard/logout")
    assert page.status == 405 and "takes POST, not GET" in reason(page)
    assert await env.snapshot() == before

    # The login form: size, type, origin, token shape; none signs in.
    fresh = Browser(env)
    long_body = b"token=" + b"A" * 3000
    form_cases = [
        (long_body, FORM, 413, "over its limit"),
        (b'{"token": "x"}', {"Content-Type": "application/json"}, 415, "login form"),
        (b"token=%E2%82%AC", FORM, 401, "unknown API token"),
        (b"token=" + b"x" * 300, FORM, 401, "unknown API token"),
        (b"token=", FORM, 400, "paste an API token"),
        (b"token=a&token=b", FORM, 400, "takes one field"),
        (b"token=a&user=b", FORM, 400, "takes one field"),
        (b"token=%ff", FORM, 401, "unknown API token"),
        (
            urllib.parse.urlencode({"token": env.tokens["read"]}).encode(),
            {**FORM, "Origin": "https://evil.example"},
            403,
            "only from its own pages",
        ),
    ]
    for body, headers, status, why in form_cases:
        page = fresh.request("POST", "/dashboard/login", body, **headers)
        assert page.status == status and why in reason(page), (body[:40], page.text)
        assert COOKIE not in fresh.cookies
    for garbage in ("x" * 400, "cft_nope", '"a b"'):
        fresh.cookies[COOKIE] = garbage
        assert fresh.get("/dashboard").status == 303 and COOKIE not in fresh.cookies
    assert await env.snapshot() == before
    out = env.stop()
    assert "refused 404" in out and "refused 401" in out


async def test_revoked_token_and_logout_end_the_session(api_env: ApiEnv):  # noqa: F811
    env = api_env
    made = await tokens_admin.create_token(env.store, "ops", ["read"], dt.timedelta(days=1))
    env.tokens["ops"] = made.token
    start(env)
    browser = Browser(env)
    assert browser.login(made.token).status == 303
    assert browser.get("/dashboard").status == 200
    await tokens_admin.revoke_token(env.store, made.info.id)
    page = browser.get("/dashboard/devices")
    assert page.status == 303 and page.headers["Location"] == "/dashboard/login"
    assert COOKIE not in browser.cookies, "the refused cookie is cleared"
    assert "was revoked" in reason(browser.get("/dashboard/login"))

    # A client that keeps the revoked cookie anyway gets nowhere.
    browser.cookies[COOKIE] = made.token
    assert browser.get("/dashboard").status == 303

    assert browser.login(env.tokens["rotate"]).status == 303
    page = browser.request("POST", "/dashboard/logout")
    assert page.status == 303 and page.headers["Location"] == "/dashboard/login"
    cleared = page.cookie(COOKIE)
    assert cleared and "max-age=0" in cleared.lower() and "path=/dashboard" in cleared.lower()
    assert COOKIE not in browser.cookies
    assert "signed out" in reason(browser.get("/dashboard/login"))
    assert browser.get("/dashboard").status == 303
    refused = browser.request("POST", "/dashboard/logout", Origin="https://evil.example")
    assert refused.status == 403
    env.stop()


async def test_curl_signs_in_and_reads_a_page(api_env: ApiEnv):  # noqa: F811
    env = api_env
    device = await add_device(env.store, not_after=NOW + dt.timedelta(days=30), group="a&b")
    start(env)
    curl = ["curl", "-sS", "--cacert", str(env.pki / "root.crt"), "--max-time", "30"]
    signed = subprocess.run(
        [*curl, "-i", "--data-urlencode", f"token={env.tokens['read']}", _url(env, "login")],
        capture_output=True,
        text=True,
        check=True,
    )
    # text=True has turned the header lines' CRLF into LF.
    head = signed.stdout.split("\n\n")[0].lower()
    assert head.startswith("http/1.1 303") and "\nlocation: /dashboard\n" in head
    cookie_line = next(line for line in head.splitlines() if line.startswith("set-cookie:"))
    assert "httponly" in cookie_line and "secure" in cookie_line
    assert "samesite=strict" in cookie_line and "path=/dashboard" in cookie_line
    page = subprocess.run(
        [*curl, "-b", f"{COOKIE}={env.tokens['read']}", _url(env, "devices?group=a%26b")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f'href="/dashboard/devices/{device}"' in page.stdout
    assert "a&amp;b" in page.stdout
    env.stop()


def _url(env: ApiEnv, path: str) -> str:
    return f"{env.api_url}/dashboard/{path}"


async def test_plain_http_cookie_is_not_secure(api_env: ApiEnv):  # noqa: F811
    env = api_env
    start(env, "--api-plain-http")
    browser = Browser(env, plain=True)
    page = browser.login(env.tokens["read"])
    assert page.status == 303
    flags = {part.strip().lower() for part in page.cookie(COOKIE).split(";")}
    assert "secure" not in flags and {"httponly", "samesite=strict"} <= flags
    assert browser.get("/dashboard").status == 200
    env.stop()


async def test_no_token_reaches_the_log(api_env: ApiEnv, caplog):  # noqa: F811
    env = api_env
    revoked = await tokens_admin.create_token(env.store, "gone", ["read"], dt.timedelta(days=1))
    await tokens_admin.revoke_token(env.store, revoked.info.id)
    secrets_used = [*env.tokens.values(), revoked.token, "cft_" + "B" * 43]
    caplog.set_level(logging.DEBUG)
    app = make_api_app(env.store)
    async with TestClient(TestServer(app)) as client:
        for token in secrets_used:
            answer = await client.post(
                "/dashboard/login", data={"token": token}, allow_redirects=False
            )
            assert answer.status in (303, 401, 403)
            client.session.cookie_jar.clear()
            page = await client.get("/dashboard", cookies={COOKIE: token}, allow_redirects=False)
            assert page.status in (200, 303)
            page = await client.get(
                "/dashboard/devices?expiring_within=abc",
                cookies={COOKIE: token},
                allow_redirects=False,
            )
            assert page.status in (400, 303)
    assert "refused 401" in caplog.text and "refused 400" in caplog.text
    for token in secrets_used:
        assert token not in caplog.text
