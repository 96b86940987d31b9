"""The switchover: quiesce → final copy → rebuild the tree → flush → commit → re-point → resume.

Inside the pause, with the entry's gate closed and every request that was
inside drained:

1. new files are picked up and the last dirty blocks copied (no throttle);
   the pool files get their source's exact size;
2. the entry's tree is rebuilt in ``<staging>/tree`` from one walk of the
   source: directories, symlinks and special files are made anew, a regular
   file's pool file is moved to its first name (further names are links),
   and every object gets its inode number and ctime (kept), owner, mode,
   xattrs and times (directories after their children). A
   rename, unlink, chmod or xattr change made during the copy is therefore
   exactly right, however the namespace moved meanwhile;
3. every pool file and tree directory is fsynced;
4. **the commit**: one atomic save of the datastore record flips the
   placement (datastore.py). Before it, the source is the truth and any
   failure leaves it so; from it on, the switch only goes forward (shielded
   from cancellation);
5. the tree is renamed to the entry's name on the destination store, the
   entry's inodes and open files are re-pointed there (same inode numbers),
   and the gate opens.

Reads never wait for the gate: until the re-point the source holds the
same bytes as the destination.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable

import trio

from . import backing
from .backing import keep_identity, kept_identity
from .datastore import Datastore, Entry, Store, native_ino
from .errors import FusediskError
from .failpoint import failpoint
from .mirror import Copier
from .vdisk import Resolver

log = logging.getLogger(__name__)

#: The tree of an entry: backing key of each source object → its path parts.
Mapping = dict[tuple[int, int], tuple[str, ...]]


class SwitchoverError(FusediskError):
    """The switchover could not complete before its commit; the source is still the truth."""


def _keep_identity(src_fd: int, dst_fd: int, st: os.stat_result, src_store_id: int) -> None:
    """Give the new object the inode number and ctime the mount showed for the
    old one (fs.py reads them back). After ``copy_attributes``, which copies
    the source's own xattrs (not for symlinks) and whose changes move the
    backing ctime, which the kept one hides."""
    ino, ctime_ns = kept_identity(src_fd)
    if ino is None:
        ino = native_ino(src_store_id, st.st_ino)
    if ctime_ns is None:
        ctime_ns = st.st_ctime_ns
    if ino is not None:
        keep_identity(dst_fd, ino, ctime_ns)


def build_tree(
    src_fd: int, staging_fd: int, copier: Copier, src_store_id: int
) -> tuple[Mapping, list[tuple[str, ...]]]:
    """Rebuild the entry below *src_fd* as ``tree`` in *staging_fd*. Blocking.

    Every object keeps the inode number the mount showed for it. Returns the
    mapping (source key → path parts) and the directories made (for the flush).
    """
    backing.remove_tree(staging_fd, "tree")
    mapping: Mapping = {}
    root_st = backing.fstat(src_fd)
    mapping[(root_st.st_dev, root_st.st_ino)] = ()
    if stat.S_ISREG(root_st.st_mode):  # an entry that is a single file
        copy = copier.copies[(root_st.st_dev, root_st.st_ino)]
        backing.renameat2(copier.pool_fd, copy.pool_name, staging_fd, "tree", 0)
        tree_fd = backing.open_path(staging_fd, "tree")
        try:
            backing.copy_attributes(src_fd, tree_fd, root_st)
            _keep_identity(src_fd, tree_fd, root_st, src_store_id)
        finally:
            backing.close(tree_fd)
        return mapping, []
    os.mkdir("tree", 0o700, dir_fd=staging_fd)
    dirs: list[tuple[str, ...]] = [()]
    tree_fd = backing.open_path(staging_fd, "tree")
    try:
        _build_dir(src_fd, tree_fd, tree_fd, (), copier, mapping, dirs, src_store_id)
        backing.copy_attributes(src_fd, tree_fd, root_st)
        _keep_identity(src_fd, tree_fd, root_st, src_store_id)
    finally:
        backing.close(tree_fd)
    return mapping, dirs


def _build_dir(
    src_dir: int, dst_dir: int, tree_fd: int, parts: tuple[str, ...], copier: Copier,
    mapping: Mapping, dirs: list[tuple[str, ...]], src_store_id: int,
) -> None:
    for name in sorted(backing.list_dir(src_dir)):
        src_fd = backing.open_path(src_dir, name)
        try:
            st = backing.fstat(src_fd)
            key = (st.st_dev, st.st_ino)
            mode = st.st_mode
            first_name = key not in mapping
            if stat.S_ISDIR(mode):
                os.mkdir(name, 0o700, dir_fd=dst_dir)
            elif not first_name:
                # another name of an object made already: the same object
                # (linkat without AT_SYMLINK_FOLLOW; the path is inside the tree)
                os.link("/".join(mapping[key]), name, src_dir_fd=tree_fd, dst_dir_fd=dst_dir,
                        follow_symlinks=False)
            elif stat.S_ISREG(mode):
                copy = copier.copies.get(key)
                if copy is None:
                    raise SwitchoverError(f"file {'/'.join((*parts, name))} was not copied")
                # moved, not linked: a pool name left behind would show as one
                # link more (st_nlink) until the staging directory is removed
                backing.renameat2(copier.pool_fd, copy.pool_name, dst_dir, name, 0)
            elif stat.S_ISLNK(mode):
                os.symlink(backing.readlink(src_fd), name, dir_fd=dst_dir)
            else:  # FIFOs, sockets, device nodes
                os.mknod(name, mode, st.st_rdev, dir_fd=dst_dir)
            dst_fd = backing.open_path(dst_dir, name)
            try:
                if stat.S_ISDIR(mode):
                    dirs.append((*parts, name))
                    _build_dir(src_fd, dst_fd, tree_fd, (*parts, name), copier, mapping, dirs,
                               src_store_id)
                if first_name:
                    mapping[key] = (*parts, name)
                    backing.copy_attributes(src_fd, dst_fd, st)
                    _keep_identity(src_fd, dst_fd, st, src_store_id)
            finally:
                backing.close(dst_fd)
        finally:
            backing.close(src_fd)


def _flush(staging_fd: int, copier: Copier, dirs: list[tuple[str, ...]]) -> None:
    """fsync every pool file, then every directory of the tree. Blocking."""
    for copy in copier.copies.values():
        os.fsync(copy.dst_fd)
    tree_fd = backing.open_path(staging_fd, "tree")
    try:
        for parts in dirs:
            fd = backing.open_parts(tree_fd, parts)
            try:
                backing.fsync_dir(fd)
            finally:
                backing.close(fd)
    finally:
        backing.close(tree_fd)
    backing.fsync_dir(staging_fd)


def resolver(dst: Store, name: str, mapping: Mapping) -> Resolver:
    """Find the new self of a source object on the destination, by its old key."""

    def resolve(key: tuple[int, int]) -> tuple[int, os.stat_result] | None:
        parts = mapping.get(key)
        if parts is None:
            return None
        fd = backing.open_parts(dst.root_fd, (name, *parts))
        try:
            return fd, backing.fstat(fd)
        except BaseException:
            backing.close(fd)
            raise

    return resolve


async def switch_over(
    datastore: Datastore,
    entry: Entry,
    dst: Store,
    copier: Copier,
    staging_fd: int,
    on_commit: Callable[[Entry, Resolver], None],
) -> float:
    """Quiesce, finish, commit and re-point *entry*; return the pause in milliseconds.

    Raises before the commit (the caller cleans up; the source is the truth);
    never after it.
    """
    gate = entry.gate
    start = time.monotonic()
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = round((time.monotonic() - start) * 1000 - sum(steps.values()), 2)

    try:
        # inside the try: a cancel that lands while draining reopens the gate
        await gate.close_and_drain()
        step("drain")
        src_fd = backing.open_path(entry.store.root_fd, entry.name)
        try:
            copier.discover(src_fd)
            await copier.copy_pass(throttle=False)
            step("copy")
            error = copier.mirror_error()
            if error is not None:
                raise SwitchoverError(f"writing to the destination failed: {error.strerror}")
            for copy in copier.copies.values():
                backing.ftruncate(copy.dst_fd, copy.vfile.size())
            mapping, dirs = build_tree(src_fd, staging_fd, copier, entry.store.store_id)
            step("tree")
        finally:
            backing.close(src_fd)
        await backing.run_blocking(_flush, staging_fd, copier, dirs)
        step("flush")
        failpoint("before-commit")
        with trio.CancelScope(shield=True):
            await datastore.relocation_committed(entry)
            step("commit")
            # committed: from here on the switch only goes forward
            failpoint("after-commit")
            backing.renameat2(
                staging_fd, "tree", dst.root_fd, entry.name, backing.RENAME_NOREPLACE
            )
            backing.fsync_dir(dst.root_fd)
            datastore.relocation_switched(entry, dst)
            on_commit(entry, resolver(dst, entry.name, mapping))
            copier.detach()  # before the gate opens: no write goes to the pool twice
            step("repoint")
    finally:
        gate.open()
        log.info("switchover of %r: %s ms", entry.name, steps)
    return (time.monotonic() - start) * 1000
