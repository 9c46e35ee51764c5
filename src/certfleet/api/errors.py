"""The one error type of the admin API: HTTP status, a code for machines, a line for people."""

from __future__ import annotations

import re

from certfleet.refusals import Refusal

# A command-line option inside a message of the shared fleet layer, e.g. --est-server.
_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# Options whose API field is not the option's name with underscores.
_FIELD_OF_OPTION = {"rate": "rate_per_minute"}


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


def api_wording(message: str) -> str:
    """A fleet-layer message as an API client reads it: --est-server becomes 'est_server'.

    A command quoted in backticks stays as it is: it is meant for a shell.
    """

    def field(match: re.Match[str]) -> str:
        option = match[1]
        return f"'{_FIELD_OF_OPTION.get(option, option.replace('-', '_'))}'"

    parts = message.split("`")
    parts[::2] = [_OPTION.sub(field, part) for part in parts[::2]]
    return "`".join(parts)
