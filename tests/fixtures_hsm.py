"""SoftHSM2 fixtures: a private token directory for the session, a fresh token per test.

Without softhsm2 the HSM tests skip, unless CERTFLEET_REQUIRE_SOFTHSM=1 (CI),
where they fail so a missing install can never pass silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE_CANDIDATES = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
]


@dataclass(frozen=True)
class SoftToken:
    module: str
    label: str
    pin: str
    so_pin: str


def find_module() -> str | None:
    """The SoftHSM2 module (SOFTHSM2_MODULE or a usual path), or None if softhsm2 is missing."""
    if shutil.which("softhsm2-util") is None:
        return None
    configured = os.environ.get("SOFTHSM2_MODULE")
    candidates = [configured] if configured else MODULE_CANDIDATES
    return next((m for m in candidates if m and Path(m).exists()), None)


def use_token_dir(root: Path) -> None:
    """Keep SoftHSM2's tokens under `root` (SOFTHSM2_CONF, read by every process started later)."""
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)


def init_token(module: str, prefix: str = "t") -> SoftToken:
    """A newly initialised, empty token with its own label."""
    token = SoftToken(module, f"{prefix}-{uuid.uuid4().hex[:10]}", "4321", "87654321")
    argv = ["softhsm2-util", "--init-token", "--free", "--label", token.label]
    subprocess.run(
        [*argv, "--pin", token.pin, "--so-pin", token.so_pin], check=True, capture_output=True
    )
    return token


@pytest.fixture(scope="session")
def softhsm_module(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the SoftHSM2 module, with SOFTHSM2_CONF pointing at a private token dir."""
    module = find_module()
    if module is None:
        message = "softhsm2 is not installed (apt-get install softhsm2)"
        if os.environ.get("CERTFLEET_REQUIRE_SOFTHSM") == "1":
            pytest.fail(message + " and CERTFLEET_REQUIRE_SOFTHSM=1")
        pytest.skip(message)
    use_token_dir(tmp_path_factory.mktemp("softhsm"))
    return module


@pytest.fixture
def softhsm_token(softhsm_module: str) -> SoftToken:
    """A newly initialised, empty token."""
    return init_token(softhsm_module)
