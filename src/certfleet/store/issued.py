"""Recording device certificates at the moment they are issued or first seen."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.pki.csr import name_text
from certfleet.pki.keys import cert_sha256, pubkey_sha256
from certfleet.store import certificates, devices
from certfleet.store.errors import NotFoundError
from certfleet.store.schema import Certificate, RegisteredVia


async def record_device_certificate(
    session: AsyncSession,
    cert: x509.Certificate,
    *,
    device_uuid: str,
    factory_id: int,
    issuer_ca_id: int | None,
    request: str | None,
    registered_via: RegisteredVia | None = None,
    make_current: bool = False,
) -> Certificate:
    """Store a device certificate; with `registered_via`, create the device if it is new."""
    try:
        device = await devices.get_device(session, device_uuid, include_deleted=True)
    except NotFoundError:
        if registered_via is None:
            raise
        device = await devices.add_device(
            session, device_uuid, factory_id=factory_id, registered_via=registered_via
        )
    row = await certificates.add_certificate(
        session,
        serial=f"{cert.serial_number:x}",
        sha256=cert_sha256(cert),
        subject=name_text(cert.subject),
        pubkey_sha256=pubkey_sha256(cert.public_key()),  # type: ignore[arg-type]
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        issuer_ca_id=issuer_ca_id,
        device_uuid=device_uuid,
        issued_by_request=request,
    )
    if make_current:
        device.current_cert_id = row.id
        await session.flush()
    return row
