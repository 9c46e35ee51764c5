"""The reason an operator gives for a change, checked the same way for every change.

Reasons go into the audit log, the config log, events and the server log, so
they are one line of printable text of bounded size.
"""

from __future__ import annotations

from certfleet.store.errors import StoreError

MAX_REASON = 1000


def checked_reason(reason: str | None, kept_in: str) -> str:
    """`reason` stripped; StoreError unless it has 1 to 1000 printable characters."""
    text = (reason or "").strip()
    if not text or len(text) > MAX_REASON or not text.isprintable():
        raise StoreError(
            f"give a reason of 1 to {MAX_REASON} printable characters on one line; "
            f"it is kept in {kept_in}"
        )
    return text
