"""What the HTTP front ends (EST, device gateway, admin API) share about refusing a request.

Each front end has its own error type (a subclass of `Refusal`), its own
answer format (text or JSON) and names the caller its own way; the fields of
a refusal, the one log line per refusal and per fault, and the wording of
framework refusals are the same everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TypeVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError


class Refusal(Exception):
    """A refused request: HTTP status, a code for machines, one line a person can act on."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


R = TypeVar("R", bound=Refusal)


def log_refusal(
    log: logging.Logger, front: str, request: web.Request, refusal: Refusal, who: str, rid: str
) -> None:
    """One line per refusal: INFO for the client's mistakes, WARNING for this server's 5xx."""
    # 501 is an answer about the protocol, not a fault of this server.
    level = logging.WARNING if refusal.status >= 500 and refusal.status != 501 else logging.INFO
    log.log(
        level,
        "%s %s %s refused %d %s: %s (peer %s%s, request %s)",
        front,
        request.method,
        request.path,
        refusal.status,
        refusal.code,
        refusal.message,
        request.remote,
        who,
        rid,
    )


def log_fault(log: logging.Logger, front: str, request: web.Request, rid: str) -> str:
    """Log the exception being handled with its traceback; the message for the 500 answer."""
    log.exception("%s %s %s failed (request %s)", front, request.method, request.path, rid)
    return f"internal error; the server log has details (request {rid})"


def method_not_allowed(
    kind: type[R], request: web.Request, exc: web.HTTPMethodNotAllowed, what: str
) -> R:
    """405 naming the methods `what` (a path or an operation) takes."""
    allowed = ", ".join(sorted(exc.allowed_methods))
    return kind(
        405, "method", f"{what} takes {allowed}, not {request.method}", {hdrs.ALLOW: allowed}
    )


def framework_refusal(kind: type[R], exc: web.HTTPException) -> R:
    """Any other refusal aiohttp raised itself, with its own reason."""
    return kind(exc.status, "http", exc.reason)


class MalformedRequestLog(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with a traceback, which reads as
    a fault of this server; it is the client's mistake, answered 400: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
            return False
        lines = [line.strip() for line in exc.message.splitlines() if line.strip()]
        reason = lines[0].rstrip(":") if lines else type(exc).__name__
        record.args = (record.getMessage(), exc.code, reason)
        record.msg = "%s: refused with %d as malformed HTTP: %s"
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info, record.exc_text = None, None
        return True


def quiet_malformed_requests() -> None:
    """Install MalformedRequestLog on aiohttp's server logger (once per process)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestLog) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLog())
