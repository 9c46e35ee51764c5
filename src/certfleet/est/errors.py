"""The one error type of the EST server: an HTTP status, a code for machines, a line for people."""

from __future__ import annotations

from certfleet.refusals import Refusal


class EstError(Refusal):
    """A refused EST request; the message is one line the client's operator can act on."""


BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="certfleet-est"'}


def unauthorized(code: str, message: str) -> EstError:
    """401 with the Basic challenge HTTP requires on every 401."""
    return EstError(401, code, message, BASIC_CHALLENGE)


def forbidden(code: str, message: str) -> EstError:
    """403: the client is known but may not have this."""
    return EstError(403, code, message)


def bad_request(code: str, message: str) -> EstError:
    """400: the request itself is wrong."""
    return EstError(400, code, message)
