"""Schemathesis, as a foreign client, against a real `certfleet server` over TLS.

It reads /openapi.json and sends generated requests, valid and invalid, to
every operation, then chains them by the links it infers (a device's uuid
from the listing into the device routes). Whatever it sends, no answer may
be a 5xx and the server may log no traceback: bad input is refused with a
reason. The seed is fixed so that a failure can be replayed.
"""

from __future__ import annotations

import datetime as dt
import subprocess

from .api_fixtures import ApiEnv, add_device, api_env  # noqa: F401
from .cli_run import BIN

SEED = "20261124"
EXAMPLES = "25"


async def test_generated_requests_never_get_a_server_error(api_env: ApiEnv):  # noqa: F811
    env = api_env
    now = dt.datetime.now(dt.UTC)
    for days, group in ((3, "lab"), (40, "lab"), (400, "kiosk")):
        await add_device(env.store, not_after=now + dt.timedelta(days=days), group=group)
    await add_device(env.store, not_after=now + dt.timedelta(days=90), locked=True)
    env.start()
    run = subprocess.run(
        [
            str(BIN / "schemathesis"), "run", f"{env.api_url}/openapi.json",
            "--header", f"Authorization: Bearer {env.tokens['pki-admin']}",
            "--tls-verify", str(env.pki / "root.crt"),
            "--checks", "not_a_server_error",
            "--max-examples", EXAMPLES, "--seed", SEED, "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True, text=True, timeout=600, check=False,
        cwd=env.pki.parent,  # where it keeps its own files
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    assert "passed" in report and "Server error" not in report, report[-3000:]
    out = env.stop()
    assert "Traceback" not in out, out[-6000:]
    assert " 500 " not in out and "internal error" not in out, out[-6000:]
