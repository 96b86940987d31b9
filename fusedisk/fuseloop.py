"""The FUSE request loop: pyfuse3's worker tasks, fed without a scheduler round per request.

pyfuse3 3.5's workers call the module-level coroutine ``_wait_fuse_readable``
before every request. It takes a trio lock and parks in
``trio.lowlevel.wait_readable`` on ``/dev/fuse``, and parking costs a whole
scheduler round (an epoll re-arm, ``epoll_wait``, a pass over the run queue)
even when the kernel already holds the next request. Under queue depth that
round was most of the daemon's CPU: 4 KiB random writes at QD32 went from
about 9k to about 35k IOPS once it is skipped (README, "I/O model").

:class:`RequestLoop` puts its own coroutine in that name's place; the worker
loop looks the name up at every call, and the coroutine keeps its contract
(return True when a request can be read, False when the loop must end):

* it first asks ``poll(2)``, with a zero timeout, whether a request is queued,
  and if so lets the worker read it at once;
* after ``burst`` such reads in a row it waits the ordinary way, which lets
  every other task (the copy engine, the control socket, timers) run at least
  once per ``burst`` requests.

Invariants, all resting on "no await between the poll and pyfuse3's read":

* True is returned only right after ``poll(2)`` said readable. The fd is
  blocking, and reading an empty ``/dev/fuse`` would stall the whole loop, so
  a waiter woken after another worker took the request polls again and goes
  back to waiting.
* At most one task waits on the fd (``_turn``): trio allows one waiter per fd.
* After :meth:`RequestLoop.terminate` no task starts waiting. pyfuse3 checks
  its session's exit flag under its own lock; that flag is not reachable from
  Python, so the loop keeps its own.

pyfuse3 counts idle workers inside the coroutine we replace, so with ours it
sees none: it starts a new worker after each request until ``max_tasks`` and
never retires one. The pool is therefore a fixed ``max_tasks``, which bounds
how many handlers may wait at once (an fsync on a thread, a write held at a
paused entry) before new requests queue in the kernel. The turn to wait goes
to the worker that queued last, so under steady load the same few workers
serve and the others never read: libfuse gives each worker a ~1 MiB receive
buffer at its first read, and a FIFO turn would touch all ``max_tasks`` of them.

If the installed pyfuse3 has no such coroutine, or ``/dev/fuse`` cannot be
told apart among the process's descriptors, pyfuse3's own loop runs and a
warning says so: slower, not wrong.
"""

from __future__ import annotations

import inspect
import logging
import os
import select
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

_HOOK = "_wait_fuse_readable"
DEV_FUSE = "/dev/fuse"
#: Requests a worker may take without yielding. At ~30 µs a request this
#: holds the loop for about 1 ms; 16 to 64 measured alike at QD32, 4 lost half.
DEFAULT_BURST = 32
#: Idle readers pyfuse3's own loop keeps when it must run: two, so it does not
#: start and end a task per request under queue depth (measured: 8 fixed
#: workers cost ~25% IOPS at QD1).
STOCK_MIN_TASKS = 2


def dev_fuse_fds() -> set[int]:
    """The descriptors of this process that are open on ``/dev/fuse``."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == DEV_FUSE:
                found.add(int(name))
        except OSError:  # closed since the listing (the listing's own fd, for one)
            continue
    return found


def find_session_fd(fds_before_init: set[int]) -> int | None:
    """The FUSE session's descriptor, if the poll-first reader can serve it.

    *fds_before_init* is :func:`dev_fuse_fds` taken before ``pyfuse3.init``:
    pyfuse3 does not expose its descriptor, so it is the one that appeared.
    None (after a warning) when pyfuse3 has no hook or the fd is ambiguous.
    """
    hook = getattr(pyfuse3, _HOOK, None)
    if hook is None or not inspect.iscoroutinefunction(hook):
        log.warning("pyfuse3 %s has no %s(): running its own request loop, "
                    "which costs a scheduler round per request",
                    getattr(pyfuse3, "__version__", "?"), _HOOK)
        return None
    new = dev_fuse_fds() - fds_before_init
    if len(new) != 1:
        log.warning("cannot tell which descriptor is the FUSE session (%d new on %s): "
                    "running pyfuse3's own request loop", len(new), DEV_FUSE)
        return None
    return new.pop()


class _LastInFirstOut:
    """A lock handed, on release, to the task that queued for it last."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[trio.lowlevel.Task] = []

    async def acquire(self) -> None:
        if not self._held:
            self._held = True
            return
        task = trio.lowlevel.current_task()
        self._waiters.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # woken holding the lock

    def release(self) -> None:
        if self._waiters:
            trio.lowlevel.reschedule(self._waiters.pop())  # the lock passes on, still held
        else:
            self._held = False


class RequestLoop:
    """Runs ``pyfuse3.main`` with the poll-first reader on *session_fd*, or
    pyfuse3's own loop when *session_fd* is None; end it with :meth:`terminate`."""

    def __init__(self, session_fd: int | None, *, max_tasks: int,
                 burst: int = DEFAULT_BURST) -> None:
        self.max_tasks = max_tasks
        self.burst = burst
        self._fd = session_fd
        self._poll = select.poll()
        if session_fd is not None:
            self._poll.register(session_fd, select.POLLIN)
        self._turn = _LastInFirstOut()
        self._exiting = False
        self._burst_left = burst
        #: Counters (``status``): requests handed to a worker after a wait
        #: for the fd and without one, and wake-ups that found the request
        #: already taken by a worker that did not wait.
        self.after_wait = 0
        self.without_wait = 0
        self.woken_empty = 0

    @property
    def batching(self) -> bool:
        """Whether the poll-first reader serves this session."""
        return self._fd is not None

    def _queued(self) -> bool:
        # POLLIN: a request is waiting; POLLERR: the connection is gone,
        # and pyfuse3's read then ends the worker.
        return bool(self._poll.poll(0))

    async def _wait_readable(self) -> bool:
        if self._burst_left > 0 and self._queued():
            self._burst_left -= 1
            self.without_wait += 1
            return True  # no await from the poll to pyfuse3's read
        self._burst_left = self.burst
        assert self._fd is not None
        await self._turn.acquire()
        try:
            while not self._exiting:
                await trio.lowlevel.wait_readable(self._fd)
                if self._queued():
                    self.after_wait += 1
                    return True  # no await from the poll to pyfuse3's read
                self.woken_empty += 1
        except trio.ClosedResourceError:  # terminate() woke the waiter
            self._exiting = True
        finally:
            self._turn.release()
        return False

    async def run(self) -> None:
        """Serve FUSE requests until the session ends."""
        if not self.batching:
            await pyfuse3.main(min_tasks=STOCK_MIN_TASKS, max_tasks=self.max_tasks)
            return
        stock: Callable[[], Awaitable[bool]] = getattr(pyfuse3, _HOOK)
        setattr(pyfuse3, _HOOK, self._wait_readable)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=self.max_tasks)
        finally:
            setattr(pyfuse3, _HOOK, stock)

    def terminate(self) -> None:
        """End the session: waiting workers return, busy ones stop after their request."""
        self._exiting = True
        pyfuse3.terminate()

    def statistics(self) -> dict[str, Any]:
        return {"batching": self.batching, "max_tasks": self.max_tasks,
                "requests_after_wait": self.after_wait,
                "requests_without_wait": self.without_wait,
                "woken_empty": self.woken_empty}
