"""CA changes reach a running server without a restart: a new online CA, a new offline CA.

A real `certfleet server`, the CLI, and devices played over real HTTPS with
`certfleet-agent` (see campaign_devices.py).
"""

from __future__ import annotations

import ssl
import time

from cryptography import x509
from cryptography.x509.oid import NameOID

from certfleet.fleet.campaigns import CampaignRunner

from .campaign_devices import Clock, Dev, Fleet
from .test_campaigns import _issuers, create, fleet, status, store  # noqa: F401

SWITCH_SECONDS = 10  # the workers poll the CAs every 2 s


def _issuer_cn(device: Dev) -> str:
    cert = x509.load_pem_x509_certificate((device.folder / device.cert).read_bytes())
    return str(cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _register_until_issued_by(started: Fleet, common_name: str) -> Dev:
    deadline = time.monotonic() + SWITCH_SECONDS
    while True:
        device = started.register(1)[0]
        if _issuer_cn(device) == common_name:
            return device
        if time.monotonic() > deadline:
            raise AssertionError(
                f"still issued by {_issuer_cn(device)}: {started.server.stop()[1]}"
            )
        time.sleep(0.5)


async def test_a_breached_online_ca_is_replaced_without_a_restart(fleet, store):  # noqa: F811
    old_devices = fleet.register(2)
    assert {_issuer_cn(d) for d in old_devices} == {"Online-CA"}
    refused = fleet.cli("keys", "ca", "revoke-device-ca", "online-ca", expect=2)
    assert "only online CA" in refused.stderr and "new-online-ca" in refused.stderr

    made = fleet.cli("keys", "ca", "new-online-ca").stdout
    assert "online-ca-2" in made and "--reissue-from-ca online-ca --to-ca online-ca-2" in made
    newcomer = _register_until_issued_by(fleet, "Online-CA-2")
    # Those registered before the workers switched count as old devices too.
    old_devices = [d for d in fleet.devices if _issuer_cn(d) == "Online-CA"]
    assert newcomer.call("GET", "/device")[0] == 200  # the gateway trusts the new CA already

    stale = create(fleet, "--reissue-from-ca", "online-ca", "--to-ca", "online-ca", expect=2)
    assert "must differ" in stale["stderr"]
    plan = create(
        fleet, "--reissue-from-ca", "online-ca", "--to-ca", "online-ca-2", "--canary-share", "0"
    )
    assert sorted(plan["devices"]) == sorted(d.uuid for d in old_devices)
    runner = CampaignRunner(store, now=Clock())
    await runner.tick()
    for device in old_devices:
        device.rotate()
    await runner.tick()
    assert await status(store, plan["campaign"]["id"]) == ("completed", None)
    assert await _issuers(store, [d.uuid for d in old_devices]) == {"online-ca-2"}

    fleet.cli("keys", "ca", "revoke-device-ca", "online-ca")
    for device in [*old_devices, newcomer]:
        assert device.call("GET", "/device")[0] == 200
    last = fleet.cli("keys", "ca", "revoke-device-ca", "online-ca-2", expect=2)
    assert "online-ca-2 is the factory's only online CA" in last.stderr


async def test_an_offline_ca_made_while_the_server_runs_registers_devices(fleet, tmp_path):  # noqa: F811
    out = tmp_path / "factory-line-2"
    fleet.cli("keys", "ca", "new-local-ca", str(out))
    deadline = time.monotonic() + SWITCH_SECONDS
    while True:
        try:
            device = fleet.offline_device("local-ca-2", out)
            break
        except ssl.SSLError:
            # Until the workers trust the new CA the handshake itself fails.
            assert time.monotonic() < deadline, "the server never trusted local-ca-2"
            time.sleep(0.5)
    assert _issuer_cn(device) == "Local-CA-2"


async def test_the_campaign_names_the_issuing_ca(fleet, store):  # noqa: F811
    fleet.offline_device()
    fleet.cli("keys", "ca", "new-online-ca")
    stale = create(fleet, "--reissue-from-ca", "local-ca-1", "--to-ca", "online-ca", expect=2)
    assert "it issues with online-ca-2 now" in stale["stderr"]
