"""Key rotation by the device agent, end to end against a real `certfleet server`.

Devices registered with `certfleet-agent register`, config set with `certfleet
config set`, rotations run by `certfleet-agent rotate` processes (and, for the
config daemon's entry points, by the rotation functions in this process).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import http.server
import ipaddress
import json
import logging
import os
import shutil
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from certfleet.agent import https, rotation
from certfleet.agent.journal import Journal, JournalError
from certfleet.agent.rotation_context import Fail
from certfleet.agent.rotation_renewal import due_at
from certfleet.agent.rotation_request import RequestError, id_pair, parse_rotate_file
from certfleet.agent.rotation_verify import verify_new_certificate
from certfleet.agent.settings import AgentSettings, Renewal, load_settings
from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.hierarchy import ServerNames, new_root_file_signer, plan_factory
from certfleet.pki.keys import cert_sha256, generate_private_key, private_key_pem
from certfleet.pki.pki_dir import PkiDir
from certfleet.pki.signer import FileSigner
from certfleet.store import denylist

from .agent_rotation_env import (
    DEVICE_VALUES,
    GROUP_VALUES,
    STEPS,
    DeviceDir,
    Lab,
    current_cert_sha256,
    decrypt_all,
    fingerprint,
    is_denied,
    issued_certificates,
    local_values,
    rotation_events,
)

ALL_VALUES = {**DEVICE_VALUES, **GROUP_VALUES}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("rotation-lab"))
    yield lab
    lab.close()


def keep_old(device: DeviceDir, into: Path) -> tuple[Path, Path]:
    """Copies of the device's current certificate and key (the rotation deletes them)."""
    into.mkdir(exist_ok=True)
    cert, key = device.current()
    shutil.copy2(cert, into / "old.pem")
    shutil.copy2(key, into / "old.key")
    return into / "old.pem", into / "old.key"


def wait_refused(lab: Lab, device: DeviceDir, cert_key: tuple[Path, Path]) -> tuple[int, bytes]:
    """The gateway's answer to the old credential, once the deny-list reached it (< 1 s)."""
    deadline = time.monotonic() + 5
    while True:
        status, _, body = lab.call(device, "GET", "/device", cert_key)
        if status in (0, 403) or time.monotonic() > deadline:
            return status, body
        time.sleep(0.2)


def assert_rotated(lab: Lab, device: DeviceDir, rotation_id: str, old: tuple[Path, Path]) -> None:
    """Everything a completed rotation must leave behind, checked against the real server."""
    journal = device.journal(rotation_id)
    assert journal["state"] == "completed", journal
    assert [r["result"] for r in journal["results"]] == ["done"] * 5
    cert_path, key_path = device.current()
    assert cert_path.name.startswith("client-") and rotation_id in cert_path.name
    assert key_path.name == f"pkey-{rotation_id}.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not (device.folder / "pkey.pem").exists() and not (device.folder / "client.pem").exists()
    assert "PRIVATE KEY" not in json.dumps(journal)

    status, _, body = lab.call(device, "GET", "/device")
    assert status == 200, body
    assert json.loads(body)["cert"]["sha256"] == fingerprint(cert_path)
    assert lab.store(current_cert_sha256, device.uuid) == fingerprint(cert_path)
    old_sha = fingerprint(old[0])
    assert lab.store(is_denied, old_sha)
    status, body = wait_refused(lab, device, old)
    assert status == 403 and b"deny-list" in body, body

    status, _, body = lab.call(device, "GET", "/config")
    assert status == 200
    assert decrypt_all(json.loads(body), key_path) == ALL_VALUES
    assert local_values(device) == ALL_VALUES

    story = lab.store(rotation_events, device.uuid, rotation_id)
    assert story["events"] == [(step, True) for step in STEPS], story
    assert story["status"] == "succeeded"


# -- the CLI and the config file -------------------------------------------------------------


def test_rotate_with_the_cli(lab, tmp_path):
    device = lab.device()
    old = keep_old(device, tmp_path)
    done = lab.rotate(device, "--rotation-id", "certs-1700000001")
    assert done.returncode == 0, done.stderr
    assert "rotation certs-1700000001 completed: now using certificate serial" in done.stdout
    assert_rotated(lab, device, "certs-1700000001", old)
    assert (device.folder / "restarts.log").read_text() == "restart\n"
    story = lab.store(rotation_events, device.uuid, "certs-1700000001")
    assert story["kind"] == "cert-rotation"
    assert "gateway accepted serial" in story["details"][5]

    again = lab.rotate(device, "--rotation-id", "certs-1700000001")
    assert again.returncode == 0 and "already completed" in again.stdout
    assert len(lab.store(issued_certificates, device.uuid)) == 2

    status = lab.rotate(device, "--status", "--json")
    assert status.returncode == 0
    shown = json.loads(status.stdout)
    assert shown[0]["rotation_id"] == "certs-1700000001" and shown[0]["state"] == "completed"
    assert shown[0]["events_delivered"] is True


def test_rotate_from_the_fio_rotate_certs_file(lab, tmp_path):
    device = lab.device()
    old = keep_old(device, tmp_path)
    settings = load_settings(device.agent_toml)
    text = (
        "# written by the operator\n"
        f"ESTSERVER={lab.server.est_url}/.well-known/est\n"
        "ROTATIONID=certs-1700000002\n"
        "PKEYIDS=01,07\n"
        "CERTIDS=03,09\n"
    )
    outcome = rotation.rotate_from_config_file(settings, text)
    assert outcome.ok, outcome
    assert_rotated(lab, device, "certs-1700000002", old)

    issued = len(lab.store(issued_certificates, device.uuid))
    again = rotation.rotate_from_config_file(settings, text)
    assert again.ok and "already completed" in again.message
    assert len(lab.store(issued_certificates, device.uuid)) == issued, "no second enrollment"


def test_rotations_follow_each_other(lab, tmp_path):
    device = lab.device()
    for n in range(2):
        old = keep_old(device, tmp_path / str(n))
        done = lab.rotate(device, "--rotation-id", f"certs-17000001{n}")
        assert done.returncode == 0, done.stderr
        assert_rotated(lab, device, f"certs-17000001{n}", old)


# -- failures ----------------------------------------------------------------------------------


def test_an_est_refusal_fails_the_rotation_and_keeps_the_old_credential(lab):
    device = lab.device()
    before = device.current()
    wrong = lab.server.gateway_url  # no EST here: every EST path is a 404
    done = lab.rotate(device, "--rotation-id", "certs-1700000003", "--est-server", wrong)
    assert done.returncode == 1
    assert "rotation certs-1700000003 failed: at 'Generate new certificate'" in done.stderr
    assert device.current() == before
    assert not (device.folder / "pkey-certs-1700000003.pem").exists(), "new key removed"
    assert device.journal("certs-1700000003")["state"] == "failed"
    status, _, _ = lab.call(device, "GET", "/device")
    assert status == 200
    story = lab.store(rotation_events, device.uuid, "certs-1700000003")
    assert story["events"] == [
        ("CertRotationStarted", True),
        ("Generate new certificate", False),
        ("CertRotationCompleted", False),
    ]
    assert story["status"] == "failed"
    assert "404" in story["details"][1]

    refused = lab.rotate(device, "--rotation-id", "certs-1700000003")
    assert refused.returncode == 1 and "send a new ROTATIONID" in refused.stderr


def test_a_refused_new_certificate_is_rolled_back(lab, tmp_path):
    device = lab.device()
    old_files = device.current()
    # Stop just before Finalize: begin, key, est note, cert, 4 step records, local config.
    crashed = lab.rotate(device, "--rotation-id", "certs-1700000004", env=crash_after_step(4))
    assert crashed.returncode == -9, crashed.stderr
    new_cert = device.folder / "client-certs-1700000004.pem"

    async def deny_new(session):
        await denylist.add_denied(session, fingerprint(new_cert), reason="test: refuse the new one")

    lab.store(deny_new)
    time.sleep(0.6)  # the gateway polls the deny-list every 0.25 s
    done = lab.rotate(device, "--resume")
    assert done.returncode == 1, done.stderr
    assert "refused the new certificate" in done.stderr
    assert device.current() == old_files
    assert not new_cert.exists() and not (device.folder / "pkey-certs-1700000004.pem").exists()
    status, _, body = lab.call(device, "GET", "/config")
    assert status == 200
    assert decrypt_all(json.loads(body), old_files[1]) == ALL_VALUES
    assert local_values(device) == ALL_VALUES
    assert (device.folder / "restarts.log").read_text().count("restart") == 2
    journal = device.journal("certs-1700000004")
    assert journal["state"] == "failed" and "previous key" in journal["summary"]
    story = lab.store(rotation_events, device.uuid, "certs-1700000004")
    assert story["events"][-2:] == [
        ("Finalize aktualizr configuration", False),
        ("CertRotationCompleted", False),
    ]
    assert story["status"] == "failed"
    assert_unlocked(lab, device, journal)

    old = keep_old(device, tmp_path)
    done = lab.rotate(device, "--rotation-id", "certs-1700000005")
    assert done.returncode == 0, done.stderr
    assert_rotated(lab, device, "certs-1700000005", old)
    lock = device.journal("certs-1700000005")["results"][1]["details"]
    assert lock["replaced_next_key"] is None, "the rolled-back key was withdrawn"


def assert_unlocked(lab: Lab, device: DeviceDir, journal: dict) -> None:
    """The undone rotation withdrew its next key: config is open to the operator again."""
    summary = journal.get("summary") or journal.get("reason") or ""
    assert "config lock lifted (next key withdrawn)" in summary, summary
    status, _, body = lab.call(device, "GET", "/device")
    view = json.loads(body)
    assert status == 200 and not view["config_locked"] and view["next_pubkey_sha256"] is None
    same = f"api-key={DEVICE_VALUES['api-key']}"  # the values stay what the later checks expect
    changed = lab.admin("config", "set", "--device", device.uuid, same, "--reason", "unlocked")
    assert changed.returncode == 0, changed.stderr


def test_abandon_undoes_an_unfinished_rotation(lab, tmp_path):
    device = lab.device()
    old_files = device.current()
    crashed = lab.rotate(device, "--rotation-id", "certs-1700000006", env=crash_after_step(3))
    assert crashed.returncode == -9
    status = lab.rotate(device, "--status")
    assert "certs-1700000006: in_progress, 3/5 steps done" in status.stdout

    done = lab.rotate(device, "--abandon", "operator wants a later window")
    assert done.returncode == 0, done.stderr
    assert "rotation certs-1700000006 abandoned: operator wants a later window" in done.stdout
    assert device.current() == old_files
    assert not (device.folder / "pkey-certs-1700000006.pem").exists()
    status, _, body = lab.call(device, "GET", "/config")
    assert decrypt_all(json.loads(body), old_files[1]) == ALL_VALUES
    assert local_values(device) == ALL_VALUES
    journal = device.journal("certs-1700000006")
    assert journal["state"] == "abandoned"
    assert journal["reason"].startswith("operator wants a later window")
    story = lab.store(rotation_events, device.uuid, "certs-1700000006")
    assert story["events"][-1] == ("CertRotationCompleted", False)
    assert "operator wants a later window" in story["details"][-1]
    assert_unlocked(lab, device, journal)

    again = lab.rotate(device, "--abandon", "nothing left")
    assert again.returncode == 0 and "no unfinished rotation" in again.stdout
    old = keep_old(device, tmp_path)
    assert lab.rotate(device, "--rotation-id", "certs-1700000007").returncode == 0
    assert_rotated(lab, device, "certs-1700000007", old)


def test_a_new_request_first_finishes_the_unfinished_one(lab):
    device = lab.device()
    crashed = lab.rotate(device, "--rotation-id", "certs-1700000008", env=crash_after_step(2))
    assert crashed.returncode == -9
    done = lab.rotate(device, "--rotation-id", "certs-1700000009")
    assert done.returncode == 0, done.stderr
    first, second = device.journal("certs-1700000008"), device.journal("certs-1700000009")
    assert first["state"] == second["state"] == "completed"
    assert first["ended_at"] <= second["started_at"]
    assert device.current()[1].name == "pkey-certs-1700000009.pem"
    for rid in ("certs-1700000008", "certs-1700000009"):
        story = lab.store(rotation_events, device.uuid, rid)
        assert story["events"] == [(step, True) for step in STEPS]


def test_one_process_at_a_time(lab):
    device = lab.device()
    device.state.mkdir(exist_ok=True)
    with open(device.state / "rotation.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = lab.rotate(device, "--rotation-id", "certs-1700000010")
    assert done.returncode == 1 and "another certfleet-agent process" in done.stderr
    assert not (device.state / "rotations" / "certs-1700000010.json").exists()


def test_bad_input_exits_2(lab, tmp_path):
    device = lab.device()
    no_server = tmp_path / "agent.toml"
    no_server.write_text(f'sota_config = "{device.sota}"\nstate_dir = "{device.state}"\n')
    assert lab_rotate(lab, no_server).returncode == 2
    assert lab.rotate(device, "--rotation-id", "../x").returncode == 2
    assert lab.rotate(device, "--est-server", "http://plain").returncode == 2
    assert lab.rotate(device, "--resume", "--status").returncode == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    assert lab_rotate(lab, bad).returncode == 2
    nothing = lab.rotate(device, "--resume")
    assert nothing.returncode == 0 and "no unfinished rotation" in nothing.stdout


def lab_rotate(lab: Lab, agent_toml: Path):
    return lab.rotate(DeviceDir("-", agent_toml.parent, agent_toml))


def crash_after_step(step: int) -> dict[str, str]:
    """CERTFLEET_CRASH_AFTER_WRITE for a kill right after step `step` (1-5) is recorded.

    Writes of a rotation with file keys and a local config copy: begin (1), new
    key (2), EST request note (3), new certificate (4), Generate recorded (5),
    Lock recorded (6), local config (7), its record (8), Server config record (9).
    """
    return {"CERTFLEET_CRASH_AFTER_WRITE": str({1: 5, 2: 6, 3: 8, 4: 9}[step])}


# -- renewal -----------------------------------------------------------------------------------


def test_renewal_starts_when_due(lab, tmp_path, caplog):
    device = lab.device()
    old = keep_old(device, tmp_path)
    settings = load_settings(device.agent_toml)
    cert = device.cert()
    due = due_at(cert, settings.renewal)
    assert rotation.renew_if_due(settings, now=due - dt.timedelta(seconds=1)) is None
    assert not (device.state / "rotations").exists() or not Journal(device.state).all()

    unconfigured = AgentSettings(
        sota_config=settings.sota_config,
        state_dir=settings.state_dir,
        renewal=Renewal(est_server=None),
    )
    with caplog.at_level(logging.WARNING):
        assert rotation.renew_if_due(unconfigured, now=cert.not_valid_after_utc) is None
    assert "no [renewal] est_server" in caplog.text

    now = due + dt.timedelta(seconds=1)
    outcome = rotation.renew_if_due(settings, now=now)
    assert outcome is not None and outcome.ok, outcome
    rotation_id = f"auto-{int(now.timestamp())}"
    assert device.journal(rotation_id)["params"]["origin"] == "renewal"
    assert device.current()[1].name == f"pkey-{rotation_id}.pem"
    status, _, _ = lab.call(device, "GET", "/device")
    assert status == 200
    assert lab.store(is_denied, fingerprint(old[0]))
    story = lab.store(rotation_events, device.uuid, rotation_id)
    assert story["events"] == [(step, True) for step in STEPS]
    assert story["kind"] == "cert-rotation", "a renewal is a rotation on the server too"
    # Nothing is due until the new certificate is.
    fresh_due = due_at(device.cert(), settings.renewal)
    assert rotation.renew_if_due(settings, now=fresh_due - dt.timedelta(seconds=1)) is None


def test_renewal_due_time_is_fixed_per_certificate_and_jittered(tmp_path):
    renewal = Renewal(after_share=2 / 3, jitter_share=0.05)
    pki = SmallPki(tmp_path)
    times = []
    for _ in range(20):
        cert = pki.device_cert(generate_private_key())
        due = due_at(cert, renewal)
        assert due == due_at(cert, renewal), "the same certificate, the same time"
        share = (due - cert.not_valid_before_utc) / (
            cert.not_valid_after_utc - cert.not_valid_before_utc
        )
        assert 2 / 3 - 0.05 <= share <= 2 / 3 + 0.05
        times.append(share)
    assert len(set(times)) > 15, "devices renew at different times"


# -- request parsing and verification ---------------------------------------------------------


def test_the_rotate_file_is_parsed_one_way():
    request = parse_rotate_file(
        " ESTSERVER = https://est.example:8443/.well-known/est \n\n"
        "ROTATIONID=certs-1700000000\nPKEYIDS=01,0x07\nCERTIDS=3,09\n"
    )
    assert request.rotation_id == "certs-1700000000"
    assert request.est_server == "https://est.example:8443/.well-known/est"
    assert id_pair(request.pkey_ids, "PKEYIDS") == ("01", "07")
    assert id_pair(request.cert_ids, "CERTIDS") == ("03", "09")
    assert request.origin == "fio-rotate-certs"
    bad = {
        "ROTATIONID=certs-1\n": "no ESTSERVER",
        "ESTSERVER=https://e\n": "no ROTATIONID",
        "ESTSERVER=http://e\nROTATIONID=certs-1\n": "not an https",
        "ESTSERVER=https://e\nROTATIONID=../etc\n": "rotation id",
        "ESTSERVER=https://e\nROTATIONID=certs-1\nROTATIONID=certs-2\n": "given twice",
        "ESTSERVER=https://e\nROTATIONID=certs-1\nPKEYID=01\n": "line 3",
        "just text\n": "NAME=value",
    }
    for text, message in bad.items():
        with pytest.raises(RequestError, match=message):
            parse_rotate_file(text)
    for ids, message in {"01": "exactly two", "01,01": "must differ", "01,zz": "hex"}.items():
        with pytest.raises(RequestError, match=message):
            id_pair(ids, "PKEYIDS")


def test_the_new_certificate_is_checked_before_use(tmp_path):
    pki = SmallPki(tmp_path)
    old_key, new_key = generate_private_key(), generate_private_key()
    old = pki.device_cert(old_key)
    good = pki.device_cert(new_key, uuid=pki.uuid_of(old))
    verify_new_certificate(good, new_key.public_key(), old, [pki.root], [pki.ca, pki.root])

    problems = {
        "not for the key": (good, old_key.public_key(), [pki.ca]),
        "subject": (pki.device_cert(new_key), new_key.public_key(), [pki.ca]),
        "chain": (good, new_key.public_key(), []),
    }
    for message, (cert, key, cas) in problems.items():
        with pytest.raises(Fail, match=message):
            verify_new_certificate(cert, key, old, [pki.root], cas)
    other = SmallPki(tmp_path / "other")
    foreign = other.device_cert(new_key, uuid=pki.uuid_of(old))
    with pytest.raises(Fail, match="chain"):
        verify_new_certificate(foreign, new_key.public_key(), old, [pki.root], [other.ca])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=800)
    with pytest.raises(Fail, match="expired"):
        verify_new_certificate(good, new_key.public_key(), old, [pki.root], [pki.ca], later)


class SmallPki:
    """A root, an online CA and device certificates in memory."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        signer, root_key = new_root_file_signer()
        issued = plan_factory(
            PkiDir(folder),
            "acme",
            signer,
            ServerNames(gateway_dns=["localhost"]),
            root_key=root_key,
        )
        self.root, online = issued[0].cert, issued[1]
        self.ca, self._ca_signer = online.cert, FileSigner(online.new_key)  # type: ignore[arg-type]

    def device_cert(self, key, uuid: str | None = None) -> x509.Certificate:
        import uuid as uuid_module

        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, uuid or str(uuid_module.uuid4())),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "acme"),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        return issue_device_certificate(csr, self.ca, self._ca_signer, "acme")

    @staticmethod
    def uuid_of(cert: x509.Certificate) -> str:
        return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_journal_never_holds_the_key(lab):
    device = lab.device()
    assert lab.rotate(device, "--rotation-id", "certs-1700000011").returncode == 0
    key_pem = device.current()[1].read_text()
    for path in (device.state / "rotations").iterdir():
        text = path.read_text()
        assert "PRIVATE KEY" not in text
        assert key_pem.splitlines()[1] not in text
    assert os.stat(device.state / "rotations").st_mode & 0o077 == 0
    assert cert_sha256(device.cert()) == lab.store(current_cert_sha256, device.uuid)


def test_journal_params_and_progress_refuse_key_material(tmp_path):
    pem = private_key_pem(generate_private_key()).decode()
    journal = Journal(tmp_path)
    with pytest.raises(JournalError, match="private key"):
        journal.begin("certs-1", ["a"], {"key": pem})
    assert journal.get("certs-1") is None
    begun = journal.begin("certs-1", ["a"], {"est_server": "https://e"})
    with pytest.raises(JournalError, match="private key"):
        begun.note(leak=pem)
    begun.note(retry={"count": 1}, csr="MIIB")
    begun.note(retry=None)
    again = Journal(tmp_path).get("certs-1")
    assert again.params == {"est_server": "https://e"} and again.progress == {"csr": "MIIB"}


def test_a_kept_alive_connection_survives_the_server_closing_it(tmp_path):
    """One connection for many requests; a server that drops an idle one gets a fresh one."""
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(private_key_pem(key))
    connections = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            connections.append(self.client_address)
            super().setup()

        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if self.path == "/drop":
                self.close_connection = True  # closes without telling the client

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
        conn = https.Connection(f"https://127.0.0.1:{server.server_address[1]}", client)
        assert [conn.request("GET", p).body for p in ("/a", "/b", "/drop")] == [
            b"/a",
            b"/b",
            b"/drop",
        ]
        assert len(connections) == 1
        time.sleep(0.2)
        assert conn.request("GET", "/after").body == b"/after"
        assert len(connections) == 2
        conn.close()
    finally:
        server.shutdown()
