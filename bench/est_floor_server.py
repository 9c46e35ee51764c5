"""The least a Python process can spend on one re-enrollment: a lower bound, not a server.

One thread, blocking sockets, no event loop, no HTTP framework, no store, no
log: accept, full mutual-TLS handshake with certfleet's own server context
(pyOpenSSL on the OpenSSL bundled with cryptography), read one request to the
end of its body, answer, close. With `--issue` the answer is what certfleet's
EST server answers a `simplereenroll`, made with the same `pki/` calls it
uses (CSR parse and signature, key type, renewal checks against the client
cert, device profile, ECDSA signature, certs-only PKCS#7); without it the
answer is a fixed 200, as `openssl s_server -www` gives. Nothing is checked
that these calls do not check themselves: it exists only so that
bench/est_reenroll.py can measure how far below certfleet's figure any
Python design could go on this machine.

    python bench/est_floor_server.py PKI_DIR PORT [--issue]
"""

from __future__ import annotations

import argparse
import base64
import socket
import sys
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL

from certfleet.pki import profiles
from certfleet.pki.authority import device_uuid_of
from certfleet.pki.csr import check_csr_signature, check_key, check_reenroll, load_csr
from certfleet.pki.pkcs7 import certs_only
from certfleet.pki.signer import FileSigner, load_file_signer
from certfleet.tls import server_context

HOST = "127.0.0.1"
FIXED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    b"Connection: close\r\n\r\nok\n"
)
PKCS7_HEAD = (
    "HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
    "Content-Transfer-Encoding: base64\r\nContent-Length: {}\r\nConnection: close\r\n\r\n"
)


class Issuer:
    """The online CA of a `keys ca create` folder, signing device profiles."""

    def __init__(self, pki_dir: Path, factory: str) -> None:
        ca = x509.load_pem_x509_certificate((pki_dir / "online-ca.crt").read_bytes())
        self.issuer = profiles.Issuer.of(ca)
        self.signer: FileSigner = load_file_signer(pki_dir / "online-ca.key")
        self.factory = factory

    def answer(self, body: bytes, client: x509.Certificate) -> bytes:
        csr = load_csr(base64.b64decode(body))
        check_csr_signature(csr)
        public_key = check_key(csr)
        check_reenroll(csr, client)
        builder = profiles.device(device_uuid_of(csr), self.factory, public_key, self.issuer)
        cert = self.signer.sign_certificate(builder)
        encoded = base64.b64encode(certs_only([cert]))
        return PKCS7_HEAD.format(len(encoded)).encode() + encoded


def read_request(conn: SSL.Connection) -> bytes:
    """The body of one HTTP/1.1 request with Content-Length (empty for a GET)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return body


def serve(ctx: SSL.Context, port: int, issuer: Issuer | None) -> None:
    listener = socket.create_server((HOST, port), backlog=128)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SSL.Connection(ctx, sock)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            body = read_request(conn)
            if issuer is None or not body:  # a GET: the readiness probe
                conn.sendall(FIXED)
            else:
                client = conn.get_peer_certificate(as_cryptography=True)
                conn.sendall(issuer.answer(body, client))
            conn.shutdown()
        except (SSL.Error, OSError, ValueError) as exc:
            print(f"connection failed: {exc!r}", file=sys.stderr)
        finally:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pki_dir", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--issue", action="store_true", help="answer simplereenroll")
    parser.add_argument("--factory", default="bench")
    args = parser.parse_args()
    pki = args.pki_dir
    trusted = [pki / "root.crt", pki / "online-ca.crt"]
    cas = [x509.load_pem_x509_certificate(p.read_bytes()) for p in trusted]
    ctx = server_context(pki / "est-tls.crt", pki / "est-tls.key", cas, stack="openssl4")
    assert isinstance(ctx, SSL.Context)
    serve(ctx, args.port, Issuer(pki, args.factory) if args.issue else None)


if __name__ == "__main__":
    main()
