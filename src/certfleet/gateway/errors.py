"""The one error type of the device gateway: HTTP status, a code for machines, a line for people."""

from __future__ import annotations

from certfleet.refusals import Refusal


class GatewayError(Refusal):
    """A refused device request; the message is one line the device's operator can act on."""


NO_CLIENT_CERT = "this endpoint needs the device's client certificate"


def no_client_cert() -> GatewayError:
    """401: the connection showed no verified client certificate."""
    return GatewayError(401, "no-client-cert", NO_CLIENT_CERT)


def forbidden(code: str, message: str) -> GatewayError:
    """403: the device is known (or claims to be) but may not connect."""
    return GatewayError(403, code, message)


def bad_request(code: str, message: str) -> GatewayError:
    """400: the request itself is wrong."""
    return GatewayError(400, code, message)


def conflict(code: str, message: str) -> GatewayError:
    """409: the request clashes with the device's current state."""
    return GatewayError(409, code, message)


def too_large(code: str, message: str) -> GatewayError:
    """413: more than this gateway accepts in one request."""
    return GatewayError(413, code, message)
