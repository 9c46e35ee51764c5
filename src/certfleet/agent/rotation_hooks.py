"""Every call the config daemon makes into key rotation (`certfleet.agent.rotation`).

Rotation is imported only when it is needed: a device that never rotates does
not pay for loading the EST client. `resume_unfinished` and `renew_if_due` run at the start of
each cycle; `rotate_from_config_file` is the built-in `renew-client-cert`
handler of the reference system's rotation trigger file.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .settings import AgentSettings

if TYPE_CHECKING:
    from .rotation import Outcome

log = logging.getLogger(__name__)


class RotationNotDone(Exception):
    """The requested rotation did not complete (failed, paused, refused or busy)."""


def resume_unfinished(settings: AgentSettings) -> None:
    """Finish (or roll back) a rotation a crash or restart interrupted."""
    _cycle_hook("resume_unfinished", settings)


def renew_if_due(settings: AgentSettings) -> None:
    """Renew the certificate if enough of its lifetime has passed (device-initiated)."""
    _cycle_hook("renew_if_due", settings)


def rotate_from_config_file(settings: AgentSettings, text: str) -> str:
    """Run the rotation a `renew-client-cert` config file asks for.

    Returns what happened for the log; raises RotationNotDone unless the rotation
    completed (now or before), so a failed or paused rotation is reported.
    """
    from . import rotation

    outcome = rotation.rotate_from_config_file(settings, text)
    if not outcome.ok:
        raise RotationNotDone(describe(outcome))
    return describe(outcome)


def describe(outcome: Outcome) -> str:
    """One line for the log: rotation id, status and the rotation's own message."""
    return f"rotation {outcome.rotation_id or '(no id)'} {outcome.status}: {outcome.message}"


def _cycle_hook(name: str, settings: AgentSettings) -> None:
    """Call rotation's `name`; a failure is logged, never stops config polling."""
    from . import rotation

    hook = getattr(rotation, name)
    try:
        outcome = hook(settings)
    except Exception as exc:
        # Config must keep flowing even while rotation fails: it may carry the fix.
        log.error("key rotation (%s) failed: %s", name, exc)
        log.debug("key rotation (%s) failure", name, exc_info=True)
        return
    if outcome is not None:
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(level, "key rotation (%s): %s", name, describe(outcome))
