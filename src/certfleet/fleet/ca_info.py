"""A CA as the operator sees it: what `keys ca show` prints."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from certfleet.pki.csr import name_text
from certfleet.store.schema import Ca


@dataclass(frozen=True)
class CaInfo:
    """One CA certificate of a factory with its status and key location."""

    name: str
    kind: str
    subject: str
    issuer: str
    serial: str
    sha256: str
    not_before: dt.datetime
    not_after: dt.datetime
    status: str
    key_ref: str | None
    cert_pem: str

    @classmethod
    def of(cls, row: Ca) -> CaInfo:
        """Describe a CA row."""
        cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
        return cls(
            name=row.name,
            kind=row.kind,
            subject=row.subject,
            issuer=name_text(cert.issuer),
            serial=f"{cert.serial_number:x}",
            sha256=row.sha256,
            not_before=row.not_before,
            not_after=row.not_after,
            status=row.status,
            key_ref=row.key_ref,
            cert_pem=row.cert_pem,
        )

    @property
    def key_location(self) -> str:
        """'file', 'pkcs11' or 'offline' (a key certfleet does not hold)."""
        if not self.key_ref:
            return "offline"
        return "pkcs11" if self.key_ref.startswith("pkcs11:") else "file"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for --json."""
        return {
            "name": self.name,
            "kind": self.kind,
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "sha256": self.sha256,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "status": self.status,
            "key": self.key_location,
            "key_ref": self.key_ref,
        }

    def details(self) -> str:
        """Multi-line description for --pretty."""
        cert = x509.load_pem_x509_certificate(self.cert_pem.encode())
        lines = [
            f"  subject:   {self.subject}",
            f"  issuer:    {self.issuer}",
            f"  serial:    {self.serial}",
            f"  sha256:    {self.sha256}",
            f"  validity:  {self.not_before.isoformat()} .. {self.not_after.isoformat()}",
            f"  status:    {self.status}",
            f"  key:       {self.key_ref or 'not held by certfleet'}",
        ]
        lines += [f"  ext:       {ext.value}" for ext in cert.extensions]
        return "\n".join(lines)
