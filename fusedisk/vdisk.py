"""The data path of a regular file: between FUSE handles and the backing fd.

A :class:`VFile` exists while a file is open (or briefly, for a truncate).
Every FUSE handle of the file reaches the backing descriptor through it, so
a relocation re-points all of them at once by swapping ``VFile.fd``.

Hot path: ``read``/``write`` are plain ``def`` on purpose: they run on the
trio thread without a checkpoint (see backing.py for why), and that is what
makes them atomic with respect to every other task.
"""

from __future__ import annotations

import errno

from . import backing


class VFile:
    """One open regular file. ``fd`` may be swapped only by a relocation's switchover."""

    __slots__ = ("fd", "opens", "writable")

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.writable = writable
        #: FUSE handles (plus internal users) that hold this VFile open.
        self.opens = 0

    def read(self, offset: int, length: int) -> bytes:
        return backing.pread(self.fd, length, offset)

    def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise OSError(errno.EROFS, "backing file is read-only")
        return backing.pwrite_all(self.fd, data, offset)

    def truncate(self, length: int) -> None:
        if not self.writable:
            raise OSError(errno.EROFS, "backing file is read-only")
        backing.ftruncate(self.fd, length)

    async def fsync(self, datasync: bool) -> None:
        await backing.run_blocking(backing.fsync, self.fd, datasync)

    def close(self) -> None:
        backing.close(self.fd)
        self.fd = -1
