"""`certfleet campaigns ...`: certificate rotation over many devices, in waves.

Each command works on the store (local mode, `--pki`/`--database`) or through
the admin API (remote mode, when a server is configured: see api_client.py).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from certfleet.fleet.campaigns import CampaignSettings, CampaignView, Selector

from .api_client import remote_options
from .campaign_backend import Campaigns, LocalCampaigns, campaigns_from
from .common import (
    CertfleetGroup,
    console,
    database_option,
    parse_duration,
    pki_option,
    print_json,
)

ACTOR = "cli"
EST_SERVER_ENV = "CERTFLEET_EST_SERVER"
STATE_STYLES = {
    "pending": "white",
    "triggered": "cyan",
    "in_progress": "blue",
    "completed": "green",
    "failed": "red",
    "skipped_offline": "yellow",
}
FINAL = ("completed", "aborted")
_RATE = re.compile(r"(\d+)\s*(?:/\s*(s|sec|m|min))?")


def parse_rate(text: str) -> int:
    """'60/min', '60' or '2/s' as devices per minute."""
    match = _RATE.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) < 1:
        raise click.BadParameter(f"{text!r} is not a rate like 60/min or 2/s")
    per = 60 if match.group(2) in ("s", "sec") else 1
    return int(match.group(1)) * per


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> dt.timedelta:
    return parse_duration(value)


def _rate(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    return parse_rate(value)


def order_options(fn: Callable) -> Callable:
    """What devices are told: --est-server and the PKCS#11 slot ids."""
    for option in reversed(
        [
            click.option(
                "--est-server",
                metavar="URL",
                default=lambda: os.environ.get(EST_SERVER_ENV),
                help=f"EST address devices renew at (default ${EST_SERVER_ENV}), "
                "e.g. https://est.acme.example:8443/.well-known/est",
            ),
            click.option(
                "--hsm-pkey-ids",
                metavar="A,B",
                help="Devices with keys in a PKCS#11 token: the two key slots, e.g. 01,07.",
            ),
            click.option(
                "--hsm-cert-ids",
                metavar="A,B",
                help="... and the two certificate slots, e.g. 03,09.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def campaign_options(fn: Callable) -> Callable:
    """How a campaign runs: canaries, rate, abort rules, offline devices."""
    for option in reversed(
        [
            click.option(
                "--canary-share",
                type=click.FloatRange(0, 1),
                default=0.05,
                show_default=True,
                help="Share of the devices that rotate first (at least one device if above 0).",
            ),
            click.option(
                "--rate",
                "rate_per_minute",
                default="60/min",
                show_default=True,
                callback=_rate,
                help="Devices triggered at most per minute after the canaries (N/min or N/s).",
            ),
            click.option(
                "--failure-threshold",
                type=click.FloatRange(0, 1),
                default=0.1,
                show_default=True,
                help="Abort when the failed share of the devices tried passes this.",
            ),
            click.option(
                "--canary-deadline",
                default="30m",
                show_default=True,
                callback=_duration,
                help="Abort if a canary has no new certificate this long after its trigger.",
            ),
            click.option(
                "--device-deadline",
                default="2h",
                show_default=True,
                callback=_duration,
                help="A device without a new certificate this long after its trigger failed.",
            ),
            click.option(
                "--offline-after",
                default="7d",
                show_default=True,
                callback=_duration,
                help="Skip devices the gateway has not seen for this long.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def settings_of(values: dict[str, Any]) -> CampaignSettings:
    """CampaignSettings from the options of `campaign_options`."""
    return CampaignSettings(
        canary_share=values["canary_share"],
        rate_per_minute=values["rate_per_minute"],
        failure_threshold=values["failure_threshold"],
        canary_deadline=values["canary_deadline"],
        device_deadline=values["device_deadline"],
        offline_after=values["offline_after"],
    )


def create_and_report(
    backend: Campaigns | str,
    selector: Selector,
    values: dict[str, Any],
    *,
    reason: str,
    dryrun: bool,
    as_json: bool,
    factory: str | None = None,
) -> None:
    """Create a campaign (or plan one with dryrun) and print what happened.

    ``backend`` is local or remote; a store URL (with ``factory``) means local.
    """
    if isinstance(backend, str):
        backend = LocalCampaigns(backend, factory)
    order = {name: values[name] for name in ("est_server", "hsm_pkey_ids", "hsm_cert_ids")}
    plan = backend.create(selector, settings_of(values), order, reason=reason, dryrun=dryrun)
    if as_json:
        print_json(plan)
        return
    _print_plan(plan)


def view_of(data: dict[str, Any]) -> CampaignView:
    """A CampaignView from its JSON (`CampaignView.as_dict`, local or from the API)."""
    finished = data["finished_at"]
    return CampaignView(
        id=data["id"],
        rotation_id=data["rotation_id"],
        status=data["status"],
        status_reason=data["status_reason"],
        reason=data["reason"],
        selector=data["selector"],
        settings=data["settings"],
        created_at=dt.datetime.fromisoformat(data["created_at"]),
        finished_at=dt.datetime.fromisoformat(finished) if finished else None,
        counts=data["counts"],
        canary_counts=data["canary_counts"],
        devices=data["devices"],
        retried=data.get("retried", 0),
    )


def campaign_where(fn: Callable) -> Callable:
    """Where the campaigns are: --pki/--database, or --server/--token/--trust/--local."""
    return pki_option(database_option(remote_options(fn)))


def _print_plan(plan: dict[str, Any]) -> None:
    canaries = plan["canaries"]
    for uuid, other in sorted(plan["left_out"].items()):
        click.echo(f"left out: {uuid} (still rotating in campaign {other})")
    if plan["campaign"] is None:
        click.echo(
            f"dry run: would rotate {len(plan['devices'])} device(s), "
            f"{len(canaries)} of them canaries first:"
        )
        for uuid in plan["devices"]:
            click.echo(f"  {uuid}{'  (canary)' if uuid in canaries else ''}")
        click.echo("each would get config file fio-rotate-certs:")
        click.echo("".join(f"  {line}\n" for line in plan["value"].splitlines()), nl=False)
        click.echo("nothing was changed")
        return
    view = view_of(plan["campaign"])
    click.echo(
        f"campaign {view.id} created: {view.total} device(s), {len(canaries)} "
        f"canar{'y' if len(canaries) == 1 else 'ies'} first, rotation id "
        f"{view.rotation_id}"
    )
    click.echo(
        "the server's campaign runner starts it; watch it with: "
        f"certfleet campaigns show {view.id} --watch"
    )


@click.group(cls=CertfleetGroup)
def campaigns() -> None:
    """Rotation campaigns: many devices renew their certificates in waves."""


@campaigns.command("create")
@click.option("--group", metavar="G", help="The devices of group G.")
@click.option("--all", "all_devices", is_flag=True, help="Every device of the factory.")
@click.option(
    "--reissue-from-ca",
    metavar="CA",
    help="Breach response: the devices whose current certificate CA issued ...",
)
@click.option("--to-ca", metavar="NEW", help="... renewed from device CA NEW (the online CA).")
@click.option("--reason", required=True, help="Why; kept with the campaign and the config log.")
@campaign_options
@order_options
@click.option("--dryrun", is_flag=True, help="Show the devices and the file; change nothing.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@campaign_where
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def create(
    group: str | None,
    all_devices: bool,
    reissue_from_ca: str | None,
    to_ca: str | None,
    reason: str,
    dryrun: bool,
    factory: str | None,
    as_json: bool,
    **values: Any,
) -> None:
    """Rotate the certificates of a group, of all devices, or of a breached CA's devices."""
    selector = Selector(group, all_devices, reissue_from_ca, to_ca)
    backend = campaigns_from(values, factory)
    create_and_report(backend, selector, values, reason=reason, dryrun=dryrun, as_json=as_json)


@campaigns.command("list")
@click.option("--limit", default=50, show_default=True, help="At most this many campaigns.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@campaign_where
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(limit: int, factory: str | None, as_json: bool, **where: Any) -> None:
    """Campaigns, newest first, with how many devices are done."""
    items = campaigns_from(where, factory).list(limit)
    if as_json:
        print_json(items)
        return
    found = [view_of(item) for item in items]
    table = Table(title="Rotation campaigns")
    for column in ("id", "status", "rotation id", "devices", "done", "failed", "created", "reason"):
        table.add_column(column, no_wrap=column not in ("devices", "reason"))
    for view in found:
        done = view.counts["completed"]
        table.add_row(
            str(view.id),
            view.status,
            view.rotation_id,
            _selector_text(view) + f" ({view.total})",
            f"{done}/{view.total}",
            str(view.counts["failed"]),
            f"{view.created_at:%m-%d %H:%M}",
            view.reason,
        )
    console.print(table)


@campaigns.command("show")
@click.argument("campaign_id", type=int, metavar="ID")
@click.option("--watch", is_flag=True, help="Keep the view up to date until the campaign ends.")
@click.option("--every", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--devices", default=20, show_default=True, help="List this many devices.")
@campaign_where
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(
    campaign_id: int, watch: bool, every: float, devices: int, as_json: bool, **where: Any
) -> None:
    """A campaign's progress: devices per state, canaries, abort reason."""
    backend = campaigns_from(where)
    if watch and not as_json:
        _watch(backend, campaign_id, every, devices)
        return
    data = backend.show(campaign_id, devices)
    if as_json:
        print_json(data)
        return
    console.print(render(view_of(data)))


def _watch(backend: Campaigns, campaign_id: int, every: float, devices: int) -> None:
    # Remote mode polls GET /v1/campaigns/{id}; local mode reads the store each time.
    view = view_of(backend.show(campaign_id, devices))
    with Live(render(view), console=console, auto_refresh=False) as live:
        while not _finished(view):
            time.sleep(every)
            view = view_of(backend.show(campaign_id, devices))
            live.update(render(view), refresh=True)


def _finished(view: CampaignView) -> bool:
    active = view.counts["triggered"] + view.counts["in_progress"]
    return view.status in FINAL and not active


def render(view: CampaignView) -> Group:
    """The campaign as a header, one bar per state, and its devices."""
    head = Text.assemble(
        (f"campaign {view.id} ", "bold"),
        (view.status, _status_style(view.status)),
        f"  {view.rotation_id}  {_selector_text(view)}, {view.total} device(s)\n",
        f"reason: {view.reason}\n",
        _settings_text(view),
    )
    if view.status_reason:
        head.append(f"\n{view.status}: {view.status_reason}", style="bold red")
    bars = Table(box=None, show_header=True, pad_edge=False)
    for column in ("state", "devices", "canaries", ""):
        bars.add_column(column, justify="right" if column in ("devices", "canaries") else "left")
    total = max(view.total, 1)
    for state, style in STATE_STYLES.items():
        count = view.counts[state]
        bar = ProgressBar(total=total, completed=count, width=40, complete_style=style)
        bars.add_row(Text(state, style=style), str(count), str(view.canary_counts[state]), bar)
    done = view.total - sum(view.counts[s] for s in ("pending", "triggered", "in_progress"))
    overall = ProgressBar(total=total, completed=done, width=40)
    bars.add_row(Text("done", style="bold"), f"{done}/{view.total}", "", overall)
    parts: list[Any] = [head, Text(""), bars]
    if view.devices:
        parts += [Text(""), _device_table(view)]
    return Group(*parts)


def _device_table(view: CampaignView) -> Table:
    table = Table(title=f"devices (first {len(view.devices)})", title_justify="left")
    for column in ("device", "canary", "state", "triggered", "detail"):
        table.add_column(
            column, no_wrap=column != "detail", min_width=20 if column == "detail" else None
        )
    for item in view.devices:
        table.add_row(
            item["device"],
            "yes" if item["canary"] else "",
            Text(item["state"], style=STATE_STYLES.get(item["state"], "")),
            (item["triggered_at"] or "")[11:19],
            _detail(view, item),
        )
    return table


def _detail(view: CampaignView, item: dict[str, Any]) -> str:
    # Retried devices run under their own rotation id; say which.
    parts = [item["detail"] or ""]
    if item["rotation_id"] and item["rotation_id"] != view.rotation_id:
        parts.insert(0, f"retry as {item['rotation_id']}")
    return "; ".join(p for p in parts if p)


def _status_style(status: str) -> str:
    return {"running": "cyan", "paused": "yellow", "aborted": "red", "completed": "green"}.get(
        status, ""
    )


def _selector_text(view: CampaignView) -> str:
    selector = view.selector
    if "group" in selector:
        return f"group {selector['group']}"
    if "reissue_from_ca" in selector:
        return f"{selector['reissue_from_ca']} -> {selector['to_ca']}"
    return "all devices"


def _settings_text(view: CampaignView) -> str:
    s = view.settings
    return (
        f"canaries {s['canary_share']:.0%} first, then {s['rate_per_minute']}/min; abort above "
        f"{s['failure_threshold']:.0%} failed or a canary late by {s['canary_deadline']}; "
        f"device deadline {s['device_deadline']}; offline after {s['offline_after']}\n"
        f"EST server {s['est_server']}"
    )


def _action(name: str, help_text: str) -> None:
    @campaigns.command(name, help=help_text)
    @click.argument("campaign_id", type=int, metavar="ID")
    @campaign_where
    def command(campaign_id: int, **where: Any) -> None:
        view = view_of(campaigns_from(where).change(campaign_id, name))
        click.echo(f"campaign {view.id} is {view.status}{_retried(name, view)}")


def _retried(name: str, view: CampaignView) -> str:
    if name != "retry-failed":
        return ""
    return f": {view.retried} failed device(s) pending again"


_action("pause", "Trigger no more devices (triggered ones are still watched).")
_action("resume", "Carry on with a paused campaign.")
_action("abort", "Stop the campaign; pending devices are not triggered.")
_action("retry-failed", "Give failed devices a new rotation id and run the campaign again.")
