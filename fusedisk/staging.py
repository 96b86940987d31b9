"""The destination tree of a relocation: built during the copy, kept in step.

A relocation builds the entry's tree on the destination, ``<staging>/tree``,
while the copy runs, not inside the switchover's pause: directories,
symlinks and special files are made anew, a regular file's pool file (see
mirror.py) is moved to its first name (further names are links), and every
object gets the owner, mode, xattrs, times, inode number and ctime the mount
shows for its source. From then on the tree is kept in step from the entry's
:class:`~fusedisk.datastore.Journal`, in which the mount notes every object
whose names or attributes a request changed (fs.py); a *sync* looks at those
objects only: a changed directory's names are compared with its staged
names, a changed object's attributes are copied again. Regular files the
guest wrote (``VFile.touched``) or the copier wrote (``FileCopy.restamp``)
get their size and times again. A *flush* fsyncs only what a sync or the
copy changed since the last flush. So the switchover's pause, which runs
the last sync and flush, costs what changed since the one before it, not
what the entry holds.

**Moving things.** A staged name whose source name is gone, or now names
another object, is moved to ``<staging>/limbo`` (under a number), not
removed: the object may have moved to a directory that this sync processes
later (a rename across directories), which then takes it back. An object
whose source is gone (no link left: the journal's handle of it keeps its
inode number from being reused until the sync has seen it) is removed from
limbo at once; the last sync, inside the pause, removes what is left there
(a surplus link would show as one link more once the tree is the entry).

**Identity.** A source object is known by its backing key ``(st_dev,
st_ino)`` on the source store, which no rename changes. A staged object's
place is kept as (parent's key, name), so that moving a directory is one
update and any object's path is found by walking up.

Runs on the trio thread, like the copy (no other task changes the staged
tree): a sync before the pause checkpoints between objects, and whatever a
request changes meanwhile is noted again when it ends; the fsyncs of a
flush run on a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from . import backing
from .backing import keep_identity, kept_identity
from .datastore import native_ino
from .mirror import Copier, FileCopy

log = logging.getLogger(__name__)

Key = tuple[int, int]
#: The parent "key" of objects in limbo, and of the tree's root.
_LIMBO: Key = (-1, -1)
_TOP: Key = (-2, -2)
TREE = "tree"
LIMBO = "limbo"
#: Objects a sync before the pause handles between two checkpoints.
_SLICE = 64


class StagingError(Exception):
    """The staged tree cannot be kept in step (a bug, or the destination failed)."""


@dataclass(slots=True)
class Statistics:
    objects: int
    limbo: int
    unsynced: int
    syncs: int
    last_sync_objects: int


def identity_of(src_fd: int, st: os.stat_result, src_store_id: int) -> tuple[int, int] | None:
    """The inode number and ctime the mount shows for a source object (fs.py
    reads them back), or None when it shows none that a staged object can keep.
    A staged object is given them after its attributes, whose changes move the
    backing ctime, which the kept one hides."""
    ino, ctime_ns = kept_identity(src_fd)
    if ino is None:
        ino = native_ino(src_store_id, st.st_ino)
    if ino is None:
        return None
    return ino, st.st_ctime_ns if ctime_ns is None else ctime_ns


class StagedTree:
    """The staged copy of one entry's tree; see the module doc."""

    def __init__(self, staging_fd: int, copier: Copier, src_store_id: int) -> None:
        self.staging_fd = staging_fd
        self.copier = copier
        self.src_store_id = src_store_id
        #: where each staged object is: (parent's key, name); the root: (_TOP, TREE)
        self._place: dict[Key, tuple[Key, str]] = {}
        #: each staged directory's names, by its key (limbo: _LIMBO)
        self._names: dict[Key, dict[str, Key]] = {_LIMBO: {}}
        #: the backing key of each staged object on the destination
        self._dst_key: dict[Key, Key] = {}
        #: source key → the staged object's file handle (None: its filesystem has
        #: none) and the ctime the mount is to show for it (its kept one): what a
        #: switchover re-points an inode to without opening or reading anything
        self._dst_handle: dict[Key, bytes | None] = {}
        self._dst_kept_ctime: dict[Key, int | None] = {}
        #: destination key → source key (the reverse of _dst_key)
        self._src_of_dst: dict[Key, Key] = {}
        #: staged objects whose filesystem gave no handle
        self._no_handle = 0
        #: the other names (hard links) of staged objects, beside their place
        self._links: dict[Key, set[tuple[Key, str]]] = {}
        #: directories whose names a sync before the pause could not bring in
        #: step (the source moved under it): synced again by the next one
        self._retry: dict[Key, int] = {}
        #: staged objects whose data or attributes changed since the last flush
        self._unsynced: set[Key] = set()
        #: staged directories whose names changed since the last flush
        self._unsynced_dirs: set[Key] = set()
        self._limbo_fd = -1
        self._limbo_seq = 0
        self._ops = 0
        self.root_key: Key | None = None
        self.syncs = 0
        self.last_sync_objects = 0

    # -- where things are -------------------------------------------------------------

    def path_of(self, key: Key) -> tuple[str, ...]:
        """The path of a staged object, relative to the staging directory."""
        parts: list[str] = []
        while key != _TOP:
            parent, name = self._place[key]
            parts.append(name)
            if parent == _LIMBO:
                parts.append(LIMBO)
                break
            key = parent
        return tuple(reversed(parts))

    def in_tree(self, key: Key) -> tuple[str, ...] | None:
        """The path of a staged object relative to the tree's root; None if it
        is not in the tree (in limbo, or never staged)."""
        if key not in self._place:
            return None
        path = self.path_of(key)
        return path[1:] if path[0] == TREE else None

    def dst_key(self, key: Key) -> Key | None:
        """The destination's backing key of a staged object in the tree."""
        return self._dst_key.get(key) if self.in_tree(key) is not None else None

    def dst_identity(self, key: Key, memo: dict[Key, bool] | None = None
                     ) -> tuple[Key, bytes, int | None] | None:
        """(backing key, file handle, kept ctime) of the staged self of *key* in
        the tree, as recorded when it was staged and last synced; None when it is
        not in the tree or its filesystem gave no handle (the caller then opens it).
        *memo* (kept by the caller while the tree does not change) remembers which
        directories are in the tree, so that a re-point of every inode walks each
        directory's ancestry once, not once per object below it."""
        if not self._in_tree_memo(key, {} if memo is None else memo):
            return None
        handle = self._dst_handle.get(key)
        dst = self._dst_key.get(key)
        if handle is None or dst is None:
            return None
        return dst, handle, self._dst_kept_ctime.get(key)

    def src_key(self, dst: Key) -> Key | None:
        """The source object whose staged self is the destination object *dst*."""
        key = self._src_of_dst.get(dst)
        return key if key is not None and self._dst_key.get(key) == dst else None

    def handles_complete(self) -> bool:
        """Whether every staged object has a recorded file handle."""
        return self._no_handle == 0

    def _in_tree_memo(self, key: Key, memo: dict[Key, bool]) -> bool:
        walked: list[Key] = []
        found: bool | None = memo.get(key)
        while found is None:
            place = self._place.get(key)
            if place is None:
                found = False
                break
            walked.append(key)
            parent, name = place
            if parent == _TOP:
                found = name == TREE
            elif parent == _LIMBO:
                found = False
            else:
                key = parent
                found = memo.get(key)
        for k in walked:
            memo[k] = found
        return found

    def _open(self, key: Key) -> int:
        return backing.open_parts(self.staging_fd, self.path_of(key))

    # -- building -------------------------------------------------------------------------

    async def build(self, src_fd: int) -> None:
        """Stage the whole entry below *src_fd* (its root) for the first time."""
        backing.remove_tree(self.staging_fd, TREE)
        backing.remove_tree(self.staging_fd, LIMBO)
        backing.mkdir_at(self.staging_fd, LIMBO, 0o700)
        self._limbo_fd = backing.open_path(self.staging_fd, LIMBO)
        st = backing.fstat(src_fd)
        key = (st.st_dev, st.st_ino)
        self.root_key = key
        await self._make(_TOP, self.staging_fd, TREE, key, src_fd, st, final=False)
        self._unsynced_dirs.add(_TOP)

    async def _make(
        self, parent: Key, dir_fd: int, name: str, key: Key, src_fd: int, st: os.stat_result,
        final: bool,
    ) -> None:
        """Make a new staged object for source *key* as *name* in *dir_fd*."""
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            backing.mkdir_at(dir_fd, name, 0o700)
        elif stat.S_ISREG(mode):
            copy = self.copier.copies.get(key) or self.copier.add(src_fd, key)
            backing.renameat2(self.copier.pool_fd, copy.pool_name, dir_fd, name,
                              backing.RENAME_NOREPLACE)
        elif stat.S_ISLNK(mode):
            backing.symlink_at(dir_fd, name, backing.readlink(src_fd))
        else:  # FIFOs, sockets, device nodes
            backing.mknod_at(dir_fd, name, mode, st.st_rdev)
        self._place[key] = (parent, name)
        self._names.setdefault(parent, {})[name] = key
        if stat.S_ISDIR(mode):
            self._names[key] = {}
            dst_fd = backing.open_path(dir_fd, name)
            try:
                for child in sorted(backing.list_dir(src_fd)):
                    await self._step(final)
                    try:
                        child_fd = backing.open_path(src_fd, child)
                    except FileNotFoundError:
                        continue  # gone meanwhile: its parent is noted again
                    try:
                        child_st = backing.fstat(child_fd)
                        child_key = (child_st.st_dev, child_st.st_ino)
                        await self._put(key, dst_fd, child, child_key, child_fd, child_st, final)
                    finally:
                        backing.close(child_fd)
                self._unsynced_dirs.add(key)
            finally:
                backing.close(dst_fd)
        self._copy_attributes(key, src_fd, st)

    async def _put(
        self, parent: Key, dir_fd: int, name: str, key: Key, src_fd: int, st: os.stat_result,
        final: bool,
    ) -> None:
        """Make staged *name* in *parent* (open as *dir_fd*) the object *key*."""
        place = self._place.get(key)
        if place is None:
            await self._make(parent, dir_fd, name, key, src_fd, st, final)
            return
        old_parent, old_name = place
        if old_parent == _LIMBO or stat.S_ISDIR(st.st_mode):
            # in limbo, or a directory (one name only): move it here
            old_dir_fd = self._limbo_fd if old_parent == _LIMBO else self._open(old_parent)
            try:
                backing.renameat2(old_dir_fd, old_name, dir_fd, name, backing.RENAME_NOREPLACE)
            finally:
                if old_dir_fd != self._limbo_fd:
                    backing.close(old_dir_fd)
            del self._names[old_parent][old_name]
            self._unsynced_dirs.add(old_parent)
            self._place[key] = (parent, name)
        else:  # another name of an object staged already
            backing.link_at(self.staging_fd, "/".join(self.path_of(key)), dir_fd, name)
            self._links.setdefault(key, set()).add((parent, name))
        self._names[parent][name] = key

    def _to_limbo(self, parent: Key, dir_fd: int, name: str) -> None:
        """Move staged *name* of *parent* to limbo (see the module doc)."""
        key = self._names[parent].pop(name)
        self._limbo_seq += 1
        limbo_name = str(self._limbo_seq)
        backing.renameat2(dir_fd, name, self._limbo_fd, limbo_name, backing.RENAME_NOREPLACE)
        self._names[_LIMBO][limbo_name] = key
        self._unsynced_dirs.update((parent, _LIMBO))
        links = self._links.get(key)
        if self._place.get(key) == (parent, name):
            if links:  # another name stays in the tree: that is its place now
                self._place[key] = links.pop()
            else:
                self._place[key] = (_LIMBO, limbo_name)
        elif links is not None:
            links.discard((parent, name))
        if links is not None and not links:
            del self._links[key]

    # -- keeping in step --------------------------------------------------------------

    async def sync_names(self, changed: dict[Key, int], *, final: bool = False) -> None:
        """Bring the names of every changed directory in step with its source.

        *changed*: the journal's objects (handles stay the caller's). First
        every staged name that no longer matches goes to limbo, in every
        changed directory; then the missing names are brought in, from
        limbo (moved) or made anew: so a directory that moved is always in
        limbo when its new parent takes it. With *final* (inside the pause)
        nothing else runs meanwhile, a failure raises, and limbo is emptied.
        """
        self.syncs += 1
        self.last_sync_objects = len(changed)
        retry, self._retry = self._retry, {}
        todo = {**retry, **changed}
        try:
            dirs: list[tuple[Key, int, dict[str, Key]]] = []
            for key, src_fd in todo.items():
                if key not in self._names or key == _LIMBO:
                    continue  # not a staged directory
                wanted = _listing(src_fd)
                if wanted is not None:
                    dirs.append((key, src_fd, wanted))
            for key, _src_fd, wanted in dirs:  # out of the way
                staged = self._names[key]
                wrong = [name for name, skey in staged.items() if wanted.get(name) != skey]
                if wrong:
                    dir_fd = self._open(key)
                    try:
                        for name in wrong:
                            self._to_limbo(key, dir_fd, name)
                    finally:
                        backing.close(dir_fd)
            for key, src_fd, wanted in dirs:  # in
                await self._bring_in(key, src_fd, wanted, final)
            for key, src_fd in todo.items():
                self._purge_if_gone(key, src_fd)
            if final:
                self._empty_limbo()
        finally:
            for fd in retry.values():
                if fd not in changed.values():
                    backing.close(fd)

    async def _bring_in(self, key: Key, src_fd: int, wanted: dict[str, Key], final: bool) -> None:
        staged = self._names[key]
        missing = sorted(name for name, okey in wanted.items() if staged.get(name) != okey)
        if not missing:
            return
        dir_fd = self._open(key)
        try:
            for name in missing:
                await self._step(final)
                okey = wanted[name]
                try:
                    obj_fd = backing.open_path(src_fd, name)
                except FileNotFoundError:
                    continue  # gone meanwhile: its parent is noted again
                try:
                    st = backing.fstat(obj_fd)
                    if (st.st_dev, st.st_ino) != okey or name in staged:
                        continue  # replaced meanwhile: noted again
                    try:
                        await self._put(key, dir_fd, name, okey, obj_fd, st, final)
                    except OSError as e:
                        if final:
                            raise StagingError(
                                f"cannot stage {name!r}: {e.strerror or e}") from None
                        # the source moved under this sync: the next one tries again
                        log.debug("staging %r deferred: %s", name, e)
                        if key not in self._retry:
                            self._retry[key] = os.dup(src_fd)
                finally:
                    backing.close(obj_fd)
        finally:
            backing.close(dir_fd)

    def _purge_if_gone(self, key: Key, src_fd: int) -> None:
        """Remove the staged copy of an object whose source has no link left."""
        place = self._place.get(key)
        if place is None or place[0] != _LIMBO:
            return
        try:
            if backing.fstat(src_fd).st_nlink > 0:
                return
        except OSError:
            return
        self._remove_limbo(place[1])

    def _remove_limbo(self, limbo_name: str) -> None:
        key = self._names[_LIMBO].pop(limbo_name)
        self._forget(key, (_LIMBO, limbo_name))
        backing.remove_tree(self._limbo_fd, limbo_name)
        self._unsynced_dirs.add(_LIMBO)

    def _forget(self, key: Key, place: tuple[Key, str]) -> None:
        """Drop *key* (and what is below it) from the tables, if staged at *place*.

        A name of an object that has another name left in the tree drops only
        that name (the object lives on there: it is still copied and synced).
        """
        links = self._links.get(key)
        here = self._place.get(key) == place
        if not here or links:
            if here and links:
                self._place[key] = links.pop()  # another name stays: its place now
            elif links is not None:
                links.discard(place)  # a surplus link: the object stays where it is
            if links is not None and not links:
                del self._links[key]
            return
        del self._place[key]
        dst = self._dst_key.pop(key, None)
        if dst is not None and self._src_of_dst.get(dst) == key:
            del self._src_of_dst[dst]
        if key in self._dst_handle and self._dst_handle.pop(key) is None:
            self._no_handle -= 1
        self._dst_kept_ctime.pop(key, None)
        self._links.pop(key, None)
        self._unsynced.discard(key)
        # a directory gone for good needs no fsync; and its inode number may come back
        # as a new file before the next flush, which must not fsync that as a directory
        self._unsynced_dirs.discard(key)
        self.copier.drop(key)  # a regular file's copy: nothing will name it again
        for name, child in list(self._names.pop(key, {}).items()):
            self._forget(child, (key, name))

    def _empty_limbo(self) -> None:
        for limbo_name in list(self._names[_LIMBO]):
            self._remove_limbo(limbo_name)

    async def sync_attributes(self, changed: dict[Key, int], *, final: bool = False) -> int:
        """Copy the attributes of every changed object, and the size and times
        of every regular file written since the last time; return how many.

        Before the pause (not *final*) it checkpoints every :data:`_SLICE`
        objects, as :meth:`sync_names` does: after a pass that copied a whole
        entry every file wants its size and times again, and a mount that
        waited for them all would stall its guests (30 s for 30k files). A
        request meanwhile is noted again; the object it changed is done now
        or by the next sync. Inside the pause (*final*) it never checkpoints.
        """
        done = 0
        for key, src_fd in changed.items():
            await self._step(final)  # between objects: none is half done
            if self.in_tree(key) is None:
                continue
            try:
                st = backing.fstat(src_fd)
            except OSError:
                continue
            if st.st_nlink == 0:
                continue
            copy = self.copier.copies.get(key)
            if copy is not None:
                with self.copier.using(copy) as vfile:
                    vfile.touched = copy.restamp = False
                    self.copier.fit(copy)
                    self._copy_attributes(key, src_fd, st)
            else:
                self._copy_attributes(key, src_fd, st)
            done += 1
        for copy in self._written():
            await self._step(final)
            if copy.key not in self.copier.copies or self.in_tree(copy.key) is None:
                continue  # dropped, or gone from the tree, while this sync waited
            with self.copier.using(copy) as vfile:
                vfile.touched = copy.restamp = False
                st = backing.fstat(vfile.fd)
                if st.st_nlink == 0:
                    continue
                self.copier.fit(copy)
                self._copy_attributes(copy.key, vfile.fd, st)
            done += 1
        return done

    def written(self) -> int:
        """Regular files a sync would give their size and times again."""
        return sum(1 for _ in self._written())

    def _written(self) -> Iterator[FileCopy]:
        for copy in self.copier.with_work():  # a parked one is touched no more
            touched = copy.vfile is not None and copy.vfile.touched
            if (touched or copy.restamp) and self.in_tree(copy.key) is not None:
                yield copy

    def _copy_attributes(self, key: Key, src_fd: int, st: os.stat_result) -> None:
        copy = self.copier.copies.get(key) if stat.S_ISREG(st.st_mode) else None
        own = copy is not None and copy.dst_fd >= 0
        if copy is None:
            dst_fd = self._open(key)
        else:
            dst_fd = copy.dst_fd if own else self.copier.open_pool(copy)
        try:
            identity = identity_of(src_fd, st, self.src_store_id)
            # the kept identity is written again below: not removed first
            backing.sync_attributes(src_fd, dst_fd, st,
                                    () if identity is None else (backing.INO_XATTR,))
            if identity is not None:  # after the attributes (see identity_of)
                keep_identity(dst_fd, *identity)
            if key not in self._dst_key:
                dst = backing.fstat(dst_fd)
                self._dst_key[key] = (dst.st_dev, dst.st_ino)
                self._src_of_dst[(dst.st_dev, dst.st_ino)] = key
                handle = self._dst_handle[key] = backing.handle_of(dst_fd)
                self._no_handle += handle is None
            # what fs.py would read back from the staged object's kept identity
            self._dst_kept_ctime[key] = (identity[1] if identity is not None
                                         else kept_identity(dst_fd)[1])
        finally:
            if not own:
                backing.close(dst_fd)
        self._unsynced.add(key)

    async def _step(self, final: bool) -> None:
        self._ops += 1
        if not final and self._ops % _SLICE == 0:
            await trio.lowlevel.checkpoint()

    # -- durability -------------------------------------------------------------------

    def pending(self) -> int:
        """Objects and directories a flush would fsync now (for the pause estimate)."""
        return len(self._unsynced) + len(self._unsynced_dirs) + sum(
            1 for c in self.copier.with_work() if c.unflushed)

    async def flush(self) -> int:
        """fsync what changed since the last flush (on a worker thread); return how many."""
        # A descriptor each at once would grow with the entry: pool files are
        # opened in turn on the worker thread (by their open copy or by file
        # handle, which no rename changes), directories in batches here.
        files: list[Callable[[], int]] = []
        for key in self._unsynced:
            copy = self.copier.copies.get(key)
            if copy is not None:
                files.append(self.copier.pool_opener(copy))
                copy.unflushed = 0
        for copy in self.copier.with_work():
            if copy.unflushed and copy.key not in self._unsynced:
                # data only: the attributes were synced before
                files.append(self.copier.pool_opener(copy))
                copy.unflushed = 0
        dir_keys = list(self._unsynced_dirs)
        self._unsynced.clear()
        self._unsynced_dirs.clear()
        await backing.run_blocking(_fsync_files, files)
        for start in range(0, len(dir_keys), _FLUSH_DIRS):
            dirs: list[int] = []
            try:
                for key in dir_keys[start:start + _FLUSH_DIRS]:
                    if key == _TOP:
                        dirs.append(os.dup(self.staging_fd))
                    elif key == _LIMBO:
                        dirs.append(os.dup(self._limbo_fd))
                    elif key in self._place:
                        dirs.append(self._open(key))
                await backing.run_blocking(_fsync_dirs, dirs)
            finally:
                for fd in dirs:
                    backing.close(fd)
        return len(files) + len(dir_keys)

    def close(self) -> None:
        for fd in self._retry.values():
            backing.close(fd)
        self._retry.clear()
        if self._limbo_fd >= 0:
            backing.close(self._limbo_fd)
            self._limbo_fd = -1

    def statistics(self) -> Statistics:
        return Statistics(
            objects=len(self._place), limbo=len(self._names[_LIMBO]),
            unsynced=len(self._unsynced) + len(self._unsynced_dirs), syncs=self.syncs,
            last_sync_objects=self.last_sync_objects,
        )


#: staged directories a flush holds open at once
_FLUSH_DIRS = 64


def _listing(dir_fd: int) -> dict[str, Key] | None:
    """Name → key of what the source directory holds now; None if it is gone."""
    try:
        st = backing.fstat(dir_fd)
        if st.st_nlink == 0 or not stat.S_ISDIR(st.st_mode):
            return None
        names = backing.list_dir(dir_fd)
    except OSError:
        return None
    out: dict[str, Key] = {}
    for name in names:
        try:
            child = backing.lstat_at(dir_fd, name)
        except FileNotFoundError:
            continue
        out[name] = (child.st_dev, child.st_ino)
    return out


def _fsync_files(files: list[Callable[[], int]]) -> None:
    """fsync every file, each opened by its callable and closed after (before
    the directories: names after the objects they name)."""
    error: OSError | None = None
    for opener in files:  # each opened is closed, even after an error
        try:
            fd = opener()
        except OSError as e:
            error = error or e
            continue
        try:
            if error is None:
                os.fsync(fd)
        except OSError as e:
            error = e
        finally:
            backing.close(fd)
    if error is not None:
        raise error


def _fsync_dirs(dirs: list[int]) -> None:
    for fd in dirs:
        try:
            backing.fsync_dir(fd)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
