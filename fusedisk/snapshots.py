"""Point-in-time snapshots of an entry: every file at one instant, each with a change id.

A snapshot is made with the entry's gate closed (no request that changes
the entry runs), so all of a VM's disks and files are taken at the same
instant (crash-consistent across disks), and each regular file gets a new
CBT change id at exactly that instant: ``cbt changes --since A --until B``
between two snapshots' ids is exact. A regular file is held one of two ways:

- **reflink** (XFS, btrfs): cloned with ``FICLONE``, metadata only, so the
  pause is short and the guest's later writes never touch the clone.
- **copy-before-write** (``cbw``; ext4 and every store that cannot clone):
  the snapshot's file starts empty (sparse, the same size) and a
  :class:`CbwGuard` on the data path (vdisk.Guard) copies each block into
  it before the first change of that block after the snapshot; the view
  reads saved blocks from it and the others from the live file. Its map
  ``cbw-N`` (a checksummed record, atomically replaced) says which blocks
  are saved and whether every saved block is durable (``clean``); the first
  save after a clean map arms it (saves it unclean) and every fsync of the
  live file first makes the saved blocks durable and the map clean again.
  A map found unclean at start is a snapshot a crash may have torn: it is
  marked **lost** (the ``lost`` file, with the reason), never read.

Layout, on the entry's store::

    .fusedisk-snapshots/ENTRY@NAME/tree       the entry (its directory, or its file)
    .fusedisk-snapshots/ENTRY@NAME/manifest   JSON: entry, created, files (path →
                                               change_id, size, method[, cbw, block_size])
    .fusedisk-snapshots/ENTRY@NAME/cbw-N      the map of copy-before-write file N
    .fusedisk-snapshots/ENTRY@NAME/lost       only once lost: why

The name starts with the datastore's reserved prefix, so the mount never
serves it as an entry and a relocation never copies it: a snapshot stays on
the store it was made on. A reflink snapshot's blocks are its own; a
copy-before-write one follows its live files through a relocation (the
guards move with the files' keys, OpenFiles.repoint) and reads their
unsaved blocks on the new store. A snapshot is built under a temporary name
and renamed into place after its manifest is fsynced; one left without a
manifest by a crash is listed as ``incomplete`` (never as a snapshot) until
deleted. Readers use :func:`open_file` only.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import stat
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import backing, metadata
from .api import SNAPSHOT_NAME
from .bitmap import Bitmap
from .datastore import Datastore, Entry, Store
from .errors import FusediskError
from .failpoint import failpoint
from .mirror import children, walk
from .vdisk import OpenFiles

log = logging.getLogger(__name__)

SNAPSHOT_DIR = ".fusedisk-snapshots"
TREE = "tree"
MANIFEST = "manifest"
#: present in a snapshot's directory once it is lost; holds the reason
LOST = "lost"
#: a copy-before-write file's map of saved blocks: ``cbw-N`` in the snapshot's directory
CBW_MAP = "cbw"
CBW_KIND = "snapshot-cbw"
#: how a file is held: a reflink clone, or copy-before-write
REFLINK = "reflink"
CBW = "cbw"
_FICLONE = 0x40049409
#: how long a guard stays armed (saved blocks not yet durable) without an fsync
#: of its file before the service syncs it: a crash loses a copy-before-write
#: snapshot only when a block was saved within about this long
SYNC_INTERVAL_S = 1.0
#: what a guard saves between two checkpoints when a file's last name goes
SAVE_ALL_PIECE = 4 << 20
#: the snapshot service of each datastore the process serves (for open_file)
_SERVICES: weakref.WeakKeyDictionary[Datastore, Snapshots] = weakref.WeakKeyDictionary()


class SnapshotError(FusediskError):
    """A snapshot request was refused or failed; nothing half-made is left."""


class _Torn(Exception):
    """A copy-before-write snapshot found at start cannot be trusted (the reason)."""


def _write_lost(dir_fd: int, reason: str) -> None:
    fd = backing.open_at(dir_fd, LOST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        backing.pwrite_all(fd, reason.encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    backing.fsync_dir(dir_fd)


@dataclass(frozen=True, slots=True)
class Snapshot:
    entry: str
    name: str
    store: str
    path: str  #: the snapshot's directory on its store
    created: float | None  #: Unix time; None when incomplete
    files: dict[str, dict[str, object]]  #: path in the entry → change_id, size
    #: "ok"; "incomplete" (a crash interrupted its creation); "lost" (see ``lost``)
    state: str
    pause_ms: float | None = None
    lost: str | None = None  #: why a lost snapshot cannot be read
    #: bytes its own files allocate on its store (reflink: shared extents included)
    space_bytes: int = 0
    #: bytes saved by copy-before-write so far (blocks of the live files it holds)
    saved_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"entry": self.entry, "name": self.name, "store": self.store,
                "path": self.path, "created": self.created, "files": self.files,
                "state": self.state, "pause_ms": self.pause_ms, "lost": self.lost,
                "space_bytes": self.space_bytes, "saved_bytes": self.saved_bytes}


def check_name(name: str) -> str:
    if not SNAPSHOT_NAME.fullmatch(name):
        raise SnapshotError(f"snapshot name {name!r}: use 1-64 letters, digits, '.', '_' or "
                            "'-', starting with a letter or digit")
    return name


def _dir_name(entry: str, name: str) -> str:
    return f"{entry}@{name}"


def _clone(src_fd: int, dst_fd: int) -> None:
    fcntl.ioctl(dst_fd, _FICLONE, src_fd)


def _snapshots_fd(store: Store, create: bool) -> int | None:
    try:
        return backing.open_path(store.root_fd, SNAPSHOT_DIR)
    except FileNotFoundError:
        if not create:
            return None
    backing.mkdir_at(store.root_fd, SNAPSHOT_DIR, 0o700)
    backing.fsync_dir(store.root_fd)
    return backing.open_path(store.root_fd, SNAPSHOT_DIR)


@dataclass(slots=True)
class _Cloning:
    """One clone of a tree: where it goes and what it found on the way."""

    into_fd: int  #: the snapshot's directory; the tree is its TREE
    #: each regular file's path, key and method
    found: list[tuple[tuple[str, ...], tuple[int, int], str]]
    #: the first path cloned of each object with several names (and its method),
    #: so that its other names become links to that clone
    linked: dict[tuple[int, int], tuple[tuple[str, ...], str]]


def _copy_tree(entry: Entry, src_fd: int, st: os.stat_result, dst_dir_fd: int, name: str,
               rel: tuple[str, ...], cloning: _Cloning) -> None:
    """Clone the object *src_fd* as *name* in *dst_dir_fd* (directories: recursively);
    names of one object stay names of one object. Each regular file's path, key and
    method (:data:`REFLINK`, or :data:`CBW` where the store cannot clone: then the
    copy is an empty file of the same size, which its guard fills) go to
    ``cloning.found``. Blocking: run on a worker thread."""
    mode = st.st_mode
    key = (st.st_dev, st.st_ino)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        first = cloning.linked.get(key)
        if first is not None:
            first_rel, first_method = first
            parent_fd = backing.open_parts(cloning.into_fd, (TREE, *first_rel[:-1]))
            try:
                backing.link_at(parent_fd, first_rel[-1], dst_dir_fd, name)
            finally:
                backing.close(parent_fd)
            if stat.S_ISREG(mode):
                cloning.found.append((rel, key, first_method))
            return
    if stat.S_ISDIR(mode):
        backing.mkdir_at(dst_dir_fd, name, 0o700)
        child_dir = backing.open_path(dst_dir_fd, name)
        try:
            for child_name, fd, child_st in children(src_fd):
                _copy_tree(entry, fd, child_st, child_dir, child_name, (*rel, child_name),
                           cloning)
        finally:
            backing.close(child_dir)
    elif stat.S_ISREG(mode):
        src = backing.reopen(src_fd, os.O_RDONLY)
        try:
            dst = backing.open_at(dst_dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            method = REFLINK
            try:
                try:
                    _clone(src, dst)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL):
                        raise
                    method = CBW  # ext4 and the like: copy-before-write
                    backing.ftruncate(dst, st.st_size)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        cloning.found.append((rel, key, method))
        if st.st_nlink > 1:
            cloning.linked[key] = (rel, method)
    elif stat.S_ISLNK(mode):
        backing.symlink_at(dst_dir_fd, name, backing.readlink(src_fd))
    else:
        backing.mknod_at(dst_dir_fd, name, mode, st.st_rdev)
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode) and st.st_nlink > 1:
        cloning.linked[key] = (rel, "")
    if not stat.S_ISLNK(mode):
        child = backing.open_path(dst_dir_fd, name)
        try:
            backing.copy_attributes(src_fd, child, st)
        finally:
            backing.close(child)


class _Live:
    """The copy-before-write state of one snapshot while the daemon serves it."""

    def __init__(self, snapshots: Snapshots, entry: Entry, dir_name: str, dir_fd: int) -> None:
        self.snapshots = snapshots
        self.entry = entry
        self.dir_name = dir_name
        #: O_PATH of the snapshot's directory (valid across its rename into place)
        self.dir_fd = dir_fd
        self.guards: dict[str, CbwGuard] = {}  #: path in the entry → its guard
        #: why the snapshot is lost (None: it is intact)
        self.lost: str | None = None

    def lose(self, reason: str) -> None:
        """The snapshot cannot be kept: say so durably (best effort), stop guarding.
        Sync: it runs inside a guest's change, which goes ahead regardless."""
        if self.lost is not None:
            return
        self.lost = reason
        log.error("snapshot %s of %s is lost: %s", self.dir_name, self.entry.name, reason)
        try:
            fd = backing.open_at(self.dir_fd, LOST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                backing.pwrite_all(fd, reason.encode(), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            backing.fsync_dir(self.dir_fd)
        except OSError as e:  # an unclean map (its guard armed it) reports it after a crash too
            log.warning("snapshot %s: the lost marker was not written: %s", self.dir_name,
                        e.strerror or e)
        self.detach()

    def detach(self) -> None:
        """Stop guarding (sync). The descriptors stay open: a guard's save may be
        running on a worker thread (see :meth:`aclose`)."""
        for guard in self.guards.values():
            self.snapshots.files.remove_guard(guard.key, guard)

    def close(self) -> None:
        """Close, when no guard's save can be running (before serving, at unmount,
        or inside the gate's pause)."""
        self.detach()
        for guard in self.guards.values():
            guard.close()
        backing.close(self.dir_fd)

    async def aclose(self) -> None:
        """Close while serving: each guard's running save finishes first (a
        descriptor closed under it could be reused by another file)."""
        self.detach()
        with trio.CancelScope(shield=True):
            for guard in self.guards.values():
                async with guard.lock:
                    guard.close()
        backing.close(self.dir_fd)


class CbwGuard:
    """Copy-before-write of one file of one snapshot (see vdisk.Guard, and the module doc).

    ``bits`` marks the blocks saved in the data file (the file's copy in the
    snapshot's tree, at the same offsets); the others are still the live
    file's. Every change is serialised by the trio thread: :meth:`preserve`
    runs inside the change's checkpoint-free section, so a block is saved
    from the live file exactly once, before its first change.

    Durability: the map ``cbw-N`` says ``clean`` only while every saved block
    is durable. The first save after a clean map first saves the map unclean
    (:meth:`arm`); :meth:`sync` (before each fsync of the live file, and at
    unmount) makes the data durable and then saves the map clean. A map
    found unclean at the next start is a snapshot that a crash may have torn:
    it is reported lost, never read.
    """

    def __init__(self, live: _Live, index: int, path: str, key: tuple[int, int], size: int,
                 block_size: int, data_fd: int, bits: Bitmap) -> None:
        self.live = live
        self.index = index
        self.path = path
        self.key = key
        self.size = size
        self.block_size = block_size
        self.nblocks = -(-size // block_size)
        self.data_fd = data_fd
        self.bits = bits
        #: the map on disk is unclean: saving blocks may go ahead
        self.armed = False
        #: held by every save that runs on a worker thread, and by aclose
        self.lock = trio.Lock()
        self._own_fd: int | None = None  #: our descriptor of the live file, if opened

    # -- the write path (vdisk.Guard) ---------------------------------------------------

    def _span(self, offset: int, length: int) -> range:
        end = min(offset + length, self.size)
        if offset >= end:
            return range(0)
        return range(offset // self.block_size, -(-end // self.block_size))

    def _needs(self, offset: int, length: int) -> bool:
        if self.bits.count >= self.nblocks:
            return False
        return any(not self.bits.test(k) for k in self._span(offset, length))

    def ready(self, offset: int, length: int) -> bool:
        return self.armed or self.live.lost is not None or not self._needs(offset, length)

    async def arm(self) -> None:
        async with self.lock:
            if self.armed or self.live.lost is not None:
                return
            record = self._record(clean=False)
            try:
                await backing.run_blocking(self._write_map, record)
            except OSError as e:
                self.live.lose(f"its map {self._map_name()} cannot be saved: {e.strerror or e}")
                return
            self.armed = True

    def preserve(self, fd: int, offset: int, length: int) -> None:
        if self.live.lost is not None:
            return
        for blockno in self._span(offset, length):
            if self.bits.test(blockno):
                continue
            if not self.armed:  # vdisk's loop waits for ready(): a bug if it did not
                self.live.lose("a change reached it before its map was armed")
                return
            start = blockno * self.block_size
            n = min(self.block_size, self.size - start)
            try:
                data = backing.pread(fd, n, start)
                if data.count(0) != len(data):  # a zero block stays a hole of the copy
                    backing.pwrite_all(self.data_fd, data, start)
            except OSError as e:
                self.live.lose(f"saving a block of {self.path or self.live.entry.name} "
                               f"failed: {e.strerror or e}")
                return
            self.bits.mark(blockno)
            failpoint("cbw-saved")  # a test's kill -9 between a save and its overwrite

    async def write_initial(self) -> None:
        """The first map, while the snapshot is being made (before its manifest)."""
        async with self.lock:
            if not self.armed and self.live.lost is None:
                await backing.run_blocking(self._write_map, self._record(clean=True))

    async def sync(self) -> None:
        async with self.lock:
            if not self.armed or self.live.lost is not None:
                return
            # no await between the record and disarming: a block saved after this
            # re-arms (after this clean save, the lock orders them) before it is saved
            record = self._record(clean=True)
            self.armed = False
            try:
                await backing.run_blocking(os.fdatasync, self.data_fd)
                await backing.run_blocking(self._write_map, record)
            except OSError as e:
                self.live.lose(f"its saved blocks cannot be made durable: {e.strerror or e}")

    async def save_all(self, fd: int) -> None:
        piece = max(1, SAVE_ALL_PIECE // self.block_size)
        for blockno in range(0, self.nblocks, piece):
            span = (blockno * self.block_size, piece * self.block_size)
            while not self.ready(*span):
                await self.arm()
            self.preserve(fd, *span)  # no await between ready() and it
            await trio.lowlevel.checkpoint()  # the loop serves others between pieces
        await self.sync()
        self.live.snapshots.files.remove_guard(self.key, self)
        if self.live.lost is None:
            log.info("snapshot %s holds all of %r now (its live file is going)",
                     self.live.dir_name, self.path or self.live.entry.name)

    @property
    def complete(self) -> bool:
        """Every block is saved: the live file is not needed any more."""
        return self.bits.count >= self.nblocks

    def rekey(self, key: tuple[int, int]) -> None:
        self.key = key
        if self._own_fd is not None:  # the old self of a relocated file
            os.close(self._own_fd)
            self._own_fd = None

    # -- the view -----------------------------------------------------------------------

    def live_fd(self) -> int:
        """A descriptor of the live file (the data path's, or our own)."""
        fd = self.live.snapshots.files.fd_of(self.key)
        if fd is not None:
            return fd
        if self._own_fd is None:
            self._own_fd = _open_live(self.live.entry, self.path, self.key)
        return self._own_fd

    def pread(self, length: int, offset: int) -> bytes:
        if self.live.lost is not None:
            raise OSError(errno.EIO, f"snapshot lost: {self.live.lost}")
        end = min(offset + length, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            blockno = pos // self.block_size
            saved = self.bits.test(blockno)
            stop = blockno + 1  # a run of blocks of one kind: one pread
            while stop * self.block_size < end and self.bits.test(stop) == saved:
                stop += 1
            upto = min(end, stop * self.block_size)
            fd = self.data_fd if saved else self.live_fd()
            data = backing.pread(fd, upto - pos, pos)
            out += data + bytes(upto - pos - len(data))
            pos = upto
        return bytes(out)

    def extents(self) -> list[tuple[int, int]]:
        """A superset of the allocated ranges: the copy's and the live file's, merged."""
        found = backing.data_extents(self.data_fd)
        if not self.complete:
            found = sorted(found + backing.data_extents(self.live_fd()))
        merged: list[tuple[int, int]] = []
        for start, length in found:
            end = min(start + length, self.size)
            if start >= end:
                continue
            if merged and start <= merged[-1][0] + merged[-1][1]:
                last_start, last_length = merged[-1]
                merged[-1] = (last_start, max(last_start + last_length, end) - last_start)
            else:
                merged.append((start, end - start))
        return merged

    # -- the map ------------------------------------------------------------------------

    def _map_name(self) -> str:
        return f"{CBW_MAP}-{self.index}"

    def _record(self, clean: bool) -> dict[str, Any]:
        return {"path": self.path, "key": list(self.key), "size": self.size,
                "block_size": self.block_size, "clean": clean, "saved": self.bits.to_record()}

    def _write_map(self, record: dict[str, Any]) -> None:
        """Atomically replace the map. Blocking."""
        data = metadata.encode_record(CBW_KIND, record)
        dir_fd = self.live.dir_fd
        tmp = f".{self._map_name()}.tmp"
        fd = backing.open_at(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            backing.pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._map_name(), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        backing.fsync_dir(dir_fd)

    def close_blocking(self) -> None:
        """At unmount: make the saved blocks durable and the map clean. Blocking."""
        if self.live.lost is not None:
            return
        try:
            os.fdatasync(self.data_fd)
            self._write_map(self._record(clean=True))
            self.armed = False
        except OSError as e:
            log.warning("snapshot %s: map of %r not saved clean at unmount (%s): it will be "
                        "reported lost", self.live.dir_name, self.path, e.strerror or e)

    def close(self) -> None:
        if self.data_fd >= 0:
            os.close(self.data_fd)
            self.data_fd = -1
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None


def _open_live(entry: Entry, path: str, key: tuple[int, int]) -> int:
    """The live file of *entry* that is the object *key*, read-only: at *path*, or
    wherever a rename inside the entry took it (the entry is searched). Blocking."""
    parts = [entry.name, *(p for p in path.split("/") if p)]
    try:
        path_fd = backing.open_parts(entry.store.root_fd, parts)
    except OSError:
        path_fd = -1
    if path_fd >= 0:
        try:
            st = backing.fstat(path_fd)
            if (st.st_dev, st.st_ino) == key and stat.S_ISREG(st.st_mode):
                return backing.reopen(path_fd, os.O_RDONLY)
        finally:
            backing.close(path_fd)
    entry_fd = backing.open_path(entry.store.root_fd, entry.name)
    try:
        if stat.S_ISDIR(backing.fstat(entry_fd).st_mode):
            for _parts, fd, st in walk(entry_fd):
                if (st.st_dev, st.st_ino) == key and stat.S_ISREG(st.st_mode):
                    return backing.reopen(fd, os.O_RDONLY)
    finally:
        backing.close(entry_fd)
    raise OSError(errno.EIO, f"the live file {'/'.join(parts)} is gone or was replaced")


def _space(snapshot_dir: str) -> int:
    """Bytes the snapshot's own files allocate on its store (for a reflink
    snapshot, extents still shared with the live file count too). Blocking."""
    total = 0
    for root, dirs, names in os.walk(snapshot_dir):
        for name in (*dirs, *names):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


class Snapshots:
    """The daemon's snapshot service: create, list, delete, and the copy-before-write
    guards of the snapshots on stores that cannot clone (:meth:`load` at start,
    :meth:`close` at unmount)."""

    def __init__(self, datastore: Datastore, files: OpenFiles) -> None:
        self.datastore = datastore
        self.files = files
        #: (store, snapshot directory name) → its copy-before-write state
        self.live: dict[tuple[str, str], _Live] = {}
        #: told the ``ENTRY@NAME`` of each snapshot deleted (the mount's view forgets it)
        self.on_deleted: Callable[[str], None] | None = None
        _SERVICES[datastore] = self
        self._pass_done = trio.Event()

    async def wait_synced(self) -> None:
        """Wait until the periodic sync's next pass is over."""
        await self._pass_done.wait()

    async def run(self, *, sync_interval_s: float = SYNC_INTERVAL_S,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sync every armed guard every *sync_interval_s* (a service of the daemon's
        nursery): a guest that never fsyncs still gets its snapshots' saved
        blocks durable and their maps clean."""
        task_status.started()
        while True:
            await trio.sleep(sync_interval_s)
            for live in list(self.live.values()):
                for guard in list(live.guards.values()):
                    if guard.armed:
                        await guard.sync()
            self._pass_done.set()
            self._pass_done = trio.Event()

    def load(self) -> None:
        """Guard the files of every copy-before-write snapshot found intact, and mark
        lost the ones a crash may have torn. Blocking; call it before the mount
        serves (a write before it would not be saved)."""
        for snapshot in self.list():
            if snapshot.state != "ok" or not any(
                    f.get("method") == CBW for f in snapshot.files.values()):
                continue
            store = self.datastore.stores[snapshot.store]
            entry = self.datastore.entries.get(snapshot.entry)
            dir_name = os.path.basename(snapshot.path)
            snaps_fd = _snapshots_fd(store, create=False)
            assert snaps_fd is not None
            try:
                dir_fd = backing.open_path(snaps_fd, dir_name)
            finally:
                backing.close(snaps_fd)
            live = _Live(self, entry, dir_name, dir_fd) if entry is not None else None
            if live is None:
                _write_lost(dir_fd, f"its entry {snapshot.entry!r} is gone")
                backing.close(dir_fd)
                continue
            try:
                for path, record in sorted(snapshot.files.items()):
                    if record.get("method") == CBW:
                        live.guards[path] = self._reload(live, path, record)
            except _Torn as e:
                for guard in live.guards.values():
                    guard.close()
                live.guards.clear()
                live.lost = str(e)
                _write_lost(dir_fd, str(e))
                log.error("snapshot %s@%s is lost: %s", snapshot.entry, snapshot.name, e)
                live.close()
                continue
            self._attach(store, live)

    def _reload(self, live: _Live, path: str, record: dict[str, Any]) -> CbwGuard:
        index = int(record["cbw"])
        name = f"{CBW_MAP}-{index}"
        try:
            fd = backing.open_at(live.dir_fd, name, os.O_RDONLY)
            try:
                data = backing.pread(fd, 1 << 30, 0)
            finally:
                os.close(fd)
            body = metadata.decode_record(CBW_KIND, data, name)
            bits = Bitmap.from_record(body["saved"])
            key = (int(body["key"][0]), int(body["key"][1]))
        except (OSError, ValueError, KeyError, TypeError, FusediskError) as e:
            raise _Torn(f"the map of {path or live.entry.name} is unreadable ({e})") from None
        if not body.get("clean"):
            raise _Torn(f"a crash interrupted copy-before-write of {path or live.entry.name}")
        size, block_size = int(body["size"]), int(body["block_size"])
        if bits.count < -(-size // block_size):  # not complete: the live file holds the rest
            try:
                os.close(_open_live(live.entry, path, key))
            except OSError as e:
                raise _Torn(e.strerror or str(e)) from None
        parts = [TREE, *(p for p in path.split("/") if p)]
        data_path = backing.open_parts(live.dir_fd, parts)
        try:
            data_fd = backing.reopen(data_path, os.O_RDWR)
        finally:
            backing.close(data_path)
        return CbwGuard(live, index, path, key, size, block_size, data_fd, bits)

    def _attach(self, store: Store, live: _Live) -> None:
        self.live[(store.name, live.dir_name)] = live
        for guard in live.guards.values():
            if not guard.complete:
                self.files.add_guard(guard.key, guard)

    def close(self) -> None:
        """At unmount, after the last write: every guard's map saved clean. Blocking."""
        for live in self.live.values():
            for guard in live.guards.values():
                guard.close_blocking()
            live.close()
        self.live.clear()
        _SERVICES.pop(self.datastore, None)

    def statistics(self) -> dict[str, Any]:
        """For ``status``: how many snapshots, which are lost, and their space."""
        snapshots = self.list()
        return {
            "count": len(snapshots),
            "lost": [f"{s.entry}@{s.name}: {s.lost}" for s in snapshots if s.state == "lost"],
            "incomplete": sum(s.state == "incomplete" for s in snapshots),
            "space_bytes": sum(s.space_bytes for s in snapshots),
            "saved_bytes": sum(s.saved_bytes for s in snapshots),
            #: files whose changes are still copied before they are written
            "guarded_files": sum(not g.complete for live in self.live.values()
                                 if live.lost is None for g in live.guards.values()),
        }

    def guard(self, store: str, dir_name: str, path: str) -> CbwGuard:
        live = self.live.get((store, dir_name))
        if live is None or path not in live.guards:
            raise SnapshotError(f"snapshot {dir_name} is not guarded by this daemon")
        if live.lost is not None:
            raise SnapshotError(f"snapshot {dir_name} is lost: {live.lost}")
        return live.guards[path]

    async def create(self, entry: Entry, name: str) -> Snapshot:
        check_name(name)
        if self.datastore.relocating(entry.name):
            raise SnapshotError(f"{entry.name!r} is being relocated; snapshot it afterwards")
        store = entry.store
        if any(s.entry == entry.name and s.name == name for s in self.list(entry.name)):
            raise SnapshotError(f"{entry.name!r} already has a snapshot named {name!r}")
        snaps_fd = _snapshots_fd(store, create=True)
        assert snaps_fd is not None
        final = _dir_name(entry.name, name)
        temp = f".tmp-{final}-{os.getpid()}"
        live: _Live | None = None
        try:
            backing.remove_tree(snaps_fd, temp)
            backing.mkdir_at(snaps_fd, temp, 0o700)
            temp_fd = backing.open_path(snaps_fd, temp)
            try:
                files, pause_ms, live = await self._take(entry, temp_fd, temp)
                if live is not None:
                    for guard in live.guards.values():
                        await guard.write_initial()
                manifest = {"entry": entry.name, "created": time.time(), "files": files}
                data = json.dumps(manifest, sort_keys=True).encode()
                fd = backing.open_at(temp_fd, MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    backing.pwrite_all(fd, data, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                await backing.run_blocking(_fsync_tree, temp_fd)
            finally:
                backing.close(temp_fd)
            backing.renameat2(snaps_fd, temp, snaps_fd, final, backing.RENAME_NOREPLACE)
            backing.fsync_dir(snaps_fd)
        except BaseException:
            if live is not None:
                await live.aclose()
            backing.remove_tree(snaps_fd, temp)
            raise
        finally:
            backing.close(snaps_fd)
        if live is not None:
            live.dir_name = final
            self.live[(store.name, final)] = live
        log.info("snapshot %s@%s made on store %r in a %.1f ms pause (%d files)",
                 entry.name, name, store.name, pause_ms, len(files))
        snapshot = self._overlay(self.read(store, final))
        assert snapshot is not None
        return dataclasses.replace(snapshot, pause_ms=pause_ms)

    async def _take(
        self, entry: Entry, into_fd: int, dir_name: str
    ) -> tuple[dict[str, dict[str, object]], float, _Live | None]:
        """Inside one closed gate: clone the entry's tree, checkpoint every file,
        and guard the files that could not be cloned."""
        src_fd = backing.open_path(entry.store.root_fd, entry.name)
        gate = entry.gate
        found: list[tuple[tuple[str, ...], tuple[int, int], str]] = []
        files: dict[str, dict[str, object]] = {}
        live: _Live | None = None
        await gate.close_and_drain()
        started = time.monotonic()
        try:
            st = backing.fstat(src_fd)
            # off the trio thread: a clone writes back the file's dirty pages first
            await backing.run_blocking(_copy_tree, entry, src_fd, st, into_fd, TREE, (),
                                       _Cloning(into_fd, found, {}))
            for rel, key, method in found:
                change_id = None
                size = 0
                path_fd = backing.open_parts(src_fd, rel)
                try:
                    mtime_ns = backing.fstat(path_fd).st_mtime_ns
                    vfile = self.files.open(path_fd, key, gate)
                    try:
                        if vfile.tracker is not None:
                            change_id = await vfile.tracker.checkpoint()
                        size = vfile.size()
                    finally:
                        self.files.release(vfile)
                finally:
                    backing.close(path_fd)
                path = "/".join(rel)
                record: dict[str, object] = {"change_id": change_id, "size": size,
                                             "method": method}
                if method == CBW:
                    # the copy's own mtime moves with every block its guard saves:
                    # the view shows this one (snapview.py)
                    record["mtime_ns"] = mtime_ns
                    if live is None:
                        live = _Live(self, entry, dir_name, os.dup(into_fd))
                    index = len(live.guards)
                    record.update(cbw=index, block_size=self.files.block_size)
                    live.guards[path] = self._guard_new(live, index, path, rel, key, size)
                files[path] = record
            if live is not None:  # no await from here to the gate's opening
                for guard in live.guards.values():
                    self.files.add_guard(guard.key, guard)
        except BaseException:
            if live is not None:
                live.close()
            raise
        finally:
            pause_ms = (time.monotonic() - started) * 1000
            gate.open()
            backing.close(src_fd)
        return files, round(pause_ms, 2), live

    def _guard_new(self, live: _Live, index: int, path: str, rel: tuple[str, ...],
                   key: tuple[int, int], size: int) -> CbwGuard:
        data_path = backing.open_parts(live.dir_fd, (TREE, *rel))
        try:
            data_fd = backing.reopen(data_path, os.O_RDWR)
        finally:
            backing.close(data_path)
        try:
            if backing.fstat(data_fd).st_size != size:
                backing.ftruncate(data_fd, size)
        except BaseException:
            os.close(data_fd)
            raise
        return CbwGuard(live, index, path, key, size, self.files.block_size, data_fd, Bitmap())

    def list(self, entry: str | None = None) -> list[Snapshot]:
        out = []
        for store in self.datastore.stores.values():
            snaps_fd = _snapshots_fd(store, create=False)
            if snaps_fd is None:
                continue
            try:
                for name in sorted(backing.list_dir(snaps_fd)):
                    snapshot = self._overlay(self.read(store, name))
                    if snapshot is not None and entry in (None, snapshot.entry):
                        out.append(snapshot)
            finally:
                backing.close(snaps_fd)
        return out

    def _overlay(self, snapshot: Snapshot | None) -> Snapshot | None:
        """*snapshot* as read from its store, with what only the daemon knows."""
        if snapshot is None:
            return None
        live = self.live.get((snapshot.store, os.path.basename(snapshot.path)))
        if live is None:
            return snapshot
        saved = sum(g.bits.count * g.block_size for g in live.guards.values())
        if live.lost is not None:
            return dataclasses.replace(snapshot, state="lost", lost=live.lost, saved_bytes=saved)
        return dataclasses.replace(snapshot, saved_bytes=saved)

    @staticmethod
    def read(store: Store, dir_name: str) -> Snapshot | None:
        path = store.path / SNAPSHOT_DIR / dir_name
        incomplete = dir_name.startswith(".tmp-")
        shown = dir_name[len(".tmp-"):].rsplit("-", 1)[0] if incomplete else dir_name
        entry, sep, name = shown.rpartition("@")
        if not sep:
            return None
        try:
            with open(path / MANIFEST, "rb") as f:
                manifest = json.loads(f.read())
            files = dict(manifest["files"])
            created = float(manifest["created"])
        except (OSError, ValueError, KeyError, TypeError):
            return Snapshot(entry, name, store.name, str(path), None, {}, "incomplete")
        if incomplete:
            return Snapshot(entry, name, store.name, str(path), None, {}, "incomplete")
        space = _space(str(path))
        try:
            with open(path / LOST, "rb") as f:
                lost = f.read().decode(errors="replace") or "lost"
            return Snapshot(entry, name, store.name, str(path), created, files, "lost",
                            lost=lost, space_bytes=space)
        except FileNotFoundError:
            pass
        except OSError as e:
            return Snapshot(entry, name, store.name, str(path), created, files, "lost",
                            lost=f"its state cannot be read: {e.strerror}", space_bytes=space)
        return Snapshot(entry, name, store.name, str(path), created, files, "ok",
                        space_bytes=space)

    async def delete(self, entry: str, name: str) -> Snapshot:
        for snapshot in self.list(entry):
            if snapshot.name == name:
                store = self.datastore.stores[snapshot.store]
                dir_name = os.path.basename(snapshot.path)
                live = self.live.pop((store.name, dir_name), None)
                if live is not None:
                    await live.aclose()
                snaps_fd = _snapshots_fd(store, create=False)
                assert snaps_fd is not None
                try:
                    backing.remove_tree(snaps_fd, dir_name)
                    backing.fsync_dir(snaps_fd)
                finally:
                    backing.close(snaps_fd)
                if self.on_deleted is not None:
                    self.on_deleted(dir_name)
                return snapshot
        raise SnapshotError(f"{entry!r} has no snapshot named {name!r}")


class SnapshotFile:
    """One regular file of a snapshot, read-only: the one way the ``.snapshots``
    view and the NBD export read a snapshot (see :func:`open_file`).

    ``pread`` and ``extents`` are plain ``def`` s that run their syscalls on
    the caller's thread; on the daemon call them on the trio thread (as
    ``VFile.read``): a copy-before-write snapshot's view is then exact with
    respect to the guest's writes, which run there too.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        #: the file's size at the snapshot's instant (bytes)
        self.size = size

    def pread(self, length: int, offset: int) -> bytes:
        """Up to *length* bytes at *offset* (short only at the end of the file)."""
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        data = backing.pread(self._fd, length, offset)
        return data + bytes(length - len(data))

    def extents(self) -> list[tuple[int, int]]:
        """The allocated ranges ``(offset, length)``, sorted, disjoint; reading
        outside them gives zeros. Blocking: it walks the whole file."""
        return [(o, min(n, self.size - o)) for o, n in backing.data_extents(self._fd)
                if o < self.size]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CbwFile(SnapshotFile):
    """A copy-before-write file of a snapshot: the saved blocks, the live file elsewhere."""

    def __init__(self, guard: CbwGuard) -> None:
        super().__init__(-1, guard.size)
        self._guard: CbwGuard | None = guard

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        if self._guard is None:
            raise OSError(errno.EBADF, "snapshot file closed")
        return self._guard.pread(length, offset)

    def extents(self) -> list[tuple[int, int]]:
        if self._guard is None:
            raise OSError(errno.EBADF, "snapshot file closed")
        return self._guard.extents()

    def close(self) -> None:
        self._guard = None


def open_file(datastore: Datastore, entry: str, name: str, path: str) -> SnapshotFile:
    """Open regular file *path* (inside the entry, ``/``-separated; ``""`` for an
    entry that is one file) of snapshot *entry*@*name*, read-only.

    Raises :class:`SnapshotError` for an unknown or incomplete snapshot and
    ``FileNotFoundError`` for a path it does not hold as a regular file.
    Blocking (a few syscalls). The caller closes the result.
    """
    snapshot = _find(datastore, entry, name)
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise FileNotFoundError(errno.ENOENT, f"no file {path!r} in {entry}@{name}")
    record = snapshot.files.get("/".join(parts))
    if record is None:
        raise FileNotFoundError(errno.ENOENT, f"no file {path!r} in {entry}@{name}")
    if record.get("method") == CBW:
        service = _SERVICES.get(datastore)
        if service is None:
            raise SnapshotError(f"snapshot {entry}@{name} is copy-before-write: only the "
                                "daemon serving it can read it")
        return _CbwFile(service.guard(snapshot.store, os.path.basename(snapshot.path),
                                      "/".join(parts)))
    store = datastore.stores[snapshot.store]
    snaps_fd = _snapshots_fd(store, create=False)
    if snaps_fd is None:
        raise SnapshotError(f"snapshot {entry}@{name} is gone")
    try:
        path_fd = backing.open_parts(snaps_fd, [os.path.basename(snapshot.path), TREE, *parts])
    finally:
        backing.close(snaps_fd)
    try:
        fd = backing.reopen(path_fd, os.O_RDONLY)
    finally:
        backing.close(path_fd)
    size = record.get("size")
    return SnapshotFile(fd, int(size) if isinstance(size, int) else os.fstat(fd).st_size)


def _find(datastore: Datastore, entry: str, name: str) -> Snapshot:
    for store in datastore.stores.values():
        snapshot = Snapshots.read(store, _dir_name(entry, name))
        if snapshot is not None and snapshot.state == "lost":
            raise SnapshotError(f"snapshot {entry}@{name} is lost: {snapshot.lost}")
        if snapshot is not None and snapshot.state == "ok":
            return snapshot
    raise SnapshotError(f"{entry!r} has no snapshot named {name!r}")


def _fsync_tree(dir_fd: int) -> None:
    """fsync every file and directory below *dir_fd*, then *dir_fd*."""
    for _parts, fd, st in walk(dir_fd):
        if stat.S_ISREG(st.st_mode):
            real = backing.reopen(fd, os.O_RDONLY)
            try:
                os.fsync(real)
            finally:
                os.close(real)
        elif stat.S_ISDIR(st.st_mode):
            backing.fsync_dir(fd)
    backing.fsync_dir(dir_fd)
