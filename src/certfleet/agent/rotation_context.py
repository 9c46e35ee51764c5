"""What every rotation step works with: the journal entry, the two credentials, the device.

A credential is where one key and its certificate live: two file names under
`base_path` (as written in `sota.toml`), or two object ids in the PKCS#11
token. The journal's params name the old and the new credential when the
rotation begins, so a restart knows both whatever `sota.toml` says by then.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from certfleet.pki.signer import Signer

from .device import Device, load_device
from .gateway_client import GatewayClient
from .journal import Journal, Rotation
from .settings import AgentSettings

log = logging.getLogger("certfleet.agent.rotation")

GENERATE = "Generate new certificate"
LOCK = "Lock device configuration on server"
LOCAL_CONFIG = "Update local configuration with new key"
SERVER_CONFIG = "Update device specific configuration on server with new key"
FINALIZE = "Finalize aktualizr configuration"
STEPS = [GENERATE, LOCK, LOCAL_CONFIG, SERVER_CONFIG, FINALIZE]

FILE_STORAGE = "file"
TOKEN_STORAGE = "pkcs11"


class Retry(Exception):
    """A step could not finish for now (server unreachable or busy); try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Fail(Exception):
    """A step failed for good; the rotation stops and undoes what it must."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


class Switched(Exception):
    """The gateway already moved the device to the new key: the rotation can only go forward."""


@dataclass(frozen=True)
class Credential:
    """Where a key and its certificate live: file names under base_path, or token ids (hex)."""

    key: str
    cert: str

    def as_json(self) -> dict[str, str]:
        """For the journal's params."""
        return {"key": self.key, "cert": self.cert}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Credential:
        """From the journal's params."""
        return cls(str(doc["key"]), str(doc["cert"]))


def credential_of(device: Device) -> Credential:
    """The credential `sota.toml` points at now."""
    if device.token is not None:
        return Credential(device.token.key_id, device.token.cert_id)
    assert device.key_path is not None and device.cert_path is not None
    return Credential(_name_under(device.key_path, device), _name_under(device.cert_path, device))


def _name_under(path: Any, device: Device) -> str:
    try:
        return str(path.relative_to(device.base_path))
    except ValueError:
        return str(path)


def with_credential(device: Device, credential: Credential) -> Device:
    """The device as it is when it uses `credential`."""
    if device.token is not None:
        token = dataclasses.replace(device.token, key_id=credential.key, cert_id=credential.cert)
        return dataclasses.replace(device, token=token)
    return dataclasses.replace(
        device,
        key_path=device.base_path / credential.key,
        cert_path=device.base_path / credential.cert,
    )


@dataclass
class RotationContext:
    """One run of one rotation: its journal entry and the device it changes."""

    settings: AgentSettings
    journal: Journal
    rotation: Rotation
    device: Device
    events_sent: int = 0
    _signers: dict[str, Signer] = field(default_factory=dict)
    _gateways: dict[str, GatewayClient] = field(default_factory=dict)
    _contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    @property
    def rotation_id(self) -> str:
        """The rotation id, also the events' correlation id."""
        return self.rotation.rotation_id

    @property
    def params(self) -> dict[str, Any]:
        """What the rotation was asked to do, from the journal."""
        return self.rotation.params

    @property
    def old(self) -> Credential:
        """The credential the device had when the rotation began."""
        return Credential.from_json(self.params["old"])

    @property
    def new(self) -> Credential:
        """Where the new key and certificate go."""
        return Credential.from_json(self.params["new"])

    @property
    def uses_token(self) -> bool:
        """True if the keys live in a PKCS#11 token."""
        return self.params.get("storage") == TOKEN_STORAGE

    def device_for(self, credential: Credential) -> Device:
        """The device with `credential` in place of whatever sota.toml says now."""
        return with_credential(self.device, credential)

    def signer(self, credential: Credential) -> Signer:
        """The key of `credential` (loaded once per run)."""
        key = f"{credential.key}\0{credential.cert}"
        if key not in self._signers:
            self._signers[key] = self.device_for(credential).signer()
        return self._signers[key]

    def forget_signer(self, credential: Credential) -> None:
        """Drop a cached key (and its connection), after it was deleted or replaced."""
        key = f"{credential.key}\0{credential.cert}"
        self._signers.pop(key, None)
        self._contexts.pop(key, None)
        client = self._gateways.pop(key, None)
        if client is not None:
            client.close()

    def tls_context(self, credential: Credential) -> ssl.SSLContext:
        """A TLS client context presenting `credential` (made once per run)."""
        key = f"{credential.key}\0{credential.cert}"
        if key not in self._contexts:
            self._contexts[key] = self.device_for(credential).tls_context()
        return self._contexts[key]

    def gateway(self, credential: Credential) -> GatewayClient:
        """A gateway client that authenticates with `credential`, on one kept-alive connection."""
        key = f"{credential.key}\0{credential.cert}"
        if key not in self._gateways:
            context = self.tls_context(credential)
            self._gateways[key] = GatewayClient(self.device.gateway_url, context, keep_alive=True)
        return self._gateways[key]

    def close(self) -> None:
        """End the kept-alive connections."""
        for client in self._gateways.values():
            client.close()
        self._gateways.clear()

    def reached(self, step: str) -> bool:
        """True if the rotation got as far as starting `step` (it may have changed things)."""
        # Only the last result can be a failure, so the done count is the current step's index.
        current = sum(1 for r in self.rotation.results if r["result"] == "done")
        return STEPS.index(step) <= current

    def step_details(self, step: str) -> dict[str, Any]:
        """What a recorded step noted (empty if it is not recorded)."""
        for result in self.rotation.results:
            if result["step"] == step:
                return result["details"]
        return {}

    def note(self, **changes: Any) -> None:
        """Durably remember facts inside a step (see Rotation.note)."""
        self.rotation.note(**changes)


def load_current_device(settings: AgentSettings) -> Device:
    """The device as `sota.toml` describes it now, with the token PIN if one is configured."""
    return load_device(settings.sota_config, settings.hsm_pin())
