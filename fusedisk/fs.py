"""pyfuse3 Operations: inodes, handles and errno translation, nothing else.

Inode numbers belong to fusedisk. A backing object is identified by its
``(st_dev, st_ino)``; its fusedisk inode number is ``store_id << 48 |
st_ino`` (stable across mounts while the placement does not change), or a
number from a private range when that would collide. The number stays with
the :class:`Inode` for as long as the kernel knows it, whatever store holds
the bytes later.

Every known inode reaches its backing object through an ``O_PATH |
O_NOFOLLOW`` handle: names are resolved one component at a time with
``*at()`` calls relative to the parent's handle, never by joining strings,
so no request can leave the store that holds its entry. The handles live in
a bounded LRU (:class:`backing.PathTable`): an evicted one is reopened by
file handle, which names the inode, so renames do not matter. An open file,
and an object whose last name went while the kernel remembers it, keep
theirs open (an unlinked object's file handle is stale).

The mount root is virtual: its children are the datastore's entries, each
on its own store. Hard links and renames across entries get ``EXDEV`` (an
entry must stay self-contained to be relocatable), like crossing a
filesystem boundary.

errno lives only here: domain code raises ``OSError``; :func:`_errno_edge`
turns it into ``FUSEError``. Any other exception is a bug and ends the
mount, as pyfuse3 intends.

How file data reaches the kernel (``direct_io`` or the page cache, and what
a ``direct_io`` write must do that the kernel then does not) is one policy
of its own, in pagecache.py; this room only tells it what happened.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
import resource
import secrets
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import backing, failpoint, fuseshim, pagecache, snapview
from .backing import PathRef, PathTable, keep_identity, kept_identity
from .datastore import Datastore, Entry, Journal, native_ino
from .gate import Gate
from .snapshots import Snapshots
from .vdisk import OpenFiles, Resolver, VFile

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")

ROOT_INODE = pyfuse3.ROOT_INODE
_PRIVATE_INO_BASE = 1 << 62
#: What a handle's open flags ask of every write before it is acknowledged
#: (``O_SYNC`` includes the ``O_DSYNC`` bit).
_SYNC_NONE, _SYNC_DATA, _SYNC_FULL = 0, 1, 2
#: How long the kernel may cache attributes and names. Every change passes
#: through this mount, so the kernel's own invalidation keeps it right.
_ATTR_TIMEOUT_S = 1.0
#: inodes the sweep after a switchover re-points between two checkpoints
_SWEEP_SLICE = 256
#: fusedisk's own xattrs on backing files (the CBT file id); never shown to clients
_PRIVATE_XATTR_PREFIX = b"trusted.fusedisk."
#: ``FUSEDISK_STALL=direct-write:MS:N`` holds the first N direct_io writes in the
#: daemon (failpoint.py): a test sees which writes the kernel has in flight at once
_DIRECT_WRITE_STALL = failpoint.stall_armed("direct-write")


def _errno_edge(
    fn: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Translate OSError raised below into the FUSE reply it stands for."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        ops = args[0]
        assert isinstance(ops, Operations)
        with ops.paths.scope():  # the O_PATH fds the request uses stay open until it ends
            try:
                return await fn(*args, **kwargs)
            except OSError as e:
                raise FUSEError(e.errno or errno.EIO) from None

    return wrapper


#: The kept ctimes a request that changes an entry dropped (see
#: :meth:`Operations._changing`), so that a request that fails shows them again:
#: a failed operation changes nothing, ctime included. One list per request
#: (each runs in its own pyfuse3 worker task, which has its own context).
_DROPPED: contextvars.ContextVar[list[tuple[Inode, int]] | None] = contextvars.ContextVar(
    "fusedisk_dropped_ctimes", default=None)


#: What a request changed in an entry whose relocation keeps a journal (see
#: :meth:`Operations._note`): noted when the request ends, so that a staging
#: pass that copies the object afterwards sees the whole change.
_NOTED: contextvars.ContextVar[list[tuple[Journal, tuple[int, int], int]] | None] = (
    contextvars.ContextVar("fusedisk_noted_changes", default=None))


def _quiesced(
    fn: Callable[..., Coroutine[Any, Any, _R]],
) -> Callable[..., Coroutine[Any, Any, _R]]:
    """Run a request that changes an entry inside that entry's gate.

    The first argument after ``self`` is an inode number. A switchover closes the gate
    and waits for such requests to leave; new ones wait until it opens again.
    Requests on the mount root itself pass freely.
    """

    @functools.wraps(fn)
    async def wrapper(self: Operations, ino: int, *args: Any) -> _R:
        node = self._inodes.get(ino)
        entry = node.entry if node is not None else None
        if entry is None:
            return await fn(self, ino, *args)
        gate = entry.gate
        await gate.enter()
        dropped: list[tuple[Inode, int]] = []
        noted: list[tuple[Journal, tuple[int, int], int]] = []
        token = _DROPPED.set(dropped)
        noted_token = _NOTED.set(noted)
        try:
            return await fn(self, ino, *args)
        except OSError:
            for node, ctime_ns in dropped:  # it failed: nothing changed
                try:
                    keep_identity(node.path_fd, node.ino, ctime_ns)
                    node.kept_ctime_ns = ctime_ns
                except OSError:
                    pass  # then the object shows its backing ctime: later, never hidden
            raise
        finally:
            _DROPPED.reset(token)
            _NOTED.reset(noted_token)
            for journal, key, fd in noted:  # done (or failed): now it may be copied
                journal.add(key, fd)
            gate.leave()

    return wrapper


class Inode:
    """A file, directory or other object the kernel knows by number.

    ``lookups`` is the kernel's lookup count; ``vfile`` is set while the file
    is open. The inode is dropped when both are gone.
    """

    __slots__ = (
        "cache_stale", "direct_handles", "entry", "file_type", "gen", "handles", "ino",
        "is_entry_root", "kept_ctime_ns", "key", "killpriv", "lookups", "no_caps", "no_set_id",
        "paths", "ref", "repoints", "sticky", "vfile",
    )

    def __init__(
        self,
        ino: int,
        paths: PathTable | None,
        ref: PathRef | None,
        key: tuple[int, int],
        file_type: int,
        entry: Entry | None,
        is_entry_root: bool,
    ) -> None:
        self.ino = ino
        #: the object's O_PATH fd lives in *paths* (bounded, reopened by handle);
        #: None for the virtual root
        self.paths = paths
        self.ref = ref
        #: pinned open because its last name went (its handle would be stale)
        self.sticky = False
        self.key = key
        #: ``S_IFMT`` bits; an object never changes its type.
        self.file_type = file_type
        self.entry = entry
        self.is_entry_root = is_entry_root
        self.lookups = 0
        #: open FUSE handles; ``vfile`` is set while there is at least one
        self.handles = 0
        self.vfile: VFile | None = None
        #: the page-cache policy's state (pagecache.py owns these five)
        self.no_caps = False
        self.no_set_id = False
        self.direct_handles = 0
        self.cache_stale = False
        self.killpriv = False
        #: the ctime the object had before a relocation moved it, shown until
        #: the mount changes it (:meth:`Operations._changing`); None: the backing one
        self.kept_ctime_ns: int | None = None
        #: what the entry's inodes share (None: the virtual root): a switchover
        #: that moved the objects and left their inodes to be re-pointed when next
        #: used (or by the sweep after the pause); this inode is re-pointed once
        #: its ``gen`` is the shared one
        self.repoints: _Repoints | None = None
        self.gen = 0

    def stale(self) -> _PendingRepoint | None:
        """The switchover this inode has yet to be re-pointed by, if any."""
        repoints = self.repoints
        if repoints is None or repoints.pending is None or self.gen == repoints.gen:
            return None
        return repoints.pending

    @property
    def path_fd(self) -> int:
        """The O_PATH fd of the backing object (see :class:`backing.PathTable`:
        inside a request it stays open until the request ends)."""
        repoints = self.repoints
        if repoints is not None and repoints.pending is not None and self.gen != repoints.gen:
            repoints.pending.catch_up(self)
        if self.ref is None or self.paths is None:
            return -1
        return self.paths.fd(self.ref)


class _Repoints:
    """What the inodes of one entry share: the number of the entry's last
    re-point, and that re-point while it is still catching up (see
    :class:`_PendingRepoint`). Marking every inode of the entry is one store."""

    __slots__ = ("gen", "pending")

    def __init__(self) -> None:
        self.gen = 0
        self.pending: _PendingRepoint | None = None


class _PendingRepoint:
    """A switchover's re-point of one entry's inodes, until every one is moved.

    Inside the pause only the inodes that may be in use are re-pointed (those
    with pinned fds: open files, requests in progress, unlinked objects, found
    through :meth:`PathTable.pinned`, not by walking every inode); every other
    one is marked at once, by a new generation of the entry's :class:`_Repoints`,
    and moved to its staged self when a request next reaches it
    (:meth:`Operations._inode`, a lookup that finds its new key, its
    ``path_fd``), or by the sweep that the switchover awaits once the gate is
    open. Nothing is opened for it: the staging recorded each object's file
    handle, key and kept ctime, which no rename after the switchover changes
    (:meth:`StagedTree.dst_identity`).
    """

    __slots__ = ("_ops", "gen", "memo", "repoints", "resolve")

    def __init__(self, ops: Operations, resolve: Resolver, repoints: _Repoints) -> None:
        self._ops = ops
        self.resolve = resolve
        self.repoints = repoints
        #: the generation an inode has once this re-point moved it
        self.gen = repoints.gen
        #: which staged directories are in the tree (StagedTree.dst_identity)
        self.memo: dict[tuple[int, int], bool] = {}

    def catch_up(self, inode: Inode) -> None:
        self._ops._catch_up(inode, self)


def _fsync_dirs(path_fds: list[int]) -> None:
    for path_fd in path_fds:
        backing.fsync_dir(path_fd)


def _sync_mode(flags: int) -> int:
    if flags & os.O_SYNC == os.O_SYNC:
        return _SYNC_FULL
    return _SYNC_DATA if flags & os.O_DSYNC else _SYNC_NONE


class _FileHandle:
    """One open of a regular file (a FUSE file handle).

    ``sync`` is set only for ``direct_io`` handles: on those the kernel
    sends no FSYNC after an ``O_DSYNC``/``O_SYNC`` write (it does for
    buffered ones), so the daemon makes each write stable before replying.
    A single ``RWF_DSYNC`` write is known only from the bits the libfuse
    shim adds to the handle (fuseshim.py).
    """

    __slots__ = ("direct", "inode", "sync", "vfile")

    def __init__(self, inode: Inode, vfile: VFile, direct: bool, sync: int) -> None:
        self.inode = inode
        self.vfile = vfile
        self.direct = direct
        self.sync = sync


class _DirHandle:
    __slots__ = ("inode", "names")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.names: list[str] | None = None


class Operations(pyfuse3.Operations):
    """Translate FUSE requests into calls on the datastore and the backing room."""

    supports_dot_lookup = False
    enable_writeback_cache = False  # would acknowledge writes the daemon never saw

    def __init__(
        self, datastore: Datastore, files: OpenFiles, paths: PathTable | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        super().__init__()
        self.datastore = datastore
        self.files = files
        files.on_kept_ctime = self._show_kept_ctime
        if paths is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            paths = PathTable(backing.path_fd_cap(nofile))
        #: the O_PATH fds of every inode but the root: bounded, reopened by handle
        self.paths = paths
        for store in datastore.stores.values():
            paths.add_filesystem(backing.fstat(store.root_fd).st_dev, store.root_fd)
        self._root = Inode(ROOT_INODE, None, None, (-1, -1), stat.S_IFDIR, None, False)
        self._root.lookups = 1
        self._inodes: dict[int, Inode] = {ROOT_INODE: self._root}
        self._by_key: dict[tuple[int, int], Inode] = {}
        #: switchovers whose inodes are not all re-pointed yet (see _PendingRepoint)
        self._pending: list[_PendingRepoint] = []
        #: each entry's shared re-point state (an Entry compares by identity)
        self._repoints: dict[Entry, _Repoints] = {}
        #: open regular files by FUSE file handle; ``_vfiles`` has the same keys
        #: and spares the read path one attribute lookup
        self._handles: dict[int, _FileHandle] = {}
        self._vfiles: dict[int, VFile] = {}
        self._next_fh = 1
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_fh = 1
        #: FSYNCs on the shim's threads, by cookie: the gate each one is inside
        self._detached_fsyncs: dict[int, Gate] = {}
        self._next_fsync_cookie = 1
        self._root_time_ns = time.time_ns()
        #: FLUSH requests served (the first tells the kernel to send no more)
        self.flush_requests = 0
        #: GETXATTRs of ``security.capability`` on regular files: the kernel's probe
        #: before a write or chown (FUSE_HANDLE_KILLPRIV_V2 spares most of them)
        self.caps_probes = 0
        #: GETATTRs served
        self.getattrs = 0
        #: ``MNT/.snapshots``: its own numbers and handles, read-only (snapview.py)
        self.view = snapview.SnapshotView(
            datastore, snapshots.list if snapshots is not None else list, _PRIVATE_XATTR_PREFIX)

    # -- inode table --------------------------------------------------------------

    def _show_kept_ctime(self, key: tuple[int, int]) -> None:
        """An open gave the file *key* a new CBT id (which moved its backing
        ctime) and kept the ctime shown: show the kept one (OpenFiles.on_kept_ctime)."""
        inode = self._known(key)
        if inode is not None and inode.path_fd >= 0:
            inode.kept_ctime_ns = kept_identity(inode.path_fd)[1]

    def _inode(self, ino: int) -> Inode:
        try:
            inode = self._inodes[ino]
        except KeyError:
            # every request that reaches here on a number of the snapshot view
            # would change it (the others were passed to the view)
            raise FUSEError(errno.EROFS if snapview.owns(ino) else errno.ESTALE) from None
        stale = inode.stale()
        if stale is not None:
            stale.catch_up(inode)
        return inode

    def _known(self, key: tuple[int, int]) -> Inode | None:
        """The inode of the backing object *key*, if the kernel knows it (also one
        that a switchover moved there and has not re-pointed yet)."""
        inode = self._by_key.get(key)
        if inode is None and self._pending:
            for pending in self._pending:
                src = pending.resolve.old_key(key)
                old = self._by_key.get(src) if src is not None else None
                if old is not None and old.stale() is pending:
                    pending.catch_up(old)
                    return old
        elif inode is not None:
            stale = inode.stale()
            if stale is not None:
                stale.catch_up(inode)
                return self._by_key.get(key)
        return inode

    def _remember(
        self, path_fd: int, st: os.stat_result, entry: Entry, is_entry_root: bool,
        fresh: bool = False,
    ) -> Inode:
        """Return the Inode for a freshly opened backing handle; consumes *path_fd*.

        An object that moved with a relocation keeps the number it had (its
        ``INO_XATTR``, see switchover.py); others get their store's number;
        a *fresh* object (just created) has none to look for.
        The lookup count is *not* incremented: the caller does it once the
        kernel is sure to have been told (see :meth:`readdir`).
        """
        key = (st.st_dev, st.st_ino)
        known = self._known(key)
        if known is not None:
            backing.close(path_fd)
            return known
        kept, kept_ctime_ns = (None, None) if fresh else kept_identity(path_fd)
        ino = kept
        if ino is None or ino in self._inodes or snapview.owns(ino):
            ino = native_ino(entry.store.store_id, st.st_ino)
            if ino is None or ino in self._inodes or snapview.owns(ino):
                # Its store's number is taken (by a number another object kept
                # through a relocation) or too large: a random private one.
                ino = _PRIVATE_INO_BASE | secrets.randbits(61)
                while ino in self._inodes:
                    ino = _PRIVATE_INO_BASE | secrets.randbits(61)
            if kept is not None or ino >= _PRIVATE_INO_BASE:
                # not the number its store gives it, nor the one it kept: keep
                # this one on the object, so that it stays
                if kept_ctime_ns is None:
                    kept_ctime_ns = st.st_ctime_ns  # writing the xattr moves the backing one
                try:
                    keep_identity(path_fd, ino, kept_ctime_ns)
                except OSError as e:
                    log.warning("inode number %#x of an object of %r is not kept (%s): it may "
                                "change when the kernel forgets it", ino, entry.name,
                                e.strerror or e)
                    kept_ctime_ns = None
        ref = self.paths.add(path_fd, st.st_dev)
        inode = Inode(ino, self.paths, ref, key, stat.S_IFMT(st.st_mode), entry, is_entry_root)
        inode.kept_ctime_ns = kept_ctime_ns
        ref.tag = ino
        repoints = inode.repoints = self._repoints_of(entry)
        inode.gen = repoints.gen  # made now: where the entry is now
        self._inodes[ino] = inode
        self._by_key[key] = inode
        return inode

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.lookups <= 0 and inode.handles == 0 and inode is not self._root:
            removed = inode.sticky  # pinned because its last name went
            inode.sticky = False  # drop closes the fd, pinned or not
            del self._inodes[inode.ino]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            assert inode.ref is not None
            self.paths.drop(inode.ref, removed=removed)

    def _attr(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.generation = 0
        attr.entry_timeout = _ATTR_TIMEOUT_S
        attr.attr_timeout = _ATTR_TIMEOUT_S
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
        kept = inode.kept_ctime_ns
        attr.st_ctime_ns = st.st_ctime_ns if kept is None else kept
        return attr

    def _changing(self, inode: Inode) -> None:
        """Before the mount changes *inode* (data, attributes, names, links):
        stop showing the ctime it kept through a relocation. The xattr goes
        first, so a crash between the two never hides the change; rewriting it
        sets the backing ctime to now, which is then what the mount shows."""
        if inode.entry is not None and inode.entry.journal is not None:
            self._note(inode.entry.journal, inode.key, inode.path_fd)
        kept = inode.kept_ctime_ns
        if kept is not None:
            keep_identity(inode.path_fd, inode.ino, None)
            inode.kept_ctime_ns = None
            dropped = _DROPPED.get()
            if dropped is not None:
                dropped.append((inode, kept))

    @staticmethod
    def _note(journal: Journal, key: tuple[int, int], path_fd: int) -> None:
        """Tell a relocation's journal that the request changes object *key*."""
        noted = _NOTED.get()
        if noted is None:
            journal.note(key, path_fd)
        else:
            noted.append((journal, key, os.dup(path_fd)))

    @staticmethod
    def _lstat_or_none(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return backing.lstat_at(dir_fd, name)
        except OSError:
            return None  # the operation itself reports it

    def _changing_at(self, dir_fd: int, name: str, entry: Entry | None,
                     st: os.stat_result | None = None) -> None:
        """:meth:`_changing` for the object named *name* of *entry* (unlinked,
        renamed or renamed over), whether or not the kernel knows it. *st*: its
        ``lstat``, if the caller has it."""
        if st is None:
            st = self._lstat_or_none(dir_fd, name)
            if st is None:
                return  # the operation itself reports it
        known = self._known((st.st_dev, st.st_ino))
        if known is not None:
            self._changing(known)
            return
        path_fd = backing.open_path(dir_fd, name)
        try:
            if entry is not None and entry.journal is not None:
                self._note(entry.journal, (st.st_dev, st.st_ino), path_fd)
            ino, ctime_ns = kept_identity(path_fd)
            if ctime_ns is not None:
                keep_identity(path_fd, ino, None)
        finally:
            backing.close(path_fd)

    def _pin_last_link(self, dir_fd: int, name: str,
                       st: os.stat_result | None = None) -> Inode | None:
        """Before *name* is unlinked, rmdir'ed or renamed over: if it is the last
        name of an object the kernel knows, pin that object's O_PATH fd, so it
        stays reachable once its handle is stale (an unlinked file still
        answers ``fstat``). Returns the inode pinned, for :meth:`_unpin_last_link`
        should the operation fail. *st* as in :meth:`_changing_at`."""
        if st is None:
            st = self._lstat_or_none(dir_fd, name)
            if st is None:
                return None  # the operation itself reports it
        known = self._known((st.st_dev, st.st_ino))
        if known is None or known.sticky or known.ref is None:
            return None
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            return None
        self.paths.pin(known.ref)
        known.sticky = True
        return known

    def _unpin_last_link(self, inode: Inode | None) -> None:
        if inode is not None and inode.sticky and inode.ref is not None:
            inode.sticky = False
            self.paths.unpin(inode.ref)

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ROOT_INODE
        attr.entry_timeout = _ATTR_TIMEOUT_S
        attr.attr_timeout = _ATTR_TIMEOUT_S
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._root_time_ns
        return attr

    def _getattr(self, inode: Inode) -> pyfuse3.EntryAttributes:
        if inode is self._root:
            return self._root_attr()
        return self._attr(inode, backing.fstat(inode.path_fd))

    def _where(
        self, parent: Inode, name: bytes, creating: bool = False
    ) -> tuple[int, str, Entry | None]:
        """``(dir_fd, name, entry)`` for a child of *parent*; entry is None for a
        top-level name that has no entry yet (new ones go to the default store)."""
        sname = backing.check_name(name)
        if parent is not self._root:
            return parent.path_fd, sname, parent.entry
        if self.datastore.is_reserved(sname):
            if not creating:
                raise OSError(errno.ENOENT, "no such entry")
            raise OSError(errno.EEXIST if sname in self.datastore.conflicts else errno.EPERM,
                          "reserved name")
        entry = self.datastore.get(sname)
        store = entry.store if entry else self.datastore.default_store
        return store.root_fd, sname, entry

    def _lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        dir_fd, sname, entry = self._where(parent, name)
        if entry is None:
            raise OSError(errno.ENOENT, "no such entry")
        path_fd = backing.open_path(dir_fd, sname)
        try:
            st = backing.fstat(path_fd)
        except BaseException:
            backing.close(path_fd)
            raise
        return self._remember(path_fd, st, entry, parent is self._root), st

    # -- lookups and attributes -----------------------------------------------------

    @_errno_edge
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if snapview.owns(parent_inode):
            attr, up_to_root = self.view.lookup(parent_inode, name)
            if not up_to_root:
                return attr
            self._root.lookups += 1
            return self._root_attr()
        if parent_inode == ROOT_INODE and name == snapview.VIEW_NAME_B:
            return self.view.lookup_root()
        parent = self._inode(parent_inode)
        if name == b".":
            inode = parent
            attr = self._getattr(parent)
        elif name == b"..":
            if parent is self._root or parent.is_entry_root:
                inode, attr = self._root, self._root_attr()
            else:
                assert parent.entry is not None
                path_fd = backing.open_path(parent.path_fd, "..")
                st = backing.fstat(path_fd)
                inode = self._remember(path_fd, st, parent.entry, False)
                attr = self._attr(inode, st)
        else:
            inode, st = self._lookup(parent, name)
            attr = self._attr(inode, st)
        inode.lookups += 1
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            if snapview.owns(ino):
                self.view.forget(ino, nlookup)
                continue
            inode = self._inodes.get(ino)
            if inode is not None:
                inode.lookups -= nlookup
                self._maybe_drop(inode)

    @_errno_edge
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.getattrs += 1
        if snapview.owns(inode):
            return self.view.getattr(inode)
        return self._getattr(self._inode(inode))

    @_errno_edge
    @_quiesced
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        if node is self._root:
            raise OSError(errno.EPERM, "the datastore root cannot be changed")
        self._changing(node)
        if fields.update_size:
            if node.file_type != stat.S_IFREG:
                raise OSError(errno.EINVAL, "only regular files can be truncated")
            assert node.entry is not None
            vfile = self.files.open(node.path_fd, node.key, node.entry.gate)
            try:
                await vfile.truncate(attr.st_size)
            finally:
                self.files.release(vfile)
        if fields.update_uid or fields.update_gid:
            backing.fchown(
                node.path_fd,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
            )
        if fields.update_mode:
            backing.fchmod(node.path_fd, node.file_type, attr.st_mode)
            pagecache.mode_set(node, attr.st_mode)
        if fields.update_atime or fields.update_mtime:
            backing.futimens(
                node.path_fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        if fh is not None and fh & fuseshim.FH_KILL_SUIDGID and node.file_type == stat.S_IFREG:
            pagecache.drop_set_id(node)  # a truncate or chown: the kernel left it to us
        return self._getattr(node)

    @_errno_edge
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if snapview.owns(inode):
            return self.view.readlink(inode)
        return backing.readlink(self._inode(inode).path_fd)

    @_errno_edge
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # pyfuse3 does not say which inode a statfs is for, so this reports the
        # default store (where new entries go); `fusedisk status` shows them all.
        vfs = self.datastore.default_store.statvfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = vfs.f_bsize
        out.f_frsize = vfs.f_frsize
        out.f_blocks = vfs.f_blocks
        out.f_bfree = vfs.f_bfree
        out.f_bavail = vfs.f_bavail
        out.f_files = vfs.f_files
        out.f_ffree = vfs.f_ffree
        out.f_favail = vfs.f_favail
        out.f_namemax = min(
            [backing.NAME_MAX] + [s.statvfs().f_namemax for s in self.datastore.stores.values()]
        )
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # `default_permissions`: the kernel checks modes itself

    # -- creating and removing names -----------------------------------------------

    def _set_owner_and_mode(
        self, path_fd: int, parent: Inode, mode: int, ctx: pyfuse3.RequestContext
    ) -> os.stat_result:
        """Give a new object the caller's uid, the right gid and the asked-for mode.

        The daemon runs as root with umask 0, so the backing object starts as
        root's; the kernel has applied the caller's umask to *mode* already.
        A set-gid parent directory hands down its group (and, to directories,
        the set-gid bit) as on any POSIX filesystem.
        """
        gid = ctx.gid
        if parent is not self._root:
            parent_st = backing.fstat(parent.path_fd)
            if parent_st.st_mode & stat.S_ISGID:
                gid = parent_st.st_gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
        backing.fchown(path_fd, ctx.uid, gid)
        st = backing.fstat(path_fd)
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode):
            backing.fchmod(path_fd, st.st_mode, mode)
            st = backing.fstat(path_fd)
        return st

    async def _created(
        self, parent: Inode, sname: str, dir_fd: int, entry: Entry | None, mode: int,
        ctx: pyfuse3.RequestContext, made: bool = True,
    ) -> tuple[Inode, pyfuse3.EntryAttributes]:
        """Register an object just created as *sname* in *dir_fd*.

        If that fails (out of descriptors, say), the object is removed again:
        a request that answers with an error has done nothing.
        """
        try:
            path_fd = backing.open_path(dir_fd, sname)
        except OSError:
            if made:
                self._unmake(dir_fd, sname, mode)
            raise
        try:
            st = self._set_owner_and_mode(path_fd, parent, mode, ctx)
        except BaseException:
            backing.close(path_fd)
            if made:
                self._unmake(dir_fd, sname, mode)
            raise
        if entry is None:  # a new top-level entry, created on the default store
            entry = await self.datastore.added(sname, self.datastore.default_store)
            self._root_time_ns = time.time_ns()
        inode = self._remember(path_fd, st, entry, parent is self._root, fresh=True)
        inode.lookups += 1
        return inode, self._attr(inode, st)

    @staticmethod
    def _unmake(dir_fd: int, sname: str, mode: int) -> None:
        """Remove an object a failed request made (see :meth:`_created`)."""
        try:
            backing.unlink_at(dir_fd, sname, is_dir=stat.S_ISDIR(mode))
        except OSError as e:
            log.warning("could not remove %r after a failed create (%s); it stays on the "
                        "store", sname, e.strerror or e)

    @_errno_edge
    @_quiesced
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        kill = flags & fuseshim.OPEN_KILL_SUIDGID
        flags &= ~fuseshim.OPEN_KILL_SUIDGID
        parent = self._inode(parent_inode)
        dir_fd, sname, entry = self._where(parent, name, creating=True)
        self._changing(parent)
        made = True
        try:
            fd = backing.open_at(dir_fd, sname, os.O_CREAT | os.O_EXCL | os.O_RDWR,
                                 stat.S_IMODE(mode))
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # made by someone else since the kernel's lookup: open it as it is
            fd = backing.open_at(dir_fd, sname, os.O_RDWR)
            made = False
        if not made:
            backing.close(fd)  # the data path opens its own (shared) descriptor
            fd = -1
        try:
            inode, attr = await self._created(parent, sname, dir_fd, entry, mode, ctx, made)
            if made:
                pagecache.created(inode)
            direct = pagecache.serve_direct(inode, flags)
        except BaseException:
            if fd >= 0:
                backing.close(fd)
            raise
        try:
            # a file just made is the data path's: its descriptor is handed over
            fh = self._open_handle(inode, direct, flags, fresh=made, io_fd=fd)
        except OSError:  # the kernel learns nothing of it: take it back
            inode.lookups -= 1
            self._maybe_drop(inode)
            if made:
                self._unmake(dir_fd, sname, mode)
            raise
        if flags & os.O_TRUNC:  # it may have existed after all (a racing create)
            await self._truncate_on_open(inode, fh)
            if kill:
                pagecache.drop_set_id(inode)
        return pagecache.file_info(inode, fh, direct), attr

    @_errno_edge
    @_quiesced
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        dir_fd, sname, entry = self._where(parent, name, creating=True)
        self._changing(parent)
        backing.mkdir_at(dir_fd, sname, stat.S_IMODE(mode))
        return (await self._created(parent, sname, dir_fd, entry, stat.S_IFDIR | mode, ctx))[1]

    @_errno_edge
    @_quiesced
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        dir_fd, sname, entry = self._where(parent, name, creating=True)
        self._changing(parent)
        backing.mknod_at(dir_fd, sname, mode, rdev)
        return (await self._created(parent, sname, dir_fd, entry, mode, ctx))[1]

    @_errno_edge
    @_quiesced
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_inode)
        dir_fd, sname, entry = self._where(parent, name, creating=True)
        self._changing(parent)
        backing.symlink_at(dir_fd, sname, target)
        return (await self._created(parent, sname, dir_fd, entry, stat.S_IFLNK | 0o777, ctx))[1]

    @_errno_edge
    @_quiesced
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        new_parent = self._inode(new_parent_inode)
        dir_fd, sname, entry = self._where(new_parent, new_name, creating=True)
        if new_parent is self._root or entry is not node.entry:
            raise OSError(errno.EXDEV, "hard links stay inside one entry")
        self._changing(node)
        self._changing(new_parent)
        backing.link(node.path_fd, dir_fd, sname)
        node.lookups += 1
        return self._getattr(node)

    async def _remove(self, parent_inode: int, name: bytes, is_dir: bool) -> None:
        parent = self._inode(parent_inode)
        dir_fd, sname, entry = self._where(parent, name)
        if entry is None:
            raise OSError(errno.ENOENT, "no such entry")
        if parent is self._root and self.datastore.relocating(entry.name):
            raise OSError(errno.EBUSY, "the entry is being relocated")
        doomed = None
        # one lstat serves every step below: none of them changes the name, and
        # only a snapshot's copy-before-write (with guards) checkpoints between them
        st = self._lstat_or_none(dir_fd, sname)
        if parent is not self._root:
            self._changing(parent)
            if st is not None:  # (else the unlink reports it) its nlink changes
                self._changing_at(dir_fd, sname, entry, st)
        if not is_dir and self.files.guards:
            # a snapshot's copy-before-write takes the rest of the file first; it
            # checkpoints, so the name may have changed meanwhile
            await self.files.before_last_link(dir_fd, sname)
            st = self._lstat_or_none(dir_fd, sname)
        pinned = self._pin_last_link(dir_fd, sname, st) if st is not None else None
        try:
            if not is_dir and st is not None:
                known = self._known((st.st_dev, st.st_ino))
                doomed = self.files.last_link_history(
                    dir_fd, sname, st, known.path_fd if known is not None else -1)
            backing.unlink_at(dir_fd, sname, is_dir=is_dir)
        except BaseException:
            self._unpin_last_link(pinned)
            raise
        if parent is self._root:
            await self.datastore.removed(sname)
            self._root_time_ns = time.time_ns()
        if doomed is not None:  # after the namespace is consistent again
            await self.files.forget_history(doomed)

    @_errno_edge
    @_quiesced
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, is_dir=False)

    @_errno_edge
    @_quiesced
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, is_dir=True)

    @_errno_edge
    @_quiesced
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        old_dir_fd, old_name, old_entry = self._where(old_parent, name_old)
        new_dir_fd, new_name, new_entry = self._where(new_parent, name_new, creating=True)
        if old_entry is None:
            raise OSError(errno.ENOENT, "no such entry")
        at_root = old_parent is self._root
        if at_root != (new_parent is self._root):
            raise OSError(errno.EXDEV, "moving into or out of the top level crosses entries")
        if at_root:
            if self.datastore.relocating(old_entry.name) or (
                    new_entry is not None and self.datastore.relocating(new_entry.name)):
                raise OSError(errno.EBUSY, "the entry is being relocated")
            if new_entry is not None and new_entry.store is not old_entry.store:
                raise OSError(errno.EXDEV, "the two entries live on different stores")
            new_dir_fd = old_entry.store.root_fd
        elif new_entry is not old_entry:
            raise OSError(errno.EXDEV, "renames stay inside one entry")
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise OSError(errno.EINVAL, "unknown rename flags")
        if not at_root:
            self._changing(old_parent)
            self._changing(new_parent)
            self._changing_at(old_dir_fd, old_name, old_entry)
            self._changing_at(new_dir_fd, new_name, old_entry)
        doomed = pinned = None
        if not flags & pyfuse3.RENAME_EXCHANGE:
            await self.files.before_last_link(new_dir_fd, new_name)  # as in _remove
            doomed = self.files.last_link_history(new_dir_fd, new_name)
            pinned = self._pin_last_link(new_dir_fd, new_name)
        try:
            backing.renameat2(old_dir_fd, old_name, new_dir_fd, new_name, flags)
        except BaseException:
            self._unpin_last_link(pinned)
            raise
        if at_root:
            await self.datastore.renamed(
                old_name, new_name, exchange=bool(flags & pyfuse3.RENAME_EXCHANGE)
            )
            self._root_time_ns = time.time_ns()
        if doomed is not None:  # after the namespace is consistent again
            await self.files.forget_history(doomed)

    # -- regular files ---------------------------------------------------------------

    def _open_handle(self, inode: Inode, direct: bool, flags: int, fresh: bool = False,
                     io_fd: int = -1) -> int:
        """Register a new open of *inode* (*fresh*: just created; *io_fd*: its
        read-write descriptor, taken over); return its FUSE file handle."""
        if inode.vfile is None:
            assert inode.entry is not None and inode.ref is not None
            inode.vfile = self.files.open(inode.path_fd, inode.key, inode.entry.gate, fresh,
                                          io_fd)
            self.paths.pin(inode.ref)  # an open file keeps its O_PATH fd (unlinked, too)
        elif io_fd >= 0:
            backing.close(io_fd)
        inode.handles += 1
        pagecache.opened(inode, direct)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _FileHandle(
            inode, inode.vfile, direct, _sync_mode(flags) if direct else _SYNC_NONE
        )
        self._vfiles[fh] = inode.vfile
        return fh

    def _release_handle(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        del self._vfiles[fh]
        inode = handle.inode
        inode.handles -= 1
        pagecache.released(inode, handle.direct)
        vfile = inode.vfile
        if inode.handles == 0 and vfile is not None:
            inode.vfile = None
            self.files.release(vfile)
            assert inode.ref is not None
            self.paths.unpin(inode.ref)
            self._maybe_drop(inode)

    async def _truncate_on_open(self, inode: Inode, fh: int) -> None:
        """Empty a file opened with O_TRUNC.

        libfuse 3 negotiates FUSE_ATOMIC_O_TRUNC (pyfuse3 cannot turn it off),
        so the kernel sends no SETATTR for ``open(O_TRUNC)``: the filesystem
        must empty the file itself. Through the VFile, so CBT records it.
        """
        assert inode.vfile is not None
        try:
            await inode.vfile.truncate(0)
        except BaseException:
            self._release_handle(fh)
            raise

    @_errno_edge
    @_quiesced
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        kill = flags & fuseshim.OPEN_KILL_SUIDGID
        flags &= ~fuseshim.OPEN_KILL_SUIDGID
        if snapview.owns(inode):
            return pyfuse3.FileInfo(fh=self.view.open(inode, flags), keep_cache=True)
        node = self._inode(inode)
        if node.file_type != stat.S_IFREG:
            raise OSError(errno.EISDIR if node.file_type == stat.S_IFDIR else errno.EINVAL,
                          "not a regular file")
        direct = pagecache.serve_direct(node, flags)
        fh = self._open_handle(node, direct, flags)
        if flags & os.O_TRUNC:
            self._changing(node)
            await self._truncate_on_open(node, fh)
            if kill:
                pagecache.drop_set_id(node)
        return pagecache.file_info(node, fh, direct)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return self._vfiles[fh].read(off, size)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except KeyError:
            return self._view_read(fh, off, size)

    def _view_read(self, fh: int, off: int, size: int) -> bytes:
        if not snapview.owns_handle(fh):
            raise RuntimeError(f"read on handle {fh}, which was never given out")
        try:
            return self.view.read(fh, off, size)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh & fuseshim.FH_MASK]
        vfile = handle.vfile
        gate = vfile.gate
        if gate.closed:
            await gate.wait_open()
        gate.inside += 1  # a write may wait for the CBT activity log
        try:
            if _DIRECT_WRITE_STALL and handle.direct:
                await failpoint.stall("direct-write")
            if handle.inode.kept_ctime_ns is not None:
                self._changing(handle.inode)
            if fh & fuseshim.FH_KILL_SUIDGID:  # before the data, as the kernel does
                pagecache.drop_set_id(handle.inode)
            written = await vfile.write(off, buf)
            if handle.direct:
                if pagecache.direct_write_needs_work(handle.inode):
                    await pagecache.after_direct_write(handle.inode)
                # O_DSYNC/O_SYNC of the open, or RWF_DSYNC/RWF_SYNC of this
                # write (the shim's bits): stable before the reply
                sync = max(handle.sync, (fh >> fuseshim.FH_SYNC_SHIFT) & fuseshim.FH_SYNC_BITS)
                if sync:
                    await vfile.fsync(sync == _SYNC_DATA)
            return written
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        finally:
            gate.leave()

    # -- what pyfuse3 lacks, served through the shim (extraops.py) ------------------------

    def _changing_data(self, handle: _FileHandle) -> None:
        """What a write does around the data change, for fallocate and copy_file_range."""
        if handle.inode.kept_ctime_ns is not None:
            self._changing(handle.inode)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self._handles[fh]
        vfile = handle.vfile
        gate = vfile.gate
        if gate.closed:
            await gate.wait_open()
        gate.inside += 1  # as a write: a switchover waits for it
        try:
            self._changing_data(handle)
            await vfile.fallocate(mode, offset, length)
            if handle.direct and handle.sync:
                await vfile.fsync(handle.sync == _SYNC_DATA)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        finally:
            gate.leave()

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        try:
            if snapview.owns_handle(fh):
                return self.view.seek(fh, offset, whence)
            return self._vfiles[fh].seek_data(offset, whence)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None

    async def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int,
                              length: int, flags: int) -> int:
        if flags:
            raise FUSEError(errno.EINVAL)
        if snapview.owns_handle(fh_in):
            raise FUSEError(errno.EXDEV)  # the kernel copies through the page cache instead
        source = self._vfiles[fh_in]
        handle = self._handles[fh_out]
        vfile = handle.vfile
        gate = vfile.gate
        if gate.closed:
            await gate.wait_open()
        gate.inside += 1
        try:
            self._changing_data(handle)
            copied = await vfile.copy_from(source, offset_in, offset_out, length)
            if handle.direct and handle.sync:
                await vfile.fsync(handle.sync == _SYNC_DATA)
            return copied
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        finally:
            gate.leave()

    async def flush(self, fh: int) -> None:
        """Nothing to do: writes are not buffered in the daemon, and POSIX locks
        are the kernel's (no lock handlers). ENOSYS tells the kernel so: it then
        sends no FLUSH at any later close (one request less per file's life)."""
        self.flush_requests += 1
        raise FUSEError(errno.ENOSYS)

    @_errno_edge
    async def fsync(self, fh: int, datasync: bool) -> None:
        token = fh >> fuseshim.FH_TOKEN_SHIFT & fuseshim.FH_TOKEN_MASK
        fh &= ~(fuseshim.FH_TOKEN_MASK << fuseshim.FH_TOKEN_SHIFT)
        if snapview.owns_handle(fh):
            return  # nothing in a snapshot is ever unwritten
        vfile = self._vfiles[fh]
        gate = vfile.gate  # as in _quiesced: a switchover waits for it
        if token and not gate.closed and vfile.fsync_detachable():
            cookie = self._next_fsync_cookie
            if fuseshim.detach_fsync(token, vfile.fd, datasync, cookie):
                # A shim thread syncs vfile.fd and answers the kernel; until its
                # completion reaches fsync_done the entry's gate counts it as
                # inside, so no switchover re-points (and closes) the fd under it,
                # and the guest's handle (open until the answer) keeps it open.
                # No await from the detach to pyfuse3's reply, which starts it.
                self._next_fsync_cookie += 1
                gate.inside += 1
                self._detached_fsyncs[cookie] = gate
                vfile.unsynced = 0
                return
        await gate.enter()
        try:
            await vfile.fsync(datasync)
        finally:
            gate.leave()

    def fsync_done(self, cookie: int, err: int) -> None:
        """A FSYNC that :meth:`fsync` detached was answered (extraops.py; *err*: the
        errno the kernel got, 0: synced)."""
        self._detached_fsyncs.pop(cookie).leave()

    async def release(self, fh: int) -> None:
        if snapview.owns_handle(fh):
            self.view.release(fh)
            return
        self._release_handle(fh)

    # -- directories -------------------------------------------------------------------

    @_errno_edge
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if snapview.owns(inode):
            return self.view.opendir(inode)
        node = self._inode(inode)
        if node.file_type != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _DirHandle(node)
        node.lookups += 1  # keeps the inode while the handle lives
        return fh

    @_errno_edge
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if snapview.owns_handle(fh):
            self.view.readdir(fh, start_id, token)
            return
        handle = self._dirs[fh]
        parent = handle.inode
        if handle.names is None or start_id == 0:
            if parent is self._root:
                handle.names = self.datastore.names()
            else:
                handle.names = sorted(backing.list_dir(parent.path_fd))
        for index in range(start_id, len(handle.names)):
            name = os.fsencode(handle.names[index])
            try:
                inode, st = self._lookup(parent, name)
            except OSError:
                continue  # gone since the listing was taken
            if not pyfuse3.readdir_reply(token, name, self._attr(inode, st), index + 1):
                self._maybe_drop(inode)
                return
            inode.lookups += 1

    async def releasedir(self, fh: int) -> None:
        if snapview.owns_handle(fh):
            self.view.release(fh)
            return
        handle = self._dirs.pop(fh)
        handle.inode.lookups -= 1
        self._maybe_drop(handle.inode)

    @_errno_edge
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if snapview.owns_handle(fh):
            return
        inode = self._dirs[fh].inode
        if inode is not self._root:
            await backing.run_blocking(backing.fsync_dir, inode.path_fd)
            return
        # The root's names are the stores' top-level names (sqlite fsyncs the
        # directory of its database after it creates or removes its journal):
        # every store's root, as the top-level names are spread over them.
        roots = [store.root_fd for store in self.datastore.stores.values()]
        await backing.run_blocking(_fsync_dirs, roots)

    # -- extended attributes -------------------------------------------------------------

    def _xattr_target(self, inode: int, name: bytes) -> Inode:
        """The inode whose xattrs a request names; symlinks and the root have none."""
        if name.startswith(_PRIVATE_XATTR_PREFIX):
            raise OSError(errno.EPERM, "fusedisk's own attribute")
        node = self._inode(inode)
        if node is self._root:
            raise OSError(errno.ENOTSUP, "the datastore root has no extended attributes")
        if node.file_type == stat.S_IFLNK:
            raise OSError(errno.EPERM, "symlinks take no extended attributes here")
        return node

    @_errno_edge
    @_quiesced
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._xattr_target(inode, name)
        pagecache.xattr_changed(node, name, set_=True)
        self._changing(node)
        backing.setxattr(node.path_fd, os.fsdecode(name), value, 0)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if snapview.owns(inode):
            try:
                return self.view.getxattr(inode, name)
            except OSError as e:
                raise FUSEError(e.errno or errno.EIO) from None
        if name == pagecache.CAPS_XATTR:
            self.caps_probes += 1
        if pagecache.known_without(self._inodes.get(inode), name):
            raise FUSEError(pyfuse3.ENOATTR)  # the hot case: one per buffered write
        try:
            node = self._xattr_target(inode, name)
            with self.paths.scope():
                return backing.getxattr(node.path_fd, os.fsdecode(name))
        except OSError as e:
            if e.errno == pyfuse3.ENOATTR:
                pagecache.learned_without(self._inodes[inode], name)
            elif e.errno == errno.EPERM:  # a symlink: it simply has none
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise FUSEError(e.errno or errno.EIO) from None

    @_errno_edge
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if snapview.owns(inode):
            return self.view.listxattr(inode)
        node = self._inode(inode)
        if node is self._root or node.file_type == stat.S_IFLNK:
            return []
        names = (os.fsencode(n) for n in backing.listxattr(node.path_fd))
        return [n for n in names if not n.startswith(_PRIVATE_XATTR_PREFIX)]

    @_errno_edge
    @_quiesced
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._xattr_target(inode, name)
        pagecache.xattr_changed(node, name, set_=False)
        self._changing(node)
        backing.removexattr(node.path_fd, os.fsdecode(name))

    # -- relocation -----------------------------------------------------------------------

    def repoint(self, entry: Entry, resolve: Resolver) -> None:
        """Move the inodes and open files of *entry* to their new backing objects.

        Called by a switchover after its commit, with the entry quiesced. Inode
        numbers do not change, so the kernel sees the same files. Objects that
        *resolve* does not know (unlinked but still open) stay where they are.

        Only what may be in use is moved here: the inodes with pinned fds (open
        files, requests in progress, unlinked objects), which the path table
        lists. Every other inode of the entry is marked by one store, however
        many the kernel knows (:class:`_PendingRepoint`); it moves when it is
        next used, or by :meth:`_sweep`, which the switchover runs once the gate
        is open (``resolve.after_pause``). Unless the destination gave no file
        handles: then every inode is moved here, by path.
        """
        repoints = self._repoints_of(entry)
        if repoints.pending is not None:  # never: a switchover awaits its sweep
            self._catch_up_all(repoints.pending)
        if not resolve.lazy():
            for inode in list(self._inodes.values()):
                if inode.entry is entry:
                    self._move(inode, resolve, resolve.close_later, None, lazy=False)
            self.files.repoint(resolve)
            return
        repoints.gen += 1
        pending = _PendingRepoint(self, resolve, repoints)
        now = 0
        for ref in self.paths.pinned():
            used = self._inodes.get(ref.tag)
            if used is None or used.ref is not ref or used.repoints is not repoints:
                continue  # another entry's, or the snapshot view's
            used.gen = pending.gen
            self._move(used, resolve, resolve.close_later, None, lazy=False)
            now += 1
        repoints.pending = pending  # every other inode of the entry: stale from now on
        self._pending.append(pending)
        self.files.repoint(resolve)
        log.info("re-point of %r: %d inodes in the pause, the rest after it", entry.name, now)
        resolve.after_pause(functools.partial(self._sweep, pending))

    def _repoints_of(self, entry: Entry) -> _Repoints:
        repoints = self._repoints.get(entry)
        if repoints is None:
            repoints = self._repoints[entry] = _Repoints()
        return repoints

    def _move(self, inode: Inode, resolve: Resolver, close_later: Callable[[int], None],
              memo: dict[tuple[int, int], bool] | None, *, lazy: bool) -> None:
        """Re-point *inode*; *lazy*: after the pause (by handle only, never by path,
        which a rename since may have changed)."""
        assert inode.ref is not None
        # what the staging recorded: no syscall but the close of the old fd
        known = resolve.identity(inode.key, memo)
        if known is not None and self.paths.retarget(inode.ref, known[0][0], known[1],
                                                     close_later):
            new_key, inode.kept_ctime_ns = known[0], known[2]
        elif known is not None and lazy:
            # pinned after the pause (a request is using it): open it by its handle
            fd = self.paths.open_handle(known[0][0], known[1])
            self.paths.replace(inode.ref, fd, known[0][0])
            new_key, inode.kept_ctime_ns = known[0], known[2]
        elif lazy:
            return  # not in the tree (unlinked, open only): it stays where its data is
        else:  # inside the pause: pinned, or no handle recorded: open it by path
            found = resolve(inode.key)
            if found is None:
                return  # unlinked, open only: it stays where its data is
            path_fd, st = found
            inode.kept_ctime_ns = kept_identity(path_fd)[1]
            self.paths.replace(inode.ref, path_fd, st.st_dev)
            new_key = (st.st_dev, st.st_ino)
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        inode.key = new_key
        self._by_key[new_key] = inode

    def _catch_up(self, inode: Inode, pending: _PendingRepoint) -> None:
        """Re-point *inode*, left by a switchover's pause, now (see _PendingRepoint)."""
        inode.gen = pending.gen
        if self._inodes.get(inode.ino) is not inode:
            return  # forgotten meanwhile: its fd is closed
        self._move(inode, pending.resolve, backing.close, pending.memo, lazy=True)

    async def _sweep(self, pending: _PendingRepoint) -> None:
        """Re-point what a switchover left pending, a slice at a time between
        requests; the switchover awaits it once the gate is open. Inodes made
        meanwhile are on the destination already (their ``gen`` is the new one)."""
        inodes = list(self._inodes.values())
        repoints = pending.repoints
        moved = 0
        try:
            for done, inode in enumerate(inodes, 1):
                if inode.repoints is repoints and inode.gen != pending.gen:
                    pending.catch_up(inode)
                    moved += 1
                if done % _SWEEP_SLICE == 0:
                    await trio.lowlevel.checkpoint()
        except BaseException:
            self._catch_up_all(pending)  # cancelled (unmount): the rest at once
            raise
        self._end(pending)
        log.info("re-point after the pause: %d inodes", moved)

    def _catch_up_all(self, pending: _PendingRepoint) -> None:
        """Re-point every inode *pending* has yet to move, now, and end it."""
        repoints = pending.repoints
        if repoints.pending is not pending:
            return
        for inode in list(self._inodes.values()):
            if inode.repoints is repoints and inode.gen != pending.gen:
                pending.catch_up(inode)
        self._end(pending)

    def _end(self, pending: _PendingRepoint) -> None:
        pending.repoints.pending = None
        self._pending.remove(pending)

    # -- introspection ----------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        paths = self.paths.statistics()
        return {"inodes": len(self._inodes), "path_fds": paths.open_fds,
                "path_fd_cap": paths.cap, "path_reopens": paths.reopens,
                "blocking_jobs": backing.blocking_jobs(), "closes_behind": backing.closes_behind(),
                "closes_pending": backing.closes_pending(),
                "flush_requests": self.flush_requests,
                "caps_probes": self.caps_probes, "getattrs": self.getattrs,
                **self.files.statistics(), **self.view.statistics()}

    def close(self) -> None:
        """Close every backing handle (after the session ended)."""
        self.view.close()
        self._vfiles.clear()
        self._handles.clear()
        self.files.close_all()
        for inode in self._inodes.values():
            if inode.ref is not None:
                self.paths.drop(inode.ref)
        self._inodes = {ROOT_INODE: self._root}
        self._by_key.clear()
        self.paths.close()
        backing.drain_closes()
