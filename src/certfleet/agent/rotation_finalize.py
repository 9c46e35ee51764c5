"""The last step (switch to the new credential and confirm it) and the rollback.

Finalize, in this order, each part safe to repeat after a crash:

1. `sota.toml` is rewritten (one durable rename) to name the new key and
   certificate; a file that already names them is left alone.
2. `restart_commands` run, so the OTA client and the config daemon load them.
3. `GET /device` with the new credential. The gateway switches the device to
   the announced key on the first request with it, deny-lists the old
   certificate and lifts the config lock; a repeat just answers.
4. Only then the old key and certificate are deleted (unlink, then fsync of
   the directory).

If the gateway refuses the new certificate while the old one still works, the
rotation is rolled back: `sota.toml` names the old files again, the local and
the server copy of the device config are re-encrypted for the old key, and the
new key is withdrawn on the gateway (which lifts the config lock) and deleted.
If the server's copy cannot be put back, the key stays announced and kept, so
nothing encrypted to it is lost; the next rotation replaces it, since the
journal shows that this device made it.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import time
import tomllib
from typing import Any

from certfleet.pki.files import write_atomic

from . import https, rotation_keys
from .gateway_client import GatewayRefused
from .rotation_context import (
    FINALIZE,
    GENERATE,
    LOCAL_CONFIG,
    LOCK,
    SERVER_CONFIG,
    Credential,
    Fail,
    Retry,
    RotationContext,
    Switched,
    log,
)
from .rotation_steps import gateway_failure, reencrypt_local, reencrypt_server

RESTART_TIMEOUT_S = 120
CONFIRM_ATTEMPTS = 3
CONFIRM_PAUSE_S = 1.0
FILE_KEYS = ("import", "tls_pkey_path", "tls_clientcert_path")
TOKEN_KEYS = ("p11", "tls_pkey_id", "tls_clientcert_id")
_SECTION = re.compile(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_ASSIGNMENT = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def finalize(ctx: RotationContext) -> dict[str, Any]:
    """Point sota.toml at the new credential, restart, confirm with the gateway, drop the old."""
    rewritten = point_sota_at(ctx, ctx.new)
    restarts = run_restart_commands(ctx)
    view = _confirm_new(ctx)
    removed = rotation_keys.remove_credential(ctx, ctx.old)
    return {
        "sota_rewritten": rewritten,
        "restarts": restarts,
        "confirmed_serial": view.get("cert", {}).get("serial"),
        "removed": removed,
    }


# -- sota.toml ---------------------------------------------------------------------------------


def point_sota_at(ctx: RotationContext, credential: Credential) -> bool:
    """Rewrite sota.toml durably to name `credential`; False if it names it already."""
    path = ctx.settings.sota_config
    text = path.read_text()
    section, key_name, cert_name = TOKEN_KEYS if ctx.uses_token else FILE_KEYS
    wanted = {key_name: credential.key, cert_name: credential.cert}
    updated = set_values(text, section, wanted)
    if updated == text:
        return False
    # Checked before writing: a sota.toml the OTA client cannot read would cut the device off.
    parsed = tomllib.loads(updated).get(section, {})
    if any(parsed.get(name) != value for name, value in wanted.items()):
        raise Fail(f"{path}: rewriting [{section}] did not give the values wanted")
    write_atomic(path, updated.encode(), stat.S_IMODE(path.stat().st_mode))
    log.info(
        "rotation %s: %s names %s and %s", ctx.rotation_id, path, credential.key, credential.cert
    )
    return True


def set_values(text: str, section: str, values: dict[str, str]) -> str:
    """`text` with `name = "value"` lines of [section] replaced; comments and order kept."""
    lines = text.splitlines(keepends=True)
    current, found = None, set()
    for number, line in enumerate(lines):
        header = _SECTION.match(line)
        if header:
            current = header.group(1)
            continue
        assignment = _ASSIGNMENT.match(line)
        if current == section and assignment and assignment.group(1) in values:
            name = assignment.group(1)
            lines[number] = f"{name} = {json.dumps(values[name])}\n"
            found.add(name)
    missing = sorted(set(values) - found)
    if missing:
        raise Fail(f"sota.toml has no {', '.join(missing)} in [{section}] to point at new files")
    return "".join(lines)


# -- restart -----------------------------------------------------------------------------------


def run_restart_commands(ctx: RotationContext) -> list[dict[str, Any]]:
    """Run restart_commands; a failing one is reported, it does not undo the switch."""
    results = []
    for command in ctx.settings.restart_commands:
        try:
            done = subprocess.run(
                list(command),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=RESTART_TIMEOUT_S,
                check=False,
            )
            code: int | str = done.returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            code = type(exc).__name__
        if code != 0:
            log.warning("rotation %s: %s ended with %s", ctx.rotation_id, command[0], code)
        results.append({"command": command[0], "exit": code})
    return results


# -- confirm -----------------------------------------------------------------------------------


def _confirm_new(ctx: RotationContext) -> dict[str, Any]:
    """GET /device with the new credential; Fail (roll back) if refused while the old works."""
    problem: Exception | None = None
    for attempt in range(CONFIRM_ATTEMPTS):
        if attempt:
            time.sleep(CONFIRM_PAUSE_S)
        try:
            return ctx.gateway(ctx.new).device()
        except GatewayRefused as exc:
            if not exc.cert_refused:
                raise gateway_failure(exc) from None
            problem = exc
            break
        except https.Unreachable as exc:
            problem = exc  # a TLS refusal of the certificate also looks like this
    if _old_still_works(ctx):
        raise Fail(f"the gateway refused the new certificate ({problem}) while the old one works")
    if isinstance(problem, https.Unreachable):
        raise Retry(f"gateway unreachable: {problem}")
    raise Fail(
        f"the gateway refuses both the new certificate ({problem}) and the old one",
        rollback=False,
    )


def _old_still_works(ctx: RotationContext) -> bool:
    try:
        ctx.gateway(ctx.old).device()
    except GatewayRefused as exc:
        if not exc.cert_refused:
            raise gateway_failure(exc) from None
        return False
    except https.Unreachable as exc:
        raise Retry(f"gateway unreachable: {exc}") from None
    return True


def _new_is_current(ctx: RotationContext) -> bool:
    try:
        ctx.gateway(ctx.new).device()
    except (GatewayRefused, https.Unreachable):
        return False
    return True


# -- rollback ------------------------------------------------------------------------------


def rollback(ctx: RotationContext) -> list[str]:
    """Put back what the rotation changed so the device runs on its old credential.

    Every part looks at the real state first, so a rollback cut short by a
    crash is finished by running it again. Raises Switched if the gateway
    already moved to the new key (then only going forward is possible).
    """
    said: list[str] = []
    if ctx.reached(FINALIZE):
        if not _old_still_works(ctx) and _new_is_current(ctx):
            raise Switched(ctx.rotation_id)
        _undo(said, "sota.toml", _sota_back, ctx)
    keep_new_key = False
    if ctx.reached(LOCAL_CONFIG):
        _undo(said, "local config", reencrypt_local, ctx, ctx.signer(ctx.new), ctx.signer(ctx.old))
    if ctx.reached(SERVER_CONFIG):
        source, target = ctx.signer(ctx.new), ctx.signer(ctx.old)
        restored = _undo(said, "server device config", reencrypt_server, ctx, source, target)
        keep_new_key = not restored
    if keep_new_key:
        said.append("the new key is kept: server values are still encrypted to it")
    else:
        if ctx.reached(LOCK):
            said.append(_lift_lock(ctx))
        removed = rotation_keys.remove_credential(ctx, ctx.new)
        if removed:
            said.append(f"removed {', '.join(removed)}")
    return said


def _lift_lock(ctx: RotationContext) -> str:
    """Withdraw the key the rotation announced, so the device's config is unlocked again."""
    key_sha256 = ctx.step_details(GENERATE)["key_sha256"]
    try:
        withdrawn = ctx.gateway(ctx.old).withdraw_next_key(key_sha256)
    except GatewayRefused as exc:
        if exc.code == "other-next-key":
            return "config lock kept: another next key was announced meanwhile"
        failure = gateway_failure(exc)
        if isinstance(failure, Retry):
            raise failure from None
        return f"config lock not lifted ({failure})"
    except https.Unreachable as exc:
        raise Retry(f"gateway unreachable: {exc}") from None
    return "config lock lifted (next key withdrawn)" if withdrawn else "no next key left announced"


def _sota_back(ctx: RotationContext) -> None:
    if point_sota_at(ctx, ctx.old):
        run_restart_commands(ctx)


def _undo(said: list[str], what: str, action: Any, *args: Any) -> bool:
    """Run one part of the rollback; a failed part is reported and the others still run."""
    try:
        action(*args)
    except Fail as exc:
        said.append(f"{what} not restored ({exc})")
        return False
    said.append(f"{what} restored for the previous key")
    return True
