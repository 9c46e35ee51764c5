"""Run one 5-step rotation through the Journal; the crash test kills it at every write.

Usage: python tests/journal_crash_child.py STATE_DIR
"""

from __future__ import annotations

import sys

from certfleet.agent.journal import Journal

ROTATION_ID = "certs-1700000000"
STEPS = [
    "Generate new certificate",
    "Lock device configuration on server",
    "Update local configuration with new key",
    "Update device specific configuration on server with new key",
    "Finalize aktualizr configuration",
]


def main(state_dir: str) -> int:
    """Begin or resume the rotation, record every pending step, then finish it."""
    journal = Journal(state_dir)
    rotation = journal.begin(ROTATION_ID, STEPS)
    while (step := rotation.next_step()) is not None:
        index = STEPS.index(step)
        rotation.record(step, True, file=f"client-{index}.pem", fingerprint=f"sha256:{index:02x}")
    if not rotation.finished:
        rotation.finish(True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
