"""Point-in-time snapshots of an entry: every file at one instant, each with a change id.

A snapshot is made with the entry's gate closed (no request that changes
the entry runs), so all of a VM's disks and files are taken at the same
instant (crash-consistent across disks), and each regular file gets a new
CBT change id at exactly that instant: ``cbt changes --since A --until B``
between two snapshots' ids is exact. Files are cloned with ``FICLONE``
(reflinks: XFS, btrfs), which costs metadata only, so the pause is short
and the guest's later writes never touch the snapshot; a store whose
filesystem cannot clone (ext4) is refused with one line (copy-before-write
is not built yet).

Layout, on the entry's store::

    .fusedisk-snapshots/ENTRY@NAME/tree       the entry (its directory, or its file)
    .fusedisk-snapshots/ENTRY@NAME/manifest   JSON: entry, name, created, files
                                               (path → change id, size)

The name starts with the datastore's reserved prefix, so the mount never
serves it as an entry and a relocation never copies it: a snapshot stays on
the store it was made on and stays valid when its entry moves (its blocks
are its own). A snapshot is built under a temporary name and renamed into
place after its manifest is fsynced; one left without a manifest by a crash
is listed as ``incomplete`` (never as a snapshot) until deleted.
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
from collections.abc import Callable
from dataclasses import dataclass

from . import backing
from .api import SNAPSHOT_NAME
from .datastore import Datastore, Entry, Store
from .errors import FusediskError
from .mirror import children, walk
from .vdisk import OpenFiles

log = logging.getLogger(__name__)

SNAPSHOT_DIR = ".fusedisk-snapshots"
TREE = "tree"
MANIFEST = "manifest"
_FICLONE = 0x40049409


class SnapshotError(FusediskError):
    """A snapshot request was refused or failed; nothing half-made is left."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    entry: str
    name: str
    store: str
    path: str  #: the snapshot's directory on its store
    created: float | None  #: Unix time; None when incomplete
    files: dict[str, dict[str, object]]  #: path in the entry → change_id, size
    state: str  #: "ok", or "incomplete" (a crash interrupted its creation)
    pause_ms: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"entry": self.entry, "name": self.name, "store": self.store,
                "path": self.path, "created": self.created, "files": self.files,
                "state": self.state, "pause_ms": self.pause_ms}


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
    #: each regular file's path and key
    found: list[tuple[tuple[str, ...], tuple[int, int]]]
    #: the first path cloned of each object with several names, so the others link to it
    linked: dict[tuple[int, int], tuple[str, ...]]


def _copy_tree(entry: Entry, src_fd: int, st: os.stat_result, dst_dir_fd: int, name: str,
               rel: tuple[str, ...], cloning: _Cloning) -> None:
    """Clone the object *src_fd* as *name* in *dst_dir_fd* (directories: recursively);
    names of one object stay names of one object. Blocking: run on a worker thread."""
    mode = st.st_mode
    key = (st.st_dev, st.st_ino)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        first = cloning.linked.get(key)
        if first is not None:
            parent_fd = backing.open_parts(cloning.into_fd, (TREE, *first[:-1]))
            try:
                backing.link_at(parent_fd, first[-1], dst_dir_fd, name)
            finally:
                backing.close(parent_fd)
            if stat.S_ISREG(mode):
                cloning.found.append((rel, key))
            return
        cloning.linked[key] = rel
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
            try:
                try:
                    _clone(src, dst)
                except OSError as e:
                    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL):
                        raise SnapshotError(
                            f"store {entry.store.name!r} cannot clone files (reflinks; its "
                            "filesystem is not XFS or btrfs): snapshots need reflinks"
                        ) from None
                    raise
            finally:
                os.close(dst)
        finally:
            os.close(src)
        cloning.found.append((rel, key))
    elif stat.S_ISLNK(mode):
        backing.symlink_at(dst_dir_fd, name, backing.readlink(src_fd))
    else:
        backing.mknod_at(dst_dir_fd, name, mode, st.st_rdev)
    if not stat.S_ISLNK(mode):
        child = backing.open_path(dst_dir_fd, name)
        try:
            backing.copy_attributes(src_fd, child, st)
        finally:
            backing.close(child)


class Snapshots:
    """The daemon's snapshot service: create, list, delete."""

    def __init__(self, datastore: Datastore, files: OpenFiles,
                 deleted: Callable[[str], None] | None = None) -> None:
        self.datastore = datastore
        self.files = files
        #: told the ``ENTRY@NAME`` of each snapshot deleted (the mount's view forgets it)
        self._deleted = deleted

    async def create(self, entry: Entry, name: str) -> Snapshot:
        check_name(name)
        if entry.relocating:
            raise SnapshotError(f"{entry.name!r} is being relocated; snapshot it afterwards")
        store = entry.store
        if any(s.entry == entry.name and s.name == name for s in self.list(entry.name)):
            raise SnapshotError(f"{entry.name!r} already has a snapshot named {name!r}")
        snaps_fd = _snapshots_fd(store, create=True)
        assert snaps_fd is not None
        final = _dir_name(entry.name, name)
        temp = f".tmp-{final}-{os.getpid()}"
        try:
            backing.remove_tree(snaps_fd, temp)
            backing.mkdir_at(snaps_fd, temp, 0o700)
            temp_fd = backing.open_path(snaps_fd, temp)
            try:
                files, pause_ms = await self._take(entry, temp_fd)
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
            backing.remove_tree(snaps_fd, temp)
            raise
        finally:
            backing.close(snaps_fd)
        log.info("snapshot %s@%s made on store %r in a %.1f ms pause (%d files)",
                 entry.name, name, store.name, pause_ms, len(files))
        snapshot = _read(store, final)
        assert snapshot is not None
        return dataclasses.replace(snapshot, pause_ms=pause_ms)

    async def _take(
        self, entry: Entry, into_fd: int
    ) -> tuple[dict[str, dict[str, object]], float]:
        """Inside one closed gate: clone the entry's tree and checkpoint every file."""
        src_fd = backing.open_path(entry.store.root_fd, entry.name)
        gate = entry.gate
        found: list[tuple[tuple[str, ...], tuple[int, int]]] = []
        files: dict[str, dict[str, object]] = {}
        await gate.close_and_drain()
        started = time.monotonic()
        try:
            st = backing.fstat(src_fd)
            # off the trio thread: a clone writes back the file's dirty pages first
            await backing.run_blocking(_copy_tree, entry, src_fd, st, into_fd, TREE, (),
                                       _Cloning(into_fd, found, {}))
            for rel, key in found:
                change_id = None
                size = 0
                path_fd = backing.open_parts(src_fd, rel)
                try:
                    vfile = self.files.open(path_fd, key, gate)
                    try:
                        if vfile.tracker is not None:
                            change_id = await vfile.tracker.checkpoint()
                        size = vfile.size()
                    finally:
                        self.files.release(vfile)
                finally:
                    backing.close(path_fd)
                files["/".join(rel)] = {"change_id": change_id, "size": size}
        finally:
            pause_ms = (time.monotonic() - started) * 1000
            gate.open()
            backing.close(src_fd)
        return files, round(pause_ms, 2)

    def list(self, entry: str | None = None) -> list[Snapshot]:
        return list_snapshots(self.datastore, entry)

    def delete(self, entry: str, name: str) -> Snapshot:
        for snapshot in self.list(entry):
            if snapshot.name == name:
                store = self.datastore.stores[snapshot.store]
                snaps_fd = _snapshots_fd(store, create=False)
                assert snaps_fd is not None
                try:
                    dir_name = os.path.basename(snapshot.path)
                    backing.remove_tree(snaps_fd, dir_name)
                    backing.fsync_dir(snaps_fd)
                finally:
                    backing.close(snaps_fd)
                if self._deleted is not None:
                    self._deleted(_dir_name(snapshot.entry, snapshot.name))
                return snapshot
        raise SnapshotError(f"{entry!r} has no snapshot named {name!r}")


def list_snapshots(datastore: Datastore, entry: str | None = None) -> list[Snapshot]:
    """Every snapshot on the datastore's stores (of *entry* only, if given), with
    those a crash left incomplete."""
    out = []
    for store in datastore.stores.values():
        snaps_fd = _snapshots_fd(store, create=False)
        if snaps_fd is None:
            continue
        try:
            for name in sorted(backing.list_dir(snaps_fd)):
                snapshot = _read(store, name)
                if snapshot is not None and entry in (None, snapshot.entry):
                    out.append(snapshot)
        finally:
            backing.close(snaps_fd)
    return out


def _read(store: Store, dir_name: str) -> Snapshot | None:
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
    return Snapshot(entry, name, store.name, str(path), created, files, "ok")


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
