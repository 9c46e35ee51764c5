"""The one error type of the admin API: HTTP status, a code for machines, a line for people."""

from __future__ import annotations

from certfleet.refusals import Refusal


class ApiError(Refusal):
    """A refused request; the message is one line the operator can act on."""


def bad_request(message: str, code: str = "bad-request") -> ApiError:
    """400: the request itself is wrong."""
    return ApiError(400, code, message)


def unauthorized(message: str) -> ApiError:
    """401: no usable token; the client should send `Authorization: Bearer <token>`."""
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="certfleet"'})


def forbidden(message: str) -> ApiError:
    """403: the token is fine but lacks the scope."""
    return ApiError(403, "forbidden", message)


def not_found(message: str) -> ApiError:
    """404: no such path or object."""
    return ApiError(404, "not-found", message)


def conflict(message: str) -> ApiError:
    """409: the request clashes with the object's state."""
    return ApiError(409, "conflict", message)


def too_large(message: str) -> ApiError:
    """413: the body is over the limit."""
    return ApiError(413, "too-large", message)
