"""One interface, two ways: the store directly (local mode) or the admin API (remote mode).

Both return the same JSON-ready data, because the API answers with what
`fleet/` returns; so a command prints the same in either mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import click

from certfleet.fleet import config_admin, denylist_admin, device_views, expiry_report, rotate_certs
from certfleet.store.config_files import ConfigValue
from certfleet.store.schema import ConfigScope

from .api_client import ApiClient, Remote, quote, remote_options, resolve_remote
from .common import database_option, parse_duration, pki_option, run, store_url, with_store

ACTOR = "cli"
PAGE = 500
# What a device is told to rotate, as given: est_server, hsm_pkey_ids, hsm_cert_ids.
Order = dict[str, str | None]


class Fleet(Protocol):
    """What device and report commands need."""

    def devices_page(self, filters: dict[str, Any], cursor: str | None, limit: int) -> dict: ...
    def device(self, uuid: str) -> dict: ...
    def delete(self, uuid: str, reason: str) -> dict: ...
    def deny(self, uuid: str, reason: str) -> list[dict]: ...
    def deny_certificate(
        self, reason: str, serial: str | None, sha256: str | None
    ) -> list[dict]: ...
    def rotate(self, uuid: str, order: Order, reason: str, dryrun: bool) -> dict: ...
    def updates_page(self, uuid: str, cursor: str | None, limit: int) -> dict: ...
    def set_config(self, change: dict[str, Any]) -> dict: ...
    def config_log(self, query: dict[str, Any]) -> list[dict]: ...
    def move(self, uuid: str, group: str, reason: str) -> dict: ...
    def unlock(self, uuid: str, reason: str) -> dict: ...
    def timeline(self, uuid: str, correlation_id: str) -> dict: ...
    def expiry(self, not_seen: str | None, renewal_window: str | None) -> dict: ...


class LocalFleet:
    """`fleet/` on the store named by --pki/--database."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call(store: Any) -> Any:
            return await fn(store, *args, **kwargs)

        return run(with_store, self.url, call)

    def devices_page(self, filters: dict[str, Any], cursor: str | None, limit: int) -> dict:
        within = filters.get("expiring_within")
        page = self._run(
            device_views.list_devices,
            group=filters.get("group"),
            status=filters.get("status"),
            expiring_within=parse_duration(within) if within else None,
            limit=limit,
            cursor=cursor,
        )
        return page.as_dict()

    def device(self, uuid: str) -> dict:
        return self._run(device_views.show_device, uuid)

    def delete(self, uuid: str, reason: str) -> dict:
        return self._run(device_views.delete_device, uuid, actor=ACTOR, reason=reason)

    def deny(self, uuid: str, reason: str) -> list[dict]:
        denied = self._run(device_views.deny_device, uuid, actor=ACTOR, reason=reason)
        return [entry.as_dict() for entry in denied]

    def deny_certificate(self, reason: str, serial: str | None, sha256: str | None) -> list[dict]:
        denied = self._run(
            denylist_admin.deny, reason=reason, actor=ACTOR, serial=serial, sha256=sha256
        )
        return [entry.as_dict() for entry in denied]

    def rotate(self, uuid: str, order: Order, reason: str, dryrun: bool) -> dict:
        checked = rotate_certs.make_order(
            order["est_server"], order["hsm_pkey_ids"], order["hsm_cert_ids"]
        )
        done = self._run(
            rotate_certs.rotate_device, uuid, checked, reason=reason, actor=ACTOR, dryrun=dryrun
        )
        return done.as_dict()

    def updates_page(self, uuid: str, cursor: str | None, limit: int) -> dict:
        page = self._run(device_views.list_updates, uuid, limit=limit, cursor=cursor)
        return page.as_dict()

    def set_config(self, change: dict[str, Any]) -> dict:
        on_changed, unencrypted = change.get("on_changed", []), change.get("unencrypted", False)
        files = {
            name: ConfigValue(value, on_changed, unencrypted)
            for name, value in change["files"].items()
        }
        done = self._run(
            config_admin.set_config,
            ConfigScope(change["scope"]),
            change.get("key", ""),
            files,
            reason=change["reason"],
            actor=ACTOR,
            factory=change.get("factory"),
        )
        return done.as_dict()

    def config_log(self, query: dict[str, Any]) -> list[dict]:
        return [change.as_dict() for change in self._run(config_admin.config_log, **query)]

    def move(self, uuid: str, group: str, reason: str) -> dict:
        change = self._run(config_admin.move_to_group, uuid, group, reason=reason, actor=ACTOR)
        return {"moved": change is not None, "change": change.as_dict() if change else None}

    def unlock(self, uuid: str, reason: str) -> dict:
        return self._run(config_admin.unlock_config, uuid, reason=reason, actor=ACTOR)

    def timeline(self, uuid: str, correlation_id: str) -> dict:
        return self._run(device_views.update_timeline, uuid, correlation_id)

    def expiry(self, not_seen: str | None, renewal_window: str | None) -> dict:
        durations = {
            name: parse_duration(value)
            for name, value in (("not_seen", not_seen), ("renewal_window", renewal_window))
            if value
        }
        return self._run(expiry_report.expiry_report, **durations)


class RemoteFleet:
    """The admin API."""

    def __init__(self, remote: Remote) -> None:
        self.api = ApiClient(remote)

    def devices_page(self, filters: dict[str, Any], cursor: str | None, limit: int) -> dict:
        return self.api.call(
            "GET", "/v1/devices", query={**filters, "cursor": cursor, "limit": limit}
        )

    def device(self, uuid: str) -> dict:
        return self.api.call("GET", f"/v1/devices/{quote(uuid)}")

    def delete(self, uuid: str, reason: str) -> dict:
        return self.api.call("DELETE", f"/v1/devices/{quote(uuid)}", query={"reason": reason})

    def deny(self, uuid: str, reason: str) -> list[dict]:
        return self.api.call("POST", f"/v1/devices/{quote(uuid)}/deny", body={"reason": reason})

    def deny_certificate(self, reason: str, serial: str | None, sha256: str | None) -> list[dict]:
        body = _given({"reason": reason, "serial": serial, "sha256": sha256})
        return self.api.call("POST", "/v1/denylist", body=body)

    def rotate(self, uuid: str, order: Order, reason: str, dryrun: bool) -> dict:
        body = _given({**order, "reason": reason, "dryrun": dryrun or None})
        return self.api.call("POST", f"/v1/devices/{quote(uuid)}/rotate-certs", body=body)

    def updates_page(self, uuid: str, cursor: str | None, limit: int) -> dict:
        query = {"cursor": cursor, "limit": limit}
        return self.api.call("GET", f"/v1/devices/{quote(uuid)}/updates", query=query)

    def set_config(self, change: dict[str, Any]) -> dict:
        return self.api.call("POST", "/v1/config", body=_given(change))

    def config_log(self, query: dict[str, Any]) -> list[dict]:
        return self.api.call("GET", "/v1/config/log", query=query)

    def move(self, uuid: str, group: str, reason: str) -> dict:
        body = {"group": group, "reason": reason}
        return self.api.call("POST", f"/v1/devices/{quote(uuid)}/group", body=body)

    def unlock(self, uuid: str, reason: str) -> dict:
        body = {"reason": reason}
        return self.api.call("POST", f"/v1/devices/{quote(uuid)}/unlock", body=body)

    def timeline(self, uuid: str, correlation_id: str) -> dict:
        path = f"/v1/devices/{quote(uuid)}/updates/{quote(correlation_id)}"
        return self.api.call("GET", path)

    def expiry(self, not_seen: str | None, renewal_window: str | None) -> dict:
        query = {"not_seen": not_seen, "renewal_window": renewal_window}
        return self.api.call("GET", "/v1/reports/expiry", query=query)


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    # The API refuses null for an optional field; leave it out instead.
    return {name: value for name, value in fields.items() if value is not None}


def pick_fleet(
    pki_dir: Path,
    database: str | None,
    server: str | None,
    token: str | None,
    trust: Path | None,
    local: bool,
) -> Fleet:
    """Remote when a server is configured (and --local is not given), else local."""
    remote = None if local else resolve_remote(server, token, trust)
    if remote is None:
        return LocalFleet(store_url(pki_dir, database))
    return RemoteFleet(remote)


def all_devices(fleet: Fleet, filters: dict[str, Any], most: int | None) -> list[dict]:
    """Every device matching ``filters`` (at most ``most``), page by page."""
    return _walk(lambda cursor, size: fleet.devices_page(filters, cursor, size), most)


def all_updates(fleet: Fleet, uuid: str) -> list[dict]:
    """Every update of a device, newest first, page by page."""
    return _walk(lambda cursor, size: fleet.updates_page(uuid, cursor, size), None)


def _walk(page_of: Callable[[str | None, int], dict], most: int | None) -> list[dict]:
    items: list[dict] = []
    cursor = None
    while True:
        size = PAGE if most is None else max(1, min(PAGE, most - len(items)))
        page = page_of(cursor, size)
        items += page["items"]
        cursor = page["next"]
        if cursor is None or (most is not None and len(items) >= most):
            return items


def fleet_options(fn: Callable) -> Callable:
    """Where the fleet is (--pki/--database, or --server/--token/--trust) and --json."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)
    return pki_option(database_option(remote_options(fn)))


def fleet_from(options: dict[str, Any]) -> Fleet:
    """The fleet named by the options of `fleet_options` (taken out of ``options``)."""
    return pick_fleet(
        options.pop("pki_dir"),
        options.pop("database"),
        options.pop("server"),
        options.pop("token"),
        options.pop("trust"),
        options.pop("local"),
    )
