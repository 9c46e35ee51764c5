"""When a device renews its certificate by itself, before anyone asks it to.

Renewal is due once `after_share` of the certificate's lifetime has passed,
moved by up to ± `jitter_share` of the lifetime so that a fleet whose
certificates were issued together does not renew in the same minute. The
jitter comes from the certificate's fingerprint: fixed for one certificate
(the due time never moves between polls), different between devices.

A renewal that failed is not retried at once: the next one for the same
certificate waits 1 h after the first failure, then 4 h, 16 h, 64 h, and at
most 7 days after each later one, so a device whose renewal cannot work does
not hammer the EST server.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .journal import ABANDONED, FAILED, Journal
from .settings import Renewal

AUTO_PREFIX = "auto-"
FIRST_RETRY = dt.timedelta(hours=1)
MAX_RETRY = dt.timedelta(days=7)


def due_at(cert: x509.Certificate, renewal: Renewal) -> dt.datetime:
    """When `cert` is due for renewal (UTC)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    digest = cert.fingerprint(hashes.SHA256())
    fraction = int.from_bytes(digest[:8], "big") / 2**64  # in [0, 1), fixed per certificate
    share = renewal.after_share + renewal.jitter_share * (2 * fraction - 1)
    share = min(max(share, 0.0), 1.0)
    return start + (end - start) * share


def retry_blocked_until(journal: Journal, cert_sha256: str) -> dt.datetime | None:
    """If renewals of this certificate failed, when the next one may start."""
    failed = [
        r
        for r in journal.all()
        if r.rotation_id.startswith(AUTO_PREFIX)
        and r.params.get("old", {}).get("cert_sha256") == cert_sha256
        and r.state in (FAILED, ABANDONED)
        and r.ended_at
    ]
    if not failed:
        return None
    last = max(dt.datetime.fromisoformat(r.ended_at or "") for r in failed)
    wait = min(FIRST_RETRY * 4 ** min(len(failed) - 1, 8), MAX_RETRY)
    return last + wait


def auto_rotation_id(now: dt.datetime) -> str:
    """`auto-<unix time>`."""
    return f"{AUTO_PREFIX}{int(now.timestamp())}"
