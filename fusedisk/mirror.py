"""The copy engine: pre-copy passes over dirty bitmaps, rate limit, mirroring.

A :class:`Copier` copies the regular files of one entry into a *pool* on
the destination store: one pool file per source file (by backing inode, so
hard links stay one file), named ``<dev>-<ino>``. Names, directories and
attributes are not copied here: staging.py moves each pool file to its place
in the staged tree (the copy goes on through the open descriptor) and keeps
the tree in step.

Each :class:`FileCopy` attaches a *consumer* bitmap to the file's shared
:class:`~fusedisk.vdisk.VFile`: every guest write marks it after landing.
Pass 1 marks every allocated block (holes stay holes); a pass copies what
is marked. The CBT ordering rule holds: a pass clears a run's bits *before*
it reads the run. And since a run's clear, read and write happen without a
checkpoint, as a guest write does, the two never interleave: the trio
thread is the range lock.

**Resuming** (progress.py): a copier given a *plan* keeps the pool file a
previous run left for a planned file, when it is still that file's (same
destination inode, same CBT history holding the plan's relocation mark), and
marks dirty only what the plan left pending plus what changed since (the
mark); everything else of the pool file is kept (``resumed_bytes``).

When mirroring is on, ``VFile.mirror_fd`` points at the pool file: guest
writes land on both stores and no longer mark the consumer, so the dirty set
only shrinks and the next pass converges.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator

import trio

from . import backing
from .bitmap import Bitmap
from .failpoint import armed_name, failpoint, stall
from .gate import Gate
from .progress import KEEP_MIN_BYTES, FileProgress
from .vdisk import OpenFiles, VFile

log = logging.getLogger(__name__)

#: Largest read/write of one copy step. Each step runs on the trio thread
#: without a checkpoint, so this bounds how long a guest request can wait.
CHUNK_SIZE = 1 << 20
#: The step size while guests are doing I/O: shorter waits for them.
BUSY_CHUNK_SIZE = 256 << 10
#: Share of the trio thread the copy takes while guests are doing I/O: after
#: a step that took t seconds it sleeps t * (1 - share) / share. Measured:
#: without it a QD1 guest kept ~23 % of its IOPS during an unlimited copy.
BUSY_COPY_SHARE = 0.4
#: Unflushed bytes a pool file may gather before the copier fdatasyncs it,
#: which keeps the flush inside the switchover's pause short.
FLUSH_BYTES = 64 << 20
_ZEROS = bytes(CHUNK_SIZE)
_PAGE = 4096


class FileCopy:
    """One source regular file and its pool file on the destination."""

    __slots__ = (
        "__weakref__", "copied", "dirty", "dst_fd", "key", "pool_name", "restamp", "unflushed",
        "vfile",
    )

    def __init__(self, vfile: VFile, dst_fd: int, pool_name: str) -> None:
        self.vfile = vfile
        self.key = vfile.key
        self.dst_fd = dst_fd
        self.pool_name = pool_name
        #: blocks to copy (the consumer bitmap attached to the VFile)
        self.dirty = Bitmap()
        #: blocks the pool file holds data for (so a block that became zeros
        #: on the source is punched on the destination, not skipped)
        self.copied = Bitmap()
        self.unflushed = 0
        #: the copy changed the pool file since its times were last set (staging.py)
        self.restamp = False

    def alive_test(self) -> Callable[[], bool]:
        """A test, holding no reference to this copy, of whether it is still in
        progress: its dirty bitmap is one of the file's consumers until detached."""
        ref = weakref.ref(self)

        def attached() -> bool:
            copy = ref()
            return copy is not None and any(b is copy.dirty for b in copy.vfile.consumers)

        return attached


def walk(
    dir_fd: int, parts: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], int, os.stat_result]]:
    """Every object below the directory *dir_fd* as ``(path parts, O_PATH fd, stat)``.

    The fd is valid only until the next item; nothing is followed, objects
    that vanish while the walk runs are skipped.
    """
    for name in sorted(backing.list_dir(dir_fd)):
        try:
            fd = backing.open_path(dir_fd, name)
        except FileNotFoundError:
            continue
        try:
            st = backing.fstat(fd)
            yield (*parts, name), fd, st
            if stat.S_ISDIR(st.st_mode):
                yield from walk(fd, (*parts, name))
        finally:
            backing.close(fd)


class Copier:
    """Copies the files of one entry into a pool directory; see the module doc."""

    def __init__(self, files: OpenFiles, gate: Gate, pool_fd: int, block_size: int) -> None:
        self.files = files
        self.gate = gate
        self.pool_fd = pool_fd
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self.copies: dict[tuple[int, int], FileCopy] = {}
        self.mirroring = False
        self.rate_limit = 0  #: bytes/s, 0 = unlimited; may change at any time
        self.bytes_copied = 0
        self._rate = 0.0
        self._rate_window: list[tuple[float, int]] = []
        self._bucket_time = time.monotonic()
        self._bucket = 0.0
        self._unpaused = trio.Event()
        self._unpaused.set()
        #: the generation of the relocation mark (cbt.py) files start when added
        self.gen = 1
        #: resuming: what a previous run left, by source key, and its generation
        self.plan: dict[tuple[int, int], FileProgress] = {}
        self.plan_gen = 0
        #: bytes of pool files a previous run copied that this one kept
        self.resumed_bytes = 0
        #: called between copy steps once ``progress_due`` (monotonic) has passed
        self.progress_hook: Callable[[], Awaitable[None]] | None = None
        self.progress_due = math.inf
        #: ... or once ``bytes_copied`` has reached this
        self.progress_due_bytes = math.inf
        #: a test's crash once this many bytes were copied (failpoint ``copied-N``)
        self.kill_at: int | None = None

    # -- control ------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def pause(self) -> None:
        if not self.paused:
            self._unpaused = trio.Event()

    def resume(self) -> None:
        self._unpaused.set()

    async def wait_resumed(self) -> None:
        await self._unpaused.wait()

    # -- files ----------------------------------------------------------------------

    def add(self, path_fd: int, key: tuple[int, int]) -> FileCopy:
        """Start copying the regular file behind *path_fd* (backing *key*) into a
        new pool file, or into the one a previous run left (see the module doc);
        every allocated block that the pool file may not hold is dirty. Blocking, small."""
        vfile = self.files.open(path_fd, key, self.gate)
        pool_name = f"{key[0]}-{key[1]}"
        try:
            dst_fd, plan = self._open_pool(vfile, pool_name, self.plan.pop(key, None))
        except BaseException:
            self.files.release(vfile)
            raise
        copy = FileCopy(vfile, dst_fd, pool_name)
        # Attach first, then scan: a write in between is marked by the consumer.
        # No checkpoint from here to the relocation mark's start either.
        vfile.consumers.append(copy.dirty)
        tracker = vfile.tracker
        allocated = Bitmap()
        for offset, length in backing.data_extents(vfile.fd):
            first = offset >> self._shift
            allocated.mark(first, ((offset + length - 1) >> self._shift) - first + 1)
        if plan is not None and tracker is not None:
            self._resume_file(copy, plan, tracker.relocation_marks[self.plan_gen], allocated)
        else:
            if tracker is not None:
                tracker.drop_relocation_marks()  # an ended relocation's, if any
            copy.dirty.update(allocated)
            backing.ftruncate(dst_fd, vfile.size())
        if tracker is not None:
            tracker.start_relocation_mark(self.gen)
        if self.mirroring:
            vfile.mirror_fd = dst_fd
        self.copies[key] = copy
        # The commit makes the pool file the file: its CBT history must be found
        # under the pool file's key after a crash (saved before the commit).
        pool = backing.fstat(dst_fd)
        self.files.keep_history(vfile, (pool.st_dev, pool.st_ino), copy.alive_test())
        return copy

    def _open_pool(
        self, vfile: VFile, pool_name: str, plan: FileProgress | None
    ) -> tuple[int, FileProgress | None]:
        """The pool file's descriptor, and *plan* if the file a previous run left
        is still this file's copy (None: a new, empty pool file)."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if plan is not None:
            tracker = vfile.tracker
            usable = (tracker is not None and tracker.withdrawn is None
                      and tracker.file_id == plan.file_id
                      and self.plan_gen in tracker.relocation_marks)
            try:
                fd = os.open(pool_name, flags | os.O_NOFOLLOW, dir_fd=self.pool_fd)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                st = backing.fstat(fd)
                if usable and stat.S_ISREG(st.st_mode) and st.st_ino == plan.dst_ino:
                    return fd, plan
                backing.close(fd)
            log.info("pool file %s is not kept (its source or destination changed): "
                     "copied afresh", pool_name)
            try:
                os.unlink(pool_name, dir_fd=self.pool_fd)
            except FileNotFoundError:
                pass
        return os.open(pool_name, flags | os.O_CREAT | os.O_EXCL, 0o600,
                       dir_fd=self.pool_fd), None

    def _resume_file(
        self, copy: FileCopy, plan: FileProgress, changed: Bitmap, allocated: Bitmap
    ) -> None:
        """Dirty: what the plan left pending, what changed since, and whatever lies
        past the pool file's end; kept: the rest of what the source holds."""
        copy.dirty.update(plan.pending)
        copy.dirty.update(changed)
        pool_size = backing.fstat(copy.dst_fd).st_size
        src_size = copy.vfile.size()
        first = pool_size >> self._shift
        end = (src_size + self.block_size - 1) >> self._shift
        if end > first:
            copy.dirty.mark(first, end - first)
        for offset, length in backing.data_extents(copy.dst_fd):
            start = offset >> self._shift
            copy.copied.mark(start, ((offset + length - 1) >> self._shift) - start + 1)
        if pool_size > src_size:
            self._cut_pool(copy, src_size)
        else:
            backing.ftruncate(copy.dst_fd, src_size)
        kept = allocated.copy()
        for blockno, nblocks in copy.dirty.extents():
            kept.clear(blockno, nblocks)
        self.resumed_bytes += kept.count << self._shift

    def progress_snapshot(self, gen: int) -> list[tuple[FileCopy, Bitmap]]:
        """Start generation *gen* of every file's relocation mark and return, of
        the files worth keeping, what is pending now (progress.py, step 1)."""
        # no checkpoint here: the pending bitmaps and the generation are one instant
        self.gen = gen
        out = []
        for copy in self.copies.values():
            tracker = copy.vfile.tracker
            if tracker is None:
                continue
            tracker.start_relocation_mark(gen)
            if (tracker.withdrawn is None
                    and backing.fstat(copy.vfile.fd).st_blocks * 512 >= KEEP_MIN_BYTES):
                out.append((copy, copy.dirty.copy()))
        return out

    def drop(self, key: tuple[int, int]) -> None:
        """Stop copying a file whose source is gone (no link left)."""
        copy = self.copies.pop(key, None)
        if copy is not None:
            self._release(copy)

    def _release(self, copy: FileCopy, later: list[int] | None = None) -> None:
        vfile = copy.vfile
        vfile.mirror_fd = None
        vfile.mirror_error = None
        for i, bits in enumerate(vfile.consumers):
            if bits is copy.dirty:
                del vfile.consumers[i]
                break
        if later is None:
            backing.close(copy.dst_fd)
        else:
            later.append(copy.dst_fd)
        self.files.release(vfile)

    def fit(self, copy: FileCopy) -> None:
        """Give the pool file its source's size now (a shorter source cuts it)."""
        size = copy.vfile.size()
        if backing.fstat(copy.dst_fd).st_size > size:
            self._cut_pool(copy, size)
        else:
            backing.ftruncate(copy.dst_fd, size)

    def start_mirroring(self) -> None:
        """From now on every guest write lands on both stores before it is acknowledged."""
        self.mirroring = True
        for copy in self.copies.values():
            copy.vfile.mirror_fd = copy.dst_fd

    def mirror_error(self) -> OSError | None:
        for copy in self.copies.values():
            if copy.vfile.mirror_error is not None:
                return copy.vfile.mirror_error
        return None

    def detach(self) -> list[int]:
        """Stop mirroring and consuming, release the sources; return the pool
        files' descriptors, for the caller to close (outside a pause)."""
        later: list[int] = []
        for copy in self.copies.values():
            self._release(copy, later)
        self.copies.clear()
        self.mirroring = False
        return later

    # -- copying --------------------------------------------------------------------

    def dirty_bytes(self) -> int:
        return sum(c.dirty.count for c in self.copies.values()) << self._shift

    async def copy_pass(self, *, throttle: bool = True) -> None:
        """Copy every block that is dirty when the pass reaches it, smallest files first.

        Files with nothing dirty cost nothing (the pause's pass sees only what
        changed); a block dirtied in a file the pass already left waits for
        the next pass.
        """
        dirty = [c for c in self.copies.values() if c.dirty.count]
        for copy in sorted(dirty, key=lambda c: c.vfile.size()):
            if copy.key in self.copies:  # not detached meanwhile
                await self._copy_file(copy, throttle)

    async def _copy_file(self, copy: FileCopy, throttle: bool) -> None:
        activity = self.files.activity
        seen = activity.requests
        blockno = copy.dirty.next_dirty(0)
        while blockno is not None:
            if throttle:
                await self._unpaused.wait()
            skipped = self._skip_hole(copy, blockno)
            if skipped:
                await trio.lowlevel.checkpoint()
                blockno = copy.dirty.next_dirty(blockno + skipped)
                continue
            busy = throttle and activity.requests != seen
            seen = activity.requests
            max_blocks = max(1, (BUSY_CHUNK_SIZE if busy else CHUNK_SIZE) >> self._shift)
            nblocks = 1
            while nblocks < max_blocks and copy.dirty.test(blockno + nblocks):
                nblocks += 1
            if throttle:
                await stall("copy-step")  # a test's stuck copy (failpoint.py)
            started = time.monotonic()
            # no await from the clear to the write (see the module doc)
            copy.dirty.clear(blockno, nblocks)
            copied = self._copy_run(copy, blockno << self._shift, nblocks << self._shift)
            self._account(copied)
            if self.kill_at is not None and self.bytes_copied >= self.kill_at:
                failpoint(armed_name())
            if copy.unflushed >= FLUSH_BYTES:
                copy.unflushed = 0
                await backing.run_blocking(backing.fsync, copy.dst_fd, True)
            if busy:  # leave the guests their share of the trio thread
                step_s = time.monotonic() - started
                await trio.sleep(step_s * (1 - BUSY_COPY_SHARE) / BUSY_COPY_SHARE)
            if throttle:
                await self._throttle(copied)
            else:
                await trio.lowlevel.checkpoint()
            if throttle and self.progress_hook is not None and (  # never inside a pause
                    time.monotonic() >= self.progress_due
                    or self.bytes_copied >= self.progress_due_bytes):
                await self.progress_hook()
            blockno = copy.dirty.next_dirty(blockno + nblocks)

    def _copy_run(self, copy: FileCopy, offset: int, length: int) -> int:
        """Copy one run from source to pool file; holes and zeros stay unallocated."""
        data = backing.pread(copy.vfile.fd, length, offset)
        if len(data) < length:
            # The source ends inside this run (it shrank since the run was
            # marked): what the pool holds past that end was deleted by the
            # guest and must not come back if the file grows again.
            self._cut_pool(copy, offset + len(data))
        if not data:
            return 0
        first, nblocks = offset >> self._shift, (len(data) + self.block_size - 1) >> self._shift
        dest_has_data = any(copy.copied.test(b) for b in range(first, first + nblocks))
        if not dest_has_data:
            # the destination is a hole here: write only the pages that hold data
            written = self._write_pages(copy.dst_fd, memoryview(data), offset)
        elif data == _ZEROS[: len(data)]:
            backing.punch_hole(copy.dst_fd, offset, len(data))
            copy.copied.clear(first, nblocks)
            copy.restamp = True
            return len(data)
        else:
            if backing.pwrite_all(copy.dst_fd, data, offset) != len(data):
                raise OSError(errno.ENOSPC, "short write on the destination")
            written = len(data)
        if written:
            copy.copied.mark(first, nblocks)
            copy.unflushed += written
            copy.restamp = True
        return len(data)

    def _skip_hole(self, copy: FileCopy, blockno: int) -> int:
        """Settle the dirty blocks from *blockno* on that lie wholly in a hole of
        the source, without reading them; return how many (0: data here).

        A guest that grows a file by a TiB marks a TiB dirty (``truncate``);
        reading it as zeros a MiB at a time would take hours. Nothing there to
        copy: the pool punches what it held in that range. Checkpoint-free, as
        a copy step (the hole is what the source is now).
        """
        offset = blockno << self._shift
        try:
            hole_end = os.lseek(copy.vfile.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            hole_end = max(offset, copy.vfile.size())  # a hole up to the end
        nblocks = (hole_end >> self._shift) - blockno
        if nblocks <= 0:
            return 0
        copy.dirty.clear(blockno, nblocks)
        held = copy.copied.next_dirty(blockno)
        if held is not None and held < blockno + nblocks:
            backing.punch_hole(copy.dst_fd, offset, nblocks << self._shift)
            copy.copied.clear(blockno, nblocks)
            copy.restamp = True
        return nblocks

    def _cut_pool(self, copy: FileCopy, size: int) -> None:
        """Make the pool file end where its source ends now (*size* bytes).

        Called with the source's size just read, with no checkpoint since:
        the source has nothing past *size*, so neither may the pool. Blocks
        past the new end no longer hold copied data.
        """
        pool_size = backing.fstat(copy.dst_fd).st_size
        if pool_size <= size:
            return
        backing.ftruncate(copy.dst_fd, size)
        copy.restamp = True
        first = (size + self.block_size - 1) >> self._shift
        end = (pool_size + self.block_size - 1) >> self._shift
        if end > first:
            copy.copied.clear(first, end - first)

    @staticmethod
    def _write_pages(fd: int, data: memoryview, offset: int) -> int:
        """Write the runs of non-zero 4 KiB pages of *data*; return the bytes written."""
        size, pos, written = len(data), 0, 0
        while pos < size:
            while pos < size and data[pos : pos + _PAGE] == _ZEROS[: min(_PAGE, size - pos)]:
                pos += _PAGE
            start = pos
            while pos < size and data[pos : pos + _PAGE] != _ZEROS[: min(_PAGE, size - pos)]:
                pos += _PAGE
            if start < pos:
                run = data[start : min(pos, size)]
                if backing.pwrite_all(fd, run, offset + start) != len(run):
                    raise OSError(errno.ENOSPC, "short write on the destination")
                written += len(run)
        return written

    def _account(self, nbytes: int) -> None:
        self.bytes_copied += nbytes
        now = time.monotonic()
        window = self._rate_window
        window.append((now, self.bytes_copied))
        while len(window) > 2 and now - window[0][0] > 2.0:
            window.pop(0)
        span = now - window[0][0]
        if span > 0.05:
            self._rate = (self.bytes_copied - window[0][1]) / span

    async def _throttle(self, nbytes: int) -> None:
        """Token bucket at ``rate_limit`` bytes/s; always a checkpoint."""
        limit = self.rate_limit
        if limit <= 0:
            await trio.lowlevel.checkpoint()
            return
        now = time.monotonic()
        self._bucket = min(float(limit), self._bucket + (now - self._bucket_time) * limit)
        self._bucket_time = now
        self._bucket -= nbytes
        # Sleep off the debt in steps of at most a second, so that a new rate
        # (``fusedisk rate``) takes effect at once, even after ``--rate 1``.
        while self._bucket < 0 and self.rate_limit > 0:
            limit = self.rate_limit
            step_s = min(1.0, -self._bucket / limit)
            await trio.sleep(step_s)
            self._bucket = min(0.0, self._bucket + step_s * limit)
        self._bucket_time = time.monotonic()
        await trio.lowlevel.checkpoint()

    def copy_rate(self) -> float:
        return self._rate


def estimate_s(nbytes: int, rate: float) -> float:
    """Seconds to copy *nbytes* at *rate* (a floor when no rate was measured yet)."""
    return nbytes / max(rate, 50e6) if nbytes else 0.0

