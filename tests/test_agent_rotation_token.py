"""Key rotation with the key in a PKCS#11 token (SoftHSM2): PKEYIDS/CERTIDS slot alternation.

The device registers with its key made in slot 01 and its certificate in 03;
rotations alternate with 07/09 and back. The agent's TLS client signs in the
token. CERTFLEET_REQUIRE_SOFTHSM=1 makes these fail instead of skip without
SoftHSM2.
"""

from __future__ import annotations

import json
import signal
import tomllib

import pytest
from pkcs11 import Attribute, ObjectClass

from certfleet.agent import rotation
from certfleet.agent.settings import load_settings
from certfleet.pki.files import CRASH_ENV
from certfleet.pki.keys import cert_sha256
from certfleet.pki.pkcs11_signer import Pkcs11Ref, open_token_session

from .agent_rotation_env import (
    DEVICE_VALUES,
    GROUP_VALUES,
    STEPS,
    DeviceDir,
    Lab,
    current_cert_sha256,
    device_values,
    is_denied,
    issued_certificates,
    local_values,
    rotation_events,
)

ALL_VALUES = {**DEVICE_VALUES, **GROUP_VALUES}
SLOTS = ["--pkey-ids", "01,07", "--cert-ids", "03,09"]
# Durable changes of a token rotation: begin, clearing the key slot, the new key, EST
# request, certificate stored, 5 step records, local config, sota.toml, old key and old
# certificate destroyed, finish, events delivered.
WRITES = 16


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("token-lab"))
    yield lab
    lab.close()


def p11(device: DeviceDir) -> tuple[str, str]:
    table = tomllib.loads(device.sota.read_text())["p11"]
    return table["tls_pkey_id"], table["tls_clientcert_id"]


def token_objects(token, object_class: ObjectClass) -> dict[str, int]:
    """How many objects of a class each id holds."""
    session = open_token_session(Pkcs11Ref(token.module, token.label), token.pin)
    with session.lock:
        found = session.session.get_objects({Attribute.CLASS: object_class})
        ids = [bytes(obj[Attribute.ID]).hex() for obj in found]
    return {i: ids.count(i) for i in sorted(set(ids))}


def assert_on_slots(lab: Lab, device: DeviceDir, token, rotation_id: str, old_sha: str, slots):
    key_id, cert_id = slots
    assert p11(device) == (key_id, cert_id)
    assert device.journal(rotation_id)["state"] == "completed"
    agent_device = device.agent_device()
    cert = agent_device.certificate()
    assert cert.public_key() == agent_device.signer().public_key
    status, _, body = lab.call(device, "GET", "/device")
    assert status == 200, body
    assert lab.store(current_cert_sha256, device.uuid) == cert_sha256(cert)
    assert lab.store(is_denied, old_sha)
    # Only the slots in use hold anything: the old key and certificate are destroyed.
    assert token_objects(token, ObjectClass.PRIVATE_KEY) == {key_id: 1}
    assert token_objects(token, ObjectClass.CERTIFICATE) == {cert_id: 1}
    status, _, body = lab.call(device, "GET", "/config")
    assert device_values(device, json.loads(body)) == ALL_VALUES
    assert local_values(device) == ALL_VALUES
    story = lab.store(rotation_events, device.uuid, rotation_id)
    assert story["events"] == [(step, True) for step in STEPS], story


def test_slots_alternate_with_the_cli_and_the_rotate_file(lab, softhsm_token):
    token = softhsm_token
    device = lab.token_device(token.module, token.label, token.pin)
    assert p11(device) == ("01", "03")
    old_sha = cert_sha256(device.agent_device().certificate())

    done = lab.rotate(device, "--rotation-id", "certs-1900000001", *SLOTS)
    assert done.returncode == 0, done.stderr
    assert_on_slots(lab, device, token, "certs-1900000001", old_sha, ("07", "09"))
    [private] = open_token_session(
        Pkcs11Ref(token.module, token.label), token.pin
    ).session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    assert private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]

    # Back to 01/03, asked the reference's way; ids are parsed one way (0x01 and 1 are 01).
    old_sha = cert_sha256(device.agent_device().certificate())
    text = (
        f"ESTSERVER={lab.server.est_url}\nROTATIONID=certs-1900000002\n"
        "PKEYIDS=0x01,7\nCERTIDS=3,0x09\n"
    )
    outcome = rotation.rotate_from_config_file(load_settings(device.agent_toml), text)
    assert outcome.ok, outcome
    assert_on_slots(lab, device, token, "certs-1900000002", old_sha, ("01", "03"))


def test_slots_that_do_not_include_the_one_in_use_are_refused(lab, softhsm_token):
    token = softhsm_token
    device = lab.token_device(token.module, token.label, token.pin)
    done = lab.rotate(device, "--rotation-id", "certs-1900000003", "--pkey-ids", "05,07")
    assert done.returncode == 2
    assert "does not include the id in use now" in done.stderr or "CERTIDS" in done.stderr
    missing = lab.rotate(device, "--rotation-id", "certs-1900000004")
    assert missing.returncode == 2 and "PKEYIDS" in missing.stderr
    assert p11(device) == ("01", "03")


def test_a_kill_at_every_write_of_a_token_rotation(lab, softhsm_token):
    # One device alternating slots; each rotation is killed after its k-th durable change.
    token = softhsm_token
    device = lab.token_device(token.module, token.label, token.pin)
    exercised = []
    for k in range(1, 40):
        slots = ("07", "09") if p11(device) == ("01", "03") else ("01", "03")
        old_sha = cert_sha256(device.agent_device().certificate())
        issued_before = {c["sha256"] for c in lab.store(issued_certificates, device.uuid)}
        rotation_id = f"certs-{1910000000 + k}"
        crashed = lab.rotate(device, "--rotation-id", rotation_id, *SLOTS, env={CRASH_ENV: str(k)})
        if crashed.returncode == 0:
            break
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        status, _, body = lab.call(device, "GET", "/device")
        assert status == 200, (k, body)
        resumed = lab.rotate(device, "--resume")
        assert resumed.returncode == 0, (k, resumed.stderr)
        assert_on_slots(lab, device, token, rotation_id, old_sha, slots)
        issued = {c["sha256"] for c in lab.store(issued_certificates, device.uuid)}
        assert issued - issued_before == {lab.store(current_cert_sha256, device.uuid)}
        exercised.append(k)
    assert exercised == list(range(1, WRITES + 1))
