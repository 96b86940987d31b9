"""Serves the FUSE requests pyfuse3 3.5 has no handlers for, on the trio loop.

The shim (fuseshim.py, fuseshim.c) registers ``fallocate``, ``lseek`` and
``copy_file_range`` handlers on the session pyfuse3 makes. They queue each
request and signal an eventfd; :class:`ExtraOps` waits on that eventfd,
takes the queued requests and runs each in its own task, like a pyfuse3
worker runs a request: a handler that waits (a gate closed by a switchover,
the CBT activity log) holds up nobody else. Each request gets exactly one
reply: the handler's result, the errno of its ``FUSEError``, or EIO when it
failed otherwise (the exception then goes on and ends the mount, as in
pyfuse3: a bug must not hide).

The same queue brings the completions of the FSYNCs the shim's threads
answered themselves (fuseshim.OP_FSYNC_DONE): no reply, only
``fsync_done``, so the daemon lets go of the file's descriptor and gate.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Protocol

import trio
from pyfuse3 import FUSEError

from . import fuseshim


class Handlers(Protocol):
    """What serves the requests (fs.Operations)."""

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None: ...

    async def lseek(self, fh: int, offset: int, whence: int) -> int: ...

    async def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int,
                              length: int, flags: int) -> int: ...

    def fsync_done(self, cookie: int, err: int) -> None: ...


class ExtraOps:
    """A service of the daemon's nursery: answers the shim's queued requests."""

    def __init__(self, handlers: Handlers, event_fd: int) -> None:
        self._handlers = handlers
        self._fd = event_fd
        #: replies sent, by operation name, and of those, errors
        self.served = dict.fromkeys(fuseshim.OP_NAMES.values(), 0)
        self.errors = 0
        #: completions of FSYNCs the shim's threads answered (fs.Operations.fsync)
        self.fsyncs_done = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                try:
                    os.read(self._fd, 8)  # resets the counter
                except BlockingIOError:
                    pass
                # Take after the reset: a request queued after the take signals again.
                for request in fuseshim.take_requests():
                    if request.op == fuseshim.OP_FSYNC_DONE:  # already answered
                        self.fsyncs_done += 1
                        self._handlers.fsync_done(request.fh, request.mode)
                    else:
                        nursery.start_soon(self._serve, request)

    async def _serve(self, request: fuseshim.Request) -> None:
        op = request.op
        try:
            if op == fuseshim.OP_FALLOCATE:
                await self._handlers.fallocate(request.fh, request.mode, request.offset,
                                               request.length)
                fuseshim.reply_err(request, 0)
            elif op == fuseshim.OP_LSEEK:
                offset = await self._handlers.lseek(request.fh, request.offset, request.mode)
                fuseshim.reply_lseek(request, offset)
            elif op == fuseshim.OP_COPY_FILE_RANGE:
                copied = await self._handlers.copy_file_range(
                    request.fh, request.offset, request.fh_out, request.offset_out,
                    request.length, request.flags)
                fuseshim.reply_write(request, copied)
            else:
                raise FUSEError(errno.ENOSYS)
        except FUSEError as e:
            self.errors += 1
            fuseshim.reply_err(request, e.errno)
        except BaseException:
            fuseshim.reply_err(request, errno.EIO)
            raise
        finally:
            name = fuseshim.OP_NAMES.get(op)
            if name is not None:
                self.served[name] += 1

    def statistics(self) -> dict[str, Any]:
        return {"served": dict(self.served), "errors": self.errors,
                "fsyncs_done": self.fsyncs_done}
