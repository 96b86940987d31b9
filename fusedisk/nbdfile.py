"""One remote file's data over NBD, shared by many concurrent trio tasks (issue 17).

An :class:`NbdFile` is an open export of a remote store's nbdkit (one
top-level file of the store directory): ``pread``/``pwrite``/``zero``/
``trim``/``flush`` from any number of trio tasks, spread over a few libnbd
connections, many requests in flight on each.

Tasks and ownership. Each connection has ONE driver task, the only code
that touches its libnbd handle (issues commands, polls, notices
completions, reconnects); a request is a :class:`_Request` that a caller
appends to a connection's queue, kicks the driver awake with, and waits
for on its ``done`` event. The drivers live in a nursery owned by
:meth:`NbdFile.run` (a service: ``await nursery.start(f.run)``, which
:meth:`NbdFile.open` does), so the caller's nursery (the store view's)
owns every task; :meth:`NbdFile.opened` is the same as an ``async with``
for callers that have no nursery at hand (tests). A caller cancelled while
it waits leaves its request to finish in the driver (libnbd cannot take
a command back; its buffer stays alive until the reply).

Requests larger than the server's maximum block size (at most
:data:`MAX_REQUEST`) are split; each piece goes to the connection with
the fewest requests queued or in flight; a request returns when all its
pieces have.

Errors. A request the server fails is ``OSError`` with the server's errno
(EIO if it gave none). A connection that dies (nbdkit gone) or does not
answer a request for ``request_timeout_s`` is dropped and reconnected:
``endpoint_of()`` is asked again (the caller may restart nbdkit and hand a
new endpoint), attempts repeat for up to ``reconnect_timeout_s``, then its
requests fail with EIO and an error is logged naming the store and
export; after such a give-up every connection tries once per new request
(fails fast) until one connects again. Requests in flight on a dropped
connection are sent again on the new one (NBD reads and writes are
idempotent); a request that itself ran out of ``request_timeout_s`` fails
with EIO instead.

Durability rule (the flush epoch). An NBD write that was acknowledged
but not yet covered by a flush may be lost with the server that
acknowledged it. Such writes are not kept (that would cost a copy of
everything unflushed). Instead: a connection dropped while writes were
acknowledged since the last successful flush bumps ``loss_epoch`` --
unless the reconnect reaches the same remote host with the same boot id
(the endpoint's ``boot_id``, which the agent gives only when nbdkit writes
straight into the file: no caching filter), since then those writes sit in
that host's page cache, and the next flush makes them durable or reports
the writeback error itself; a flush then fails with EIO if the epoch moved
while it ran, or if it moved before and no flush has reported it yet -- so after a possible loss the
next flush fails exactly once (like Linux's writeback-error reporting),
and a flush that returns means every write acknowledged before it began
is on the remote host's disk. The report is once per NbdFile: a store
view that shares one NbdFile between several file handles must fan it
out to them itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import remote
from .remote import RemoteError

log = logging.getLogger(__name__)

#: The buffers of every NbdFile of the process (they run on one trio thread). One
#: pool, not one per file: python3-libnbd pins every buffer it was ever given
#: (remote.BufferPool), so a pool per file pinned its buffers for ever once the file
#: closed, and a store view grew by every file it opened (94-104 MiB after six
#: relocations through it, from 39 after the first). Shared, the pinned total is the
#: most commands of each size ever in flight at once in the process.
BUFFERS = remote.BufferPool()

#: The largest request sent as one NBD command (also libnbd's own sane bound).
MAX_REQUEST = 32 << 20
#: Zero and trim carry no payload: they are split at this size only.
MAX_ZERO = 1 << 30
#: Pause between two reconnect attempts: from the first to the last.
_BACKOFF_S = (0.02, 0.5)


@dataclass(eq=False, slots=True)
class _Request:
    """One NBD command of one caller, from queued to done."""

    op: str  # "read", "write", "zero", "trim", "flush", "reopen"
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: memoryview | None = None  # a write's payload
    pinned: _Connection | None = None  # flush and reopen: this connection only
    result: bytes | None = None  # a read's data
    error: OSError | None = None
    done: trio.Event = field(default_factory=trio.Event)
    deadline: float = math.inf  # trio time; set when the command is sent
    sent: float = 0.0
    buffer: Any = None  # the nbd.Buffer libnbd holds while the command is in flight
    slot: bytearray | None = None  # its pooled buffer while in flight (remote.BufferPool)


class _Connection:
    """A libnbd handle and its requests. Only its driver (:meth:`NbdFile._drive`)
    touches ``handle`` and ``in_flight``; callers append to ``queue`` and set
    ``kick``, which the driver replaces after draining the queue (with no await
    in between, so no request is left queued behind a spent event)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.handle: Any = None
        self.endpoint_gen = -1  # which endpoint_of() answer the handle was made from
        self.boot_id = ""  # the remote host's boot id when the handle was made
        self.queue: deque[_Request] = deque()
        self.in_flight: dict[int, _Request] = {}
        self.kick = trio.Event()

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.in_flight)


class NbdFile:
    """Data of one NBD export, shared by many concurrent trio tasks.

    Start it with ``await f.open(nursery)`` (or ``await nursery.start(f.run)``,
    or ``async with f.opened()``); end it with :meth:`close`. ``stats`` counts
    requests, bytes read and written, reconnects, errors, the last request's
    latency and the most requests ever in flight at once.
    """

    def __init__(self, endpoint_of: Callable[[], Awaitable[remote.Endpoint]], export: str, *,
                 connections: int = 2, reconnect_timeout_s: float = 30.0,
                 request_timeout_s: float = 60.0, name: str = "") -> None:
        self.endpoint_of = endpoint_of
        self.export = export
        self.reconnect_timeout_s = reconnect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.name = name
        self.stats: dict[str, float] = {
            "requests": 0, "bytes_read": 0, "bytes_written": 0, "reconnects": 0, "errors": 0,
            "last_latency_s": 0.0, "in_flight": 0, "max_in_flight": 0, "resent": 0}
        #: writes acknowledged so far / when the last successful flush began
        self.acked_writes = 0
        self.flushed_writes = 0
        #: bumped by a drop that may have lost acknowledged writes; see the module's rule
        self.loss_epoch = 0
        self.reported_epoch = 0
        #: boot ids of the remote host under which dropped connections had
        #: acknowledged writes not yet flushed: judged at the reconnect
        self._suspect: set[str] = set()
        self._conns = [_Connection(i) for i in range(max(1, connections))]
        self._endpoint: remote.Endpoint | None = None
        self._endpoint_gen = 0
        self._endpoint_lock = trio.Lock()
        self._size = 0
        self._max_request = MAX_REQUEST
        self._pool = BUFFERS
        self._can_fua = self._can_zero = self._can_trim = True
        self._state = "new"  # new -> open -> closing -> closed
        #: a reconnect window ran out and no connection has been made since
        self._unreachable = False
        self._outstanding = 0
        self._drained = trio.Event()
        self._stopped = trio.Event()
        self._scope: trio.CancelScope | None = None

    # -- life ----------------------------------------------------------------------

    @property
    def where(self) -> str:
        """How messages name this file: the store and the export."""
        if self.name:
            return self.name
        store = self._endpoint.store if self._endpoint is not None else "?"
        return f"store {store!r}: {self.export}"

    @property
    def size(self) -> int:
        """The export's size at the last (re)connect."""
        return self._size

    async def open(self, nursery: trio.Nursery) -> None:
        """Connect every handle and start their drivers in *nursery*; RemoteError (one
        line) if the export cannot be reached."""
        await nursery.start(self.run)

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[NbdFile]:
        """Open in a nursery of its own; closed on leaving. One error out of the block
        (RemoteError from the open, say) leaves as itself, not in a group."""
        try:
            async with trio.open_nursery() as nursery:
                await self.open(nursery)
                try:
                    yield self
                finally:
                    with trio.CancelScope(shield=True):
                        await self.close()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and not isinstance(group.exceptions[0],
                                                             BaseExceptionGroup):
                raise group.exceptions[0] from None
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The service: connects, reports started, runs the drivers until :meth:`close`."""
        if self._state != "new":
            raise RemoteError(f"{self.where}: already opened")
        try:
            self._endpoint = await self._ask_endpoint()
            for conn in self._conns:
                conn.handle = await trio.to_thread.run_sync(self._endpoint.handle, self.export)
                conn.endpoint_gen = self._endpoint_gen
                conn.boot_id = self._endpoint.boot_id
                self._learn(conn.handle)
            self._state = "open"
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                for conn in self._conns:
                    nursery.start_soon(self._drive, conn)
                task_status.started()
        finally:
            self._state = "closed"
            for conn in self._conns:
                self._fail_all(conn, errno.EBADF, "closed")
                if conn.handle is not None:
                    remote.close_handle(conn.handle)
                    conn.handle = None
            self._stopped.set()

    async def close(self) -> None:
        """Let the requests in flight finish (for up to ``request_timeout_s``), then
        disconnect every handle; later requests fail with EBADF, and so do those
        still unfinished when the time is up (their drivers are cancelled)."""
        if self._state == "new":
            self._state = "closed"
        if self._state == "closed":
            return
        self._state = "closing"
        with trio.move_on_after(self.request_timeout_s) as waited:
            if self._outstanding:
                await self._drained.wait()
        if waited.cancelled_caught and self._scope is not None:
            self._scope.cancel()
        for conn in self._conns:
            conn.kick.set()  # a driver that sees "closing" with nothing to do ends
        await self._stopped.wait()

    # -- the requests ----------------------------------------------------------------

    async def pread(self, length: int, offset: int) -> bytes:
        """*length* bytes at *offset*; fewer only at the end of the export."""
        self._check(offset, length)
        length = max(0, min(length, self._size - offset))
        if not length:
            await trio.lowlevel.checkpoint()
            return b""
        reqs = [_Request("read", start, n)
                for start, n in remote.pow2_pieces(offset, length, self._max_request)]
        await self._run(reqs)
        if len(reqs) == 1:
            assert reqs[0].result is not None
            return reqs[0].result
        return b"".join(r.result or b"" for r in reqs)

    async def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        """Write *data* at *offset* (within the export: ENOSPC beyond its end). With *fua*
        the data is durable when this returns."""
        payload = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._check(offset, len(payload), write=True)
        flags = 0
        if fua and self._can_fua:
            flags = remote.libnbd().CMD_FLAG_FUA
        reqs = [_Request("write", start, n, flags, payload[start - offset:start - offset + n])
                for start, n in remote.pow2_pieces(offset, len(payload), self._max_request)]
        await self._run(reqs)
        if fua and not self._can_fua:
            await self.flush()

    async def zero(self, offset: int, length: int, *, punch: bool = True) -> None:
        """Make [offset, offset+length) read as zeroes; with *punch* the server may
        deallocate it (a hole), else it keeps it allocated."""
        self._check(offset, length, write=True)
        if not self._can_zero:
            for start, n in _split(offset, length, self._max_request):
                await self.pwrite(bytes(n), start)
            return
        flags = 0 if punch else remote.libnbd().CMD_FLAG_NO_HOLE
        await self._run([_Request("zero", start, n, flags)
                         for start, n in _split(offset, length, MAX_ZERO)])

    async def trim(self, offset: int, length: int) -> None:
        """Tell the server that [offset, offset+length) is no longer needed (it may punch a
        hole; what it reads afterwards is unspecified). Nothing if it cannot trim."""
        self._check(offset, length, write=True)
        if not self._can_trim:
            await trio.lowlevel.checkpoint()
            return
        await self._run([_Request("trim", start, n)
                         for start, n in _split(offset, length, MAX_ZERO)])

    async def flush(self) -> None:
        """NBD flush on every connection, waited for on all: on return every write
        acknowledged before the call is durable on the remote host. EIO (once) if a
        dropped connection may have lost acknowledged writes (the module's rule)."""
        self._check(0, 0)
        epoch, covered = self.loss_epoch, self.acked_writes
        await self._run([_Request("flush", pinned=conn) for conn in self._conns])
        if self.loss_epoch != epoch or self.reported_epoch != self.loss_epoch:
            self.reported_epoch = self.loss_epoch
            self.flushed_writes = max(self.flushed_writes, covered)
            self.stats["errors"] += 1
            raise OSError(errno.EIO, f"{self.where}: flush: a connection was lost since the "
                          "last flush: writes acknowledged before it may not have reached "
                          "the remote disk")
        self.flushed_writes = max(self.flushed_writes, covered)

    async def refresh(self) -> None:
        """Reconnect every handle (after the requests before it): the size, and what the
        server offers, are learnt anew (e.g. the file grew)."""
        self._check(0, 0)
        await self._run([_Request("reopen", pinned=conn) for conn in self._conns])

    def _check(self, offset: int, length: int, write: bool = False) -> None:
        if self._state != "open":
            raise OSError(errno.EBADF, f"{self.where}: not open")
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, f"{self.where}: negative offset or length")
        if write and offset + length > self._size:
            raise OSError(errno.ENOSPC, f"{self.where}: [{offset}, {offset + length}) is "
                          f"beyond the end of the export ({self._size} bytes)")

    async def _run(self, reqs: list[_Request]) -> None:
        """Queue *reqs*, wait for all, raise the first one's error."""
        for req in reqs:
            conn = req.pinned or min(self._conns, key=lambda c: c.load)
            conn.queue.append(req)
            conn.kick.set()
            self._outstanding += 1
        for req in reqs:
            await req.done.wait()
        for req in reqs:
            if req.error is not None:
                raise req.error

    def _finish(self, req: _Request, error: OSError | None = None) -> None:
        req.error = error
        req.buffer = None
        self._unslot(req, keep=error is None and req.op == "read")
        if error is not None:
            self.stats["errors"] += 1
        req.done.set()
        self._outstanding -= 1
        if not self._outstanding:
            self._drained.set()
            self._drained = trio.Event() if self._state == "open" else self._drained

    def _unslot(self, req: _Request, *, keep: bool) -> None:
        """Give a request's pooled buffer back (remote.BufferPool says why); a read that
        succeeded first copies its data out of it."""
        if req.slot is not None:
            if keep:
                req.result = bytes(req.slot)
            self._pool.give(req.slot)
            req.slot = None

    def _fail_all(self, conn: _Connection, code: int, why: str) -> int:
        failed = [*conn.queue, *conn.in_flight.values()]
        conn.queue.clear()
        conn.in_flight.clear()
        for req in failed:
            # a command still in flight on a live handle may yet be written into by
            # libnbd: its buffer is abandoned, never handed out again
            req.slot = None
            self._finish(req, OSError(code, f"{self.where}: {req.op} at {req.offset}: {why}"))
        return len(failed)

    # -- the driver of one connection ---------------------------------------------------

    async def _drive(self, conn: _Connection) -> None:
        while True:
            if conn.handle is None:
                if conn.queue:
                    await self._reconnect(conn)  # connected, or its queue failed
                    continue
                if self._state != "open":
                    return
                conn.kick = trio.Event()  # no await since the queue was found empty
                await conn.kick.wait()
                continue
            if self._state != "open" and not conn.queue and not conn.in_flight:
                break
            await self._issue(conn)
            if conn.handle is None:  # it died while issuing
                continue
            conn.kick = trio.Event()  # no await since _issue drained the queue
            in_flight = sum(len(c.in_flight) for c in self._conns)
            self.stats["in_flight"] = in_flight
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], in_flight)
            now = trio.current_time()
            deadline = min((r.deadline for r in conn.in_flight.values()), default=math.inf)
            failure = ""
            try:
                await remote._wait(conn.handle, max(0.0, deadline - now),
                                   lambda: f"{self.where} (connection {conn.index})", conn.kick)
            except RemoteError as e:
                failure = str(e)
            shutting_down = self._collect(conn)
            if not failure and shutting_down:
                failure = shutting_down
            if not failure and (conn.handle.aio_is_dead() or conn.handle.aio_is_closed()):
                failure = "the connection died"
            if failure:
                self._drop(conn, failure)
        await self._disconnect(conn)

    async def _issue(self, conn: _Connection) -> None:
        """Hand the queued requests to libnbd (a reopen waits until the connection is idle)."""
        nbd = remote.libnbd()
        h = conn.handle
        while conn.queue:
            req = conn.queue[0]
            if req.op == "reopen":
                if conn.in_flight:
                    return
                conn.queue.popleft()
                await self._reopen(conn, req)
                if conn.handle is None:
                    return
                h = conn.handle
                continue
            conn.queue.popleft()
            try:
                if req.op == "read":
                    req.slot = self._pool.take(req.length)
                    req.buffer = nbd.Buffer.from_buffer(req.slot)
                    cookie = h.aio_pread(req.buffer, req.offset)
                elif req.op == "write":
                    assert req.data is not None
                    req.slot = self._pool.take(req.length)
                    req.slot[:] = req.data
                    req.buffer = nbd.Buffer.from_buffer(req.slot)
                    cookie = h.aio_pwrite(req.buffer, req.offset, flags=req.flags)
                elif req.op == "zero":
                    cookie = h.aio_zero(req.length, req.offset, flags=req.flags)
                elif req.op == "trim":
                    cookie = h.aio_trim(req.length, req.offset)
                else:
                    cookie = h.aio_flush()
            except nbd.Error as e:
                if h.aio_is_dead() or h.aio_is_closed():
                    conn.queue.appendleft(req)
                    self._drop(conn, remote._nbd_reason(e))
                    return
                self._finish(req, self._server_error(req, e))
                continue
            req.sent = trio.current_time()
            req.deadline = req.sent + self.request_timeout_s
            conn.in_flight[cookie] = req
            self.stats["requests"] += 1

    def _collect(self, conn: _Connection) -> str:
        """Finish the requests whose replies arrived (on a dead handle: those that
        completed before it died; the rest are sent again by :meth:`_drop`).

        A request the server refused with ESHUTDOWN (it is going away: NBD's word
        for "try again elsewhere") stays to be sent again; the connection is then
        to be dropped, which the returned reason says ("" otherwise)."""
        nbd = remote.libnbd()
        h = conn.handle
        dead = h.aio_is_dead() or h.aio_is_closed()
        now = trio.current_time()
        shutting_down = ""
        for cookie, req in list(conn.in_flight.items()):
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                if dead:
                    continue
                if getattr(e, "errnum", None) == errno.ESHUTDOWN:
                    shutting_down = "the server is shutting down (ESHUTDOWN)"
                    continue  # kept in flight: _drop sends it again
                del conn.in_flight[cookie]
                self._finish(req, self._server_error(req, e))
                continue
            del conn.in_flight[cookie]
            self.stats["last_latency_s"] = now - req.sent
            if req.op == "read":
                self.stats["bytes_read"] += req.length
            elif req.op in ("write", "zero", "trim"):
                self.acked_writes += 1
                if req.op == "write":
                    self.stats["bytes_written"] += req.length
            self._finish(req)
        return shutting_down

    def _server_error(self, req: _Request, e: Exception) -> OSError:
        code = getattr(e, "errnum", None) or errno.EIO
        return OSError(code, f"{self.where}: {req.op} of {req.length} bytes at {req.offset} "
                       f"failed: {remote._nbd_reason(e)}")

    def _drop(self, conn: _Connection, why: str) -> None:
        """Forget a broken handle; its requests in flight go back to the queue (sent
        again after the reconnect), except those past their deadline (EIO)."""
        if self.acked_writes > self.flushed_writes:
            # acknowledged, unflushed writes are gone only if the remote host restarted
            # (or cannot say): judged when the connection is back (_judge)
            self._suspect.add(conn.boot_id)
        remote.close_handle(conn.handle)
        conn.handle = None
        now = trio.current_time()
        again = []
        for req in conn.in_flight.values():
            if req.deadline <= now:
                self._finish(req, OSError(errno.EIO, f"{self.where}: {req.op} at {req.offset}:"
                                          f" no answer for {self.request_timeout_s:g} s"))
            else:
                req.buffer = None
                self._unslot(req, keep=False)  # taken again when it is sent again
                again.append(req)
        conn.in_flight.clear()
        conn.queue.extendleft(reversed(again))
        self.stats["resent"] += len(again)
        if self._state == "open":
            log.warning("%s: NBD connection %d lost (%s); reconnecting, %d requests to resend",
                        self.where, conn.index, why, len(again))

    async def _ask_endpoint(self) -> remote.Endpoint:
        try:
            endpoint = await self.endpoint_of()
        except (RemoteError, OSError) as e:
            raise RemoteError(f"{self.where}: no endpoint: {e}") from None
        self._endpoint_gen += 1
        return endpoint

    async def _current_endpoint(self, conn: _Connection, fresh: bool) -> tuple[remote.Endpoint,
                                                                              int]:
        """The endpoint to connect to: a new one from ``endpoint_of()`` if *fresh* and no
        other connection has already asked since this one's handle was made."""
        async with self._endpoint_lock:
            if self._endpoint is None or (fresh and conn.endpoint_gen >= self._endpoint_gen):
                self._endpoint = await self._ask_endpoint()
            return self._endpoint, self._endpoint_gen

    async def _reconnect(self, conn: _Connection, fresh: bool = True) -> bool:
        """Connect *conn* again within ``reconnect_timeout_s`` (one try after a give-up);
        else fail its requests with EIO. Whether it connected."""
        window = 0.0 if self._unreachable else self.reconnect_timeout_s
        deadline = trio.current_time() + window
        attempt = 0
        last = ""
        while True:
            try:
                endpoint, gen = await self._current_endpoint(conn, fresh or attempt > 0)
                h = await trio.to_thread.run_sync(endpoint.handle, self.export)
            except RemoteError as e:
                last = str(e)
                conn.endpoint_gen = self._endpoint_gen
            else:
                conn.handle, conn.endpoint_gen, self._unreachable = h, gen, False
                conn.boot_id = endpoint.boot_id
                self._judge(endpoint.boot_id)
                self._learn(h)
                self.stats["reconnects"] += 1
                log.info("%s: NBD connection %d reconnected to %s", self.where, conn.index,
                         endpoint)
                return True
            attempt += 1
            left = deadline - trio.current_time()
            if left <= 0 or self._state != "open":
                break
            await trio.sleep(min(_BACKOFF_S[0] * 2 ** attempt, _BACKOFF_S[1], left))
        self._unreachable = True
        self._judge(None)
        failed = self._fail_all(conn, errno.EIO, f"no NBD connection for {window:g} s ({last})")
        log.error("%s: NBD connection %d not back within %g s, %d requests failed with EIO: "
                  "%s", self.where, conn.index, window, failed, last)
        return False

    def _judge(self, boot_id: str | None) -> None:
        """After dropped connections with acknowledged, unflushed writes: the remote
        host answered again with *boot_id* (None: it did not answer). Unchanged and
        known: its kernel did not restart, so those writes are in its page cache
        (nbdkit's ``file`` plugin writes before it answers) and the next flush
        makes them durable; a writeback error there is the flush's own to report.
        Anything else: they may be lost, so the next flush fails once."""
        if not self._suspect:
            return
        if boot_id and self._suspect == {boot_id}:
            log.info("%s: the remote host did not restart (same boot id): nothing "
                     "acknowledged was lost with the connection", self.where)
        else:
            self.loss_epoch += 1
            log.warning("%s: the remote host %s: acknowledged writes since the last flush "
                        "may be lost; the next flush fails with EIO", self.where,
                        "did not answer" if boot_id is None else "restarted (or cannot "
                        "tell: no boot id)")
        self._suspect.clear()

    async def _reopen(self, conn: _Connection, req: _Request) -> None:
        remote.close_handle(conn.handle)
        conn.handle = None
        if await self._reconnect(conn, fresh=False):
            self._finish(req)
        # else _reconnect failed it with the rest of the queue

    def _learn(self, h: Any) -> None:
        """What a (re)connected handle says about the export."""
        nbd = remote.libnbd()
        self._size = h.get_size()
        maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
        largest = min(MAX_REQUEST, maximum) if maximum > 0 else MAX_REQUEST
        self._max_request = 1 << (largest.bit_length() - 1)  # pieces are powers of two
        self._can_fua, self._can_zero, self._can_trim = (
            h.can_fua(), h.can_zero(), h.can_trim())

    async def _disconnect(self, conn: _Connection) -> None:
        """An orderly NBD disconnect, bounded; the handle is closed either way."""
        nbd = remote.libnbd()
        h = conn.handle
        with contextlib.suppress(nbd.Error):
            h.aio_disconnect()
        with trio.move_on_after(5.0), contextlib.suppress(RemoteError):
            while not (h.aio_is_closed() or h.aio_is_dead()):
                await remote._wait(h, 5.0, lambda: self.where)
        remote.close_handle(h)
        conn.handle = None


def _split(offset: int, length: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(step, offset + length - start))
            for start in range(offset, offset + length, step)]
