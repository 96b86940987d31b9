"""Crash injection for the crash-safety tests (like QEMU's blkdebug events).

``FUSEDISK_FAILPOINT=NAME`` in the daemon's environment makes it kill itself
with SIGKILL when it reaches the point NAME, so a test can crash it at an
exact phase (say, between a switchover's flush and its commit record) and
prove the next mount serves exactly what was acknowledged. Unset, a point
costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

_ARMED = os.environ.get("FUSEDISK_FAILPOINT", "")
#: ``FUSEDISK_PAUSE_AFTER_PASS=1``: every relocation pauses itself after each
#: copy pass (``fusedisk resume`` goes on), so a test can change a file between
#: two passes without racing the copy.
PAUSE_AFTER_PASS = os.environ.get("FUSEDISK_PAUSE_AFTER_PASS", "") == "1"


def failpoint(name: str) -> None:
    """Die here, as ``kill -9`` would, if the failpoint *name* is armed."""
    if name == _ARMED:
        log.warning("failpoint %s reached: killing the daemon", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
