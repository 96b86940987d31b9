"""The data path of a regular file: between its users and the backing fd.

A :class:`VFile` exists while a file is open, by FUSE handles or by an
internal user (a CBT query, later a relocation). :class:`OpenFiles` keeps
exactly one per backing file, so every user of a file shares one
descriptor and one change tracker, and a relocation re-points all of them
at once by swapping ``VFile.fd``.

Hot path: ``read`` is a plain ``def`` and ``write`` checkpoints only when
the activity log must grow (see cbt.py); both run their syscalls on the
trio thread (see backing.py for why), which is what makes "write, then
mark" atomic with respect to every other task.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from . import backing
from .bitmap import Bitmap
from .cbt import REGION_SHIFT, CbtStore, Tracker
from .failpoint import stall
from .gate import Gate
from .sizes import block_span

log = logging.getLogger(__name__)

#: The fallocate modes passed on; the others get EOPNOTSUPP (FUSE's kernel
#: side refuses every mode beyond these bits before asking).
FALLOCATE_MODES = frozenset({
    0,
    backing.FALLOC_FL_KEEP_SIZE,
    backing.FALLOC_FL_PUNCH_HOLE | backing.FALLOC_FL_KEEP_SIZE,
    backing.FALLOC_FL_ZERO_RANGE,
    backing.FALLOC_FL_ZERO_RANGE | backing.FALLOC_FL_KEEP_SIZE,
})
#: A punch or zero range up to this many activity-log regions goes through
#: the log like a write; a wider one is marked durably first (one save).
_LOGGED_REGIONS = 4
#: The most one copy_file_range request copies (it runs on the trio thread).
COPY_PIECE = 8 << 20
#: Write-behind: once this many bytes were written to a file since its last
#: write-behind or fsync, writeback of its dirty pages is started on a shim
#: thread (backing.start_writeback), so a guest's fsync finds little left to
#: write. 0: off.
WRITE_BEHIND_BYTES = 256 << 10

class Resolver(Protocol):
    """Where a relocation's switchover moved the objects of an entry."""

    def __call__(self, key: tuple[int, int]) -> tuple[int, os.stat_result] | None:
        """A fresh O_PATH handle and the stat of the new self of source object
        *key*; None if it has none (unlinked, open only: it stays)."""

    def new_key(self, key: tuple[int, int]) -> tuple[int, int] | None:
        """The backing key of the new self of source object *key* (no I/O)."""

    def identity(self, key: tuple[int, int], memo: dict[tuple[int, int], bool] | None = None
                 ) -> tuple[tuple[int, int], bytes, int | None] | None:
        """(backing key, file handle, kept ctime) of the new self of *key*, as the
        relocation recorded them (no I/O); None when it has none recorded. *memo*:
        the caller's cache of which directories are in the tree."""

    def old_key(self, key: tuple[int, int]) -> tuple[int, int] | None:
        """The source object whose new self is the backing object *key* (no I/O)."""

    def lazy(self) -> bool:
        """Whether objects not in use may be re-pointed after the pause (every
        staged object has a recorded handle)."""

    def close_later(self, fd: int) -> None:
        """Take over *fd*, a source object's old descriptor that nothing uses any
        more, and close it once the switchover's pause is over."""

    def after_pause(self, job: Callable[[], Awaitable[None]]) -> None:
        """Have the switchover await *job* once its gate is open again."""


class Guard(Protocol):
    """Copy-before-write for a snapshot of a file whose store cannot clone
    (snapshots.py): the file's old bytes are saved before a change overwrites them.

    A change of ``[offset, offset + length)`` first awaits :meth:`arm` until
    :meth:`ready` holds, then calls :meth:`preserve` with no checkpoint
    between it and the change; :meth:`sync` runs before the file's own fsync,
    so a saved block is durable before the overwrite is acknowledged as
    durable.
    """

    def ready(self, offset: int, length: int) -> bool:
        """True if :meth:`preserve` of this range may run now (no I/O)."""

    async def arm(self) -> None:
        """Make :meth:`ready` true (one durable save), for every range."""

    def preserve(self, fd: int, offset: int, length: int) -> None:
        """Save the blocks of the range not saved yet, read from *fd*. Sync; never raises
        (a failure loses the snapshot, never the guest's change)."""

    async def sync(self) -> None:
        """Make every saved block durable. Never raises (as :meth:`preserve`)."""

    def rekey(self, key: tuple[int, int]) -> None:
        """A relocation moved the file: its backing key is now *key* (no I/O)."""

    async def save_all(self, fd: int) -> None:
        """The file's last name is going: save every block not saved yet (read from
        *fd*) and make them durable; then (or when that failed and lost the
        snapshot) the guard leaves the file's guards."""


#: the guards of a file that has none
_NO_GUARDS: list[Guard] = []


async def _guard(vfile: VFile, offset: int, length: int) -> None:
    """Wait until every guard of *vfile* may preserve the range (see :class:`Guard`)."""
    for guard in list(vfile.guards):
        if not guard.ready(offset, length):
            await guard.arm()


def _all_ready(guards: list[Guard], offset: int, length: int) -> bool:
    return all(guard.ready(offset, length) for guard in guards)


def _preserve(vfile: VFile, offset: int, length: int) -> None:
    for guard in list(vfile.guards):  # a guard that loses its snapshot leaves the list
        guard.preserve(vfile.fd, offset, length)


class Activity:
    """Counts guest reads and writes, so background work can yield to them."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests = 0


class VFile:
    """One open regular file. ``fd`` may be swapped only by a relocation's switchover.

    During a relocation the copy engine attaches ``consumers`` (dirty bitmaps
    it clears before it copies a block: the CBT ordering rule) and, once it
    mirrors, ``mirror_fd``: every write then lands on both stores before it
    is acknowledged. A failed mirror write does not fail the guest's write
    (the source is the truth until the commit): it stops the mirroring and
    is reported in ``mirror_error`` for the engine to fail the relocation.
    """

    __slots__ = (
        "activity", "block_shift", "closing", "consumers", "copying", "fd", "gate", "gen",
        "gone", "guards", "key",
        "mirror_error", "mirror_fd", "opens", "stale", "touched", "tracker", "unsynced",
        "writable",
    )
    #: see :data:`WRITE_BEHIND_BYTES` (the daemon may turn it off for a measurement)
    write_behind_bytes = WRITE_BEHIND_BYTES

    def __init__(
        self,
        fd: int,
        key: tuple[int, int],
        writable: bool,
        tracker: Tracker | None,
        gate: Gate,
        block_size: int,
        activity: Activity,
    ) -> None:
        self.fd = fd
        self.activity = activity
        self.key = key
        self.writable = writable
        #: changed block tracking; None for a read-only file or with CBT off
        self.tracker = tracker
        #: the gate of the entry the file belongs to
        self.gate = gate
        self.block_shift = block_size.bit_length() - 1
        self.consumers: list[Bitmap] = []
        self.mirror_fd: int | None = None
        self.mirror_error: OSError | None = None
        #: the byte range ``[start, end)`` of a copy step on the copier's worker
        #: thread: a change mirrored into it is marked too (mirror.py, step 4)
        self.copying: tuple[int, int] | None = None
        #: users holding this VFile open, and releases still saving (OpenFiles counts them)
        self.opens = 0
        self.closing = 0
        #: the number of the last switchover that re-keyed it (OpenFiles.repoint)
        self.gen = 0
        #: a write or truncate changed the file (its size and times) since a
        #: relocation's staging last copied its attributes (staging.py)
        self.touched = False
        #: ``fd`` is the old backing file of a relocation that committed: no
        #: user had the file open at the re-point, the next open reopens it; or
        #: ``fd`` is -1: the last user released it (its history may still be saving)
        self.stale = False
        #: the file had no link left when its last user released it
        self.gone = False
        #: copy-before-write of the snapshots of the file (shared with OpenFiles.guards)
        self.guards: list[Guard] = _NO_GUARDS
        #: bytes written since the last write-behind or fsync (trio thread only)
        self.unsynced = 0

    def read(self, offset: int, length: int) -> bytes:
        self.activity.requests += 1
        return backing.pread(self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise OSError(errno.EROFS, "backing file is read-only")
        self.activity.requests += 1
        tracker = self.tracker
        while True:
            if tracker is not None and not tracker.logged(offset, len(data)):
                try:
                    await tracker.log(offset, len(data))
                except OSError as e:  # the state directory refused: see cbt.py
                    await tracker.withdraw(self.fd, e)
            elif self.guards and not _all_ready(self.guards, offset, len(data)):
                await _guard(self, offset, len(data))
            else:
                break
        # No await from here on: the region stays logged, the marks follow the
        # write they describe (the CBT ordering rule), a copy of the same
        # blocks (also checkpoint-free) is wholly before or after this write,
        # and a snapshot's old bytes are saved before they are overwritten.
        if self.guards:
            _preserve(self, offset, len(data))
        written = backing.pwrite_all(self.fd, data, offset)
        self.touched = True
        if tracker is not None:
            tracker.mark_bytes(offset, written)
        if self.mirror_fd is not None:
            self._mirror(offset, data[:written])
        elif self.consumers:
            self._mark_consumers(offset, written)
        self.unsynced += written
        if self.unsynced >= self.write_behind_bytes > 0:
            self.unsynced = 0
            backing.start_writeback(self.fd)
        return written

    def _mark_consumers(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, nblocks = block_span(offset, length, self.block_shift)
        for bits in self.consumers:
            bits.mark(first, nblocks)

    def _mirror(self, offset: int, data: bytes) -> None:
        assert self.mirror_fd is not None
        try:
            if backing.pwrite_all(self.mirror_fd, data, offset) != len(data):
                raise OSError(errno.EIO, "short write on the destination")
        except OSError as e:
            self.mirror_error = e
            self.mirror_fd = None
            self._mark_consumers(offset, len(data))
            return
        self._mirrored(offset, len(data))

    def _mirrored(self, offset: int, length: int) -> None:
        """A change landed on the mirror too: if it overlaps the run a copy step
        has in flight, mark it as well, for the step's write of what it read
        before may land over it (mirror.py, step 4)."""
        run = self.copying
        if run is not None and offset < run[1] and offset + length > run[0]:
            self._mark_consumers(offset, length)

    async def truncate(self, length: int) -> None:
        """Set the file's size. The changed span is marked durably before the
        backing change (a crash just after it finds it marked) and marked again
        after it (the ordering rule); a failed ``ftruncate`` (EFBIG) raises and
        leaves only marks of a change that did not happen: a superset."""
        if not self.writable:
            raise OSError(errno.EROFS, "backing file is read-only")
        tracker = self.tracker
        old = self.size()
        # The saves checkpoint, and a write meanwhile may move the end of the
        # file: mark again until the marks cover the span as it is now (and the
        # snapshots' guards are ready for the bytes a shrink cuts off).
        low = high = old
        while True:
            if tracker is not None and (min(old, length) < low or max(old, length) > high):
                low, high = min(low, old, length), max(high, old, length)
                try:
                    await tracker.mark_bytes_durably(low, high - low)
                except OSError as e:  # the state directory refused: see cbt.py
                    await tracker.withdraw(self.fd, e)
                    tracker.mark_bytes(low, high - low)
            elif self.guards and old > length and not _all_ready(self.guards, length,
                                                                 old - length):
                await _guard(self, length, old - length)
            else:
                break
            old = self.size()
        if old == length:
            return
        start, span = min(old, length), abs(old - length)
        # no await from here on (as in write)
        if self.guards and old > length:
            _preserve(self, length, old - length)
        backing.ftruncate(self.fd, length)
        self.touched = True
        if tracker is not None:
            tracker.mark_bytes(start, span)
        if self.mirror_fd is not None:
            try:
                backing.ftruncate(self.mirror_fd, length)
            except OSError as e:
                self.mirror_error, self.mirror_fd = e, None
                self._mark_consumers(start, span)
            else:
                self._mirrored(start, span)
        else:
            self._mark_consumers(start, span)

    async def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` on the backing file, with the modes of :data:`FALLOCATE_MODES`.

        A punched or zeroed range reads as zeros afterwards: it is marked as
        changed like a write (activity log first, marks after the change), and
        a range wider than a few log regions is marked durably first, as a
        truncate is (any length costs the same). An allocation changes no
        bytes; only the span by which it grows the file is marked. During a
        relocation the change goes to the destination too when writes are
        mirrored, else the copier's bitmaps are marked and the next pass copies
        the range as it now is (holes as holes, see mirror.py).
        """
        if not self.writable:
            raise OSError(errno.EROFS, "backing file is read-only")
        if mode not in FALLOCATE_MODES:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported")
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "invalid fallocate range")
        self.activity.requests += 1
        old = self.size()
        new_size = old if mode & backing.FALLOC_FL_KEEP_SIZE else max(old, offset + length)
        if mode & (backing.FALLOC_FL_PUNCH_HOLE | backing.FALLOC_FL_ZERO_RANGE):
            low, high = offset, min(offset + length, new_size)
        else:
            low, high = old, new_size
        if new_size > old:
            low = min(low, old)
        tracker = self.tracker
        logged = tracker is not None and high > low and (
            (high - 1 >> REGION_SHIFT) - (low >> REGION_SHIFT) < _LOGGED_REGIONS)
        if tracker is not None and high > low and not logged:
            try:
                await tracker.mark_bytes_durably(low, high - low)
            except OSError as e:
                await tracker.withdraw(self.fd, e)
        # a punch or zero range of bytes a snapshot holds is saved first (as in
        # write); an allocation changes no byte
        changes_bytes = bool(mode & (backing.FALLOC_FL_PUNCH_HOLE | backing.FALLOC_FL_ZERO_RANGE))
        while True:
            if logged and tracker is not None and not tracker.logged(low, high - low):
                try:
                    await tracker.log(low, high - low)
                except OSError as e:  # the state directory refused: see cbt.py
                    await tracker.withdraw(self.fd, e)
            elif changes_bytes and self.guards and not _all_ready(self.guards, offset, length):
                await _guard(self, offset, length)
            else:
                break
        # No await from here on (as in write): the marks follow the change, and
        # a copy step of the same blocks is wholly before or after it.
        if changes_bytes and self.guards:
            _preserve(self, offset, length)
        backing.fallocate(self.fd, mode, offset, length)
        self.touched = True
        if high <= low:
            if self.mirror_fd is not None:  # keep the destination's allocation in step
                self._mirror_fallocate(mode, offset, length, low, high)
            return
        if tracker is not None:
            tracker.mark_bytes(low, high - low)
        if self.mirror_fd is not None:
            self._mirror_fallocate(mode, offset, length, low, high)
        else:
            self._mark_consumers(low, high - low)

    def _mirror_fallocate(self, mode: int, offset: int, length: int, low: int, high: int) -> None:
        assert self.mirror_fd is not None
        try:
            backing.fallocate(self.mirror_fd, mode, offset, length)
        except OSError as e:
            # A destination without the mode (another filesystem) or failing:
            # stop mirroring, and let the copier settle the range.
            self.mirror_error, self.mirror_fd = e, None
            self._mark_consumers(low, high - low)
        else:
            if high > low:
                self._mirrored(low, high - low)

    def seek_data(self, offset: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE`` answered by the backing file."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the daemon")
        self.activity.requests += 1
        return backing.seek(self.fd, offset, whence)

    async def copy_from(self, source: VFile, src_offset: int, offset: int, length: int) -> int:
        """Copy up to *length* bytes of *source* at *src_offset* to *offset*; return
        how many (0 at the source's end). At most :data:`COPY_PIECE` per call:
        the copy runs on the trio thread, and callers of copy_file_range(2)
        loop on short counts. Marked like a write."""
        if not self.writable:
            raise OSError(errno.EROFS, "backing file is read-only")
        if src_offset < 0 or offset < 0:
            raise OSError(errno.EINVAL, "invalid copy range")
        length = min(length, COPY_PIECE)
        if length <= 0:
            return 0
        self.activity.requests += 1
        tracker = self.tracker
        while True:
            if tracker is not None and not tracker.logged(offset, length):
                try:
                    await tracker.log(offset, length)
                except OSError as e:  # the state directory refused: see cbt.py
                    await tracker.withdraw(self.fd, e)
            elif self.guards and not _all_ready(self.guards, offset, length):
                await _guard(self, offset, length)
            else:
                break
        # No await from here on (as in write).
        length = min(length, max(0, source.size() - src_offset))
        if length == 0:
            return 0
        if self.guards:
            _preserve(self, offset, length)
        copied = 0
        if self.mirror_fd is None:
            try:
                copied = backing.copy_range(source.fd, src_offset, self.fd, offset, length)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        data = b""
        if not copied:
            data = backing.pread(source.fd, length, src_offset)
            copied = backing.pwrite_all(self.fd, data, offset) if data else 0
        self.touched = True
        if tracker is not None:
            tracker.mark_bytes(offset, copied)
        if self.mirror_fd is not None:
            self._mirror(offset, data[:copied])
        else:
            self._mark_consumers(offset, copied)
        return copied

    async def fsync(self, datasync: bool) -> None:
        for guard in list(self.guards):  # a snapshot's saved blocks are durable first
            await guard.sync()
        self.unsynced = 0
        await backing.run_blocking(backing.fsync, self.fd, datasync)

    def fsync_detachable(self) -> bool:
        """Whether an fsync of this file is the backing fsync of ``fd`` and nothing
        else (no snapshot's saved blocks to sync first), so a caller may run it
        elsewhere (fs.py: on the shim's threads) while it keeps ``fd`` open."""
        return not self.guards and self.fd >= 0

    def size(self) -> int:
        return backing.fstat(self.fd).st_size


class OpenFiles:
    """The open VFiles, one per backing file, by backing ``(st_dev, st_ino)``.

    A release that drops the last user does not wait for the tracker's clean
    save: it hands the VFile to :meth:`run`, which saves and then closes it
    unless it was opened again meanwhile. Until then the VFile stays in the
    table, so a new open shares it rather than loading a stale history.
    """

    def __init__(self, cbt: CbtStore | None, block_size: int) -> None:
        #: None when changed block tracking is off for the datastore
        self.cbt = cbt
        self.block_size = block_size
        #: guest reads and writes on every file (the copy engine yields to them)
        self.activity = Activity()
        self._files: dict[tuple[int, int], VFile] = {}
        #: the VFiles with users (few; ``_files`` also holds the closed ones whose
        #: history is still saving, thousands while a relocation parks its copies)
        self._open: dict[VFile, None] = {}
        #: the number of the last lazy re-point; a VFile made since has it
        self._gen = 0
        #: the closed files switchovers moved and left to be re-keyed after their
        #: pause (by their next open, a lookup of their new key, their close's
        #: save, or the sweep the switchover awaits): each one's resolver and
        #: number; a closed VFile with a lower ``gen`` is still to be re-keyed
        self._rekey: list[tuple[Resolver, int]] = []
        self._to_close, self._closing = trio.open_memory_channel[VFile](math.inf)
        #: files whose CBT history is to be saved with a relocation's alias
        self._to_keep, self._keeping = trio.open_memory_channel[VFile](math.inf)
        #: called when a file of these keys gets its first user (a relocation's
        #: copier, which closes the files it is not copying: mirror.py)
        self._watchers: dict[tuple[int, int], Callable[[VFile], None]] = {}
        self._idle_watchers: dict[tuple[int, int], Callable[[VFile], None]] = {}
        #: backing key → the copy-before-write guards of its snapshots (snapshots.py);
        #: an open VFile shares the list. A relocation's repoint moves them along.
        self.guards: dict[tuple[int, int], list[Guard]] = {}
        #: told the key of a file whose open gave it a new CBT id, which moved
        #: its backing ctime and kept the one shown (the mount shows the kept one)
        self.on_kept_ctime: Callable[[tuple[int, int]], None] | None = None

    def add_guard(self, key: tuple[int, int], guard: Guard) -> None:
        """Guard the file *key*, open or not, from now on (sync: no write can slip in)."""
        guards = self.guards.setdefault(key, [])
        guards.append(guard)
        vfile = self._get(key)
        if vfile is not None:
            vfile.guards = guards

    def remove_guard(self, key: tuple[int, int], guard: Guard) -> None:
        guards = self.guards.get(key)
        if guards is not None and guard in guards:
            guards.remove(guard)

    async def before_last_link(self, dir_fd: int, name: str) -> None:
        """Before *name* is unlinked or renamed over: when it is the last name of a
        file that snapshots guard, they take the rest of it first (a snapshot must
        not depend on a file that goes). Never raises: the guards lose their
        snapshot if they cannot, and the removal goes ahead."""
        # Until no guard is left for what the name is now: the caller removes it
        # with no checkpoint after our last look (a save guards against nothing
        # when another request renamed a different file to the name meanwhile).
        while self.guards:
            try:
                st = backing.lstat_at(dir_fd, name)
            except OSError:
                return  # the unlink or rename reports it
            guards = self.guards.get((st.st_dev, st.st_ino))
            if not guards or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return
            try:
                path_fd = backing.open_path(dir_fd, name)
                try:
                    fd = backing.reopen(path_fd, os.O_RDONLY)
                finally:
                    backing.close(path_fd)
            except OSError:
                return
            try:
                for guard in list(guards):
                    await guard.save_all(fd)  # then it is gone from the guards
            finally:
                backing.close(fd)

    def fd_of(self, key: tuple[int, int]) -> int | None:
        """The descriptor the data path uses for the file *key*, if it is open."""
        vfile = self._get(key)
        if vfile is None or vfile.stale or vfile.fd < 0:
            return None
        return vfile.fd

    def _get(self, key: tuple[int, int]) -> VFile | None:
        """The VFile of backing key *key*: also a closed one that a switchover
        moved there and has not re-keyed yet (it is re-keyed now)."""
        vfile = self._files.get(key)
        if vfile is None and self._rekey:
            for resolve, gen in self._rekey:
                old = resolve.old_key(key)
                moved = self._files.get(old) if old is not None else None
                if moved is not None and moved.opens == 0 and moved.gen < gen:
                    self._settle(moved)
                    return self._files.get(key)
        return vfile

    def _rekey_now(self, vfile: VFile, resolve: Resolver, gen: int) -> None:
        vfile.gen = gen
        if vfile.opens or self._files.get(vfile.key) is not vfile:
            return  # closed for good meanwhile (or reopened: then it was re-keyed)
        new = resolve.new_key(vfile.key)
        if new is not None:
            self._rekey_closed(vfile, new)

    def _rekey_closed(self, vfile: VFile, new: tuple[int, int]) -> None:
        """File the closed *vfile* (and its guards and tracker) under its new key
        *new*; marked stale, so that its next open opens its new self."""
        del self._files[vfile.key]
        self._move_guards(vfile.key, new)
        vfile.key, vfile.stale = new, True
        self._files[new] = vfile
        if vfile.tracker is not None:
            vfile.tracker.key = new

    def _settle(self, vfile: VFile) -> None:
        """Re-key *vfile* now if switchovers left it to be re-keyed (in their order)."""
        for resolve, gen in self._rekey:
            if vfile.gen < gen:
                self._rekey_now(vfile, resolve, gen)

    async def _rekey_sweep(self, resolve: Resolver, gen: int) -> None:
        """Re-key the closed files the switchover *gen* left, a slice at a time
        (those made since are where their file is now)."""
        closed = list(self._files.values())
        try:
            for done, vfile in enumerate(closed, 1):
                if vfile.opens == 0 and vfile.gen < gen:
                    self._settle(vfile)
                if done % 256 == 0:
                    await trio.lowlevel.checkpoint()
        except BaseException:
            for vfile in list(self._files.values()):  # cancelled: the rest at once
                if vfile.opens == 0 and vfile.gen < gen:
                    self._settle(vfile)
            raise
        finally:
            self._rekey = [e for e in self._rekey if e[1] != gen]

    def _move_guards(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        guards = self.guards.pop(old, None)
        if guards is not None:
            self.guards[new] = guards
            for guard in guards:
                guard.rekey(new)

    def watch(
        self, key: tuple[int, int], on_first_open: Callable[[VFile], None],
        on_one_left: Callable[[VFile], None],
    ) -> None:
        """Call *on_first_open* (sync) whenever the file *key* gets its first
        user, before that user can read or write it (it may raise: the open
        then fails), and *on_one_left* (sync) whenever a release leaves one."""
        self._watchers[key] = on_first_open
        self._idle_watchers[key] = on_one_left

    def unwatch(self, key: tuple[int, int]) -> None:
        self._watchers.pop(key, None)
        self._idle_watchers.pop(key, None)

    def open(self, path_fd: int, key: tuple[int, int], gate: Gate, fresh: bool = False,
             io_fd: int = -1) -> VFile:
        """Open (or share) the file behind an O_PATH handle (*fresh*: just
        created); pair with :meth:`release`. *io_fd*: a read-write descriptor of
        the file that the caller has already (a create's), taken over in every
        case: the data path's if it needs one (no reopen through /proc), else closed."""
        vfile = self._get(key)
        if vfile is not None and vfile.opens == 0 and not self._same_file(vfile, path_fd,
                                                                           gate, fresh):
            vfile = None  # a removed file's, still saving: the new file on its number is another
        if vfile is not None and not vfile.stale and io_fd >= 0:
            backing.close(io_fd)  # shared: the file has its descriptor
            io_fd = -1
        if vfile is not None and vfile.stale:
            fd, vfile.writable = (io_fd, True) if io_fd >= 0 else backing.open_for_io(path_fd)
            old_fd, vfile.fd, vfile.stale, vfile.gone = vfile.fd, fd, False, False
            if old_fd >= 0:
                backing.close(old_fd)
        if vfile is None:
            fd, writable = (io_fd, True) if io_fd >= 0 else backing.open_for_io(path_fd)
            try:
                tracker = (
                    self.cbt.open_tracker(path_fd, key, fresh) if writable and self.cbt else None
                )
            except BaseException:
                backing.close(fd)
                raise
            vfile = self._files[key] = VFile(
                fd, key, writable, tracker, gate, self.block_size, self.activity
            )
            vfile.guards = self.guards.get(key, _NO_GUARDS)
            vfile.gen = self._gen
            if tracker is not None and tracker.moved_ctime and self.on_kept_ctime is not None:
                self.on_kept_ctime(key)
        vfile.opens += 1
        if vfile.opens == 1:
            self._open[vfile] = None
            watcher = self._watchers.get(key)
            if watcher is not None:
                try:
                    watcher(vfile)
                except BaseException:
                    self.release(vfile)
                    raise
        return vfile

    def _same_file(self, vfile: VFile, path_fd: int, gate: Gate, fresh: bool) -> bool:
        """Whether the closed *vfile* (its history may still be saving) is the file
        behind *path_fd*. ext4 and XFS give a new file the inode number of one just
        removed, so the key alone does not say: a file just created, a file of
        another entry, or one whose CBT id differs is another file."""
        if fresh or vfile.gone or vfile.gate is not gate:
            return False
        tracker = vfile.tracker
        return tracker is None or self.cbt is None or self.cbt.file_id(path_fd) == tracker.file_id

    def release(self, vfile: VFile) -> None:
        vfile.opens -= 1
        if vfile.opens == 1:
            one_left = self._idle_watchers.get(vfile.key)
            if one_left is not None:
                one_left(vfile)
        elif vfile.opens == 0:
            del self._open[vfile]
            # A closed file holds no descriptor, even while its history saves
            # (saves queue up behind each other: a `find | xargs cat` would
            # otherwise pile up descriptors); a new open reopens it.
            if vfile.fd >= 0:
                vfile.gone = not vfile.stale and backing.fstat(vfile.fd).st_nlink == 0
                backing.close(vfile.fd)
                vfile.fd, vfile.stale = -1, True
            if not vfile.closing:
                vfile.closing = 1
                self._to_close.send_nowait(vfile)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close released files, and save the histories given to :meth:`keep_history`,
        in the background (a service of the daemon's nursery)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_histories)
            await nursery.start(self._close_released)
            task_status.started()

    async def _close_released(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        async for vfile in self._closing:
            tracker = vfile.tracker
            await stall("close-released")  # a test's slow history save (failpoint.py)
            if self._rekey:  # saved under the key its file has now
                self._settle(vfile)
            try:
                if tracker is not None and vfile.opens == 0:
                    await tracker.close()
                    # opened, written and released again while that save ran?
                    while vfile.opens == 0 and not tracker.clean:
                        await tracker.close()
            except OSError as e:
                # State directory full or read-only: the file's data is safe on
                # its store; its activity log still lists every region written
                # since the last saved bitmap, so the history it reloads is a
                # superset (never smaller), as after a crash.
                log.warning("CBT history %s not saved at close (%s); its next open "
                            "reports the logged regions as changed", tracker and
                            tracker.file_id, e.strerror or e)
            finally:
                vfile.closing = 0
            if vfile.opens == 0:
                if self._files.get(vfile.key) is vfile:  # (not if a new file took its key)
                    del self._files[vfile.key]
                # unlinked while open or while this save ran: now it is gone, and
                # its history with it (a stale fd is the old self of a file that
                # lives on elsewhere)
                if vfile.fd >= 0:
                    backing.close(vfile.fd)
                    vfile.fd = -1
                if tracker is not None and vfile.gone:
                    await self._forget((tracker.file_id, vfile.key))

    def last_link_history(
        self, dir_fd: int, name: str, st: os.stat_result | None = None, path_fd: int = -1,
    ) -> tuple[str, tuple[int, int]] | None:
        """Before *name* is unlinked or renamed over: the CBT history that goes
        with it, when it is the last link of a regular file that nobody has
        open (an open one is forgotten when it is closed). The kernel never
        sends a rename between two links of one file (vfs_rename returns 0
        first), so a target named here really goes. Blocking.

        *st* is the name's ``lstat`` and *path_fd* an O_PATH handle of that
        object, when the caller has them (spared a lookup each).
        """
        if self.cbt is None:
            return None
        if st is None:
            try:
                st = backing.lstat_at(dir_fd, name)
            except OSError:
                return None  # the unlink or rename reports it
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return None
        vfile = self._get(key)
        if vfile is not None and vfile.opens:
            return None  # forgotten when closed (closed but still saving: after that save)
        if path_fd >= 0:
            file_id = self.cbt.file_id(path_fd)
        else:
            path_fd = backing.open_path(dir_fd, name)
            try:
                file_id = self.cbt.file_id(path_fd)
            finally:
                backing.close(path_fd)
        return None if file_id is None else (file_id, key)

    async def forget_history(self, history: tuple[str, tuple[int, int]]) -> None:
        """Drop the CBT history of a file that is gone (see :meth:`last_link_history`).
        Never raises: the file is already gone, and a history left behind costs
        only space."""
        file_id, key = history
        vfile = self._get(key)
        if (vfile is not None and vfile.opens == 0 and vfile.closing
                and vfile.tracker is not None and vfile.tracker.file_id == file_id):
            vfile.gone = True  # its save is still running: _close_released drops it after
            return
        await self._forget(history)

    async def _forget(self, history: tuple[str, tuple[int, int]]) -> None:
        if self.cbt is None or not self.cbt.has_history(history[0]):
            return  # the usual case: nothing was ever saved for it
        try:
            await backing.run_blocking(self.cbt.forget, *history)
        except OSError as e:
            log.warning("CBT history %s of a removed file is left in the state directory: %s",
                        history[0], e.strerror or e)

    def keep_history(
        self, vfile: VFile, alias: tuple[int, int], alive: Callable[[], bool]
    ) -> None:
        """A relocation made *alias*, the backing file *vfile* has once it commits:
        let the file's CBT history be found under it after a crash too (see
        cbt.py), for as long as ``alive()``.

        Sync. The save (one small record, fsynced) runs on a worker thread from
        :meth:`run`, outside the switchover's pause: the entry's gate counts it
        as inside until it is durable, and a switchover drains the gate before
        it commits. A file found once the gate is closed (inside the pause) has
        the alias saved with its history's next save only. A history without a
        live change id is not saved for it: a new one after a crash refuses nothing.
        """
        tracker = vfile.tracker
        if tracker is None:
            return
        tracker.add_alias(alias, alive)
        if tracker.has_change_ids and not vfile.gate.closed:
            vfile.gate.inside += 1  # until _keep_histories has saved it
            self._to_keep.send_nowait(vfile)

    async def _keep_histories(self) -> None:
        async for vfile in self._keeping:
            tracker = vfile.tracker
            assert tracker is not None
            try:
                await tracker.save()
            except OSError as e:
                log.warning("CBT history %s not saved for its relocation (%s): a crash after "
                            "the switchover starts it anew", tracker.file_id, e.strerror or e)
            finally:
                vfile.gate.leave()

    def repoint(self, resolve: Resolver) -> None:
        """Switch every open file that *resolve* knows to its new backing file.

        Called inside a switchover (entry quiesced), after the commit. No
        checkpoint: every user sees either the old or the new descriptor.
        """
        lazy = resolve.lazy()
        if lazy:  # closed ones: re-keyed when next found, or by the sweep
            self._gen += 1
            gen = self._gen
        for vfile in list(self._open if lazy else self._files.values()):
            if lazy:
                vfile.gen = gen
            if vfile.opens == 0:
                # nobody can read or write it before it is opened again (which
                # reopens it) or closed: no need to open its new self now
                new = resolve.new_key(vfile.key)
                if new is not None:
                    self._rekey_closed(vfile, new)
                continue
            found = resolve(vfile.key)
            if found is None:
                continue  # unlinked but open: it stays where its data is
            path_fd, st = found
            try:
                fd, writable = backing.open_for_io(path_fd)
            finally:
                backing.close(path_fd)
            old_fd, vfile.fd = vfile.fd, fd
            backing.close(old_fd)
            del self._files[vfile.key]
            self._move_guards(vfile.key, (st.st_dev, st.st_ino))
            vfile.key = (st.st_dev, st.st_ino)
            vfile.writable = writable
            self._files[vfile.key] = vfile
            if vfile.tracker is not None:
                vfile.tracker.key = vfile.key
        for key in [k for k in self.guards if k not in self._files or not self._files[k].opens]:
            # guarded files nobody had open: their next open must find the guards
            new = resolve.new_key(key)
            if new is not None:
                self._move_guards(key, new)
        if lazy:
            self._rekey.append((resolve, gen))
            resolve.after_pause(functools.partial(self._rekey_sweep, resolve, gen))

    def close_all(self) -> None:
        """At unmount: save every tracker cleanly and close every descriptor. Blocking."""
        for vfile in self._files.values():
            try:
                if vfile.tracker is not None:
                    vfile.tracker.close_blocking()
            except OSError as e:  # as in _close_released: the log keeps a superset
                log.warning("CBT history %s not saved at unmount (%s); its next open "
                            "reports the logged regions as changed",
                            vfile.tracker and vfile.tracker.file_id, e.strerror or e)
            finally:
                if vfile.fd >= 0:
                    backing.close(vfile.fd)
        self._files.clear()

    def statistics(self) -> dict[str, int]:
        return {"open_files": len(self._files)}
