"""The config daemon: poll the gateway, write the device's config files, run handlers.

One cycle:

1. let key rotation resume an interrupted rotation and renew a certificate
   that is due (`rotation_hooks`);
2. load the device from `sota.toml` (a rotation may have switched key and
   certificate) and `GET /config` with the local copy's Last-Modified;
3. on 200: decrypt and write the changed files, delete vanished ones, save
   the encrypted copy, run the changed files' OnChanged handlers, then
   `POST /config/applied` with the version. On 304 nothing happens, unless
   files are missing (a tmpfs after a reboot) or handlers are still owed
   from an interrupted cycle: then the local copy is applied again.

Between cycles the daemon sleeps `poll_interval` ± `poll_jitter_share`; after
network failures and 5xx answers it backs off exponentially with full jitter;
when the gateway refuses the device's certificate it waits the full interval
and says why on every attempt. SIGTERM and SIGINT stop it between steps.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import signal
import ssl
from dataclasses import dataclass, field
from typing import Any

from certfleet.pki.errors import PkiError

from . import rotation_hooks
from .backoff import Backoff, jittered
from .config_apply import Applied, apply_files, missing_files
from .device import ContextCache, Device, DeviceConfigError, load_device
from .gateway_client import GatewayClient, GatewayRefused
from .handlers import HandlerResult, run_handler
from .https import Unreachable
from .local_config import LocalConfig, LocalConfigError, load_local_config, save_local_config
from .manifest import Manifest, ManifestError, load_manifest
from .settings import AgentSettings, SettingsError

log = logging.getLogger(__name__)


class Status(enum.Enum):
    """How a cycle ended, which decides the next wait and the exit code of `--once`."""

    DONE = "done"  # the gateway answered and the config is applied (maybe with problems)
    RETRY = "retry"  # no usable answer (network, 5xx): back off and try again soon
    REFUSED = "refused"  # retrying will not help until someone acts: wait the full interval


@dataclass
class CycleReport:
    """The outcome of one cycle; `problems` are things an operator should look at."""

    status: Status
    reason: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: all done; 1: worth retrying, or done with problems; 2: needs someone to act."""
        if self.status is Status.REFUSED:
            return 2
        return 1 if self.status is Status.RETRY or self.problems else 0


class StopSignal:
    """SIGTERM/SIGINT set a flag and wake a sleep; the current step always finishes."""

    def __init__(self) -> None:
        self.requested = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (call from the main thread)."""
        # The wake-up fd gets a byte from the C-level handler, so a sleep in select()
        # ends at once; setting a threading.Event from a handler can deadlock instead.
        signal.set_wakeup_fd(self._write)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number: int, _frame: Any) -> None:
        self.requested = True

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if a stop was requested."""
        if not self.requested and seconds > 0:
            select.select([self._read], [], [], seconds)
            try:
                os.read(self._read, 512)
            except BlockingIOError:
                pass
        return self.requested


class ConfigDaemon:
    """Runs cycles with one agent.toml's settings."""

    def __init__(self, settings: AgentSettings, stop: StopSignal | None = None) -> None:
        _check_folders(settings)
        self.settings = settings
        self.stop = stop or StopSignal()
        self.backoff = Backoff.for_poll_interval(settings.poll_interval)
        self.contexts = ContextCache()

    def run_forever(self) -> None:
        """Cycle until SIGTERM/SIGINT."""
        log.info(
            "config daemon started: device %s, polling every %g s",
            self.settings.sota_config,
            self.settings.poll_interval,
        )
        while not self.stop.requested:
            report = self.cycle_safely()
            if self.stop.sleep(self._wait_after(report)):
                break
        log.info("config daemon stopped")

    def cycle_safely(self) -> CycleReport:
        """One cycle; an unexpected fault is logged and retried, not fatal."""
        try:
            return self.cycle()
        except Exception as exc:
            log.exception("config cycle failed unexpectedly: %s", exc)
            return CycleReport(Status.RETRY, f"unexpected fault: {exc}")

    def cycle(self) -> CycleReport:
        """Rotation hooks, one poll, and whatever the answer asks for."""
        rotation_hooks.resume_unfinished(self.settings)
        rotation_hooks.renew_if_due(self.settings)
        if self.stop.requested:
            return CycleReport(Status.DONE, "stopped")
        try:
            device, local, manifest = self._load()
        except (DeviceConfigError, LocalConfigError, ManifestError, SettingsError) as exc:
            return CycleReport(Status.REFUSED, str(exc))
        return _Cycle(self.settings, self.stop, device, local, manifest, self.contexts).run()

    def _load(self) -> tuple[Device, LocalConfig, Manifest]:
        device = load_device(self.settings.sota_config, self.settings.hsm_pin())
        state_dir = self.settings.state_dir
        return device, load_local_config(state_dir), load_manifest(state_dir)

    def _wait_after(self, report: CycleReport) -> float:
        settings = self.settings
        if report.status is Status.RETRY:
            wait, ceiling = self.backoff.next_wait()
            log.warning(
                "%s; retry in %.2f s (backoff ceiling %.2f s, failure %d)",
                report.reason,
                wait,
                ceiling,
                self.backoff.failures,
            )
            return wait
        self.backoff.reset()
        wait = jittered(settings.poll_interval, settings.poll_jitter_share)
        if report.status is Status.REFUSED:
            log.error("%s; next attempt in %.0f s", report.reason, wait)
        else:
            log.debug("next poll in %.1f s", wait)
        return wait


@dataclass
class _Cycle:
    """One poll and what follows from it, for one loaded device."""

    settings: AgentSettings
    stop: StopSignal
    device: Device
    local: LocalConfig
    manifest: Manifest
    contexts: ContextCache

    def run(self) -> CycleReport:
        fetched = self._fetch()
        if isinstance(fetched, CycleReport):
            return fetched
        config, fresh = fetched
        if config is None:
            return self._report_pending_version(CycleReport(Status.DONE, "unchanged"))
        if self.stop.requested:
            return CycleReport(Status.DONE, "stopped before applying")
        try:
            signer = self.device.signer()
        except PkiError as exc:
            return CycleReport(Status.REFUSED, f"cannot use the device key: {exc}")
        report = CycleReport(Status.DONE, "applied")
        applied = apply_files(config.files, signer, self.settings.secrets_dir, self.manifest)
        self._log_applied(config, fresh, applied, report)
        if fresh and not applied.failed:
            # Saved before the handlers: a rotation handler re-encrypts this copy.
            save_local_config(self.settings.state_dir, config)
            self.local = config
        self._run_handlers(config, applied, report)
        return self._report_pending_version(report)

    def _fetch(self) -> tuple[LocalConfig | None, bool] | CycleReport:
        """(config to apply or None, fetched now) or the report of a failed poll."""
        try:
            context = self.contexts.context(self.device)
        except (OSError, ssl.SSLError) as exc:
            return CycleReport(
                Status.REFUSED,
                f"cannot load the device's TLS identity from {_where(self.device)}: {exc}",
            )
        try:
            answer = GatewayClient(self.device.gateway_url, context).config(
                self.local.last_modified
            )
        except Unreachable as exc:
            return CycleReport(Status.RETRY, f"gateway unreachable: {exc}")
        except GatewayRefused as exc:
            return _refused(exc, self.device)
        if answer.status == 304:
            how = "resumed TLS session" if answer.resumed else "full TLS handshake"
            log.debug("config unchanged since %s (304, %s)", self.local.last_modified, how)
            return (self.local if self._owed() else None), False
        try:
            files = answer.json()
        except ValueError:
            files = None
        if not isinstance(files, dict):
            return CycleReport(
                Status.RETRY, "the gateway's GET /config answer is not a JSON object"
            )
        return LocalConfig(answer.headers.get("last-modified"), files), True

    def _owed(self) -> bool:
        """True if the local copy must be applied again although nothing changed."""
        missing = missing_files(self.local.files, self.settings.secrets_dir)
        if missing:
            log.info("config files missing from %s: %s", self.settings.secrets_dir, missing)
        if self.manifest.pending:
            log.info("handlers still owed for: %s", ", ".join(sorted(self.manifest.pending)))
        return bool(missing or self.manifest.pending)

    def _log_applied(
        self, config: LocalConfig, fresh: bool, applied: Applied, report: CycleReport
    ) -> None:
        source = "from the gateway" if fresh else "again from the local copy"
        log.info("config version %s %s: %s", config.last_modified, source, applied.summary())
        for name, why in sorted(applied.failed.items()):
            log.error("config file %s: %s", name, why)
            report.problems.append(f"file {name}: {why}")

    def _run_handlers(self, config: LocalConfig, applied: Applied, report: CycleReport) -> None:
        for name in sorted(self.manifest.pending):
            if self.stop.requested:
                log.info("stopping: handlers of %s run on the next start", self.manifest.pending)
                return
            if name in applied.failed:
                continue  # its old file stays, and so does the debt
            entry = config.files.get(name)
            argv = entry.get("OnChanged") if isinstance(entry, dict) else None
            if argv:
                path = self.settings.secrets_dir / name
                _log_handler(run_handler(self.settings, name, path, argv), report)
            self.manifest.pending.discard(name)
            self.manifest.save()

    def _report_pending_version(self, report: CycleReport) -> CycleReport:
        """POST /config/applied for a fully applied version the gateway has not heard of."""
        version = self.local.last_modified
        if self.stop.requested or not version or version == self.manifest.reported:
            return report
        if self.manifest.pending or missing_files(self.local.files, self.settings.secrets_dir):
            return report
        try:
            # Reloaded: a rotation handler may have moved the device to a new key.
            device = load_device(self.settings.sota_config, self.settings.hsm_pin())
            GatewayClient(device.gateway_url, self.contexts.context(device)).config_applied(version)
        except (Unreachable, GatewayRefused, DeviceConfigError, SettingsError) as exc:
            log.warning("could not report config version %s as applied: %s", version, exc)
            report.problems.append(f"report of version {version} not sent: {exc}")
            return report
        self.manifest.reported = version
        self.manifest.save()
        log.info("reported config version %s as applied", version)
        return report


def _refused(exc: GatewayRefused, device: Device) -> CycleReport:
    if exc.status >= 500:
        return CycleReport(Status.RETRY, str(exc))
    if exc.cert_refused:
        return CycleReport(
            Status.REFUSED,
            f"the gateway {device.gateway_url} refuses this device's certificate: {exc}; "
            "retrying will not help until an operator acts (or a new certificate is installed)",
        )
    return CycleReport(Status.REFUSED, f"{exc}; retrying will not help until this is fixed")


def _where(device: Device) -> str:
    if device.token is not None:
        return f"token {device.token.label!r}"
    return f"{device.cert_path} and {device.key_path}"


def _log_handler(result: HandlerResult, report: CycleReport) -> None:
    if result.ok:
        log.info("handler of %s (%s): %s", result.file, result.command, result.detail)
        return
    what = "refused" if result.refused else "failed"
    log.error("handler of %s %s: %s", result.file, what, result.detail)
    report.problems.append(f"handler of {result.file} {what}: {result.detail}")


def _check_folders(settings: AgentSettings) -> None:
    """The secrets folder must not hold the agent's own state (a file could overwrite it)."""
    secrets = os.path.realpath(settings.secrets_dir)
    state = os.path.realpath(settings.state_dir)
    if secrets == state or state.startswith(secrets + os.sep):
        raise SettingsError(
            f"secrets_dir {settings.secrets_dir} must not contain state_dir "
            f"{settings.state_dir}: a config file could overwrite the agent's state"
        )
