"""`certfleet server` as a real process, driven by the real `certfleet-agent est` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest
from cryptography import x509

from .cli_run import certfleet
from .cli_run import certfleet_agent as agent
from .server_process import ServerProcess, free_port

NAMES = ["--gateway-dns", "localhost", "--gateway-ip", "127.0.0.1"]


@pytest.fixture
def pki(tmp_path, db_url):
    folder = tmp_path / "pki"
    certfleet(
        "keys", "ca", "create", str(folder), "--factory", "acme", *NAMES, "--database", db_url
    )
    if db_url.startswith("postgresql"):
        certfleet("db", "upgrade", "--database", db_url, "--pki", str(folder))
    return folder, db_url


@pytest.mark.parametrize("stack", ["openssl4", "stdlib"])
def test_enroll_then_renew_through_two_workers(pki, tmp_path, stack):
    folder, db_url = pki
    port = free_port()
    server = ServerProcess(
        "--pki",
        str(folder),
        "--database",
        db_url,
        "--listen-est",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "--tls-stack",
        stack,
        port=port,
    )
    try:
        device = str(uuid.uuid4())
        created = json.loads(
            certfleet(
                "est",
                "credentials",
                "create",
                "--device",
                device,
                "--pki",
                str(folder),
                "--database",
                db_url,
                "--json",
            ).stdout
        )
        url = f"https://127.0.0.1:{port}"
        root = folder / "root.crt"
        agent(
            "est",
            "enroll",
            "--server",
            url,
            "--trust",
            str(root),
            "--device",
            device,
            "--user",
            created["username"],
            "--key-out",
            str(tmp_path / "d1.key"),
            "--cert-out",
            str(tmp_path / "d1.crt"),
            env={"CERTFLEET_EST_PASSWORD": created["password"]},
        )
        assert oct((tmp_path / "d1.key").stat().st_mode & 0o777) == "0o600"
        chain = tmp_path / "chain.pem"
        agent("est", "cacerts", "--server", url, "--trust", str(root), "--out", str(chain))
        first = x509.load_pem_x509_certificate((tmp_path / "d1.crt").read_bytes())
        assert first.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == device
        agent(
            "est",
            "reenroll",
            "--server",
            url,
            "--trust",
            str(root),
            "--cert",
            str(tmp_path / "d1.crt"),
            "--key",
            str(tmp_path / "d1.key"),
            "--key-out",
            str(tmp_path / "d2.key"),
            "--cert-out",
            str(tmp_path / "d2.crt"),
        )
        second = x509.load_pem_x509_certificate((tmp_path / "d2.crt").read_bytes())
        assert second.subject == first.subject and second.public_key() != first.public_key()
        for cert in ("d1.crt", "d2.crt"):
            done = subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-CAfile",
                    str(root),
                    "-untrusted",
                    str(chain),
                    str(tmp_path / cert),
                ],
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
        refused = agent(
            "est",
            "reenroll",
            "--server",
            url,
            "--trust",
            str(root),
            "--cert",
            str(tmp_path / "d1.crt"),
            "--key",
            str(tmp_path / "d1.key"),
            "--key-out",
            str(tmp_path / "d1.key"),
            "--cert-out",
            str(tmp_path / "x.crt"),
            expect=2,
        )
        assert "key" in refused.stderr and "400" in refused.stderr
    finally:
        code, out = server.stop()
    assert code == 0, out
    assert "worker" in out and "Traceback" not in out


def test_bootstrap_cacerts_needs_the_right_fingerprint(pki, tmp_path):
    folder, db_url = pki
    port = free_port()
    server = ServerProcess(
        "--pki", str(folder), "--database", db_url, "--listen-est", f"127.0.0.1:{port}", port=port
    )
    try:
        url = f"https://127.0.0.1:{port}"
        right = subprocess.run(
            [
                "openssl",
                "x509",
                "-in",
                str(folder / "root.crt"),
                "-noout",
                "-fingerprint",
                "-sha256",
            ],
            capture_output=True,
            text=True,
        )
        fingerprint = right.stdout.strip().split("=")[1]
        out = tmp_path / "anchor.pem"
        agent(
            "est",
            "cacerts",
            "--server",
            url,
            "--bootstrap",
            "--fingerprint",
            fingerprint,
            "--out",
            str(out),
        )
        subjects = {
            c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(out.read_bytes())
        }
        assert subjects == {"OU=acme,CN=Factory-CA", "OU=acme,CN=Online-CA"}
        wrong = agent(
            "est",
            "cacerts",
            "--server",
            url,
            "--bootstrap",
            "--fingerprint",
            "00" * 32,
            "--out",
            str(tmp_path / "no.pem"),
            expect=2,
        )
        assert "do not trust this server" in wrong.stderr
        assert not (tmp_path / "no.pem").exists()
    finally:
        server.stop()


def test_config_file_and_bad_settings(tmp_path):
    folder = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(folder), "--factory", "acme", *NAMES)
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f'pki = "{folder}"\nlisten_est = "127.0.0.1:{port}"\n[est]\nserverkeygen_enabled = true\n'
    )
    server = ServerProcess("--config", str(config), port=port)
    code, out = server.stop()
    assert code == 0, out
    config.write_text(f'pki = "{folder}"\nlisten_sst = "x"\n')
    done = certfleet("server", "--config", str(config), expect=2)
    assert "unknown setting(s)" in done.stderr and "listen_sst" in done.stderr
    config.write_text(f'pki = "{folder}"\n[est]\nvalidity_days = "long"\n')
    done = certfleet("server", "--config", str(config), expect=2)
    assert "[est] settings" in done.stderr and "validity_days = 'long'" in done.stderr
    config.write_text(f'pki = "{folder}"\n[est]\nserverkeygen = true\n')
    done = certfleet("server", "--config", str(config), expect=2)
    assert "unknown EST setting(s) serverkeygen" in done.stderr
    done = certfleet("server", "--pki", str(folder), "--listen-est", "nowhere", expect=2)
    assert "must look like 127.0.0.1:8443" in done.stderr
    done = certfleet("server", "--pki", str(tmp_path / "empty"), expect=2)
    assert "keys ca create" in done.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    folder = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(folder), "--factory", "acme", *NAMES)
    port = free_port()
    server = ServerProcess("--pki", str(folder), "--listen-est", f"127.0.0.1:{port}", port=port)
    try:
        done = certfleet(
            "server", "--pki", str(folder), "--listen-est", f"127.0.0.1:{port}", expect=2
        )
        assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    finally:
        server.stop()


def _workers(server: ServerProcess, count: int, gone: str | None = None) -> list[str]:
    """The server's worker pids once there are `count` of them (and `gone` is not one)."""
    import time

    deadline = time.monotonic() + 15
    while True:
        found = subprocess.run(
            ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True
        ).stdout.split()
        if len(found) == count and gone not in found:
            return found
        assert time.monotonic() < deadline, f"workers: {found}"
        time.sleep(0.1)


def test_a_killed_worker_is_replaced(tmp_path):
    folder = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(folder), "--factory", "acme", *NAMES)
    port = free_port()
    server = ServerProcess(
        "--pki", str(folder), "--listen-est", f"127.0.0.1:{port}", "--workers", "2", port=port
    )
    try:
        # The sockets listen before the workers are forked: wait for them.
        children = _workers(server, 2)
        os.kill(int(children[0]), signal.SIGKILL)
        after = _workers(server, 2, gone=children[0])
        assert len(after) == 2 and children[0] not in after
        agent(
            "est",
            "cacerts",
            "--server",
            f"https://127.0.0.1:{port}",
            "--trust",
            str(folder / "root.crt"),
        )
    finally:
        code, out = server.stop()
    assert "starting another" in out


def test_enroll_a_key_made_inside_softhsm(tmp_path, softhsm_token):
    folder = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(folder), "--factory", "acme", *NAMES)
    port = free_port()
    server = ServerProcess("--pki", str(folder), "--listen-est", f"127.0.0.1:{port}", port=port)
    try:
        device = str(uuid.uuid4())
        created = json.loads(
            certfleet(
                "est", "credentials", "create", "--device", device, "--pki", str(folder), "--json"
            ).stdout
        )
        hsm = [
            "--hsm-module",
            softhsm_token.module,
            "--hsm-token-label",
            softhsm_token.label,
            "--hsm-key-id",
            "07",
        ]
        agent(
            "est",
            "enroll",
            "--server",
            f"https://127.0.0.1:{port}",
            "--trust",
            str(folder / "root.crt"),
            "--device",
            device,
            "--user",
            created["username"],
            "--cert-out",
            str(tmp_path / "hsm.crt"),
            *hsm,
            env={
                "CERTFLEET_EST_PASSWORD": created["password"],
                "CERTFLEET_HSM_PIN": softhsm_token.pin,
            },
        )
    finally:
        server.stop()
    from certfleet.pki.pkcs11_signer import Pkcs11Ref, Pkcs11Signer

    token_key = Pkcs11Signer(
        Pkcs11Ref(softhsm_token.module, softhsm_token.label, key_id=b"\x07"), softhsm_token.pin
    ).public_key
    cert = x509.load_pem_x509_certificate((tmp_path / "hsm.crt").read_bytes())
    assert cert.public_key().public_numbers() == token_key.public_numbers()
    assert not list(tmp_path.glob("*.key")), "no key file: the key stays in the token"


class _Receiver:
    """A webhook receiver on 127.0.0.1 that records what it gets."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_server_delivers_events_to_a_signed_webhook(tmp_path):
    import time

    from certfleet.events.webhook import verify_signature

    folder = tmp_path / "pki"
    certfleet("keys", "ca", "create", str(folder), "--factory", "acme", *NAMES)
    receiver = _Receiver()
    secret = "s3cret-for-tests-only"
    port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f'pki = "{folder}"\nlisten_est = "127.0.0.1:{port}"\nworkers = 2\n'
        f'[events]\n[[events.webhooks]]\nurl = "{receiver.url}"\n'
        f'secret = "{secret}"\n'
    )
    server = ServerProcess("--config", str(config), port=port)
    try:
        device = str(uuid.uuid4())
        created = json.loads(
            certfleet(
                "est", "credentials", "create", "--device", device, "--pki", str(folder), "--json"
            ).stdout
        )
        agent(
            "est",
            "enroll",
            "--server",
            f"https://127.0.0.1:{port}",
            "--trust",
            str(folder / "root.crt"),
            "--device",
            device,
            "--user",
            created["username"],
            "--key-out",
            str(tmp_path / "d.key"),
            "--cert-out",
            str(tmp_path / "d.crt"),
            env={"CERTFLEET_EST_PASSWORD": created["password"]},
        )
        deadline = time.monotonic() + 10
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        code, out = server.stop()
        receiver.server.shutdown()
    assert code == 0, out
    assert len(receiver.received) == 1, "one loop on SQLite: delivered once"
    headers, body = receiver.received[0]
    assert verify_signature(secret, body, headers["X-Certfleet-Signature"])
    event = json.loads(body)
    assert event["topic"] == "CERT_ISSUED" and event["device"] == device
    assert secret not in out


def test_register_online_then_use_the_gateway(pki, tmp_path):
    """A device registers through `certfleet server`'s gateway and uses its certificate."""
    folder, db_url = pki
    port = free_port()
    server = ServerProcess(
        "--pki",
        str(folder),
        "--database",
        db_url,
        "--listen-est",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        port=port,
    )
    try:
        token = json.loads(
            certfleet(
                "tokens",
                "create",
                "--name",
                "line-1",
                "--scope",
                "register",
                "--pki",
                str(folder),
                "--database",
                db_url,
                "--json",
            ).stdout
        )["token"]
        gateway = f"https://127.0.0.1:{server.gateway_port}"
        device_dir = tmp_path / "sota"
        done = agent(
            "register",
            "--server",
            gateway,
            "--factory",
            "acme",
            "--group",
            "lab",
            "--dir",
            str(device_dir),
            "--trust",
            str(folder / "root.crt"),
            env={"CERTFLEET_REGISTER_TOKEN": token},
        )
        device = done.stdout.strip()
        uuid.UUID(device)
        curl = [
            "curl",
            "-sS",
            "--cacert",
            str(folder / "root.crt"),
            "--cert",
            str(device_dir / "client.pem"),
            "--key",
            str(device_dir / "pkey.pem"),
        ]
        seen = subprocess.run([*curl, f"{gateway}/device"], capture_output=True, text=True)
        view = json.loads(seen.stdout)
        assert view["uuid"] == device and view["group"] == "lab"
        refused = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(folder / "root.crt"),
                "-w",
                " %{http_code}",
                f"{gateway}/device",
            ],
            capture_output=True,
            text=True,
        )
        assert refused.stdout.endswith(" 401") and "client certificate" in refused.stdout
        certfleet(
            "devices",
            "deny",
            device,
            "--reason",
            "test",
            "--pki",
            str(folder),
            "--database",
            db_url,
        )
        import time

        time.sleep(1.0)
        for _ in range(4):  # new connections, so both workers answer
            denied = subprocess.run(
                [*curl, "-w", " %{http_code}", f"{gateway}/device"], capture_output=True, text=True
            )
            assert denied.stdout.endswith(" 403") and "deny-list" in denied.stdout
    finally:
        code, out = server.stop()
    assert code == 0, out
    assert token not in out
