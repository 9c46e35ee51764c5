"""Device cost of one key rotation: CPU time and peak memory of `certfleet-agent rotate`.

Setup (not measured): a factory PKI and `certfleet server` (SQLite, 1 worker) on
loopback, and one device per run with file keys, registered through `POST
/register`, with two device-scope and one group-scope encrypted config values
and a local config copy (the helpers of tests/agent_rotation_env.py). Then the
same with the device key in a SoftHSM2 token: one new token per device, the
device registered by `certfleet-agent register` with its key made in slot 01
(certificate in 03), and rotations told PKEYIDS=01,07 and CERTIDS=03,09. Without
SoftHSM2 (or with --no-token) only the file-key rows are measured, and the
output says so.

Measured, per run: one `certfleet-agent rotate --config agent.toml` process, from
exec to exit, all five steps against the real server. CPU is utime + stime and
memory is ru_maxrss of that process, from wait4() in a small launcher process
(Linux keeps the parent's resident size in a child's ru_maxrss across exec, so
the launcher is a bare `python -S` rather than this process). The agent runs
with compiled bytecode (a temporary PYTHONPYCACHEPREFIX, warmed by one
unmeasured run), as an installed package would; restart_commands is empty, so
only the agent's own work counts. Wall time is from the launcher too.

The same rotation inside a running agent: the config daemon calls it in-process
(`rotate_from_config_file` through `rotation_hooks`), where the interpreter,
cryptography, ssl and the daemon's modules are loaded already. Measured there:
the CPU from importing `certfleet.agent.rotation` to the end of the rotation
(getrusage before and after, in a process that imported the daemon first), and
that process's peak RSS. For a token device that process also makes the
device's TLS context before measuring, as a running agent has (its polls sign
in the token), so the PKCS#11 module is loaded and logged in already.

Also measured, as the floor under those figures: the interpreter with the
imports of `certfleet-agent rotate` and no rotation (`rotate --status` on an
empty state), and the imports the agent command had before its subcommands were
made lazy (every subcommand and aiohttp), against the lazy command.

    .venv/bin/python bench/agent_rotation.py [--runs 7] [--no-token]
        [--out bench/results/agent_rotation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the setup helpers live with the tests

from tests.agent_rotation_env import DeviceDir, Lab  # noqa: E402
from tests.fixtures_hsm import find_module, init_token, use_token_dir  # noqa: E402

BIN = Path(sys.executable).parent
TARGET_CPU_MS = 150
TARGET_RSS_MB = 60
TARGETS = f"< {TARGET_CPU_MS} ms, < {TARGET_RSS_MB} MB"
# The slots a token device alternates between (PKEYIDS, CERTIDS of the rotation request).
PKEY_IDS, CERT_IDS = "01,07", "03,09"
NO_SOFTHSM = (
    "SoftHSM2 is not installed (no libsofthsm2.so or softhsm2-util): apt-get install softhsm2"
)
LAUNCHER = """
import json, os, sys, time
start = time.monotonic()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({
    "exit": os.waitstatus_to_exitcode(status),
    "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000,
    "user_ms": usage.ru_utime * 1000,
    "system_ms": usage.ru_stime * 1000,
    "rss_mb": usage.ru_maxrss / 1024,
    "wall_s": time.monotonic() - start,
}))
"""
IN_DAEMON = """
import json, resource, sys
from pathlib import Path
import certfleet.agent.config_daemon  # what a running agent has loaded already
from certfleet.agent.device import load_device
from certfleet.agent.settings import load_settings
settings = load_settings(Path(sys.argv[1]))
start = resource.getrusage(resource.RUSAGE_SELF)
if settings.hsm_pin_file is not None:
    # A running agent with a token key is logged in already: its TLS context signs there.
    load_device(settings.sota_config, settings.hsm_pin()).tls_context()
text = Path(sys.argv[2]).read_text()
before = resource.getrusage(resource.RUSAGE_SELF)
from certfleet.agent import rotation
outcome = rotation.rotate_from_config_file(settings, text)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = lambda a, b: (b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime) * 1000
report = {"ok": outcome.ok, "cpu_ms": cpu(before, after), "warm_ms": cpu(start, before)}
Path(sys.argv[3]).write_text(json.dumps(report))
"""
EAGER_BEFORE = (
    "import certfleet.cli.common, certfleet.est.client, certfleet.cli.agent_est_commands, "
    "certfleet.cli.agent_register_command, certfleet.cli.agent_run_command, "
    "certfleet.cli.agent_rotate_command"
)
LAZY_AFTER = "import certfleet.cli.agent_main, certfleet.cli.agent_rotate_command"


def measure(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run argv under the launcher; its exit code, CPU, peak RSS and wall time."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, *argv],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout)


def agent_env(pycache: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


@dataclass(frozen=True)
class Keys:
    """Where the devices of a set of runs keep their key, and what their rotation is told."""

    new_device: Callable[[], DeviceDir]
    rotate_args: list[str]  # options of `certfleet-agent rotate`
    request: dict[str, str]  # the same as lines of the in-daemon rotation request


def quiet(device: DeviceDir) -> DeviceDir:
    """No restart_commands, so only the agent's own work counts."""
    device.agent_toml.write_text(
        device.agent_toml.read_text().replace("restart_commands = [", "# restart_commands = [")
    )
    return device


def file_keys(lab: Lab) -> Keys:
    return Keys(lambda: quiet(lab.quick_device()), [], {})


def token_keys(lab: Lab, module: str) -> Keys:
    def new_device() -> DeviceDir:
        # A device makes its key in slot 01, so each needs a token of its own.
        token = init_token(module, prefix="bench")
        return quiet(lab.token_device(token.module, token.label, token.pin))

    args = ["--pkey-ids", PKEY_IDS, "--cert-ids", CERT_IDS]
    return Keys(new_device, args, {"PKEYIDS": PKEY_IDS, "CERTIDS": CERT_IDS})


def softhsm(root: Path) -> str | None:
    """The SoftHSM2 module, with its tokens kept under root; None if SoftHSM2 is absent."""
    module = find_module()
    if module is not None:
        use_token_dir(root)  # registration, the agents and softhsm2-util read SOFTHSM2_CONF
    return module


def softhsm_version() -> str:
    done = subprocess.run(["softhsm2-util", "--version"], capture_output=True, text=True)
    return done.stdout.strip()


def token_module(root: Path, wanted: bool) -> tuple[str | None, str]:
    """The SoftHSM2 module to measure with (None: no token rows), and what to say about it."""
    if not wanted:
        return None, "skipped (--no-token)"
    module = softhsm(root)
    if module is None:
        return None, NO_SOFTHSM
    return module, f"SoftHSM2 {softhsm_version()}, {module}"


def rotation_runs(runs: int, env: dict[str, str], keys: Keys) -> list[dict[str, float]]:
    results = []
    for n in range(runs + 1):
        device = keys.new_device()
        rotation_id = f"certs-{1700000000 + n}"
        argv = [str(BIN / "certfleet-agent"), "rotate", "--config", str(device.agent_toml)]
        argv += ["--rotation-id", rotation_id, *keys.rotate_args]
        result = measure(argv, env)
        if result["exit"] != 0 or device.journal(rotation_id)["state"] != "completed":
            raise SystemExit(f"rotation {n} did not complete: {result}")
        if n:  # the first run compiles the bytecode
            results.append(result)
    return results


def daemon_runs(lab: Lab, runs: int, env: dict[str, str], keys: Keys) -> list[dict[str, float]]:
    results = []
    for n in range(runs + 1):
        device = keys.new_device()
        request = device.folder / "fio-rotate-certs"
        lines = {"ESTSERVER": lab.server.est_url, "ROTATIONID": f"certs-{1710000000 + n}"}
        request.write_text("".join(f"{k}={v}\n" for k, v in {**lines, **keys.request}.items()))
        report = device.folder / "cpu.json"
        argv = [sys.executable, "-c", IN_DAEMON, str(device.agent_toml), str(request), str(report)]
        whole = measure(argv, env)
        inside = json.loads(report.read_text())
        if whole["exit"] != 0 or not inside["ok"]:
            raise SystemExit(f"in-daemon rotation {n} did not complete: {whole} {inside}")
        if n:
            cpu = {"cpu_ms": inside["cpu_ms"], "warm_ms": inside["warm_ms"]}
            results.append({**whole, **cpu, "user_ms": 0, "system_ms": 0})
    return results


def floor_runs(lab: Lab, runs: int, env: dict[str, str]) -> dict[str, list[dict[str, float]]]:
    device = lab.quick_device()
    status = [str(BIN / "certfleet-agent"), "rotate", "--config", str(device.agent_toml)]
    python = [sys.executable, "-c"]
    rows: dict[str, list[dict[str, float]]] = {"status": [], "eager": [], "lazy": []}
    for _ in range(runs):
        rows["status"].append(measure([*status, "--status"], env))
        rows["eager"].append(measure([*python, EAGER_BEFORE], env))
        rows["lazy"].append(measure([*python, LAZY_AFTER], env))
    return rows


def summary(results: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in ("cpu_ms", "user_ms", "system_ms", "rss_mb", "wall_s"):
        values = [r[key] for r in results]
        out[key] = statistics.median(values)
        out[f"{key}_min"] = min(values)
        out[f"{key}_max"] = max(values)
    return out


def measure_all(
    lab: Lab, runs: int, env: dict[str, str], module: str | None
) -> dict[str, list[dict[str, float]]]:
    """The raw runs: file keys, then the token (if `module`), then the floors."""
    raw = {
        "rotations": rotation_runs(runs, env, file_keys(lab)),
        "in_daemon": daemon_runs(lab, runs, env, file_keys(lab)),
    }
    if module is not None:
        raw["token_rotations"] = rotation_runs(runs, env, token_keys(lab, module))
        raw["token_in_daemon"] = daemon_runs(lab, runs, env, token_keys(lab, module))
    return {**raw, **floor_runs(lab, runs, env)}


def table(raw: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """One summary row per measurement that was made, in the order they are printed."""
    names = {
        "rotations": "rotate (one full rotation)",
        "in_daemon": "same rotation inside the running agent",
        "token_rotations": "rotate, key in SoftHSM2 token",
        "token_in_daemon": "same inside the running agent, token",
        "status": "rotate --status (imports, no rotation)",
        "eager": "imports before lazy subcommands",
        "lazy": "imports after lazy subcommands",
    }
    return {name: summary(raw[key]) for key, name in names.items() if key in raw}


def print_table(rows: dict[str, dict[str, float]], runs: int) -> None:
    # The targets are for a rotation with file keys; none is set for the token or the floors.
    with_target = ("rotate (one full rotation)", "same rotation inside the running agent")
    print(
        f"{'median of ' + str(runs) + ' runs':42} {'CPU ms':>8} {'(min-max)':>13}"
        f" {'RSS MB':>7} {'wall s':>7}  target"
    )
    for name, row in rows.items():
        spread = f"{row['cpu_ms_min']:.0f}-{row['cpu_ms_max']:.0f}"
        target = TARGETS if name in with_target else "–"
        print(
            f"{name:42} {row['cpu_ms']:8.0f} {spread:>13} {row['rss_mb']:7.1f}"
            f" {row['wall_s']:7.2f}  {target}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-token", action="store_true", help="skip the SoftHSM2 token rows")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/agent_rotation.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agent-rotation-bench-") as tmp:
        module, token_note = token_module(Path(tmp) / "softhsm", not args.no_token)
        print(f"token rows: {token_note}", flush=True)
        env = agent_env(Path(tmp) / "pycache")
        lab = Lab(Path(tmp))
        try:
            raw = measure_all(lab, args.runs, env, module)
        finally:
            lab.close()
    rows = table(raw)
    print_table(rows, args.runs)
    rotate = rows["rotate (one full rotation)"]
    cpu_met = "met" if rotate["cpu_ms"] < TARGET_CPU_MS else "NOT met"
    rss_met = "met" if rotate["rss_mb"] < TARGET_RSS_MB else "NOT met"
    print(f"targets: CPU < {TARGET_CPU_MS} ms ({cpu_met}), RSS < {TARGET_RSS_MB} MB ({rss_met})")
    if module is None:
        print(f"token rows not measured: {token_note}")
    else:
        warm = statistics.median(r["warm_ms"] for r in raw["token_in_daemon"])
        print(f"token: a running agent's first TLS context (imports, login) took {warm:.0f} ms")
    load = os.getloadavg()
    record = {
        "bench": "agent_rotation",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": args.runs,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "token": token_note,
        "targets": {"cpu_ms": TARGET_CPU_MS, "rss_mb": TARGET_RSS_MB},
        "rows": rows,
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; JSON in {args.out}")


if __name__ == "__main__":
    main()
