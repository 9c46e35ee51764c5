"""Operator actions on the EST server's rows: enrollment credentials and held requests."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store import audit, devices, est, factories
from certfleet.store.engine import Store
from certfleet.store.errors import NotFoundError, StoreError
from certfleet.store.schema import EstCredential, EstPending, Factory, PendingStatus, utcnow

ACTOR = "cli"


@dataclass(frozen=True)
class NewCredential:
    """A credential just made; the password exists only here, never in the store."""

    username: str
    device_uuid: str
    factory: str
    expires_at: dt.datetime
    password: str = field(repr=False)


@dataclass(frozen=True)
class CredentialInfo:
    """A stored credential without its secret."""

    username: str
    device_uuid: str
    factory: str
    expires_at: dt.datetime
    used_at: dt.datetime | None
    created_at: dt.datetime

    @property
    def state(self) -> str:
        """used, expired or unused."""
        if self.used_at is not None:
            return "used"
        return "expired" if self.expires_at <= utcnow() else "unused"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the state."""
        return {
            "username": self.username,
            "device": self.device_uuid,
            "factory": self.factory,
            "state": self.state,
            "expires_at": self.expires_at.isoformat(),
            "used_at": self.used_at.isoformat() if self.used_at else None,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class PendingInfo:
    """A request held for approval."""

    id: int
    status: str
    device_uuid: str | None
    subject: str
    created_at: dt.datetime
    decided_at: dt.datetime | None
    cert_id: int | None

    @classmethod
    def of(cls, row: EstPending) -> PendingInfo:
        """From a store row."""
        return cls(
            row.id,
            row.status,
            row.device_uuid,
            row.subject,
            row.created_at,
            row.decided_at,
            row.cert_id,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "id": self.id,
            "status": self.status,
            "device": self.device_uuid,
            "subject": self.subject,
            "created_at": self.created_at.isoformat(),
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "issued": self.cert_id is not None,
        }


async def create_credential(
    store: Store, device: str, expires_in: dt.timedelta, factory: str | None = None
) -> NewCredential:
    """A one-time Basic credential that may enroll only `device` (its CN) until it expires."""
    device_uuid = _device_uuid(device)
    if expires_in <= dt.timedelta(0):
        raise StoreError("a credential must expire in the future: give a positive --expires-in")
    username, password = f"est-{secrets.token_hex(5)}", secrets.token_urlsafe(24)
    expires_at = utcnow() + expires_in
    async with store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        await _check_device(session, device_uuid, row)
        await est.add_est_credential(
            session,
            factory_id=row.id,
            username=username,
            secret=password,
            bound_subject=device_uuid,
            expires_at=expires_at,
        )
        await audit.append_audit(
            session,
            actor=ACTOR,
            action="est.credential.create",
            target=device_uuid,
            details={"username": username, "expires_at": expires_at.isoformat()},
        )
    return NewCredential(username, device_uuid, row.name, expires_at, password)


async def list_credentials(store: Store, factory: str | None = None) -> list[CredentialInfo]:
    """Every credential (of one factory if named), oldest first, without secrets."""
    async with store.transaction() as session:
        names = {f.id: f.name for f in await factories.list_factories(session)}
        factory_id = (await factories.get_factory(session, factory)).id if factory else None
        rows = await est.list_credentials(session, factory_id=factory_id)
    return [_credential_info(row, names) for row in rows]


async def list_pending(store: Store, status: PendingStatus | None = None) -> list[PendingInfo]:
    """Held requests, oldest first."""
    async with store.transaction() as session:
        return [PendingInfo.of(row) for row in await est.list_pending(session, status=status)]


async def decide_pending(store: Store, pending_id: int, approve: bool) -> PendingInfo:
    """Approve or reject a held request; the client's identical retry then gets the answer."""
    async with store.transaction() as session:
        row = await est.decide_pending(session, pending_id, approve)
        await audit.append_audit(
            session,
            actor=ACTOR,
            action="est.pending.approve" if approve else "est.pending.reject",
            target=f"est-request:{pending_id}",
            details={"device": row.device_uuid, "subject": row.subject},
        )
        return PendingInfo.of(row)


def _device_uuid(device: str) -> str:
    try:
        return str(uuid.UUID(device))
    except ValueError as exc:
        raise StoreError(f"{device!r} is not a device uuid") from exc


async def _check_device(session: AsyncSession, device_uuid: str, factory: Factory) -> None:
    """A credential for a device that can never enroll here is refused now, not at use."""
    try:
        device = await devices.get_device(session, device_uuid, include_deleted=True)
    except NotFoundError:
        return
    if device.deleted_at is not None:
        raise StoreError(f"device {device_uuid} was deleted; it cannot enroll again")
    if device.factory_id != factory.id:
        raise StoreError(f"device {device_uuid} belongs to another factory than {factory.name}")


def _credential_info(row: EstCredential, names: dict[int, str]) -> CredentialInfo:
    return CredentialInfo(
        row.username,
        row.bound_subject,
        names.get(row.factory_id, str(row.factory_id)),
        row.expires_at,
        row.used_at,
        row.created_at,
    )
