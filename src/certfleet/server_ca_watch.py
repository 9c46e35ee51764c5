"""Keep a running worker in step with the store's CAs, so that no CA change needs a restart.

Each worker reads the CA rows every few seconds (a handful of rows). When a
CA was added, it trusts the new certificate in its TLS contexts (an offline
device CA from `keys ca add-device-ca` registers devices at once); when a CA
was added or changed status, it reloads the factory's authority, so that a
new online CA (`keys ca new-online-ca`) issues from then on. Refusals of
disabled and revoked CAs need none of this: the apps read CA status from the
store on every request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from sqlalchemy import select

from certfleet import background
from certfleet.pki.authority import FactoryAuthority
from certfleet.store.authorities import load_pki_authorities
from certfleet.store.engine import Store
from certfleet.store.schema import Ca, CaKind
from certfleet.tls.contexts import trust_more

log = logging.getLogger(__name__)
TRUSTED_KINDS = (CaKind.ROOT, CaKind.ONLINE, CaKind.LOCAL)

Snapshot = dict[int, tuple[str, str]]  # CA id -> (status, PEM)
UseAuthorities = Callable[[Mapping[str, FactoryAuthority]], None]


class CaWatcher:
    """Polls the CA rows; trusts new CAs in `contexts` and hands new authorities to `users`."""

    def __init__(
        self,
        store: Store,
        pki_dir: Path,
        pin: str | None,
        contexts: list[SSL.Context | ssl.SSLContext],
        users: list[UseAuthorities],
        every: float = 2.0,
    ) -> None:
        self.store = store
        self.pki_dir = pki_dir
        self.pin = pin
        self.contexts = contexts
        self.users = users
        self.every = every
        self._known: Snapshot = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Remember the CAs the worker started with, then poll in the background."""
        self._known = await self._snapshot()
        # A CA added between the parent's read and this one would be missed.
        every_ca = [x509.load_pem_x509_certificate(pem.encode()) for _, pem in self._known.values()]
        for context in self.contexts:
            trust_more(context, every_ca)
        self._task = asyncio.create_task(
            background.repeat(self.every, self.check, "reading the CAs", log), name="ca-watch"
        )

    async def stop(self) -> None:
        """Stop polling."""
        await background.cancel(self._task)
        self._task = None

    async def check(self) -> None:
        """One poll: act on what changed since the last one."""
        now = await self._snapshot()
        if now == self._known:
            return
        added = [
            x509.load_pem_x509_certificate(pem.encode())
            for i, (_, pem) in now.items()
            if i not in self._known
        ]
        if added:
            for context in self.contexts:
                trust_more(context, added)
        async with self.store.transaction() as session:
            authorities = await load_pki_authorities(session, self.pki_dir, self.pin)
        for use in self.users:
            use(authorities)
        self._known = now
        issuing = ", ".join(f"{a.factory}: {_cn(a.issuing_ca)}" for a in authorities.values())
        log.info("CAs changed (%d new); issuing with %s", len(added), issuing)

    async def _snapshot(self) -> Snapshot:
        async with self.store.transaction() as session:
            rows = await session.execute(
                select(Ca.id, Ca.status, Ca.cert_pem).where(Ca.kind.in_(TRUSTED_KINDS))
            )
            return {row.id: (str(row.status), row.cert_pem) for row in rows}


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()
