"""A timeline of what the daemon does, for finding where a guest's I/O gap goes.

``FUSEDISK_TRACE=PATH`` in the daemon's environment turns it on: the daemon
then keeps, in memory, one line per

* switchover step (:func:`mark`, called by switchover.py and relocation.py:
  the gate closing, each step, the gate opening, what runs after the pause
  and the relocation's clean-up),
* FUSE ``read``/``write``/``fsync`` request (when its handler started and
  ended, which is when pyfuse3 replies),
* trio task step that held the loop for :data:`SLOW_STEP_NS` or more (the
  task's name: what kept every other request waiting),
* garbage collection of :data:`SLOW_GC_NS` or more,

and writes them to PATH when it exits (:func:`dump`), as
``<CLOCK_MONOTONIC ns> <event> <detail>``: the clock the bench's own
``time.monotonic()`` reads, so its figures and the daemon's line up. Unset,
nothing of it runs; :data:`ON` is read once, at import.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

PATH = os.environ.get("FUSEDISK_TRACE", "")
ON = bool(PATH)
#: a task step (or a collection) at least this long is a line of its own
SLOW_STEP_NS = 500_000
SLOW_GC_NS = 200_000
#: at most this many lines are kept (the first ones)
LIMIT = 2_000_000

_lines: list[tuple[int, str, str]] = []


def mark(event: str, detail: str = "") -> None:
    """Note *event* now (callers test :data:`ON` first)."""
    if len(_lines) < LIMIT:
        _lines.append((time.monotonic_ns(), event, detail))


class _SlowSteps(trio.abc.Instrument):
    """Notes every task step that kept the loop for SLOW_STEP_NS or more."""

    def __init__(self) -> None:
        self._started = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.monotonic_ns()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.monotonic_ns() - self._started
        # _started is 0 for the step that installed the instrument
        if took >= SLOW_STEP_NS and self._started and len(_lines) < LIMIT:
            _lines.append((self._started, "step", f"{took / 1e6:.3f}ms {task.name}"))


_gc_started = 0


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.monotonic_ns()
        return
    took = time.monotonic_ns() - _gc_started
    if took >= SLOW_GC_NS and len(_lines) < LIMIT:
        _lines.append((_gc_started, "gc",
                       f"{took / 1e6:.3f}ms gen{info.get('generation')} "
                       f"freed {info.get('collected')}"))


def _traced(name: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def traced(fh: int, *args: Any) -> Any:
        started = time.monotonic_ns()
        try:
            return await handler(fh, *args)
        finally:
            if len(_lines) < LIMIT:
                size = args[1] if name == "read" else len(args[1]) if name == "write" else 0
                where = args[0] if name in ("read", "write") else 0
                _lines.append((started, name, f"fh={fh} off={where} len={size} "
                               f"took={(time.monotonic_ns() - started) / 1e6:.3f}ms"))
    return traced


def install(operations: object) -> None:
    """Start tracing (if :data:`ON`): call on the trio thread, before the mount serves."""
    if not ON:
        return
    trio.lowlevel.add_instrument(_SlowSteps())
    gc.callbacks.append(_gc_callback)
    for name in ("read", "write", "fsync"):
        setattr(operations, name, _traced(name, getattr(operations, name)))
    mark("trace", f"pid {os.getpid()}")


def dump() -> None:
    """Write what was noted to PATH (if :data:`ON`), appending."""
    if not ON:
        return
    with open(PATH, "a") as f:
        for stamp, event, detail in sorted(_lines):
            f.write(f"{stamp} {event} {detail}\n")
    _lines.clear()
