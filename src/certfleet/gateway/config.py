"""Device config: factory, group and device files merged, encrypted for one device, versioned.

Factory and group values are stored in clear, because one value serves many
devices; each device gets them encrypted to its current public key when it
asks (ECIES, go-ecies wire format), unless the file is `Unencrypted`.
Device-scope values are stored as the ciphertext the device (or the operator's
tool) made for that device's key, and served as stored.

The version a device sees is the `Last-Modified` time of the newest change to
any file that applies to it, from the change log so that deletions count.

`CheckinCache` keeps, per worker, each device's last change by the digest of
its current certificate, so that the usual check-in (nothing changed: 304)
needs no store query. An entry is good while the store's change counter has
not moved past the value it was read with (see gateway/denylist_cache.py);
the counter covers config changes, group moves, deletions, certificate
switches and CA status, so another process's change is seen within a poll.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from certfleet.pki import ecies
from certfleet.store.hot_rows import ConfigFileRow
from certfleet.store.schema import ConfigFile, ConfigScope

# Either the ORM row or the hot path's: both have name, scope, value, on_changed, unencrypted.
StoredFile = ConfigFile | ConfigFileRow

_PRECEDENCE = {ConfigScope.FACTORY: 0, ConfigScope.GROUP: 1, ConfigScope.DEVICE: 2}


def merge(files: Iterable[StoredFile]) -> dict[str, StoredFile]:
    """One file per name: the device's wins over the group's, which wins over the factory's."""
    merged: dict[str, StoredFile] = {}
    for row in sorted(files, key=lambda f: _PRECEDENCE[ConfigScope(f.scope)]):
        merged[row.name] = row
    return merged


def render(
    files: Mapping[str, StoredFile], public_key: ec.EllipticCurvePublicKey
) -> dict[str, Any]:
    """The reference's JSON, with clear factory/group values encrypted to `public_key`."""
    return {
        name: _entry(row, _served_value(row, public_key)) for name, row in sorted(files.items())
    }


def as_stored(files: Iterable[StoredFile]) -> dict[str, Any]:
    """The reference's JSON with values exactly as stored (device-scope files)."""
    return {row.name: _entry(row, row.value) for row in sorted(files, key=lambda f: f.name)}


def _served_value(row: StoredFile, public_key: ec.EllipticCurvePublicKey) -> str:
    if row.unencrypted or row.scope == ConfigScope.DEVICE:
        return row.value
    return ecies.encrypt_b64(public_key, row.value.encode())


def _entry(row: StoredFile, value: str) -> dict[str, Any]:
    return {"Value": value, "OnChanged": list(row.on_changed), "Unencrypted": row.unencrypted}


def version(last_change: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """The Last-Modified to announce for config last changed at `last_change`, seen at `now`.

    HTTP dates have whole seconds. A change later in the same second as the
    answer would carry the same date, and the device would get 304 for it
    forever after; so while that second lasts, the date announced is one
    second earlier, and the next poll gets the full config again.
    """
    if last_change is None:
        return None
    second = last_change.replace(microsecond=0)
    if now.replace(microsecond=0) <= second:
        return second - dt.timedelta(seconds=1)
    return second


def not_modified(
    if_modified_since: dt.datetime | None, current: dt.datetime | None, now: dt.datetime
) -> bool:
    """True if the device's copy (If-Modified-Since) is not older than `current`.

    A date in the future is ignored (RFC 9110 §13.1.3): it comes from a wrong
    clock, not from us, and would hide every change until then.
    """
    if if_modified_since is None or current is None or if_modified_since > now:
        return False
    return if_modified_since >= current


@functools.lru_cache(maxsize=4096)
def http_date(moment: dt.datetime) -> str:
    """`moment` as an HTTP date (RFC 9110 IMF-fixdate)."""
    return email.utils.format_datetime(moment.astimezone(dt.UTC), usegmt=True)


@dataclass(slots=True)
class CachedCheckin:
    """What a 304 needs about a device: its config's last change, when it was last marked seen."""

    config_changed: dt.datetime | None
    last_seen: dt.datetime | None
    generation: int


class CheckinCache:
    """Per worker: each current certificate's CachedCheckin, by SHA-256 digest.

    At most `limit` entries (about 200 bytes each); the oldest go first.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._entries: OrderedDict[bytes, CachedCheckin] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, generation: int) -> CachedCheckin | None:
        """The entry of `digest` if it was read at or after change counter `generation`."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.generation < generation:
            del self._entries[digest]
            return None
        return entry

    def put(self, digest: bytes, entry: CachedCheckin) -> None:
        """Remember `entry` for `digest`, replacing any older one."""
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)

    def drop(self, digest: bytes) -> None:
        """Forget `digest` (this process just changed its device)."""
        self._entries.pop(digest, None)
