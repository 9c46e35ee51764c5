"""Exponential backoff with full jitter for failed deliveries."""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2**64 s is far past any cap; stops float overflow on very old events.
MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n: uniform in [0, min(cap, base * factor**n)]."""

    base: float = 1.0
    factor: float = 2.0
    cap: float = 600.0

    def delay(self, failures_before: int) -> float:
        """Seconds to wait after a failure, given how many failures came before it."""
        exponent = min(max(failures_before, 0), MAX_EXPONENT)
        ceiling = min(self.cap, self.base * self.factor**exponent)
        # Full jitter spreads the retries of many events that failed together.
        return random.uniform(0, ceiling)
