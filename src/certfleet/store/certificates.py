"""Issued certificates (device and server), looked up by fingerprint."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.config_files import device_config_changed
from certfleet.store.rows import add_unique, found
from certfleet.store.schema import Ca, Certificate, CertStatus, Device

CertHolder = tuple[Certificate, Device | None, Ca | None]
"""A certificate row with its device and its issuing CA (either may be missing)."""


async def add_certificate(
    session: AsyncSession,
    *,
    serial: str,
    sha256: str,
    subject: str,
    pubkey_sha256: str,
    not_before: datetime,
    not_after: datetime,
    cert_pem: str,
    issuer_ca_id: int | None = None,
    device_uuid: str | None = None,
    issued_by_request: str | None = None,
) -> Certificate:
    """Record a certificate; DuplicateError if its fingerprint or issuer+serial exist."""
    row = Certificate(
        serial=serial.lower(),
        sha256=sha256.lower(),
        subject=subject,
        pubkey_sha256=pubkey_sha256.lower(),
        not_before=not_before,
        not_after=not_after,
        cert_pem=cert_pem,
        issuer_ca_id=issuer_ca_id,
        device_uuid=device_uuid,
        issued_by_request=issued_by_request,
    )
    duplicate = f"certificate {sha256} (or serial {serial} from the same CA) is already stored"
    return await add_unique(session, row, duplicate)


async def get_certificate(session: AsyncSession, sha256: str) -> Certificate:
    """The certificate with this SHA-256 fingerprint."""
    query = select(Certificate).where(Certificate.sha256 == sha256.lower())
    return found(await session.scalar(query), f"no certificate with fingerprint {sha256}")


async def list_device_certificates(session: AsyncSession, device_uuid: str) -> list[Certificate]:
    """All certificates of a device, oldest first."""
    query = select(Certificate).where(Certificate.device_uuid == device_uuid)
    return list(await session.scalars(query.order_by(Certificate.id)))


async def active_device_certificates(
    session: AsyncSession, device_uuid: str, except_ids: Iterable[int], *, valid_at: datetime
) -> list[Certificate]:
    """A device's active certificates still valid at `valid_at`, but `except_ids`, oldest first."""
    query = select(Certificate).where(
        Certificate.device_uuid == device_uuid,
        Certificate.status == CertStatus.ACTIVE,
        Certificate.not_after > valid_at,
        Certificate.id.not_in(list(except_ids)),
    )
    return list(await session.scalars(query.order_by(Certificate.id)))


async def devices_with_certificates_from(session: AsyncSession, ca_id: int) -> list[str]:
    """Device uuids holding any certificate issued by CA ``ca_id``."""
    query = (
        select(Certificate.device_uuid)
        .where(Certificate.issuer_ca_id == ca_id, Certificate.device_uuid.is_not(None))
        .distinct()
        .order_by(Certificate.device_uuid)
    )
    return [uuid for uuid in await session.scalars(query) if uuid]


async def get_holder(session: AsyncSession, sha256: str) -> CertHolder | None:
    """The certificate with this fingerprint, its device and issuer (one query), or None."""
    query = (
        select(Certificate, Device, Ca)
        .outerjoin(Device, Device.uuid == Certificate.device_uuid)
        .outerjoin(Ca, Ca.id == Certificate.issuer_ca_id)
        .where(Certificate.sha256 == sha256.lower())
    )
    row = (await session.execute(query)).first()
    return None if row is None else (row[0], row[1], row[2])


async def find_by_serial(session: AsyncSession, serial: str) -> list[Certificate]:
    """Certificates with this hex serial (unique per issuer, so possibly several), oldest first."""
    query = select(Certificate).where(Certificate.serial == serial.lower().removeprefix("0x"))
    return list(await session.scalars(query.order_by(Certificate.id)))


async def set_certificate_status(session: AsyncSession, cert_id: int, status: CertStatus) -> None:
    """Mark a certificate active, superseded or revoked."""
    await session.execute(
        update(Certificate).where(Certificate.id == cert_id).values(status=status)
    )


async def get_certificate_by_id(session: AsyncSession, cert_id: int) -> Certificate:
    """The certificate row ``cert_id`` (e.g. a device's current certificate)."""
    return found(await session.get(Certificate, cert_id), f"no certificate with id {cert_id}")


# Built once: a device's check-in runs this on every request, and building a
# statement costs more than running it.
_CHECKIN = (
    select(
        Certificate.id.label("cert_id"),
        Certificate.serial,
        Certificate.status.label("cert_status"),
        Certificate.pubkey_sha256,
        Certificate.not_before,
        Certificate.not_after,
        Certificate.device_uuid,
        Device.factory_id,
        Device.group_name,
        Device.current_cert_id,
        Device.next_pubkey_sha256,
        Device.config_locked,
        Device.last_seen_at,
        Device.deleted_at,
        Device.created_at,
        Device.registered_via,
        Ca.name.label("ca_name"),
        Ca.status.label("ca_status"),
        Ca.status_changed_at.label("ca_status_changed_at"),
    )
    .outerjoin(Device, Device.uuid == Certificate.device_uuid)
    .outerjoin(Ca, Ca.id == Certificate.issuer_ca_id)
    .where(Certificate.sha256 == bindparam("sha256"))
)
_CHECKIN_WITH_CONFIG = _CHECKIN.add_columns(device_config_changed().label("config_changed"))


async def checkin(session: AsyncSession, sha256: str, *, with_config: bool = False) -> Row | None:
    """A client certificate's row with its device's and issuer's state, in one query.

    Columns: cert_id, serial, cert_status, pubkey_sha256, not_before, not_after,
    device_uuid, factory_id, group_name, current_cert_id, next_pubkey_sha256,
    config_locked, last_seen_at, deleted_at, created_at, registered_via,
    ca_name, ca_status, ca_status_changed_at, and with `with_config` also
    config_changed (see config_files.device_config_changed). None if unknown.
    """
    query = _CHECKIN_WITH_CONFIG if with_config else _CHECKIN
    return (await session.execute(query, {"sha256": sha256.lower()})).first()
