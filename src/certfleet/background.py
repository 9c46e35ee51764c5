"""Background loops of a server worker: run something every few seconds, stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


async def repeat(
    seconds: float, action: Callable[[], Awaitable[None]], what: str, log: logging.Logger
) -> None:
    """Run `action` every `seconds` until cancelled.

    A failure (a store outage, say) must not end the loop; it is logged once
    when it starts and once when it is over, not on every round.
    """
    failing = False
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception as exc:
            if not failing:
                log.warning("%s failed, keeping the last state: %r", what, exc)
            failing = True
        else:
            if failing:
                log.warning("%s works again", what)
            failing = False


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait until it is over."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
