"""Campaigns two ways: the store directly (local mode) or the admin API (remote mode).

Both return the same JSON-ready data (what `CampaignView.as_dict` gives, and
for `create` the plan dict of `plan_dict`), so a command prints the same in
either mode.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Protocol

from certfleet.fleet import campaigns as fleet
from certfleet.fleet.campaigns import CampaignSettings, Plan, Selector
from certfleet.fleet.rotate_certs import RotationOrder, make_order

from .api_client import ApiClient, ApiClientError, Remote, resolve_remote
from .common import run, store_url

ACTOR = "cli"
ACTIONS = {
    "pause": fleet.pause,
    "resume": fleet.resume,
    "abort": fleet.abort,
    "retry-failed": fleet.retry_failed,
}
# Most devices a remote `create` asks back to learn its canaries (the API's limit).
MOST_DEVICES = 10000


class Campaigns(Protocol):
    """What `certfleet campaigns ...` needs."""

    def create(
        self,
        selector: Selector,
        settings: CampaignSettings,
        order: dict[str, str | None],
        *,
        reason: str,
        dryrun: bool,
    ) -> dict[str, Any]: ...
    def list(self, limit: int) -> list[dict[str, Any]]: ...
    def show(self, campaign_id: int, devices: int) -> dict[str, Any]: ...
    def change(self, campaign_id: int, action: str) -> dict[str, Any]: ...


def plan_dict(plan: Plan) -> dict[str, Any]:
    """A plan as JSON: what `campaigns create --json` prints."""
    return {
        "dryrun": plan.campaign is None,
        "devices": plan.devices,
        "canaries": plan.canaries,
        "left_out": plan.left_out,
        "rotation_id": plan.order.rotation_id,
        "value": plan.order.value(),
        "campaign": plan.campaign.as_dict() if plan.campaign else None,
    }


class LocalCampaigns:
    """certfleet.fleet.campaigns on the store named by --pki/--database."""

    def __init__(self, url: str, factory: str | None) -> None:
        self.url = url
        self.factory = factory

    def create(
        self,
        selector: Selector,
        settings: CampaignSettings,
        order: dict[str, str | None],
        *,
        reason: str,
        dryrun: bool,
    ) -> dict[str, Any]:
        plan = run(
            fleet.create_campaign,
            self.url,
            selector,
            settings,
            make_order(order["est_server"], order["hsm_pkey_ids"], order["hsm_cert_ids"]),
            reason=reason,
            actor=ACTOR,
            factory=self.factory,
            dryrun=dryrun,
        )
        return plan_dict(plan)

    def list(self, limit: int) -> list[dict[str, Any]]:
        found = run(fleet.list_campaigns, self.url, factory=self.factory, limit=limit)
        return [view.as_dict() for view in found]

    def show(self, campaign_id: int, devices: int) -> dict[str, Any]:
        return run(fleet.show_campaign, self.url, campaign_id, devices=devices).as_dict()

    def change(self, campaign_id: int, action: str) -> dict[str, Any]:
        view = run(ACTIONS[action], self.url, campaign_id, actor=ACTOR)
        return {**view.as_dict(), "retried": view.retried}


class RemoteCampaigns:
    """The admin API (GET/POST /v1/campaigns...)."""

    def __init__(self, remote: Remote) -> None:
        self.api = ApiClient(remote)

    def create(
        self,
        selector: Selector,
        settings: CampaignSettings,
        order: dict[str, str | None],
        *,
        reason: str,
        dryrun: bool,
    ) -> dict[str, Any]:
        body = _create_body(selector, settings, order, reason)
        # A dry run first: the plan (left out devices included) is what the API tells on one.
        planned = self.api.call("POST", "/v1/campaigns", body={**body, "dryrun": True})
        if dryrun:
            return {
                "dryrun": True,
                "devices": planned["devices"],
                "canaries": planned["canaries"],
                "left_out": planned["left_out"],
                "rotation_id": _rotation_id(planned["value"]),
                "value": planned["value"],
                "campaign": None,
            }
        created = self.api.call("POST", "/v1/campaigns", body=body)
        shown = self.show(created["id"], min(created["total"], MOST_DEVICES))
        chosen = shown["devices"]
        s = created["settings"]
        value = RotationOrder(
            s["est_server"], created["rotation_id"], s.get("pkey_ids"), s.get("cert_ids")
        ).value()
        return {
            "dryrun": False,
            "devices": [item["device"] for item in chosen],
            "canaries": [item["device"] for item in chosen if item["canary"]],
            "left_out": planned["left_out"],
            "rotation_id": created["rotation_id"],
            "value": value,
            "campaign": created,
        }

    def list(self, limit: int) -> list[dict[str, Any]]:
        return self.api.call("GET", "/v1/campaigns", query={"limit": limit})["items"]

    def show(self, campaign_id: int, devices: int) -> dict[str, Any]:
        return self.api.call("GET", f"/v1/campaigns/{campaign_id}", query={"devices": devices})

    def change(self, campaign_id: int, action: str) -> dict[str, Any]:
        before = self.show(campaign_id, 0) if action == "retry-failed" else None
        view = self.api.call("POST", f"/v1/campaigns/{campaign_id}/{action}")
        # The API does not say how many devices a retry put back; the failed count tells.
        retried = before["counts"]["failed"] - view["counts"]["failed"] if before else 0
        return {**view, "retried": max(retried, 0)}


def _create_body(
    selector: Selector,
    settings: CampaignSettings,
    order: dict[str, str | None],
    reason: str,
) -> dict[str, Any]:
    def seconds(value: dt.timedelta) -> str:
        return f"{int(value.total_seconds())}s"

    body: dict[str, Any] = {
        "group": selector.group,
        "all": selector.all_devices or None,
        "reissue_from_ca": selector.reissue_from_ca,
        "to_ca": selector.to_ca,
        "reason": reason,
        "est_server": order["est_server"],
        "hsm_pkey_ids": order["hsm_pkey_ids"],
        "hsm_cert_ids": order["hsm_cert_ids"],
        "canary_share": settings.canary_share,
        "rate_per_minute": settings.rate_per_minute,
        "failure_threshold": settings.failure_threshold,
        "canary_deadline": seconds(settings.canary_deadline),
        "device_deadline": seconds(settings.device_deadline),
        "offline_after": seconds(settings.offline_after),
    }
    return {name: value for name, value in body.items() if value is not None}


def _rotation_id(value: str) -> str | None:
    for line in value.splitlines():
        if line.startswith("ROTATIONID="):
            return line.removeprefix("ROTATIONID=")
    return None


def pick_campaigns(
    pki_dir: Path,
    database: str | None,
    server: str | None,
    token: str | None,
    trust: Path | None,
    local: bool,
    factory: str | None = None,
) -> Campaigns:
    """Remote when a server is configured (and --local is not given), else local."""
    remote = None if local else resolve_remote(server, token, trust)
    if remote is None:
        return LocalCampaigns(store_url(pki_dir, database), factory)
    if factory:
        raise ApiClientError(
            "--factory works on the store only (the server uses its own factory); "
            "drop it or add --local"
        )
    return RemoteCampaigns(remote)


def campaigns_from(options: dict[str, Any], factory: str | None = None) -> Campaigns:
    """The backend named by --pki/--database/--server/--token/--trust/--local (taken out)."""
    return pick_campaigns(
        options.pop("pki_dir"),
        options.pop("database"),
        options.pop("server"),
        options.pop("token"),
        options.pop("trust"),
        options.pop("local"),
        factory,
    )
