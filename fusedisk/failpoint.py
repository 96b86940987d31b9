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
import threading
import time

import trio

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


def armed_percent(prefix: str) -> float | None:
    """For a failpoint armed as ``PREFIX<N>`` (e.g. ``copied-50``: die once half
    of the relocation's bytes are copied): N; None if none such is armed."""
    if not _ARMED.startswith(prefix):
        return None
    try:
        return float(_ARMED.removeprefix(prefix))
    except ValueError:
        return None


def armed_name() -> str:
    return _ARMED


def _stall_spec() -> tuple[str, float, int]:
    name, _, rest = os.environ.get("FUSEDISK_STALL", "").partition(":")
    ms, _, count = rest.partition(":")
    try:
        return name, float(ms or 0) / 1000, int(count or 1)
    except ValueError:
        return "", 0.0, 0


#: ``FUSEDISK_STALL=NAME:MS:COUNT``: the first COUNT times the daemon reaches
#: the stall point NAME it waits MS milliseconds (a slow disk, on demand), so a
#: test can make a switchover overrun its pause budget without racing a load.
_STALL_NAME, _STALL_S, _stalls_left = _stall_spec()
_stall_lock = threading.Lock()


def stall_armed(name: str) -> bool:
    """Whether the stall point *name* is armed (for a hot path to test once, at import)."""
    return name == _STALL_NAME and _stalls_left > 0


async def stall(name: str) -> None:
    """Wait here if the stall point *name* is armed and has stalls left."""
    global _stalls_left
    if name == _STALL_NAME and _stalls_left > 0:
        _stalls_left -= 1
        log.warning("stall point %s reached: waiting %.0f ms", name, _STALL_S * 1000)
        await trio.sleep(_STALL_S)


def stall_blocking(name: str) -> None:
    """:func:`stall` for a worker thread: block it there (the stall points of
    the copy's worker, e.g. ``copy-io`` between a step's read and its write)."""
    global _stalls_left
    if name != _STALL_NAME:
        return
    with _stall_lock:  # two relocations' workers may reach it at once
        if _stalls_left <= 0:
            return
        _stalls_left -= 1
    log.warning("stall point %s reached: waiting %.0f ms", name, _STALL_S * 1000)
    time.sleep(_STALL_S)


def _hold_spec() -> tuple[str, str]:
    name, _, path = os.environ.get("FUSEDISK_HOLD", "").partition(":")
    return name, path


#: ``FUSEDISK_HOLD=NAME:PATH``: each time the daemon reaches the hold point NAME
#: it waits for as long as the file PATH exists, so that a test can act inside
#: an exact phase (say, after a switchover's pause, before its sweep) for as long
#: as it needs, however loaded the machine, and end it by removing the file.
_HOLD_NAME, _HOLD_PATH = _hold_spec()


async def hold(name: str) -> None:
    """Wait here while the hold point *name* is armed and its file exists."""
    if name != _HOLD_NAME or not _HOLD_PATH:
        return
    path = trio.Path(_HOLD_PATH)
    if await path.exists():
        log.warning("hold point %s reached: waiting while %s exists", name, _HOLD_PATH)
        while await path.exists():  # noqa: ASYNC110 (a test's file, not an event of ours)
            await trio.sleep(0.01)
        log.warning("hold point %s released", name)
