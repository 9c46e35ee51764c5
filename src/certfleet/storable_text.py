"""Text the store can hold: no NUL character (PostgreSQL refuses one in text) and no
unpaired surrogate (UTF-8 cannot encode one; JSON's \\ud800 escape makes one).

Checked where requests come in, so that such text is refused with a 400 and a
reason instead of failing in the database driver.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def unstorable(value: Any) -> str | None:
    """Why a string in `value` (a JSON value, object keys included) cannot be stored; None
    if every one can."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            reason = _text_problem(item)
            if reason:
                return reason
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def unstorable_pairs(pairs: Iterable[tuple[str, str]]) -> str | None:
    """Like `unstorable` for names and values, e.g. of a query string."""
    for name, text in pairs:
        reason = _text_problem(name) or _text_problem(text)
        if reason:
            return f"{name!r}: {reason}"
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"an unpaired surrogate ({text[exc.start]!r})"
    return None
