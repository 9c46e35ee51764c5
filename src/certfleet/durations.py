"""Durations as operators type them ('90s', '30m', '12h', '30d', '2w'), for the CLI and the API.

Bounded, so that a typo such as 999999999w is refused with a reason instead of
overflowing a date computed from it.
"""

from __future__ import annotations

import datetime as dt
import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
LONGEST = dt.timedelta(days=36500)
_DURATION = re.compile(r"([0-9]{1,12})([smhdw])")


def parse_duration(text: str) -> dt.timedelta:
    """A positive duration of at most 100 years; otherwise ValueError whose message
    says what is wrong with `text` (to follow the text itself)."""
    match = _DURATION.fullmatch(text.strip().lower())
    seconds = int(match.group(1)) * UNITS[match.group(2)] if match else 0
    if not match or seconds == 0:
        raise ValueError("is not a positive duration like 30m, 12h, 7d or 2w")
    if seconds > LONGEST.total_seconds():
        raise ValueError(f"is longer than {LONGEST.days}d (100 years)")
    return dt.timedelta(seconds=seconds)
