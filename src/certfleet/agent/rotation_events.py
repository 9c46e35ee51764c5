"""A rotation's update events, derived from its journal, and their delivery.

The journal is the durable queue: every event is rebuilt from a durable
record (the start, each step's result, the end), with an id from
`stable_event_id` and the record's own time, so the same record always gives
the same event. Delivery sends what this process has not sent yet; after a
crash everything is sent again and the gateway counts the repeats as
duplicates. Once a finished rotation's events all went out, the journal notes
it and they are not sent again.

`CertRotationCompleted` says what happened: success only if every step did,
otherwise the failed step (or the abandon reason) and what the rollback did.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import https
from .gateway_client import GatewayClient, GatewayRefused
from .journal import COMPLETED, DONE, Rotation
from .rotation_context import FINALIZE, GENERATE, LOCAL_CONFIG, LOCK, SERVER_CONFIG, log
from .update_events import ROTATION_COMPLETED, ROTATION_STARTED, stable_event_id, update_event

MAX_DETAILS_CHARS = 1000


def rotation_events(rotation: Rotation) -> list[dict[str, Any]]:
    """Every event the journal of `rotation` accounts for so far, in order."""
    rid = rotation.rotation_id
    events = [_event(rid, ROTATION_STARTED, True, _started(rotation), rotation.started_at)]
    for result in rotation.results:
        ok = result["result"] == DONE
        events.append(_event(rid, result["step"], ok, _step_text(result), result["time"]))
    if rotation.finished:
        ok = rotation.state == COMPLETED
        text = rotation.summary or rotation.reason or rotation.state
        events.append(_event(rid, ROTATION_COMPLETED, ok, text, rotation.ended_at))
    return events


def delivered(rotation: Rotation) -> bool:
    """True once all events of a finished rotation reached the gateway."""
    return rotation.finished and rotation.progress.get("events_delivered") == len(
        rotation_events(rotation)
    )


def deliver(rotation: Rotation, gateway: GatewayClient, already: int = 0) -> int:
    """Send the events after the first `already`; returns how many are sent now."""
    events = rotation_events(rotation)
    if rotation.progress.get("events_delivered") == len(events):
        return len(events)
    pending = events[already:]
    try:
        if pending:
            gateway.send_events(pending)
    except (https.Unreachable, GatewayRefused) as exc:
        log.info("rotation %s: events wait in the journal (%s)", rotation.rotation_id, exc)
        return already
    if rotation.finished:
        rotation.note(events_delivered=len(events))
    return len(events)


def _event(rid: str, step: str, ok: bool, details: str, when: str | None) -> dict[str, Any]:
    event = update_event(
        step, rid, ok, details[:MAX_DETAILS_CHARS], event_id=stable_event_id(rid, step)
    )
    if when:
        moment = dt.datetime.fromisoformat(when).astimezone(dt.UTC)
        event["deviceTime"] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return event


def _started(rotation: Rotation) -> str:
    params = rotation.params
    old = params.get("old", {})
    return (
        f"requested by {params.get('origin', '?')}; EST server {params.get('est_server', '?')}; "
        f"current certificate serial {old.get('serial', '?')}"
    )


def _step_text(result: dict[str, Any]) -> str:
    details = result.get("details", {})
    if result["result"] != DONE:
        return str(details.get("error", "failed"))
    describe = _DESCRIBE.get(result["step"])
    if describe is not None:
        try:
            return describe(details)
        except (KeyError, TypeError):
            pass  # an older journal's details: fall back to the raw values
    return "; ".join(f"{name}: {value}" for name, value in sorted(details.items()))


def _generated(d: dict[str, Any]) -> str:
    return (
        f"new key in {d['key']}; certificate serial {d['serial']} valid until {d['not_after']} "
        f"in {d['cert']} ({d['est_requests']} EST request(s))"
    )


def _locked(d: dict[str, Any]) -> str:
    text = f"next key sha256 {d['next_pubkey_sha256'][:16]}… announced; device config locked"
    if d.get("replaced_next_key"):
        text += f"; replaced the earlier next key {d['replaced_next_key'][:16]}…"
    return text


def _reencrypted(d: dict[str, Any]) -> str:
    text = f"{d['reencrypted']} value(s) re-encrypted, {d['already']} already for the new key"
    if d.get("unreadable"):
        text += f"; opened with neither key: {', '.join(d['unreadable'])}"
    return text


def _finalized(d: dict[str, Any]) -> str:
    restarts = ", ".join(f"{r['command']} -> {r['exit']}" for r in d["restarts"]) or "none"
    return (
        f"sota.toml names the new key and certificate; gateway accepted serial "
        f"{d['confirmed_serial']}; restarts: {restarts}; removed: {', '.join(d['removed']) or '-'}"
    )


_DESCRIBE = {
    GENERATE: _generated,
    LOCK: _locked,
    LOCAL_CONFIG: _reencrypted,
    SERVER_CONFIG: _reencrypted,
    FINALIZE: _finalized,
}
