"""Crash-safe rotation of the device's key and certificate (the reference's `renew-client-cert`).

Entry points, for the config daemon (through `rotation_hooks`) and
`certfleet-agent rotate`:

- `rotate_from_config_file(settings, text)`: the `fio-rotate-certs` request;
  runs unless a rotation with that ROTATIONID already ended.
- `resume_unfinished(settings)`: finish (or finish rolling back) the rotation
  a crash or a restart interrupted.
- `renew_if_due(settings, now)`: start a rotation `auto-<unix time>` once the
  certificate is far enough into its life.

The steps are those of the reference, and each name is also the update event
id: Generate new certificate, Lock device configuration on server, Update
local configuration with new key, Update device specific configuration on
server with new key, Finalize aktualizr configuration. Each step's result is
durable in the journal before the next step starts; see `rotation_steps` and
`rotation_finalize` for how a step finds out what a run before a crash did.

Failures are of two kinds. A server that cannot be reached, or is busy, pauses
the rotation: it stays unfinished and waits (exponential backoff with jitter,
30 s doubling to 1 h) before the next try. A refusal or a failed check ends it:
what the rotation changed is undone (`rotation_finalize.rollback`), the
journal says failed, and `CertRotationCompleted` reports success false.

One process rotates at a time (an exclusive lock on `<state_dir>/rotation.lock`),
and at most one rotation is unfinished: a new request first finishes the
unfinished one, and waits while that one waits.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from typing import Any

from certfleet.pki.errors import PkiError
from certfleet.pki.keys import cert_sha256, pubkey_sha256

from . import rotation_keys
from .device import Device, DeviceConfigError
from .journal import ABANDONED, COMPLETED, STEP_FAILED, Journal, JournalError, Rotation
from .local_config import config_path
from .rotation_context import (
    FILE_STORAGE,
    FINALIZE,
    GENERATE,
    LOCAL_CONFIG,
    LOCK,
    SERVER_CONFIG,
    STEPS,
    TOKEN_STORAGE,
    Credential,
    Fail,
    Retry,
    RotationContext,
    Switched,
    credential_of,
    load_current_device,
    log,
)
from .rotation_events import deliver, delivered
from .rotation_finalize import finalize, point_sota_at, rollback
from .rotation_renewal import auto_rotation_id, due_at, retry_blocked_until
from .rotation_request import RequestError, RotationRequest, id_pair, parse_rotate_file
from .rotation_steps import generate, local_config, lock, server_config
from .settings import AgentSettings

# Outcome statuses.
PENDING = "pending"  # unfinished; will be tried again after `retry_at`
FAILED = "failed"
BUSY = "busy"  # another process is rotating now
INVALID = "invalid"  # the request itself is wrong
NOTHING = "nothing"  # nothing to resume

FIRST_RETRY_S = 30.0
MAX_RETRY_S = 3600.0
LOCK_FILE = "rotation.lock"

RUNNERS: dict[str, Callable[[RotationContext], dict[str, Any]]] = {
    GENERATE: generate,
    LOCK: lock,
    LOCAL_CONFIG: local_config,
    SERVER_CONFIG: server_config,
    FINALIZE: finalize,
}
# Local problems (a key file with the wrong mode, a full disk) may be fixed by someone;
# they pause the rotation like an unreachable server instead of failing it.
LOCAL_PROBLEMS = (OSError, PkiError, DeviceConfigError)


@dataclass(frozen=True)
class Outcome:
    """What a call did: status completed, failed, abandoned, pending, busy, invalid or nothing."""

    rotation_id: str | None
    status: str
    message: str
    retry_at: dt.datetime | None = None

    @property
    def ok(self) -> bool:
        """True only if the rotation completed."""
        return self.status == COMPLETED


# -- entry points ------------------------------------------------------------------------------


def rotate_from_config_file(settings: AgentSettings, text: str) -> Outcome:
    """Run the rotation a `fio-rotate-certs` file asks for (see `rotation_request`)."""
    try:
        request = parse_rotate_file(text)
    except RequestError as exc:
        log.error("rotation request refused: %s", exc)
        return Outcome(None, INVALID, str(exc))
    return rotate(settings, request, force=False)


def rotate(settings: AgentSettings, request: RotationRequest, *, force: bool = True) -> Outcome:
    """Run `request` unless a rotation with its id already ended; `force` skips backoff waits."""
    try:
        return _rotate(settings, request, force)
    except JournalError as exc:
        return Outcome(request.rotation_id, FAILED, str(exc))


def _rotate(settings: AgentSettings, request: RotationRequest, force: bool) -> Outcome:
    with _exclusive(settings) as held:
        if not held:
            return _busy(request.rotation_id)
        journal = Journal(settings.state_dir)
        _deliver_finished(settings, journal)
        earlier = journal.unfinished()
        if earlier is not None and earlier.rotation_id != request.rotation_id:
            outcome = _run(settings, journal, earlier, force)
            if outcome.status == PENDING:
                return Outcome(
                    request.rotation_id,
                    PENDING,
                    f"waits for rotation {earlier.rotation_id}, which is {outcome.message}",
                    outcome.retry_at,
                )
        existing = journal.get(request.rotation_id)
        if existing is not None and existing.finished:
            return _already(existing)
        if existing is None:
            try:
                existing = _begin(settings, journal, request)
            except (RequestError, JournalError) as exc:
                return Outcome(request.rotation_id, INVALID, str(exc))
            except LOCAL_PROBLEMS as exc:
                return Outcome(request.rotation_id, FAILED, f"cannot start: {exc}")
        return _run(settings, journal, existing, force)


def resume_unfinished(settings: AgentSettings, *, force: bool = False) -> Outcome | None:
    """Finish the unfinished rotation, if there is one (after its backoff unless `force`)."""
    with _exclusive(settings) as held:
        if not held:
            return _busy(None)
        try:
            journal = Journal(settings.state_dir)
            _deliver_finished(settings, journal)
            unfinished = journal.unfinished()
            if unfinished is None:
                return None
            return _run(settings, journal, unfinished, force)
        except JournalError as exc:
            return Outcome(None, FAILED, str(exc))


def abandon_unfinished(settings: AgentSettings, reason: str) -> Outcome | None:
    """Stop the unfinished rotation, undoing what it changed; None if there is none."""
    if not reason.strip():
        return Outcome(None, INVALID, "abandoning a rotation needs a reason")
    with _exclusive(settings) as held:
        if not held:
            return _busy(None)
        try:
            journal = Journal(settings.state_dir)
            unfinished = journal.unfinished()
            if unfinished is None:
                return None
            unfinished.note(abandon=reason.strip())
            return _run(settings, journal, unfinished, force=True)
        except JournalError as exc:
            return Outcome(None, FAILED, str(exc))


def renew_if_due(settings: AgentSettings, now: dt.datetime | None = None) -> Outcome | None:
    """Start a renewal if the certificate is due (see `rotation_renewal`); None if not."""
    if not settings.renewal.enabled:
        return None
    now = now or dt.datetime.now(dt.UTC)
    unfinished = resume_unfinished(settings)
    if unfinished is not None:
        return unfinished
    request = _renewal_request(settings, now)
    return None if request is None else rotate(settings, request, force=False)


def _renewal_request(settings: AgentSettings, now: dt.datetime) -> RotationRequest | None:
    """The renewal to start now, or None (not due, not configured, or failed recently)."""
    device = load_current_device(settings)
    cert = device.certificate()
    due = due_at(cert, settings.renewal)
    if now < due:
        return None
    server = settings.renewal.est_server
    if server is None:
        log.warning(
            "certificate serial %x is due for renewal since %s, but agent.toml has no "
            "[renewal] est_server; not renewing",
            cert.serial_number,
            f"{due:%Y-%m-%d %H:%M} UTC",
        )
        return None
    journal = Journal(settings.state_dir)
    blocked = retry_blocked_until(journal, cert_sha256(cert))
    if blocked is not None and now < blocked:
        log.info("renewal failed before; next try after %s", f"{blocked:%Y-%m-%d %H:%M} UTC")
        return None
    pkey_ids, cert_ids = _last_slot_pairs(journal)
    if device.uses_token and not (pkey_ids and cert_ids):
        log.warning(
            "certificate is due for renewal, but no earlier rotation named the token slots "
            "to alternate (PKEYIDS/CERTIDS); rotate once with --pkey-ids/--cert-ids"
        )
        return None
    return RotationRequest(
        auto_rotation_id(now), server, pkey_ids=pkey_ids, cert_ids=cert_ids, origin="renewal"
    )


def _last_slot_pairs(journal: Journal) -> tuple[str | None, str | None]:
    """PKEYIDS and CERTIDS of the latest rotation that had them (token devices renew with them)."""
    for earlier in reversed(journal.all()):
        if earlier.params.get("pkey_ids") and earlier.params.get("cert_ids"):
            return earlier.params["pkey_ids"], earlier.params["cert_ids"]
    return None, None


def rotation_status(settings: AgentSettings, last: int = 5) -> list[dict[str, Any]]:
    """The unfinished rotation and the latest ended ones, newest first, for people and tests."""
    rotations = Journal(settings.state_dir).all()
    shown = [r for r in rotations if not r.finished] + [r for r in rotations if r.finished][-last:]
    return [_status_of(r) for r in sorted(shown, key=lambda r: r.started_at, reverse=True)]


# -- running one rotation -------------------------------------------------------------------


def _run(settings: AgentSettings, journal: Journal, rotation: Rotation, force: bool) -> Outcome:
    waiting = _waiting_until(rotation)
    if waiting is not None and not force:
        return _pending(rotation, rotation.progress["retry"]["error"], waiting)
    try:
        ctx = RotationContext(settings, journal, rotation, load_current_device(settings))
    except LOCAL_PROBLEMS as exc:
        return _backoff_bare(rotation, "start", exc)
    try:
        return _drive(ctx)
    finally:
        ctx.close()


def _drive(ctx: RotationContext) -> Outcome:
    """Run the rotation's remaining steps, or undo it if it failed or is being abandoned."""
    rotation = ctx.rotation
    _clean_temp_files(ctx)
    _deliver(ctx)
    if rotation.progress.get("abandon") or _last_failed(rotation):
        return _conclude_failure(ctx)
    while (step := rotation.next_step()) is not None:
        try:
            details = RUNNERS[step](ctx)
        except Retry as exc:
            return _backoff(ctx, step, exc)
        except Fail as exc:
            rotation.record(step, False, error=str(exc), **exc.details)
            return _conclude_failure(ctx)
        except LOCAL_PROBLEMS as exc:
            return _backoff(ctx, step, Retry(f"{type(exc).__name__}: {exc}"))
        rotation.record(step, True, **details)
        if rotation.progress.get("retry"):
            rotation.note(retry=None)  # the wait was for this step; the next one starts fresh
        _deliver(ctx)
    rotation.finish(True, summary=_completed_text(ctx))
    _deliver(ctx)
    return Outcome(rotation.rotation_id, COMPLETED, rotation.summary or "completed")


def _conclude_failure(ctx: RotationContext) -> Outcome:
    """Undo what the failed or abandoned rotation changed, then end it and report."""
    rotation = ctx.rotation
    reason = rotation.progress.get("abandon")
    wants_rollback = not _last_failed(rotation) or rotation.results[-1]["details"].get(
        "rollback", True
    )
    try:
        undone = rollback(ctx) if wants_rollback else ["nothing undone: no credential works"]
    except Switched:
        return _switched_meanwhile(ctx)
    except Retry as exc:
        return _backoff(ctx, "rollback", exc)
    except LOCAL_PROBLEMS as exc:
        return _backoff(ctx, "rollback", Retry(f"{type(exc).__name__}: {exc}"))
    if reason:
        rotation.abandon(f"{reason} ({'; '.join(undone) or 'nothing to undo'})")
        status, text = ABANDONED, rotation.reason or reason
    else:
        failed = rotation.results[-1]
        text = f"at '{failed['step']}': {failed['details'].get('error', 'failed')}"
        if undone:
            text += "; " + "; ".join(undone)
        rotation.finish(False, summary=f"failed {text}")
        status = FAILED
    _deliver(ctx)
    log.log(
        logging.WARNING if reason else logging.ERROR,
        "rotation %s %s: %s",
        rotation.rotation_id,
        status,
        text,
    )
    return Outcome(rotation.rotation_id, status, text)


def _switched_meanwhile(ctx: RotationContext) -> Outcome:
    """Rollback found the gateway on the new key already: the only way left is forward."""
    rotation = ctx.rotation
    if rotation.progress.get("abandon") and not _last_failed(rotation):
        rotation.note(abandon=None)
        log.warning("rotation %s cannot be abandoned: the switch is done", rotation.rotation_id)
        return _run(ctx.settings, ctx.journal, rotation, force=True)
    # A step failed after the switch went through: the device keeps the new credential.
    point_sota_at(ctx, ctx.new)
    rotation_keys.remove_credential(ctx, ctx.old)
    text = "a step failed, but the gateway had switched to the new certificate, now in use"
    rotation.finish(False, summary=text)
    _deliver(ctx)
    return Outcome(rotation.rotation_id, FAILED, text)


def _backoff(ctx: RotationContext, step: str, exc: Retry) -> Outcome:
    outcome = _backoff_bare(ctx.rotation, step, exc)
    _deliver(ctx)
    return outcome


def _backoff_bare(rotation: Rotation, step: str, exc: Exception) -> Outcome:
    previous = rotation.progress.get("retry", {})
    tries = previous.get("count", 0) + 1 if previous.get("step") == step else 1
    delay = getattr(exc, "retry_after", None) or min(
        MAX_RETRY_S, FIRST_RETRY_S * 2 ** min(tries - 1, 20)
    ) * random.uniform(0.5, 1.0)
    retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
    message = f"'{step}' ({exc})"
    rotation.note(
        retry={"step": step, "count": tries, "next_at": retry_at.isoformat(), "error": message}
    )
    outcome = _pending(rotation, message, retry_at)
    log.warning("rotation %s %s", rotation.rotation_id, outcome.message)
    return outcome


def _pending(rotation: Rotation, message: str, retry_at: dt.datetime) -> Outcome:
    return Outcome(
        rotation.rotation_id,
        PENDING,
        f"paused at {message}; next try after {retry_at:%Y-%m-%d %H:%M:%S} UTC, "
        "or now with `certfleet-agent rotate --resume`",
        retry_at,
    )


def _waiting_until(rotation: Rotation) -> dt.datetime | None:
    retry = rotation.progress.get("retry")
    if not retry:
        return None
    next_at = dt.datetime.fromisoformat(retry["next_at"])
    return next_at if next_at > dt.datetime.now(dt.UTC) else None


def _last_failed(rotation: Rotation) -> bool:
    return bool(rotation.results) and rotation.results[-1]["result"] == STEP_FAILED


# -- beginning -------------------------------------------------------------------------------


def _begin(settings: AgentSettings, journal: Journal, request: RotationRequest) -> Rotation:
    """Record a new rotation: what was asked, and where the old and new credentials live."""
    device = load_current_device(settings)
    old = credential_of(device)
    cert = device.certificate()
    params = {
        "origin": request.origin,
        "est_server": request.est_server,
        "storage": TOKEN_STORAGE if device.uses_token else FILE_STORAGE,
        "replace_next_key": request.replace_next_key,
        "pkey_ids": request.pkey_ids,
        "cert_ids": request.cert_ids,
        "old": {
            **old.as_json(),
            "serial": f"{cert.serial_number:x}",
            "cert_sha256": cert_sha256(cert),
            "key_sha256": pubkey_sha256(cert.public_key()),  # type: ignore[arg-type]
        },
        "new": _new_credential(device, request, old).as_json(),
    }
    rotation = journal.begin(request.rotation_id, STEPS, params)
    log.info("rotation %s started (%s)", request.rotation_id, request.origin)
    return rotation


def _new_credential(device: Device, request: RotationRequest, old: Credential) -> Credential:
    """Token: the slots of PKEYIDS/CERTIDS not in use. Files: new names after the rotation id."""
    if device.uses_token:
        keys, certs = id_pair(request.pkey_ids, "PKEYIDS"), id_pair(request.cert_ids, "CERTIDS")
        return Credential(_other(keys, old.key, "PKEYIDS"), _other(certs, old.cert, "CERTIDS"))
    for n in count(1):
        suffix = "" if n == 1 else f"-{n}"
        new = Credential(
            f"pkey-{request.rotation_id}{suffix}.pem", f"client-{request.rotation_id}{suffix}.pem"
        )
        if not any((device.base_path / name).exists() for name in (new.key, new.cert)):
            return new
    raise AssertionError("unreachable")


def _other(pair: tuple[str, str], current: str, name: str) -> str:
    from certfleet.pki.pkcs11_signer import parse_hex_id

    in_use = parse_hex_id(current).hex()
    if in_use not in pair:
        raise RequestError(
            f"{name}={','.join(pair)} does not include the id in use now ({current})"
        )
    return pair[1] if pair[0] == in_use else pair[0]


# -- events, cleanup, texts ------------------------------------------------------------------


def _deliver(ctx: RotationContext) -> None:
    """Send the rotation's events not sent yet, with whatever credential sota.toml names now."""
    try:
        current = credential_of(load_current_device(ctx.settings))
    except LOCAL_PROBLEMS as exc:
        log.info("rotation %s: events wait (%s)", ctx.rotation_id, exc)
        return
    ctx.events_sent = deliver(ctx.rotation, ctx.gateway(current), ctx.events_sent)


def _deliver_finished(settings: AgentSettings, journal: Journal) -> None:
    """Resend the events of ended rotations that could not be sent at the time."""
    waiting = [r for r in journal.all() if r.finished and not delivered(r)]
    if not waiting:
        return
    try:
        device = load_current_device(settings)
        for rotation in waiting:
            ctx = RotationContext(settings, journal, rotation, device)
            try:
                _deliver(ctx)
            finally:
                ctx.close()
    except LOCAL_PROBLEMS as exc:
        log.info("events of ended rotations wait (%s)", exc)


def _clean_temp_files(ctx: RotationContext) -> None:
    base = ctx.device.base_path
    paths = [ctx.settings.sota_config, config_path(ctx.settings.state_dir)]
    if not ctx.uses_token:
        paths += [base / ctx.new.key, base / ctx.new.cert]
    rotation_keys.remove_temp_files(paths)


def _completed_text(ctx: RotationContext) -> str:
    generated = ctx.step_details(GENERATE)
    return (
        f"now using certificate serial {generated.get('serial')} "
        f"(valid until {generated.get('not_after')}); previous serial "
        f"{ctx.params['old'].get('serial')} is replaced"
    )


def _already(rotation: Rotation) -> Outcome:
    when = rotation.ended_at or "?"
    if rotation.state == COMPLETED:
        return Outcome(rotation.rotation_id, COMPLETED, f"already completed at {when}")
    return Outcome(
        rotation.rotation_id,
        FAILED if rotation.state != ABANDONED else ABANDONED,
        f"already {rotation.state} at {when} ({rotation.summary or rotation.reason or '-'}); "
        "send a new ROTATIONID to try again",
    )


def _busy(rotation_id: str | None) -> Outcome:
    return Outcome(rotation_id, BUSY, "another certfleet-agent process is rotating now; try later")


def _status_of(rotation: Rotation) -> dict[str, Any]:
    return {
        "rotation_id": rotation.rotation_id,
        "state": rotation.state,
        "started_at": rotation.started_at,
        "ended_at": rotation.ended_at,
        "steps": [(r["step"], r["result"]) for r in rotation.results],
        "next_step": rotation.next_step(),
        "retry": rotation.progress.get("retry") if not rotation.finished else None,
        "summary": rotation.summary or rotation.reason,
        "events_delivered": delivered(rotation),
        "params": rotation.params,
        "progress": {k: v for k, v in rotation.progress.items() if k != "retry"},
    }


@contextmanager
def _exclusive(settings: AgentSettings) -> Iterator[bool]:
    """Hold the state directory's rotation lock; yields False if another process holds it."""
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(settings.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
