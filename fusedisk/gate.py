"""A gate that quiesces the requests of one datastore entry.

Requests that change an entry pass the gate; a switchover closes it, waits
for the requests already inside to leave (:meth:`Gate.close_and_drain`),
does its work, and opens it again. Requests that arrive while it is closed
wait in :meth:`Gate.wait_open`.

Only requests that can *checkpoint* between their start and their end need
to be counted as inside (a write waiting for the CBT activity log, an
fsync on a worker thread, a truncate). A request that runs start to end
without a checkpoint is atomic on the trio thread: it is either wholly
before or wholly after the switchover's own steps, so the cheap
``if gate.closed`` test at its start is all it needs.
"""

from __future__ import annotations

import trio


class Gate:
    """Open by default. ``closed`` and ``inside`` may be read by anyone."""

    __slots__ = ("_drained", "_opened", "closed", "inside")

    def __init__(self) -> None:
        self.closed = False
        self.inside = 0
        self._opened = trio.Event()
        self._opened.set()
        self._drained: trio.Event | None = None

    async def wait_open(self) -> None:
        while self.closed:
            await self._opened.wait()

    async def enter(self) -> None:
        """Wait until open, then count the caller as inside; pair with :meth:`leave`."""
        while self.closed:
            await self._opened.wait()
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1
        if self.inside == 0 and self._drained is not None:
            self._drained.set()

    async def close_and_drain(self) -> None:
        """Stop new requests and wait until the ones inside have left."""
        assert not self.closed, "gate closed twice"
        self.closed = True
        self._opened = trio.Event()
        if self.inside:
            self._drained = trio.Event()
            try:
                await self._drained.wait()
            finally:
                self._drained = None

    def open(self) -> None:
        self.closed = False
        self._opened.set()
