"""The device gateway's API as the agent calls it, over mutual TLS.

Each method returns the gateway's answer or raises `GatewayRefused` with the
gateway's own reason (status, `X-Certfleet-Error` code, message); a network
failure raises `https.Unreachable`.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

from . import https

JSON = {"Content-Type": "application/json"}


class GatewayRefused(Exception):
    """The gateway answered with an error status."""

    def __init__(self, method: str, path: str, answer: https.Answer) -> None:
        super().__init__(f"gateway refused {method} {path}: {answer.status} {answer.reason()}")
        self.status = answer.status
        self.code = answer.headers.get("x-certfleet-error", "")

    @property
    def cert_refused(self) -> bool:
        """True if the gateway refused the client certificate itself (retrying won't help)."""
        return self.status in (401, 403)


class GatewayClient:
    """Calls to one gateway with one client identity (the SSL context holds it).

    With `keep_alive` the calls share one connection (one TLS handshake for a
    series of calls); `close()` ends it. Without, each call has its own.
    """

    def __init__(
        self,
        base_url: str,
        context: ssl.SSLContext,
        timeout: float = 30.0,
        keep_alive: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._context = context
        self._timeout = timeout
        self._connection: https.Connection | None = None
        if keep_alive:
            origin, self._prefix = https.split_url(self.base_url)
            self._connection = https.Connection(origin, context, timeout)

    def close(self) -> None:
        """End the kept-alive connection, if any."""
        if self._connection is not None:
            self._connection.close()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> https.Answer:
        """One request; a status outside `ok` raises GatewayRefused."""
        data = None if body is None else json.dumps(body).encode()
        sent = {**(JSON if data is not None else {}), **(headers or {})}
        if self._connection is not None:
            answer = self._connection.request(method, self._prefix.rstrip("/") + path, data, sent)
        else:
            answer = https.request(
                self.base_url + path, self._context, method, data, sent, self._timeout
            )
        if answer.status not in ok:
            raise GatewayRefused(method, path, answer)
        return answer

    def device(self) -> dict[str, Any]:
        """The device's own record (uuid, group, next key, lock)."""
        return self.call("GET", "/device").json()

    def config(self, if_modified_since: str | None = None) -> https.Answer:
        """Merged config files (200, with Last-Modified) or 304 if unchanged since."""
        headers = {"If-Modified-Since": if_modified_since} if if_modified_since else None
        return self.call("GET", "/config", headers=headers, ok=(200, 304))

    def announce_next_key(self, public_key_pem: str, replace: bool = False) -> dict[str, Any]:
        """PATCH /device: announce the next key; the gateway locks the device's config."""
        body = {"next_pubkey": public_key_pem, "replace": replace}
        return self.call("PATCH", "/device", body).json()

    def withdraw_next_key(self, pubkey_sha256: str) -> bool:
        """DELETE /device/next-key: take back the announced key; True if it was still announced."""
        answer = self.call("DELETE", f"/device/next-key?sha256={pubkey_sha256}")
        return bool(answer.json().get("withdrawn"))

    def device_config(self) -> dict[str, Any]:
        """The device-scope files as stored (values encrypted to the current key)."""
        return self.call("GET", "/config-device").json()

    def upload_device_config(self, files: dict[str, Any], next_public_key_pem: str) -> bool:
        """Replace the device-scope files with ones encrypted to the next key; True if changed."""
        body = {"files": files, "next_pubkey": next_public_key_pem}
        return bool(self.call("PATCH", "/config", body).json().get("changed"))

    def config_applied(self, version: str) -> None:
        """Tell the gateway which config version (Last-Modified) the device applied."""
        self.call("POST", "/config/applied", {"version": version})

    def send_events(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """POST /events: update events in the reference's envelope."""
        return self.call("POST", "/events", events).json()
