"""The read-only view of every snapshot, under ``MNT/.snapshots``.

``MNT/.snapshots/ENTRY@NAME/...`` is the entry as it was at the snapshot's
instant: names, hard links, modes, owners, times, xattrs and data, so
``cp -a``, ``rsync``, ``qemu-img convert``, restic or borg read a point in
time with no fusedisk-specific code. Nothing in it can be changed: every
request that would gets ``EROFS`` (fs.py answers so for any inode number in
this view's range).

Hidden, as ZFS shows ``.zfs`` with ``snapdir=hidden``: the mount root's
``readdir`` does not list ``.snapshots``, so ``find MNT`` or ``cp -a MNT/``
do not walk every snapshot of every entry; a lookup by name works. The name
is reserved (no entry may be called so), and snapshots are never relocated
as data: they live on their store under the datastore's reserved prefix
(snapshots.py).

Identity. A node is a backing object of a snapshot's tree, known by its
``(st_dev, st_ino)`` (hard links in a snapshot share one node, so they share
one inode number, as they did in the entry). Numbers come from a range of
their own, above every number fs.py hands out. A node remembers one path
from its store's root and resolves it one component at a time (``O_PATH``,
no symlink followed) for each request: a snapshot never changes while it
exists, so a path names the same object for its whole life, and the view
holds no descriptor but those of open files. A node of a deleted snapshot
answers ``ESTALE``.

Data is read through snapshots.py's reader of a snapshot's file
(:func:`snapshots.open_file`): a reflink clone, or a copy-before-write
snapshot's saved blocks and the live file elsewhere. It runs on the trio
thread, as the guest's writes do, so a copy-before-write view is exact.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3

from . import backing
from .datastore import SNAPSHOT_VIEW_NAME, Datastore, Store
from .snapshots import SNAPSHOT_DIR, TREE, Snapshot, SnapshotError, SnapshotFile, open_file

#: The name of the view under the mount root.
VIEW_NAME = SNAPSHOT_VIEW_NAME
VIEW_NAME_B = VIEW_NAME.encode()
#: Inode numbers of the view: ``[VIEW_BASE, 2**63)``. fs.py's own numbers stay
#: below (store numbers ``store_id << 48 | st_ino``, private ones ``2**62 | 61 bits``).
VIEW_BASE = (1 << 62) | (1 << 61)
#: The view's own directory.
VIEW_ROOT = VIEW_BASE
#: File and directory handles of the view: ``[FH_BASE, 2**61)``; fs.py counts from 1.
FH_BASE = 1 << 60
_FH_END = 1 << 61
_ATTR_TIMEOUT_S = 1.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def owns(ino: int) -> bool:
    """Whether inode number *ino* belongs to the view."""
    return ino >= VIEW_BASE


def owns_handle(fh: int) -> bool:
    """Whether FUSE handle *fh* (file or directory) belongs to the view."""
    return FH_BASE <= fh < _FH_END


def read_only() -> OSError:
    return OSError(errno.EROFS, "snapshots are read-only")


@dataclass(eq=False, slots=True)
class _Node:
    ino: int
    store: Store | None  #: None for the view's own directory
    parts: tuple[str, ...]  #: from the store's root: SNAPSHOT_DIR, ENTRY@NAME, TREE, ...
    key: tuple[int, int]
    file_type: int
    #: the snapshot it belongs to (None for the view's own directory)
    snapshot: Snapshot | None = None
    lookups: int = 0
    handles: int = 0
    #: while open: one reader for every handle (it outlives the snapshot's
    #: deletion, as an open file outlives its unlink), its attributes at open,
    #: and its allocated ranges (for SEEK_DATA/SEEK_HOLE: a snapshot never changes)
    file: SnapshotFile | None = None
    opened_st: os.stat_result | None = None
    extents: list[tuple[int, int]] | None = None


@dataclass(eq=False, slots=True)
class _Dir:
    node: _Node
    names: list[str] | None = None



class SnapshotView:
    """The nodes and handles of ``MNT/.snapshots``; fs.py passes it every request
    on a number or handle in its ranges (:func:`owns`, :func:`owns_handle`)."""

    def __init__(self, datastore: Datastore, listing: Callable[[], list[Snapshot]],
                 private_xattr_prefix: bytes) -> None:
        self.datastore = datastore
        self._listing = listing
        self._private = private_xattr_prefix
        self._root = _Node(VIEW_ROOT, None, (), (-1, -1), stat.S_IFDIR)
        self._root_time_ns = time.time_ns()
        self._nodes: dict[int, _Node] = {VIEW_ROOT: self._root}
        self._by_key: dict[tuple[int, int], _Node] = {}
        self._next_ino = VIEW_BASE + 1
        self._files: dict[int, _Node] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = FH_BASE

    # -- nodes -------------------------------------------------------------------------

    def _node(self, ino: int) -> _Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, "no longer known") from None

    def _open_path(self, node: _Node) -> int:
        assert node.store is not None
        try:
            return backing.open_parts(node.store.root_fd, node.parts)
        except FileNotFoundError:
            raise OSError(errno.ESTALE, "its snapshot was deleted") from None

    def _known(self, store: Store, parts: tuple[str, ...], st: os.stat_result,
               snapshot: Snapshot | None) -> _Node:
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is None:
            node = _Node(self._next_ino, store, parts, key, stat.S_IFMT(st.st_mode), snapshot)
            self._next_ino += 1
            self._nodes[node.ino] = node
            self._by_key[key] = node
        return node

    def _maybe_drop(self, node: _Node) -> None:
        if node.lookups <= 0 and node.handles == 0 and node is not self._root:
            del self._nodes[node.ino]
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]

    def _snapshots(self) -> dict[str, Snapshot]:
        return {f"{s.entry}@{s.name}": s for s in self._listing() if s.state == "ok"}

    def _child(self, parent: _Node, name: str, snapshots: dict[str, Snapshot] | None = None
               ) -> tuple[_Node, os.stat_result]:
        if parent is self._root:
            snapshot = (self._snapshots() if snapshots is None else snapshots).get(name)
            if snapshot is None:
                raise OSError(errno.ENOENT, "no such snapshot")
            store = self.datastore.stores[snapshot.store]
            parts: tuple[str, ...] = (SNAPSHOT_DIR, name, TREE)
        else:
            assert parent.store is not None
            store, snapshot = parent.store, parent.snapshot
            parts = (*parent.parts, name)
        path_fd = backing.open_parts(store.root_fd, parts)
        try:
            st = backing.fstat(path_fd)
        finally:
            backing.close(path_fd)
        return self._known(store, parts, st, snapshot), st

    def _attr(self, node: _Node, st: os.stat_result | None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.entry_timeout = _ATTR_TIMEOUT_S
        attr.attr_timeout = _ATTR_TIMEOUT_S
        if st is None:  # the view's own directory
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_blksize = 4096
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._root_time_ns
            return attr
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        if node.snapshot is not None and node.file_type == stat.S_IFREG:
            # a copy-before-write copy is written as the guest changes the live
            # file: its own mtime moves, the instant's is in the manifest
            record = node.snapshot.files.get("/".join(node.parts[3:]))
            mtime_ns = record.get("mtime_ns") if record is not None else None
            if isinstance(mtime_ns, int):
                attr.st_mtime_ns = mtime_ns
        return attr

    def _stat(self, node: _Node) -> os.stat_result | None:
        if node is self._root:
            return None
        try:
            path_fd = self._open_path(node)
        except OSError:
            if node.opened_st is None:
                raise
            return node.opened_st  # deleted while open: as it was
        try:
            return backing.fstat(path_fd)
        finally:
            backing.close(path_fd)

    # -- requests (fs.py turns OSError into the reply) -------------------------------------

    def lookup_root(self) -> pyfuse3.EntryAttributes:
        """``lookup(MNT, ".snapshots")``."""
        self._root.lookups += 1
        return self._attr(self._root, None)

    def lookup(self, parent_ino: int, name: bytes) -> tuple[pyfuse3.EntryAttributes, bool]:
        """A name in the view; the second value is True when it is ``..`` of the view's
        own directory (the mount root, which fs.py answers)."""
        parent = self._node(parent_ino)
        if parent.file_type != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b"..":
            if parent is self._root:
                return pyfuse3.EntryAttributes(), True
            if len(parent.parts) == 3:  # a snapshot's top: its parent is the view
                return self.lookup_root(), False
            assert parent.store is not None
            up = parent.parts[:-1]
            path_fd = backing.open_parts(parent.store.root_fd, up)
            try:
                st = backing.fstat(path_fd)
            finally:
                backing.close(path_fd)
            node = self._known(parent.store, up, st, parent.snapshot)
        else:
            node, st = self._child(parent, backing.check_name(name))
        node.lookups += 1
        return self._attr(node, st), False

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups -= count
            self._maybe_drop(node)

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self._node(ino)
        return self._attr(node, self._stat(node))

    def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        if node.file_type != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        path_fd = self._open_path(node)
        try:
            return backing.readlink(path_fd)
        finally:
            backing.close(path_fd)

    def _handle(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        if self._next_fh >= _FH_END:
            self._next_fh = FH_BASE
        return fh

    def open(self, ino: int, flags: int) -> int:
        node = self._node(ino)
        if flags & _WRITE_FLAGS:
            raise read_only()
        if node.file_type != stat.S_IFREG:
            raise OSError(errno.EISDIR if node.file_type == stat.S_IFDIR else errno.EINVAL,
                          "not a regular file")
        if node.file is None:
            st = self._stat(node)
            assert node.store is not None and st is not None
            entry, _, name = node.parts[1].rpartition("@")
            try:
                node.file = open_file(self.datastore, entry, name, "/".join(node.parts[3:]))
            except SnapshotError as e:
                raise OSError(errno.EIO if "lost" in str(e) else errno.ESTALE, str(e)) from None
            node.opened_st = st
        fh = self._handle()
        self._files[fh] = node
        node.handles += 1
        return fh

    def _file(self, fh: int) -> SnapshotFile:
        file = self._files[fh].file
        assert file is not None
        return file

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return self._file(fh).pread(size, offset)

    def seek(self, fh: int, offset: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE`` from the file's allocated ranges."""
        node = self._files[fh]
        file = self._file(fh)
        if node.extents is None:
            node.extents = file.extents()
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if offset >= file.size:
            raise OSError(errno.ENXIO, "past the end")
        if whence == os.SEEK_DATA:
            for start, length in node.extents:
                if start + length > offset:
                    return max(start, offset)
            raise OSError(errno.ENXIO, "no data after the offset")
        if whence == os.SEEK_HOLE:
            at = offset
            for start, length in node.extents:
                if start > at:
                    break
                at = max(at, start + length)
            return min(at, file.size)
        raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE")

    def release(self, fh: int) -> None:
        node = self._files.pop(fh, None)
        if node is not None:
            node.handles -= 1
            if node.handles == 0 and node.file is not None:
                node.file.close()
                node.file = node.opened_st = node.extents = None
            self._maybe_drop(node)
            return
        directory = self._dirs.pop(fh, None)
        if directory is not None:
            directory.node.lookups -= 1
            self._maybe_drop(directory.node)

    def opendir(self, ino: int) -> int:
        node = self._node(ino)
        if node.file_type != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = self._handle()
        self._dirs[fh] = _Dir(node)
        node.lookups += 1  # keeps the node while the handle lives
        return fh

    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        parent = handle.node
        snapshots = self._snapshots() if parent is self._root else None
        if handle.names is None or start_id == 0:
            if snapshots is not None:
                handle.names = sorted(snapshots)
            else:
                path_fd = self._open_path(parent)
                try:
                    handle.names = sorted(backing.list_dir(path_fd))
                finally:
                    backing.close(path_fd)
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            try:
                node, st = self._child(parent, name, snapshots)
            except OSError:
                continue  # a snapshot deleted since the listing was taken
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(node, st),
                                         index + 1):
                self._maybe_drop(node)
                return
            node.lookups += 1

    def is_directory_handle(self, fh: int) -> bool:
        return fh in self._dirs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self._node(ino)
        if node is self._root or node.file_type == stat.S_IFLNK:
            raise OSError(pyfuse3.ENOATTR, "no such attribute")
        if name.startswith(self._private):
            raise OSError(pyfuse3.ENOATTR, "no such attribute")
        path_fd = self._open_path(node)
        try:
            return backing.getxattr(path_fd, os.fsdecode(name))
        finally:
            backing.close(path_fd)

    def listxattr(self, ino: int) -> list[bytes]:
        node = self._node(ino)
        if node is self._root or node.file_type == stat.S_IFLNK:
            return []
        path_fd = self._open_path(node)
        try:
            names = [os.fsencode(n) for n in backing.listxattr(path_fd)]
        finally:
            backing.close(path_fd)
        return [n for n in names if not n.startswith(self._private)]

    def deleted(self, dir_name: str) -> None:
        """Snapshot *dir_name* (``ENTRY@NAME``) is gone: the kernel forgets its name,
        so that it stops answering from its cache of names."""
        if self._root.lookups > 0:
            pyfuse3.invalidate_entry_async(VIEW_ROOT, os.fsencode(dir_name),
                                           ignore_enoent=True)

    def statistics(self) -> dict[str, int]:
        return {"snapshot_view_nodes": len(self._nodes) - 1,
                "snapshot_view_open_handles": len(self._files)}

    def close(self) -> None:
        for node in self._nodes.values():
            if node.file is not None:
                node.file.close()
                node.file = None
        self._files.clear()
        self._dirs.clear()
        self._nodes = {VIEW_ROOT: self._root}
        self._by_key.clear()
