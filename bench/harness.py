"""What the server benchmarks share besides /proc readings: the machine, ports, the CLI."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.pki.authority import FactoryAuthority, issue_device_certificate
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import RegisteredVia

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def machine() -> dict:
    """The CPU, its count, the load at the end of the run, the platform and Python."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def certfleet(*args: str) -> None:
    """Run a `certfleet` command of this virtualenv; its output is not wanted."""
    subprocess.run([str(BIN / "certfleet"), *args], check=True, stdout=subprocess.DEVNULL)


async def record_online_device(
    session: AsyncSession, authority: FactoryAuthority, factory_id: int
) -> tuple[str, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new device with a certificate from the online CA: its uuid, certificate and key."""
    device_uuid = str(uuid.uuid4())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_uuid)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    cert = issue_device_certificate(csr, authority.issuing_ca, authority.signer, authority.factory)
    await record_device_certificate(
        session,
        cert,
        device_uuid=device_uuid,
        factory_id=factory_id,
        issuer_ca_id=authority.issuing_ca_id,
        request="bench",
        registered_via=RegisteredVia.ONLINE,
        make_current=True,
    )
    return device_uuid, cert, key


def s_server_process(pki_dir: Path, tls_stem: str) -> tuple[subprocess.Popen, int]:
    """`openssl s_server -www` with mutual TLS: the baseline; the process and its port.

    It presents `<tls_stem>.crt` and verifies device certificates against the
    root and the online CA they chain to.
    """
    port = free_port()
    trusted = pki_dir / "s_server-client-cas.pem"
    trusted.write_bytes(b"".join((pki_dir / f).read_bytes() for f in ("root.crt", "online-ca.crt")))
    argv = ["openssl", "s_server", "-quiet", "-www", "-accept", f"{HOST}:{port}"]
    argv += ["-cert", str(pki_dir / f"{tls_stem}.crt"), "-key", str(pki_dir / f"{tls_stem}.key")]
    argv += ["-CAfile", str(trusted), "-Verify", "1", "-verify_return_error"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port
