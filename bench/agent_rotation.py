"""Device cost of one key rotation: CPU time and peak memory of `certfleet-agent rotate`.

Setup (not measured): a factory PKI and `certfleet server` (SQLite, 1 worker) on
loopback, and one device per run with file keys, registered through `POST
/register`, with two device-scope and one group-scope encrypted config values
and a local config copy (the helpers of tests/agent_rotation_env.py).

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
that process's peak RSS.

Also measured, as the floor under those figures: the interpreter with the
imports of `certfleet-agent rotate` and no rotation (`rotate --status` on an
empty state), and the imports the agent command had before its subcommands were
made lazy (every subcommand and aiohttp), against the lazy command.

    .venv/bin/python bench/agent_rotation.py [--runs 7] [--out bench/results/agent_rotation.json]
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the setup helpers live with the tests

from tests.agent_rotation_env import Lab  # noqa: E402

BIN = Path(sys.executable).parent
TARGET_CPU_MS = 150
TARGET_RSS_MB = 60
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
from certfleet.agent.settings import load_settings
settings = load_settings(Path(sys.argv[1]))
text = Path(sys.argv[2]).read_text()
before = resource.getrusage(resource.RUSAGE_SELF)
from certfleet.agent import rotation
outcome = rotation.rotate_from_config_file(settings, text)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
Path(sys.argv[3]).write_text(json.dumps({"ok": outcome.ok, "cpu_ms": cpu}))
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


def rotation_runs(lab: Lab, runs: int, env: dict[str, str]) -> list[dict[str, float]]:
    results = []
    for n in range(runs + 1):
        device = lab.quick_device()
        device.agent_toml.write_text(
            device.agent_toml.read_text().replace("restart_commands = [", "# restart_commands = [")
        )
        argv = [str(BIN / "certfleet-agent"), "rotate", "--config", str(device.agent_toml)]
        argv += ["--rotation-id", f"certs-{1700000000 + n}"]
        result = measure(argv, env)
        if result["exit"] != 0 or device.journal(f"certs-{1700000000 + n}")["state"] != "completed":
            raise SystemExit(f"rotation {n} did not complete: {result}")
        if n:  # the first run compiles the bytecode
            results.append(result)
    return results


def daemon_runs(lab: Lab, runs: int, env: dict[str, str]) -> list[dict[str, float]]:
    results = []
    for n in range(runs + 1):
        device = lab.quick_device()
        device.agent_toml.write_text(
            device.agent_toml.read_text().replace("restart_commands = [", "# restart_commands = [")
        )
        request = device.folder / "fio-rotate-certs"
        request.write_text(f"ESTSERVER={lab.server.est_url}\nROTATIONID=certs-{1710000000 + n}\n")
        report = device.folder / "cpu.json"
        argv = [sys.executable, "-c", IN_DAEMON, str(device.agent_toml), str(request), str(report)]
        whole = measure(argv, env)
        inside = json.loads(report.read_text())
        if whole["exit"] != 0 or not inside["ok"]:
            raise SystemExit(f"in-daemon rotation {n} did not complete: {whole} {inside}")
        if n:
            results.append({**whole, "cpu_ms": inside["cpu_ms"], "user_ms": 0, "system_ms": 0})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/agent_rotation.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agent-rotation-bench-") as tmp:
        env = agent_env(Path(tmp) / "pycache")
        lab = Lab(Path(tmp))
        try:
            rotations = rotation_runs(lab, args.runs, env)
            in_daemon = daemon_runs(lab, args.runs, env)
            floors = floor_runs(lab, args.runs, env)
        finally:
            lab.close()
    rows = {
        "rotate (one full rotation)": summary(rotations),
        "same rotation inside the running agent": summary(in_daemon),
        "rotate --status (imports, no rotation)": summary(floors["status"]),
        "imports before lazy subcommands": summary(floors["eager"]),
        "imports after lazy subcommands": summary(floors["lazy"]),
    }
    print(
        f"{'median of ' + str(args.runs) + ' runs':42} {'CPU ms':>8} {'(min-max)':>13}"
        f" {'RSS MB':>7} {'wall s':>7}"
    )
    for name, row in rows.items():
        spread = f"{row['cpu_ms_min']:.0f}-{row['cpu_ms_max']:.0f}"
        print(
            f"{name:42} {row['cpu_ms']:8.0f} {spread:>13} {row['rss_mb']:7.1f} {row['wall_s']:7.2f}"
        )
    rotate = rows["rotate (one full rotation)"]
    cpu_met = "met" if rotate["cpu_ms"] < TARGET_CPU_MS else "NOT met"
    rss_met = "met" if rotate["rss_mb"] < TARGET_RSS_MB else "NOT met"
    print(f"targets: CPU < {TARGET_CPU_MS} ms ({cpu_met}), RSS < {TARGET_RSS_MB} MB ({rss_met})")
    load = os.getloadavg()
    record = {
        "bench": "agent_rotation",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": args.runs,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "targets": {"cpu_ms": TARGET_CPU_MS, "rss_mb": TARGET_RSS_MB},
        "rows": rows,
        "raw": {"rotations": rotations, "in_daemon": in_daemon, **floors},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; JSON in {args.out}")


if __name__ == "__main__":
    main()
