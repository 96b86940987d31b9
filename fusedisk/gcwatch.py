"""Long garbage collections: kept short, and told in the log.

CPython's cyclic collector stops the whole daemon while it runs: a full
(generation 2) collection walks every tracked object, which for an entry of
tens of thousands of files is millions of objects (the inodes, the staged
tree's tables, the copies and their bitmaps). Measured: relocating an entry
of 30,000 small files, 17 full collections of 53-1,233 ms each, freeing next
to nothing (0-29 objects), while a guest's 4 KiB O_DIRECT writes waited.

The daemon's objects are long-lived and freed by reference counting, not
by the collector. So after every full collection that freed almost nothing
(:data:`FREEZE_BELOW`), everything that survived it is moved to the
permanent generation (``gc.freeze()``), which later collections skip: the
next full one walks only what was made since. Freezing only after a slow one
was not enough: relocating 100,000 files, the full collections between two
slow ones each walked everything made since the last freeze, 52-448 ms each,
and the O_DIRECT probe saw a 1.4 s gap. A switchover's pause runs with the
collector off (switchover.py). The cost: a reference cycle
among frozen objects that becomes garbage later is not freed until the
daemon exits (cycles are rare here and short-lived ones die young, before
any freeze). Each slow collection is logged with its generation and time,
so that one is never taken for a slow disk.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

#: a collection longer than this is logged
SLOW_MS = 50.0
#: a full collection that freed fewer objects than this freezes its survivors
FREEZE_BELOW = 1000


class _Watch:
    def __init__(self) -> None:
        self.started = 0.0
        self.slow = 0
        self.freezes = 0
        self.longest_ms = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        took_ms = (time.perf_counter() - self.started) * 1000
        self.longest_ms = max(self.longest_ms, took_ms)
        generation, collected = info.get("generation", -1), info.get("collected", 0)
        frozen = generation == 2 and collected < FREEZE_BELOW
        if frozen:  # the lists are consistent again once a collection ended
            gc.freeze()
            self.freezes += 1
        if took_ms < SLOW_MS:
            return
        self.slow += 1
        log.warning("garbage collection of generation %d stopped the daemon for %.0f ms "
                    "(%d objects freed)%s", generation, took_ms, collected,
                    "; its survivors are frozen: later collections skip them" if frozen else "")


_watch = _Watch()


def install() -> None:
    """Start watching (idempotent)."""
    if _watch not in gc.callbacks:
        gc.callbacks.append(_watch)


def uninstall() -> None:
    """Stop watching (idempotent): a collection while the process ends, or after a
    refused start, is nobody's stall, and its warning would follow the one-line error."""
    if _watch in gc.callbacks:
        gc.callbacks.remove(_watch)


def statistics() -> dict[str, float]:
    return {"gc_slow": _watch.slow, "gc_freezes": _watch.freezes,
            "gc_longest_ms": round(_watch.longest_ms, 1), "gc_frozen": gc.get_freeze_count()}
