"""How long the agent waits between polls and after failures.

Thousands of devices restarting together (power cut, gateway outage) must not
come back in step: every wait is randomized. Regular polls spread by a share of
the interval; retries after failures use exponential backoff with full jitter
(a uniform wait between 0 and a ceiling that doubles per failure).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_RETRY_CEILING_S = 5.0
# With a short poll interval, start lower so that the doubling still has room to grow.
FIRST_RETRY_SHARE = 1 / 8


def jittered(interval: float, share: float, rng: random.Random | None = None) -> float:
    """`interval` moved by up to ± `share` of itself."""
    spread = interval * share
    return max(0.0, interval + (rng or random).uniform(-spread, spread))


@dataclass
class Backoff:
    """Retry waits that double per failure up to `ceiling`; `reset()` after a success."""

    first: float
    ceiling: float
    failures: int = 0

    @classmethod
    def for_poll_interval(cls, poll_interval: float) -> Backoff:
        """Start at 5 s (or an eighth of the poll interval if shorter), end at the interval."""
        first = min(FIRST_RETRY_CEILING_S, poll_interval * FIRST_RETRY_SHARE)
        return cls(first=first, ceiling=poll_interval)

    def next_wait(self, rng: random.Random | None = None) -> tuple[float, float]:
        """(wait, its ceiling) for the failure just seen; each call counts one failure."""
        # min() before the power: 2**failures alone overflows a float after ~1000 failures.
        ceiling = min(self.ceiling, self.first * 2 ** min(self.failures, 64))
        self.failures += 1
        return (rng or random).uniform(0.0, ceiling), ceiling

    def reset(self) -> None:
        """Forget past failures."""
        self.failures = 0
