"""Turn the gateway's config files into files in the secrets folder.

Each value is decrypted with the device key (unless `Unencrypted`) and written
to `<secrets_dir>/<name>` (mode 0600, durably) only if it differs from what is
there, so an unchanged file is never rewritten and its handlers do not run.
Files the agent wrote earlier that the config no longer has are deleted. A
value that cannot be decrypted leaves the old file in place. Only names and
reasons are ever logged or returned, never a value.
"""

from __future__ import annotations

import logging
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certfleet.pki import ecies
from certfleet.pki.files import write_atomic
from certfleet.pki.signer import Signer

from .manifest import Manifest

log = logging.getLogger(__name__)

# The gateway's rule for names: a file name in one folder, no dot files.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass
class Applied:
    """What one application of the config did, by file name."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log: names only."""
        parts = [
            f"{label} {', '.join(sorted(names))}"
            for label, names in (
                ("wrote", self.written),
                ("removed", self.removed),
                ("unchanged", self.unchanged),
                ("failed", self.failed),
            )
            if names
        ]
        return "; ".join(parts) or "no files"


def bad_name(name: str) -> bool:
    """True if `name` cannot be a file in the secrets folder (a path, a dot file, too long)."""
    return not (_NAME.fullmatch(name) and ".." not in name)


def missing_files(files: dict[str, Any], secrets_dir: Path) -> list[str]:
    """Names of the config whose file is not in the secrets folder (a tmpfs after a reboot)."""
    return [n for n in files if not bad_name(n) and not (secrets_dir / n).exists()]


def apply_files(
    files: dict[str, Any], signer: Signer, secrets_dir: Path, manifest: Manifest
) -> Applied:
    """Write changed files, delete vanished ones; changed names are added to manifest.pending."""
    applied = Applied()
    contents = _contents(files, signer, applied)
    _prepare(secrets_dir)
    changed = {}
    for name, content in contents.items():
        if _same(secrets_dir / name, content):
            applied.unchanged.append(name)
        else:
            changed[name] = content
    if changed:
        # Recorded first: a crash mid-way must still let the next run finish the job.
        manifest.files |= {str(secrets_dir / name) for name in changed}
        manifest.pending |= set(changed)
        manifest.save()
    for name, content in changed.items():
        _write(secrets_dir / name, content, name, applied, manifest)
    _remove_vanished(files, secrets_dir, manifest, applied)
    manifest.save()
    return applied


def _contents(files: dict[str, Any], signer: Signer, applied: Applied) -> dict[str, bytes]:
    contents = {}
    for name, entry in files.items():
        try:
            contents[name] = _content(name, entry, signer)
        except ValueError as exc:
            applied.failed[name] = str(exc)
    return contents


def _content(name: str, entry: Any, signer: Signer) -> bytes:
    if bad_name(name):
        raise ValueError("not a plain file name; not written")
    value = entry.get("Value") if isinstance(entry, dict) else None
    if not isinstance(value, str):
        raise ValueError("the gateway sent no string Value; not written")
    if entry.get("Unencrypted") is True:
        return value.encode()
    try:
        return ecies.decrypt_b64(signer.exchange, signer.public_key.curve, value)
    except ecies.EciesError as exc:
        raise ValueError(
            f"cannot decrypt ({exc}); the value may be encrypted to another key than this "
            "device's current one; the old file is kept"
        ) from None


def _prepare(secrets_dir: Path) -> None:
    secrets_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(secrets_dir.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "secrets folder %s has mode %04o: others may list it; chmod 700 it",
            secrets_dir,
            mode,
        )


def _same(path: Path, content: bytes) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.read_bytes() == content
    except OSError:
        return False


def _write(path: Path, content: bytes, name: str, applied: Applied, manifest: Manifest) -> None:
    try:
        write_atomic(path, content, FILE_MODE)
    except OSError as exc:
        applied.failed[name] = f"cannot write {path}: {exc.strerror or exc}"
        manifest.pending.discard(name)
        return
    applied.written.append(name)


def _remove_vanished(
    files: dict[str, Any], secrets_dir: Path, manifest: Manifest, applied: Applied
) -> None:
    # A file whose new value failed keeps its old content, so it is not "vanished".
    keep = {str(secrets_dir / name) for name in files if not bad_name(name)}
    for path in sorted(manifest.files - keep):
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove %s, which the config no longer has: %s", path, exc)
            continue
        manifest.files.discard(path)
        applied.removed.append(Path(path).name)
