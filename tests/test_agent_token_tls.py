"""TLS client authentication with a key inside a SoftHSM2 token: real token, real servers.

`openssl s_server -Verify 1` shows that the context completes TLS 1.3 and 1.2
handshakes that require a client certificate (the server echoes the
certificate it verified); `certfleet server` plus the real `certfleet-agent`
shows EST re-enrollment over mutual TLS with the current key in the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certfleet.est.client import EstClient, EstClientError
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import generate_private_key
from certfleet.pki.pkcs11_signer import Pkcs11Ref, Pkcs11Signer, generate_pkcs11_key
from certfleet.pki.tls_client import TokenKey, TokenTlsError, client_context, support_problem
from certfleet.pki.token_tls import openssl_library, use_token_key

from .cli_run import certfleet
from .cli_run import certfleet_agent as agent
from .server_process import ServerProcess, free_port

NAMES = ["--gateway-dns", "localhost", "--gateway-ip", "127.0.0.1"]


@pytest.fixture(scope="session")
def token_tls_ready() -> None:
    """Token TLS keys work in this interpreter, or the test skips (fails under CI's REQUIRE)."""
    problem = support_problem()
    if problem is not None:
        if os.environ.get("CERTFLEET_REQUIRE_SOFTHSM") == "1":
            pytest.fail(f"token TLS keys unsupported here: {problem}")
        pytest.skip(f"token TLS keys unsupported here: {problem}")


@pytest.fixture
def token(softhsm_token, token_tls_ready):
    return softhsm_token


# -- a small PKI and `openssl s_server -Verify 1` ---------------------------------------


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-tls test CA")])
        self.ca = self._cert(name, name, self.ca_key.public_key(), ca=True)
        self.ca_path = self._write("ca.crt", self.ca)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = self._cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            name,
            server_key.public_key(),
        )
        self.server_cert = self._write("server.crt", server)
        self.server_key = folder / "server.key"
        self.server_key.write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def leaf(self, cn: str, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        return self._cert(subject, self.ca.subject, public_key)

    def _cert(self, subject, issuer, public_key, ca: bool = False) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        return builder.sign(self.ca_key, hashes.SHA256())

    def _write(self, name: str, cert: x509.Certificate) -> Path:
        path = self.folder / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


@contextlib.contextmanager
def s_server(pki: Pki, version: str):
    """`openssl s_server` that insists on a client certificate from our CA, one TLS version."""
    port = free_port()
    process = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            str(pki.server_cert),
            "-key",
            str(pki.server_key),
            "-CAfile",
            str(pki.ca_path),
            "-Verify",
            "1",
            "-verify_return_error",
            f"-tls{version.replace('.', '_')}",
            "-www",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, "openssl s_server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "openssl s_server did not listen"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def fetch(context: ssl.SSLContext, port: int) -> tuple[str, str]:
    """(TLS version, s_server's status page) over one connection."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        page = b""
        while chunk := tls.recv(65536):
            page += chunk
        return tls.version(), page.decode(errors="replace")


def token_key_and_cert(token, pki: Pki, key_id: bytes, curve: str = "P-256"):
    ref = Pkcs11Ref(token.module, token.label, label=f"tls-{key_id.hex()}", key_id=key_id)
    signer = generate_pkcs11_key(ref, token.pin, curve)
    cert = pki.leaf(f"device-{key_id.hex()}", signer.public_key)
    return TokenKey(Pkcs11Ref(token.module, token.label, key_id=key_id), token.pin), cert


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_handshakes_tls13_and_tls12_with_the_token_key(token, pki, curve):
    key, cert = token_key_and_cert(token, pki, b"\x07", curve)
    context = client_context([pki.ca], cert, key)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    for version in ("1.3", "1.2"):
        with s_server(pki, version) as port:
            seen_version, page = fetch(context, port)
            assert seen_version == f"TLSv{version}"
            # s_server prints the client certificate it verified.
            assert pem.strip() in page.replace("\r\n", "\n"), page
    # Without the client key the same server refuses: the page above was earned.
    bare = client_context([pki.ca])
    with s_server(pki, "1.3") as port, pytest.raises((ssl.SSLError, OSError)):
        fetch(bare, port)


def test_token_shared_with_the_signer_and_a_slot_rescan(token, pki, softhsm_module):
    """python-pkcs11 works in the same process before, between and after handshakes."""
    key, cert = token_key_and_cert(token, pki, b"\x07")
    context = client_context([pki.ca], cert, key)
    signer = Pkcs11Signer(key.ref, token.pin)
    with s_server(pki, "1.3") as port:
        signer.sign(b"before", hashes.SHA256())
        assert fetch(context, port)[0] == "TLSv1.3"
        generate_pkcs11_key(
            Pkcs11Ref(token.module, token.label, label="next", key_id=b"\x08"), token.pin
        )
        # A token made now is seen only after python-pkcs11 re-initialises the
        # module, which ends every session of the process; the context must
        # log in again by itself.
        other = f"t-{uuid.uuid4().hex[:10]}"
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", other]
            + ["--pin", "1111", "--so-pin", "22222222"],
            check=True,
            capture_output=True,
        )
        generate_pkcs11_key(Pkcs11Ref(softhsm_module, other, label="x", key_id=b"\x01"), "1111")
        assert fetch(context, port)[0] == "TLSv1.3"
        Pkcs11Signer(key.ref, token.pin).sign(b"after", hashes.SHA256())


def test_wrong_pin_missing_key_and_foreign_cert_are_clear_errors(token, pki):
    key, cert = token_key_and_cert(token, pki, b"\x07")
    with pytest.raises(PkiError) as wrong_pin:
        client_context([pki.ca], cert, TokenKey(key.ref, "999999"))
    assert "wrong PIN" in str(wrong_pin.value) and "999999" not in str(wrong_pin.value)
    missing = TokenKey(Pkcs11Ref(token.module, token.label, key_id=b"\x09"), token.pin)
    with pytest.raises(TokenTlsError, match="no EC private key with id 09"):
        client_context([pki.ca], cert, missing)
    foreign = pki.leaf("someone-else", ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(TokenTlsError, match="certificate is not for the key with id 07"):
        client_context([pki.ca], foreign, key)
    nowhere = TokenKey(Pkcs11Ref(token.module, "no-such-token", key_id=b"\x07"), token.pin)
    with pytest.raises(PkiError, match="no PKCS#11 token labelled 'no-such-token'"):
        client_context([pki.ca], cert, nowhere)


def test_refuses_what_it_cannot_prove(token, pki):
    key, cert = token_key_and_cert(token, pki, b"\x07")
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(TokenTlsError, match="client contexts"):
        use_token_key(server_side, cert.public_bytes(serialization.Encoding.PEM), key)


def test_calls_the_libcrypto_the_ssl_module_is_linked_to(token_tls_ready):
    import _ssl

    linked = subprocess.run(["ldd", _ssl.__file__], capture_output=True, text=True).stdout
    wanted = next(
        line.split("=>")[1].split("(")[0].strip()
        for line in linked.splitlines()
        if "libcrypto" in line
    )
    assert os.path.realpath(openssl_library()) == os.path.realpath(wanted)
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "libcrypto" in line}
    assert {os.path.realpath(p) for p in mapped} == {os.path.realpath(wanted)}


# -- certfleet server + certfleet-agent ----------------------------------------------------


@pytest.mark.parametrize("stack", ["openssl4", "stdlib"])
def test_reenroll_over_mtls_with_the_current_key_in_the_token(tmp_path, token, stack):
    folder = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(folder), "--factory", "acme", *NAMES)
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f'pki = "{folder}"\nlisten_est = "127.0.0.1:{port}"\n[est]\nserverkeygen_enabled = true\n'
    )
    server = ServerProcess("--config", str(config), "--tls-stack", stack, port=port)
    url, root = f"https://127.0.0.1:{port}", str(folder / "root.crt")
    hsm = ["--hsm-module", token.module, "--hsm-token-label", token.label]
    pin = {"CERTFLEET_HSM_PIN": token.pin}
    try:
        device = str(uuid.uuid4())
        created = json.loads(
            certfleet(
                "est", "credentials", "create", "--device", device, "--pki", str(folder), "--json"
            ).stdout
        )
        agent(
            *("est", "enroll", "--server", url, "--trust", root, "--device", device),
            *("--user", created["username"], "--cert-out", str(tmp_path / "d1.crt")),
            *hsm,
            *("--hsm-key-id", "07"),
            env={"CERTFLEET_EST_PASSWORD": created["password"], **pin},
        )
        # The control: without the current certificate the server refuses renewal.
        first = x509.load_pem_x509_certificate((tmp_path / "d1.crt").read_bytes())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(first.subject)
            .sign(generate_private_key(), hashes.SHA256())
        )
        anonymous = EstClient(url, x509.load_pem_x509_certificates(Path(root).read_bytes()))
        with pytest.raises(EstClientError) as refused:
            asyncio.run(anonymous.simplereenroll(csr))
        assert refused.value.status in (401, 403), refused.value

        reenroll = ["est", "reenroll", "--server", url, "--trust", root]
        reenroll += ["--cert", str(tmp_path / "d1.crt"), *hsm]

        wrong_pin = agent(
            *reenroll,
            *("--hsm-current-key-id", "07", "--hsm-key-id", "08"),
            *("--cert-out", str(tmp_path / "x.crt")),
            env={"CERTFLEET_HSM_PIN": "98765"},
            expect=2,
        )
        assert "wrong PIN" in wrong_pin.stderr and "98765" not in wrong_pin.stderr
        assert "Traceback" not in wrong_pin.stderr
        missing = agent(
            *reenroll,
            *("--hsm-current-key-id", "0a", "--hsm-key-id", "08"),
            *("--cert-out", str(tmp_path / "x.crt")),
            env=pin,
            expect=2,
        )
        assert "no EC private key with id 0a" in missing.stderr
        same = agent(
            *reenroll,
            *("--hsm-current-key-id", "07", "--hsm-key-id", "7"),
            *("--cert-out", str(tmp_path / "x.crt")),
            env=pin,
            expect=2,
        )
        assert "another slot" in same.stderr
        assert not (tmp_path / "x.crt").exists()

        agent(
            *reenroll,
            *("--hsm-current-key-id", "07", "--hsm-key-id", "08"),
            *("--cert-out", str(tmp_path / "d2.crt")),
            env=pin,
        )
        # The renewed certificate with its token key authenticates the next
        # mutual-TLS call: a key made by the server, for this device.
        agent(
            *("est", "serverkeygen", "--server", url, "--trust", root, "--device", device),
            *("--cert", str(tmp_path / "d2.crt"), *hsm, "--hsm-current-key-id", "08"),
            *("--key-out", str(tmp_path / "d3.key"), "--cert-out", str(tmp_path / "d3.crt")),
            env=pin,
        )
        chain = tmp_path / "chain.pem"
        agent("est", "cacerts", "--server", url, "--trust", root, "--out", str(chain))
    finally:
        code, out = server.stop()
    assert code == 0, out
    assert "Traceback" not in out

    first = x509.load_pem_x509_certificate((tmp_path / "d1.crt").read_bytes())
    second = x509.load_pem_x509_certificate((tmp_path / "d2.crt").read_bytes())
    new_key = Pkcs11Signer(Pkcs11Ref(token.module, token.label, key_id=b"\x08"), token.pin)
    assert second.subject == first.subject
    assert second.public_key().public_numbers() == new_key.public_key.public_numbers()
    assert second.serial_number != first.serial_number
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", root, "-untrusted", str(chain), str(tmp_path / "d2.crt")],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    third = x509.load_pem_x509_certificate((tmp_path / "d3.crt").read_bytes())
    assert third.subject == first.subject
    assert [p.name for p in tmp_path.glob("*.key")] == ["d3.key"], "token keys stay inside"
