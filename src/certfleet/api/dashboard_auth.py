"""Sign-in to the dashboard: an API token posted once, then kept in a cookie.

A browser cannot send `Authorization: Bearer`, so the login form takes the
token (`certfleet tokens create --scope read`) and the answer stores it in an
HttpOnly, SameSite=Strict cookie scoped to /dashboard. Every page checks the
token again with `auth.authenticate`, so revoking or expiring it ends the
session at the next page. Nothing here logs or echoes a token.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from aiohttp import web

from . import auth
from .errors import ApiError, bad_request, forbidden, too_large, unauthorized
from .keys import CALLER, STORE

PREFIX = "/dashboard"
LOGIN = f"{PREFIX}/login"
COOKIE = "certfleet_dashboard"
# A one-line reason for the login page after a redirect; short-lived.
REASON_COOKIE = "certfleet_dashboard_reason"
REASON_MAX_AGE = 60
MAX_REASON = 300
MAX_FORM_BYTES = 2048
FORM_TYPE = "application/x-www-form-urlencoded"
NO_SESSION = "sign in with an API token that has the read scope (certfleet tokens create)"
_UNKNOWN = "unknown API token; check it was copied whole or create a new one"


def _set(
    response: web.StreamResponse,
    request: web.Request,
    name: str,
    value: str,
    *,
    path: str = PREFIX,
    max_age: int | None = None,
) -> None:
    # The server serves plain HTTP only on loopback (ApiSettings.check_listen),
    # so a cookie without Secure never crosses the network.
    response.set_cookie(
        name,
        value,
        path=path,
        max_age=max_age,
        httponly=True,
        secure=request.secure,
        samesite="Strict",
    )


def _clear(
    response: web.StreamResponse, request: web.Request, name: str, *, path: str = PREFIX
) -> None:
    response.del_cookie(name, path=path, httponly=True, secure=request.secure, samesite="Strict")


def check_origin(request: web.Request) -> None:
    """403 for a form posted from another site (login and logout CSRF)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise forbidden("the dashboard takes forms only from its own pages")


def checked_token(text: str) -> str:
    """The token, refused like the API refuses a malformed bearer token."""
    token = text.strip()
    if not token or len(token) > auth.MAX_TOKEN_LENGTH:
        raise unauthorized(_UNKNOWN)
    if not token.isascii() or not token.isprintable():
        raise unauthorized(_UNKNOWN)
    return token


async def form_token(request: web.Request) -> str:
    """The token field of the posted login form (400/413/415 for anything else)."""
    check_origin(request)
    if request.content_type != FORM_TYPE:
        raise ApiError(415, "media-type", f"sign in with the login form ({FORM_TYPE})")
    if (request.content_length or 0) > MAX_FORM_BYTES:
        raise too_large(f"the login form is over its limit of {MAX_FORM_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(1024):
        raw += chunk
        if len(raw) > MAX_FORM_BYTES:
            raise too_large(f"the login form is over its limit of {MAX_FORM_BYTES} bytes")
    try:
        fields = urllib.parse.parse_qs(raw.decode("ascii"), max_num_fields=4)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request("the login form could not be read; send it again") from exc
    # Field names are not echoed: a pasted token could end up as one.
    if set(fields) - {"token"} or len(fields.get("token", ())) > 1:
        raise bad_request("the login form takes one field, token")
    if not fields.get("token"):
        raise bad_request("paste an API token with the read scope (certfleet tokens create)")
    return checked_token(fields["token"][0])


async def authorize(request: web.Request, token: str) -> None:
    """Set the request's caller if the token is live and may read; 401/403 otherwise."""
    caller = await auth.authenticate(request.app[STORE], token)
    # Set before the scope check, so that a 403 in the log names the token.
    request[CALLER] = caller
    auth.check_scope(caller, auth.READ, "the dashboard")


def session_token(request: web.Request) -> str:
    """The token of the session cookie; 401 with a reason when there is none."""
    text = request.cookies.get(COOKIE)
    if text is None:
        raise unauthorized(NO_SESSION)
    return checked_token(text)


def signed_in(request: web.Request, token: str) -> web.Response:
    """303 to the overview, setting the session cookie."""
    response = _see_other(PREFIX)
    _set(response, request, COOKIE, token)
    if REASON_COOKIE in request.cookies:
        _clear(response, request, REASON_COOKIE, path=LOGIN)
    return response


def to_login(request: web.Request, reason: str) -> web.Response:
    """303 to the login page, which shows ``reason``; any session cookie is cleared."""
    response = _see_other(LOGIN)
    if COOKIE in request.cookies:
        _clear(response, request, COOKIE)
    # base64 keeps any reason (quotes, non-ASCII token names) a valid cookie value.
    value = base64.urlsafe_b64encode(reason[:MAX_REASON].encode()).decode()
    _set(response, request, REASON_COOKIE, value, path=LOGIN, max_age=REASON_MAX_AGE)
    return response


def login_reason(request: web.Request) -> str | None:
    """The reason a redirect left for the login page, if any."""
    value = request.cookies.get(REASON_COOKIE)
    if not value:
        return None
    try:
        text = base64.urlsafe_b64decode(value.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return text[:MAX_REASON].splitlines()[0] if text.strip() else None


def forget_reason(request: web.Request, response: web.StreamResponse) -> None:
    """Clear the reason cookie once the login page has shown it."""
    if REASON_COOKIE in request.cookies:
        _clear(response, request, REASON_COOKIE, path=LOGIN)


def signed_out(request: web.Request) -> web.Response:
    """303 to the login page, clearing the session cookie."""
    response = to_login(request, "signed out")
    _clear(response, request, COOKIE)
    return response


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})
