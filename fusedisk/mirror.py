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
is marked.

**No write lost to a racing copy.** A copy *step* (one run of up to
:data:`CHUNK_SIZE`) reads the source and writes the pool file on a worker
thread, so the request loop serves guests meanwhile and the disk sees large
I/O. Guest writes stay on the loop thread. The order that keeps every
acknowledged write:

1. a guest write lands on the source, then marks the consumer, then is
   acknowledged, all with no checkpoint (vdisk.py), so on the loop a write
   is wholly before or after any instant the copier looks at;
2. the copier clears the run's bits *on the loop*, then (a checkpoint
   later) the worker reads the run: a write before the clear is in what the
   worker reads; a write after it is marked again, whatever the worker read;
3. a block marked again while its step is in flight is copied again by a
   later pass (``next_dirty`` finds it; the pause's pass takes what is left),
   so a torn or stale run the worker wrote is overwritten from the source;
4. while mirroring, a guest write lands on the pool file too and is not
   marked, except while a step is in flight: the file's ``VFile.copying``
   holds the step's byte range, and a write, truncate or fallocate mirrored
   into that range is marked as well (vdisk.py ``_mirrored``), for the
   worker's later write of the run, read before the guest's, may land over
   it on the pool file. Writes elsewhere in the file are only mirrored, so
   the dirty set still converges. Nothing else writes a pool file during a
   flight but the worker (:meth:`Copier.fit` only cuts it, after a source
   change that is marked too);
5. a copy dropped or detached while its step is in flight is released when
   the step is back (its descriptors are the worker's until then).

The copier's bitmaps (``dirty``, ``copied``) are changed on the loop only;
the worker returns what it did. ``tests/test_copy_race.py`` races O_DIRECT
guest writes against steps held between their read and their write (the
``copy-io`` stall point) and checks every acknowledged write after the
switchover.

**Resuming** (progress.py): a copier given a *plan* keeps the pool file a
previous run left for a planned file, when it is still that file's (same
destination inode, same CBT history holding the plan's relocation mark), and
marks dirty only what the plan left pending plus what changed since (the
mark); everything else of the pool file is kept (``resumed_bytes``).

When mirroring is on, ``VFile.mirror_fd`` points at the pool file: guest
writes land on both stores and no longer mark the consumer, so the dirty set
only shrinks and the next pass converges.

Descriptors do not grow with the entry's file count: a copy that nobody
else has open and that is not being copied is *parked* (its source and pool
descriptors closed, its bitmaps kept, both files remembered by file handle).
Nothing can write a parked file without opening it, and :class:`OpenFiles`
calls the copier on every first open of a file it copies, before the opener
can write: the copy is then attached again (consumer, mirror) first.
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
from contextlib import contextmanager

import trio

from . import backing
from .bitmap import Bitmap
from .failpoint import armed_name, failpoint, stall, stall_blocking
from .gate import Gate
from .progress import KEEP_MIN_BYTES, FileProgress
from .sizes import block_span
from .vdisk import OpenFiles, VFile

log = logging.getLogger(__name__)

#: Largest read/write of one copy step (on the worker thread, idle guests).
#: Measured on this machine (1 GiB, ext4 on virtio, shared): buffered
#: pread/pwrite of 1 MiB steps reached 54-276 MB/s, of 4 MiB 112-394 MB/s,
#: O_DIRECT 4 MiB 191-368, copy_file_range 4 MiB 291-309, dd bs=1M
#: oflag=direct 241-292 (see README "Copy speed").
CHUNK_SIZE = 4 << 20
#: The step size while guests are doing I/O: shorter waits for them.
BUSY_CHUNK_SIZE = 256 << 10
#: Share of the time the copy takes while guests are doing I/O: after a step
#: that took t seconds it sleeps t * (1 - share) / share. Measured (on-loop
#: copy): without it a QD1 guest kept ~23 % of its IOPS during an unlimited copy.
BUSY_COPY_SHARE = 0.4
#: Unflushed bytes a pool file may gather before the copier fdatasyncs it,
#: which keeps the flush inside the switchover's pause short.
FLUSH_BYTES = 64 << 20
_ZEROS = bytes(CHUNK_SIZE)
_PAGE = 4096
_ZERO_PAGE = bytes(_PAGE)


class FileCopy:
    """One source regular file and its pool file on the destination."""

    __slots__ = (
        "__weakref__", "copied", "detached", "dirty", "dst_fd", "dst_handle", "key",
        "parked_dirty", "pool_key", "pool_name", "restamp", "size", "src_handle", "unflushed",
        "vfile",
    )

    def __init__(self, vfile: VFile, dst_fd: int, pool_name: str) -> None:
        #: the source, shared with its other users; None while parked
        self.vfile: VFile | None = vfile
        self.key = vfile.key
        #: the pool file, read-write; -1 while parked
        self.dst_fd = dst_fd
        self.pool_name = pool_name
        #: file handles of source and pool file (None: no handles, never parked)
        self.src_handle: bytes | None = None
        self.dst_handle: bytes | None = None
        self.pool_key = (-1, -1)
        #: the source's size when last seen (the order of a pass while parked)
        self.size = 0
        #: the copy ended (dropped or detached): its history alias goes
        self.detached = False
        #: blocks to copy (the consumer bitmap attached to the VFile)
        self.dirty = Bitmap()
        #: blocks the pool file holds data for (so a block that became zeros
        #: on the source is punched on the destination, not skipped)
        self.copied = Bitmap()
        self.unflushed = 0
        #: ``dirty.count`` when parked, counted in the copier's running total
        #: (a parked copy's bitmaps do not change)
        self.parked_dirty = 0
        #: the copy changed the pool file since its times were last set (staging.py)
        self.restamp = False

    def alive_test(self) -> Callable[[], bool]:
        """A test, holding no reference to this copy, of whether it is still in
        progress: its dirty bitmap is one of the file's consumers until detached."""
        ref = weakref.ref(self)

        def attached() -> bool:
            copy = ref()
            return copy is not None and not copy.detached

        return attached

    @property
    def parked(self) -> bool:
        return self.vfile is None


def walk(
    dir_fd: int, parts: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], int, os.stat_result]]:
    """Every object below the directory *dir_fd* as ``(path parts, O_PATH fd, stat)``.

    The fd is valid only until the next item; nothing is followed, objects
    that vanish while the walk runs are skipped.
    """
    for name, fd, st in children(dir_fd):
        yield (*parts, name), fd, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(fd, (*parts, name))


def children(dir_fd: int) -> Iterator[tuple[str, int, os.stat_result]]:
    """The objects directly in the directory *dir_fd*, by name, as ``(name, O_PATH fd,
    stat)``; the fd is valid only until the next item; vanished ones are skipped."""
    for name in sorted(backing.list_dir(dir_fd)):
        try:
            fd = backing.open_path(dir_fd, name)
        except FileNotFoundError:
            continue
        try:
            yield name, fd, backing.fstat(fd)
        finally:
            backing.close(fd)


class Copier:
    """Copies the files of one entry into a pool directory; see the module doc."""

    def __init__(
        self, files: OpenFiles, gate: Gate, pool_fd: int, block_size: int,
        src_root_fd: int | None = None, write_piece: int = backing.WRITE_PIECE,
    ) -> None:
        self.files = files
        #: the largest single write to the pool's files (the destination store's)
        self.write_piece = write_piece
        self.gate = gate
        self.pool_fd = pool_fd
        # open_by_handle_at wants a plain (not O_PATH) fd on each filesystem
        self._dst_mount_fd = backing.reopen(pool_fd, os.O_RDONLY | os.O_DIRECTORY)
        self._src_mount_fd = (
            -1 if src_root_fd is None
            else backing.reopen(src_root_fd, os.O_RDONLY | os.O_DIRECTORY)
        )
        self._handles_warned = False
        #: copies whose descriptors are in use (a pass copying one, across its
        #: awaits; :meth:`using`): never parked meanwhile
        self._busy: set[FileCopy] = set()
        #: the copy whose step is on the worker thread (see the module doc, 4-5)
        self._inflight: FileCopy | None = None
        self._worker = trio.CapacityLimiter(1)
        #: steps back from the worker with blocks of their run marked again
        #: meanwhile (a guest wrote them): copied again by a later pass
        self.raced_steps = 0
        #: copies parked and attached again, for statistics
        self.parks = 0
        self.unparks = 0
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self.copies: dict[tuple[int, int], FileCopy] = {}
        #: the copies that are not parked (their VFile attached): the only ones a
        #: guest can write, so the only ones whose work can grow
        self._attached: set[FileCopy] = set()
        #: parked copies that may have work left (dirty blocks, unflushed bytes,
        #: size and times to restamp): a superset, pruned by :meth:`with_work`.
        #: With ``_attached``, what a pass, a flush or the pause has to look at:
        #: O(changed), not O(files)
        self._parked_work: set[FileCopy] = set()
        #: the dirty blocks of the parked copies: what :meth:`dirty_bytes` (polled by
        #: ``status``) adds to the attached ones' without walking every file
        self._parked_dirty = 0
        self.mirroring = False
        self.rate_limit = 0  #: bytes/s, 0 = unlimited; may change at any time
        self.bytes_copied = 0
        self._rate = 0.0
        self._rate_window: list[tuple[float, int]] = []
        #: the token bucket's clock is trio's (tests drive it with the autojump clock)
        self._bucket_time: float | None = None
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
            allocated.mark(*block_span(offset, length, self._shift))
        if plan is not None and tracker is not None:
            self._resume_file(copy, plan, tracker.relocation_marks[self.plan_gen], allocated)
        else:
            if tracker is not None:
                tracker.drop_relocation_marks()  # an ended relocation's, if any
            copy.dirty.update(allocated)
            backing.ftruncate(dst_fd, vfile.size())
        if tracker is not None and _kept_across_a_crash(vfile):
            # only a file a resume would keep needs the mark: on a small one it
            # would make the history durable, two fsynced saves per file when
            # the copier closes it (the progress snapshot starts it on a file
            # that grew since, with its pending blocks, in one instant)
            tracker.start_relocation_mark(self.gen)
        if self.mirroring:
            vfile.mirror_fd = dst_fd
        self.copies[key] = copy
        self._attached.add(copy)
        # The commit makes the pool file the file: its CBT history must be found
        # under the pool file's key after a crash (saved before the commit).
        pool = backing.fstat(dst_fd)
        copy.pool_key = (pool.st_dev, pool.st_ino)
        self.files.keep_history(vfile, copy.pool_key, copy.alive_test())
        if self._src_mount_fd >= 0:
            copy.src_handle = backing.handle_of(path_fd)
            copy.dst_handle = backing.handle_of(dst_fd)
            if (copy.src_handle is None or copy.dst_handle is None) and not self._handles_warned:
                self._handles_warned = True
                log.warning("a store has no file handles: the relocation keeps every file "
                            "it copies open")
        self.files.watch(key, self._on_first_open, self._on_one_left)
        self.park(copy)
        return copy

    # -- parking: closed while idle -------------------------------------------------------
    #
    # Not parked: a file worth keeping across a crash (progress.py). Its CBT
    # tracker must stay loaded, so that every write is marked in the
    # relocation's mark generations (a parked file's tracker is closed, and a
    # generation started meanwhile would miss it, which makes a resume copy it
    # afresh). Those are the few large files (disks) of an entry; the many small
    # ones, which bound the descriptors, are parked.

    def park(self, copy: FileCopy) -> bool:
        """Close the descriptors of a copy that nobody else uses; True if parked.

        Not parked: one another user has open (a guest may write it), one a
        pass is copying, a failed mirror (kept for :meth:`mirror_error`), a
        store without handles. A written file whose size and times the staging
        has yet to see (``touched``) keeps that as ``restamp``: the same sync.
        """
        vfile = copy.vfile
        if (vfile is None or vfile.opens != 1 or vfile.mirror_error
                or copy.src_handle is None or copy.dst_handle is None
                or copy in self._busy or _kept_across_a_crash(vfile)):
            return False
        if vfile.touched:
            copy.restamp = True
        copy.size = vfile.size()
        self._release(copy)
        copy.vfile, copy.dst_fd = None, -1
        self._attached.discard(copy)
        if copy.dirty.count or copy.unflushed or copy.restamp:
            self._parked_work.add(copy)
        copy.parked_dirty = copy.dirty.count
        self._parked_dirty += copy.parked_dirty
        self.parks += 1
        return True

    def _on_first_open(self, vfile: VFile) -> None:
        """A file this copier copies got its first user (OpenFiles.watch): attach
        the parked copy to it before that user can write. Sync."""
        copy = self.copies.get(vfile.key)
        if copy is None or copy.vfile is not None:
            return
        if vfile.tracker is not None and _kept_across_a_crash(vfile):  # see add
            vfile.tracker.start_relocation_mark(self.gen)
        assert copy.dst_handle is not None
        dst_fd = backing.open_by_handle(self._dst_mount_fd, copy.dst_handle, os.O_RDWR)
        vfile.opens += 1  # the copier's own use, until it parks it again
        copy.vfile, copy.dst_fd = vfile, dst_fd
        self._attached.add(copy)
        self._parked_work.discard(copy)
        self._parked_dirty -= copy.parked_dirty
        copy.parked_dirty = 0
        vfile.consumers.append(copy.dirty)
        if self.mirroring:
            vfile.mirror_fd = dst_fd
        self.files.keep_history(vfile, copy.pool_key, copy.alive_test())
        self.unparks += 1

    def _on_one_left(self, vfile: VFile) -> None:
        """The other users of a copied file went (OpenFiles.watch): if the one
        left is this copier, park it now rather than at the next pass."""
        copy = self.copies.get(vfile.key)
        if copy is not None and copy.vfile is vfile:
            self.park(copy)

    def unpark(self, copy: FileCopy) -> VFile:
        """Open a parked copy again (by handle); return its source VFile.

        Raises ``OSError`` (ESTALE) when the source is gone."""
        if copy.vfile is not None:
            return copy.vfile
        assert copy.src_handle is not None
        path_fd = backing.open_by_handle(self._src_mount_fd, copy.src_handle)
        try:
            vfile = self.files.open(path_fd, copy.key, self.gate)  # attaches (above)
        finally:
            backing.close(path_fd)
        self._busy.add(copy)  # the release below leaves one: not a reason to park
        try:
            self.files.release(vfile)  # the copier keeps the open _on_first_open took
        finally:
            self._busy.discard(copy)
        if copy.vfile is not vfile:  # someone had it open all along: never while parked
            raise AssertionError("a parked copy's file was open")
        return vfile

    @contextmanager
    def using(self, copy: FileCopy) -> Iterator[VFile]:
        """The copy's source VFile (and ``dst_fd``) for a while; parked again after
        if it was parked before."""
        was_parked = copy.parked
        vfile = self.unpark(copy)
        busy = copy not in self._busy
        self._busy.add(copy)
        try:
            yield vfile
        finally:
            if busy:
                self._busy.discard(copy)
            if was_parked and copy.key in self.copies:
                self.park(copy)

    def pool_opener(self, copy: FileCopy) -> Callable[[], int]:
        """What opens a new descriptor of the copy's pool file, on any thread,
        even if the copy is parked meanwhile (each call's result is the
        caller's to close; call it once)."""
        if copy.dst_fd >= 0:
            fd = os.dup(copy.dst_fd)
            return lambda: fd
        assert copy.dst_handle is not None
        mount_fd, handle = self._dst_mount_fd, copy.dst_handle
        return lambda: backing.open_by_handle(mount_fd, handle, os.O_RDWR)

    def open_pool(self, copy: FileCopy) -> int:
        """A new read-write descriptor of the copy's pool file; the caller closes it."""
        if copy.dst_fd >= 0:
            return os.dup(copy.dst_fd)
        assert copy.dst_handle is not None
        return backing.open_by_handle(self._dst_mount_fd, copy.dst_handle, os.O_RDWR)

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
                fd = backing.open_at(self.pool_fd, pool_name, flags)
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
                backing.unlink_at(self.pool_fd, pool_name)
            except FileNotFoundError:
                pass
        return backing.open_at(self.pool_fd, pool_name, flags | os.O_CREAT | os.O_EXCL), None

    def _resume_file(
        self, copy: FileCopy, plan: FileProgress, changed: Bitmap, allocated: Bitmap
    ) -> None:
        """Dirty: what the plan left pending, what changed since, and whatever lies
        past the pool file's end; kept: the rest of what the source holds."""
        copy.dirty.update(plan.pending)
        copy.dirty.update(changed)
        assert copy.vfile is not None  # called from add, before any park
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
        for copy in self.attached():  # a parked one: a small file, copied afresh on a resume
            vfile = copy.vfile
            assert vfile is not None
            tracker = vfile.tracker
            if tracker is None:
                continue
            tracker.start_relocation_mark(gen)
            if (tracker.withdrawn is None
                    and backing.fstat(vfile.fd).st_blocks * 512 >= KEEP_MIN_BYTES):
                out.append((copy, copy.dirty.copy()))
        return out

    def attached(self) -> list[FileCopy]:
        """The copies that are not parked (few: open files, and the large files a
        resume would keep)."""
        return list(self._attached)

    def with_work(self) -> list[FileCopy]:
        """Every copy that may have work left: the attached ones, and the parked
        ones with dirty blocks, unflushed bytes or a restamp due. What a pass, a
        flush and the pause look at, instead of every file of the entry."""
        done = [c for c in self._parked_work
                if not (c.dirty.count or c.unflushed or c.restamp) or c.detached]
        self._parked_work.difference_update(done)
        return [*self._attached, *self._parked_work]

    def drop(self, key: tuple[int, int]) -> None:
        """Stop copying a file whose source is gone (no link left)."""
        copy = self.copies.pop(key, None)
        if copy is not None:
            self._attached.discard(copy)
            self._parked_work.discard(copy)
            self._parked_dirty -= copy.parked_dirty
            copy.parked_dirty = 0
            self.files.unwatch(key)
            copy.detached = True
            if not copy.parked and copy is not self._inflight:  # else: once it is back
                self._release(copy)

    def _release(self, copy: FileCopy, later: list[int] | None = None) -> None:
        vfile = copy.vfile
        assert vfile is not None
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
        with self.using(copy) as vfile:
            size = vfile.size()
            if backing.fstat(copy.dst_fd).st_size > size:
                self._cut_pool(copy, size)
            else:
                backing.ftruncate(copy.dst_fd, size)

    def start_mirroring(self) -> None:
        """From now on every guest write lands on both stores before it is acknowledged."""
        self.mirroring = True
        for copy in self._attached:  # a parked one mirrors once it is opened
            assert copy.vfile is not None
            copy.vfile.mirror_fd = copy.dst_fd

    def mirror_error(self) -> OSError | None:
        for copy in self._attached:  # a parked one mirrors nothing
            if copy.vfile is not None and copy.vfile.mirror_error is not None:
                return copy.vfile.mirror_error
        return None

    def detach(self, parked: list[dict[tuple[int, int], FileCopy]] | None = None) -> list[int]:
        """Stop mirroring and consuming, release the sources; return the pool
        files' descriptors, for the caller to close (outside a pause).

        With *parked*, the parked copies (closed: nothing can write them, and the
        copies are gone from the table) are only put there, for the caller to
        finish with :meth:`forget_parked` outside the pause: the many small
        files of an entry cost the pause nothing (the whole table is handed
        over, not walked)."""
        later: list[int] = []
        if self.copies:
            log.info("copy steps raced by guest writes: %d (copied again)", self.raced_steps)
        ending = [*self._attached]
        if self._inflight is not None:
            ending.append(self._inflight)
        if parked is None:
            ending = list(self.copies.values())
        for copy in ending:
            self.files.unwatch(copy.key)
            copy.detached = True
            if not copy.parked and copy is not self._inflight:  # else: once it is back
                self._release(copy, later)
        if parked is not None:
            parked.append(self.copies)  # the rest: forget_parked skips the detached
        self.copies = {}
        self._attached.clear()
        self._parked_work.clear()
        self._parked_dirty = 0
        self.mirroring = False
        for fd in (self._dst_mount_fd, self._src_mount_fd):
            if fd >= 0:
                later.append(fd)
        self._dst_mount_fd = self._src_mount_fd = -1
        return later

    def forget_parked(self, parked: list[dict[tuple[int, int], FileCopy]]) -> None:
        """Finish what :meth:`detach` left of its parked copies."""
        for table in parked:
            for copy in table.values():
                if not copy.detached:
                    self.files.unwatch(copy.key)
                    copy.detached = True

    # -- copying --------------------------------------------------------------------

    def dirty_bytes(self) -> int:
        """What is left to copy; O(attached copies)."""
        attached = sum(c.dirty.count for c in self._attached)
        return (attached + self._parked_dirty) << self._shift

    async def copy_pass(self, *, throttle: bool = True) -> None:
        """Copy every block that is dirty when the pass reaches it, smallest files first.

        Files with nothing dirty cost nothing (the pause's pass sees only what
        changed); a block dirtied in a file the pass already left waits for
        the next pass.
        """
        dirty = [c for c in self.with_work() if c.dirty.count]
        for copy in sorted(dirty, key=lambda c: c.size if c.vfile is None else c.vfile.size()):
            if copy.key not in self.copies:  # detached meanwhile
                continue
            try:
                self.unpark(copy)
            except OSError as e:
                if e.errno not in (errno.ESTALE, errno.ENOENT):
                    raise
                continue  # gone, with no link and nobody holding it: staging drops it
            self._busy.add(copy)
            try:
                await self._copy_file(copy, throttle)
            finally:
                self._busy.discard(copy)
            if throttle and copy.key in self.copies:  # not inside the pause
                self.park(copy)

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
            copied = await self._copy_step(copy, blockno, nblocks, throttle)
            if copy.key not in self.copies:  # dropped while in flight: released
                return
            self._account(copied)
            if self.kill_at is not None and self.bytes_copied >= self.kill_at:
                failpoint(armed_name())
            if copy.unflushed >= FLUSH_BYTES:
                copy.unflushed = 0
                await backing.run_blocking(backing.fsync, copy.dst_fd, True)
            if busy:  # leave the guests their share
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

    async def _copy_step(
        self, copy: FileCopy, blockno: int, nblocks: int, throttle: bool
    ) -> int:
        """Copy one run on the worker thread, in the order of the module doc;
        return the bytes of the source it covered (holes and zeros stay
        unallocated on the pool file)."""
        vfile = copy.vfile
        assert vfile is not None
        offset, length = blockno << self._shift, nblocks << self._shift
        # (2) cleared before the worker reads, on the loop
        copy.dirty.clear(blockno, nblocks)
        held = copy.copied.next_dirty(blockno)
        dest_has_data = held is not None and held < blockno + nblocks
        # (4) a change mirrored into the run meanwhile is marked too
        self._inflight = copy
        vfile.copying = (offset, offset + length)
        try:
            nread, written, punched = await trio.to_thread.run_sync(
                _copy_io, vfile.fd, copy.dst_fd, offset, length, dest_has_data, throttle,
                self.write_piece,
                limiter=self._worker)
        finally:
            self._inflight = None
            vfile.copying = None
            if copy.detached:  # (5)
                self._release(copy)
        if copy.detached:
            return nread
        if nread < length:
            # The source ended inside this run when the worker read it (it shrank
            # since the run was marked): what the pool holds past that end was
            # deleted by the guest and must not come back if the file grows
            # again. A guest write past that end since is marked (3).
            self._cut_pool(copy, offset + nread)
        if nread:
            first = offset >> self._shift
            run = (nread + self.block_size - 1) >> self._shift
            if punched:
                copy.copied.clear(first, run)
                copy.restamp = True
            elif written:
                copy.copied.mark(first, run)
                copy.unflushed += written
                copy.restamp = True
        again = copy.dirty.next_dirty(blockno)
        if again is not None and again < blockno + nblocks:
            self.raced_steps += 1  # (3): a later pass copies the run again
        return nread

    def _skip_hole(self, copy: FileCopy, blockno: int) -> int:
        """Settle the dirty blocks from *blockno* on that lie wholly in a hole of
        the source, without reading them; return how many (0: data here).

        A guest that grows a file by a TiB marks a TiB dirty (``truncate``);
        reading it as zeros a MiB at a time would take hours. Nothing there to
        copy: the pool punches what it held in that range. Checkpoint-free, as
        a copy step (the hole is what the source is now).
        """
        offset = blockno << self._shift
        assert copy.vfile is not None
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

    def _account(self, nbytes: int) -> None:
        self.bytes_copied += nbytes
        now = trio.current_time()
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
        now = trio.current_time()
        if self._bucket_time is None:
            self._bucket_time = now
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
        self._bucket_time = trio.current_time()
        await trio.lowlevel.checkpoint()

    def copy_rate(self) -> float:
        return self._rate


def _kept_across_a_crash(vfile: VFile) -> bool:
    """Whether a resume would keep this file's copy (see progress.py)."""
    return backing.fstat(vfile.fd).st_blocks * 512 >= KEEP_MIN_BYTES


def estimate_s(nbytes: int, rate: float) -> float:
    """Seconds to copy *nbytes* at *rate* (a floor when no rate was measured yet)."""
    return nbytes / max(rate, 50e6) if nbytes else 0.0


def _copy_io(
    src_fd: int, dst_fd: int, offset: int, length: int, dest_has_data: bool, hold: bool,
    piece: int = backing.WRITE_PIECE,
) -> tuple[int, int, bool]:
    """One copy step's I/O, on the worker thread: read the run of the source,
    write it to the pool file; return (bytes read, bytes written, punched).

    Where the pool file is a hole, only the pages that hold data are written;
    where it held data and the source now reads as zeros, the run is punched.
    """
    data = backing.pread(src_fd, length, offset)
    if hold:  # not inside a pause
        stall_blocking("copy-io")  # a test's step held between its read and its write
    if not data:
        return 0, 0, False
    if not dest_has_data:
        return len(data), _write_pages(dst_fd, data, offset, piece), False
    if data == (_ZEROS if len(data) == CHUNK_SIZE else bytes(len(data))):  # memcmp
        backing.punch_hole(dst_fd, offset, len(data))
        return len(data), 0, True
    if backing.pwrite_all(dst_fd, data, offset, piece) != len(data):
        raise OSError(errno.ENOSPC, "short write on the destination")
    return len(data), len(data), False


def _zero_page(data: bytes, pos: int) -> bool:
    page = data[pos : pos + _PAGE]  # bytes == bytes is a memcmp; memoryviews compare by item
    return page == (_ZERO_PAGE if len(page) == _PAGE else bytes(len(page)))


def _write_pages(fd: int, data: bytes, offset: int, piece: int = backing.WRITE_PIECE) -> int:
    """Write the runs of non-zero 4 KiB pages of *data*; return the bytes written."""
    view = memoryview(data)
    size, pos, written = len(data), 0, 0
    while pos < size:
        while pos < size and _zero_page(data, pos):
            pos += _PAGE
        start = pos
        while pos < size and not _zero_page(data, pos):
            pos += _PAGE
        if start < pos:
            run = view[start : min(pos, size)]
            if backing.pwrite_all(fd, run, offset + start, piece) != len(run):
                raise OSError(errno.ENOSPC, "short write on the destination")
            written += len(run)
    return written
