"""The datastore namespace: stores, top-level entries and their placement.

Every top-level entry (a VM home directory, or a single file) lives on
exactly one store. The placement table is the truth about where; it is
persisted in the state directory as the ``datastore`` record together with
the stores' numeric ids (which make inode numbers stable across mounts).

Ordering rule for namespace changes at the top level: the backing change
happens first, the placement record is saved second. A crash in between
leaves a state that :meth:`Datastore.open` repairs without guessing: an
entry found on exactly one store but missing from the table is adopted, an
entry in the table that no store holds is dropped (both logged). A name
found on several stores and absent from the table is *not* merged: it is
reported as a conflict and left out of the namespace until an operator
removes one copy.

A store belongs to one datastore at a time (:class:`StoreClaims`): its root
holds the owner file :data:`OWNER_NAME`, which the serving daemon keeps
flocked and which names the datastore's state directory, so that another
datastore is refused while that one runs, and also while its state
directory still lists the store. Nothing on a store is touched before every
store is claimed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import backing
from .config import Config
from .errors import ConfigError, OwnershipError, StateError
from .failpoint import stall
from .gate import Gate
from .lifecycle import Phase
from .metadata import (
    OWNER_SLOT_SIZE,
    StateDir,
    parse_slots,
    read_identity,
    write_slot_fd,
)

log = logging.getLogger(__name__)

#: Top-level names with this prefix are fusedisk's own (relocation scratch).
RESERVED_PREFIX = ".fusedisk"
#: Top-level names that belong to a store's filesystem, not to the datastore:
#: a store on its own ext4 disk has e2fsck's ``lost+found`` at its root, and
#: with two such stores it would otherwise be a conflict at every mount.
STORE_OWN_NAMES = frozenset({"lost+found"})
#: The mount's own top-level name: the read-only view of every snapshot
#: (snapview.py). No entry may take it; a store directory of that name is
#: not served (it would be hidden by the view), with a warning at mount.
SNAPSHOT_VIEW_NAME = ".snapshots"
_RECORD = "datastore"
#: Store ids are packed into the top bits of inode numbers (see fs.py).
MAX_STORE_ID = (1 << 14) - 1
#: How long a top-level create, removal or rename waits for the placement
#: record's save, which then carries every such change made meanwhile (see
#: :meth:`Datastore.run`).
NAMESPACE_SAVE_DELAY_S = 0.5
#: At the root of every store: the record of the datastore it belongs to (two
#: slots, see metadata.write_slot_fd), flocked by the daemon serving it.
OWNER_NAME = f"{RESERVED_PREFIX}-owner"
_OWNER_KIND = "owner"
#: How often a claim retries when the owner file changes under it (another
#: daemon removing the one it had just created, on a refused mount).
_OWNER_OPEN_TRIES = 16
STORE_SHIFT = 48
def native_ino(store_id: int, st_ino: int) -> int | None:
    """The inode number the mount shows for backing inode *st_ino* of a store,
    unless the object keeps another (:data:`backing.INO_XATTR`); None if it does not fit."""
    if st_ino >> STORE_SHIFT:
        return None
    return (store_id << STORE_SHIFT) | st_ino


@dataclass(eq=False, slots=True)
class Store:
    """A backing directory. ``root_fd`` is an O_PATH handle held for the mount's life."""

    name: str
    path: Path
    store_id: int
    root_fd: int
    #: the largest single write to its files (backing.pwrite_all): larger for a remote
    #: store, whose every write is a round trip
    write_piece: int = backing.WRITE_PIECE

    def statvfs(self) -> os.statvfs_result:
        return backing.statvfs(self.root_fd)


class Journal:
    """The objects of an entry whose names or attributes the mount changed,
    while a relocation keeps a staged copy of its tree in step (staging.py).

    The mount notes an object (by its backing key, with an O_PATH handle of
    its own) when a request that changed it has ended (fs.py): a copy made
    after the note sees the change, and one made while the request ran is
    made again after the next :meth:`take`.
    """

    __slots__ = ("_closed", "_fds")

    def __init__(self) -> None:
        self._fds: dict[tuple[int, int], int] = {}
        self._closed = False

    def note(self, key: tuple[int, int], path_fd: int) -> None:
        """Object *key* (behind *path_fd*, which stays the caller's) changed."""
        if key not in self._fds and not self._closed:
            self._fds[key] = os.dup(path_fd)

    def add(self, key: tuple[int, int], own_fd: int) -> None:
        """:meth:`note`, handing over a handle of the object's own."""
        if key in self._fds or self._closed:
            backing.close(own_fd)
        else:
            self._fds[key] = own_fd

    def __len__(self) -> int:
        return len(self._fds)

    def take(self) -> dict[tuple[int, int], int]:
        """The objects noted since the last take; their handles are the caller's now."""
        fds, self._fds = self._fds, {}
        return fds

    def close(self) -> None:
        """The relocation ended: drop what is noted, and note nothing more."""
        self._closed = True
        for fd in self.take().values():
            backing.close(fd)


@dataclass(eq=False, slots=True)
class Entry:
    """A top-level entry. Only :class:`Datastore` changes ``name`` and ``store``.

    ``gate`` quiesces the entry's requests for a switchover; ``journal``,
    while a relocation runs, lists what the mount changed in the entry (see
    :class:`Journal`). Whether one runs is the datastore's record
    (:meth:`Datastore.relocating`), not a copy here.
    """

    name: str
    store: Store
    gate: Gate = field(default_factory=Gate)
    journal: Journal | None = None


def _scratch_name(kind: str, entry_name: str) -> str:
    """``.fusedisk-<kind>-<entry>``, or, when that would pass NAME_MAX, the
    entry's sha256 in its place: an entry name may use all 255 bytes."""
    name = f"{RESERVED_PREFIX}-{kind}-{entry_name}"
    if len(os.fsencode(name)) <= backing.NAME_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(entry_name)).hexdigest()
    return f"{RESERVED_PREFIX}-{kind}-sha256-{digest}"


def staging_name(entry_name: str) -> str:
    """Where a relocation builds its copy of *entry_name* on the destination store."""
    return _scratch_name("reloc", entry_name)


def kept_source_name(entry_name: str) -> str:
    """Where ``--keep-source`` leaves the old copy on the source store."""
    return _scratch_name("kept", entry_name)


def _check_distinct(stores: dict[str, Store]) -> None:
    """Two stores must be two directories, however their paths are spelt (a bind mount)."""
    seen: dict[tuple[int, int], Store] = {}
    for store in stores.values():
        st = backing.fstat(store.root_fd)
        other = seen.setdefault((st.st_dev, st.st_ino), store)
        if other is not store:
            raise ConfigError(f"stores {other.name!r} ({other.path}) and {store.name!r} "
                              f"({store.path}) are the same directory")


@dataclass(eq=False, slots=True)
class _Claim:
    """One store's owner file, locked. ``root_fd`` is the store's, not the claim's."""

    store: str
    path: Path
    root_fd: int
    fd: int
    created: bool  #: made by this claim (and removed again if the mount fails)
    writable: bool  #: False on a read-only store: locked, but not rewritten
    seq: int  #: of the newest record in the file (0: none)


class StoreClaims:
    """The owner files of one datastore's stores: claimed at open, locked until released.

    A store whose owner file another process holds locked is served by
    another daemon: refused. An unlocked owner file that names another
    datastore whose state directory still exists and still lists the store
    (in its ``identity`` record) belongs to that datastore: refused, with how
    to release it. Anything else (no owner file, this datastore, a state
    directory that is gone or no longer lists the store) becomes this
    datastore's at :meth:`commit`: the identity record first, then each
    owner file. Locks end with the process, so a crashed daemon never blocks
    the next mount; the files stay, so a claim outlives a clean unmount.

    Blocking throughout (start-up and shut-down only).
    """

    def __init__(self, state: StateDir, mountpoint: Path,
                 shown: dict[str, str] | None = None) -> None:
        self.state = state
        self.mountpoint = mountpoint
        #: store name -> its root as its operator names it, where that is not the
        #: path the daemon uses (a remote store: ``host:/dir``, not its view)
        self.shown = shown or {}
        self._claims: list[_Claim] = []
        self._committed = False

    def claim(self, name: str, path: Path, root_fd: int) -> None:
        """Lock store *name*'s owner file; OwnershipError if the store is another's."""
        where = path / OWNER_NAME
        opened = _open_owner_file(root_fd, name, where)
        if opened is None:
            log.warning("store %r is read-only and has no owner file: it cannot be claimed, "
                        "so nothing stops another datastore from using it too", name)
            return
        fd, created, writable, locked = opened
        try:
            found = parse_slots(os.pread(fd, 2 * OWNER_SLOT_SIZE, 0), _OWNER_KIND,
                                OWNER_SLOT_SIZE, str(where))
        except StateError as e:
            if locked:
                os.close(fd)
                raise OwnershipError(f"store {name!r} ({path}): {e}; if no other datastore "
                                     f"uses this store, delete {where}") from None
            found = None
        if not locked:
            os.close(fd)
            raise OwnershipError(_in_use(name, self.shown.get(name, str(path)),
                                         found[1] if found else None))
        self._claims.append(_Claim(name, path, root_fd, fd, created, writable,
                                   found[0] if found else 0))
        if found is not None and self._claimed_elsewhere(found[1], path):
            raise OwnershipError(_claimed(name, self.shown.get(name, str(path)), found[1]))

    def _claimed_elsewhere(self, owner: dict[str, Any], path: Path) -> bool:
        """Whether the datastore an owner record names still claims the store at *path*."""
        other_dir, other_id = owner.get("state_dir"), owner.get("datastore_id")
        if not isinstance(other_dir, str) or not isinstance(other_id, str) or not other_dir:
            return False  # names no claimant
        if other_id == self.state.datastore_id and (
            os.path.realpath(other_dir) == os.path.realpath(self.state.path)
        ):
            return False  # ours
        host = owner.get("host")
        if isinstance(host, str) and host and host != socket.gethostname():
            return True  # its state directory is on another host: it cannot be asked here
        try:
            identity = read_identity(Path(other_dir))
        except StateError:
            return True  # it exists but cannot be read: it may well still claim the store
        if identity is None or identity.get("datastore_id") != other_id:
            return False  # gone, or the directory holds another datastore now
        listed = identity.get("stores")
        if not isinstance(listed, dict):
            return True
        paths = {os.path.realpath(p) for p in listed.values() if isinstance(p, str) and p}
        mine = {os.path.realpath(path)}
        recorded = owner.get("store_path")
        if isinstance(recorded, str) and recorded:
            mine.add(os.path.realpath(recorded))
        return bool(paths & mine)

    def commit(self, stores: dict[str, Path]) -> None:
        """Make the claims durable: the identity record (every store), then each owner file."""
        self.state.save_identity(self.mountpoint, {
            name: os.path.realpath(path) for name, path in sorted(stores.items())})
        for claim in self._claims:
            if not claim.writable:
                continue
            body = {
                "datastore_id": self.state.datastore_id,
                "state_dir": str(self.state.path),
                "mountpoint": str(self.mountpoint),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "store": claim.store,
                "store_path": os.path.realpath(claim.path),
            }
            claim.seq += 1
            write_slot_fd(claim.fd, _OWNER_KIND, claim.seq, body, OWNER_SLOT_SIZE,
                          str(claim.path / OWNER_NAME))
            if claim.created:
                backing.fsync_dir(claim.root_fd)
        self._committed = True

    def release(self) -> None:
        """Unlock every owner file; before :meth:`commit`, remove those this claim made.

        Idempotent. A refused mount thus leaves no owner file behind (one
        removed while locked is never taken for the lock: see
        :func:`_open_owner_file`).
        """
        claims, self._claims = self._claims, []
        for claim in claims:
            if claim.created and not self._committed:
                try:
                    os.unlink(OWNER_NAME, dir_fd=claim.root_fd)
                except OSError:
                    pass
            os.close(claim.fd)


def _open_owner_file(
    root_fd: int, name: str, where: Path
) -> tuple[int, bool, bool, bool] | None:
    """Open (or create) a store's owner file and try to lock it.

    Returns ``(fd, created, writable, locked)``, or None on a read-only store
    that has none. The lock counts only if the file still has its name once
    locked: a refused mount removes the owner file it created while holding
    its lock, and a lock on that unlinked file would guard nothing.
    """
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(_OWNER_OPEN_TRIES):
        created, writable = False, True
        try:
            try:
                fd = os.open(OWNER_NAME, os.O_RDWR | flags, dir_fd=root_fd)
            except FileNotFoundError:
                try:
                    fd = os.open(OWNER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o600,
                                 dir_fd=root_fd)
                    created = True
                except FileExistsError:
                    continue
                except OSError as e:
                    if e.errno == errno.EROFS:
                        return None
                    raise
            except OSError as e:
                if e.errno != errno.EROFS:
                    raise
                fd = os.open(OWNER_NAME, os.O_RDONLY | flags, dir_fd=root_fd)
                writable = False
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OwnershipError(f"store {name!r}: cannot open its owner file {where}: "
                                 f"{e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OwnershipError(f"store {name!r}: {where} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return fd, created, writable, False
            except OSError as e:
                raise OwnershipError(
                    f"store {name!r}: cannot lock {where}: {e.strerror}") from None
            try:
                named: os.stat_result | None = os.stat(
                    OWNER_NAME, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            raise
        if named is not None and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
            return fd, created, writable, True
        os.close(fd)
    raise OwnershipError(f"store {name!r}: its owner file {where} keeps changing; "
                         "is another fusedisk daemon starting on this store?")


def _in_use(name: str, path: str, owner: dict[str, Any] | None) -> str:
    if owner is None:
        who = "which one is not recorded yet"
    else:
        who = (f"state directory {owner.get('state_dir')}, mounted on "
               f"{owner.get('mountpoint')}, daemon pid {owner.get('pid')}")
    return f"store {name!r} ({path}) is in use by another fusedisk datastore ({who})"


def _claimed(name: str, path: str, owner: dict[str, Any]) -> str:
    host = owner.get("host")
    on_host = f" on host {host}" if isinstance(host, str) and host != socket.gethostname() else ""
    return (f"store {name!r} ({path}) belongs to the datastore whose state directory is "
            f"{owner.get('state_dir')}{on_host} (last mounted on {owner.get('mountpoint')}); "
            "to use it "
            "here, remove it from that datastore's stores and mount that datastore once, or, "
            f"if that datastore is gone, delete {path}/{OWNER_NAME} (or its state directory)")


class Datastore:
    """Stores and placement; the single writer of the ``datastore`` record."""

    def __init__(self, state: StateDir, stores: dict[str, Store], default_store: str) -> None:
        self.state = state
        self.stores = stores
        self.default_store = stores[default_store]
        self.entries: dict[str, Entry] = {}
        #: name → stores holding it, for names that could not be placed.
        self.conflicts: dict[str, list[str]] = {}
        self._store_ids: dict[str, int] = {}
        self._save_lock = trio.Lock()
        #: why the last namespace save failed, until one succeeds (see _save_namespace)
        self.record_stale: str | None = None
        #: entry → relocation record: {"from", "to", "phase", "keep_source", "options"};
        #: phase: a lifecycle.Phase (what the job's state maps to, lifecycle.PHASE_OF)
        self.relocations: dict[str, dict[str, Any]] = {}
        #: relocations a crash or a stop interrupted before their commit: the
        #: daemon resumes them (their records stay in :attr:`relocations`)
        self.resumable: dict[str, dict[str, Any]] = {}
        #: top-level changes made, and how many of them a finished save attempt
        #: covers; with :meth:`run` serving, they are saved behind the requests
        self._changes = 0
        self._changes_saved = 0
        self._saver_running = False
        self._changed = trio.Event()
        self._saved = trio.Event()
        self._hurry = trio.Event()

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, config: Config, state: StateDir, claims: StoreClaims) -> Datastore:
        """Load the placement, open and claim the stores, repair and adopt. Blocking.

        Every store is claimed (into *claims*, which the caller releases when
        the datastore closes) before anything on any store is looked at.
        """
        record = state.load(_RECORD) or {}
        store_ids: dict[str, int] = dict(record.get("stores", {}))
        placement: dict[str, str] = dict(record.get("placement", {}))
        for name, store_name in sorted(placement.items()):
            if store_name not in config.stores:
                raise ConfigError(
                    f"entry {name!r} is placed on store {store_name!r}, which is not "
                    "configured any more; add the store back"
                )
        next_id = max(store_ids.values(), default=0) + 1
        stores: dict[str, Store] = {}
        try:
            for name, path in sorted(config.stores.items()):
                if name not in store_ids:
                    if next_id > MAX_STORE_ID:
                        raise StateError("too many stores have been configured over time")
                    store_ids[name] = next_id
                    next_id += 1
                try:
                    fd = backing.open_dir_path(str(path))
                except OSError as e:
                    raise ConfigError(f"store {name!r}: cannot open {path}: {e.strerror}") from None
                stores[name] = Store(name, path, store_ids[name], fd,
                                     backing.REMOTE_WRITE_PIECE
                                     if name in config.remote_stores
                                     else backing.WRITE_PIECE)
            _check_distinct(stores)
            for store in stores.values():
                claims.claim(store.name, store.path, store.root_fd)
            ds = cls(state, stores, config.default_store)
            ds._store_ids = store_ids
            for name, reloc in sorted(dict(record.get("relocations", {})).items()):
                ds._recover_relocation(name, reloc, placement)
            ds._adopt(placement)
            for name in list(ds.resumable):
                if name not in ds.entries or ds.entries[name].store.name != ds.resumable[name][
                        "from"]:
                    ds._drop_resumable(name)
            claims.commit({name: store.path for name, store in stores.items()})
        except BaseException:
            claims.release()  # before the root handles it works through are closed
            for store in stores.values():
                os.close(store.root_fd)
            raise
        ds.save_nowait_blocking()
        return ds

    def _recover_relocation(
        self, name: str, reloc: dict[str, Any], placement: dict[str, str]
    ) -> None:
        """Finish or undo a relocation that a crash interrupted (before adoption).

        Before the commit record the source is the truth: the relocation is
        resumed from the partial copy (the daemon starts it again, see
        relocation.py), unless it had failed or was cancelled ("abandoned"):
        then the partial copy is removed. After it,
        the destination is: its staged tree takes the entry's name, and the
        source copy is removed (or kept aside with ``keep_source``).
        """
        src, dst = self.stores.get(reloc.get("from", "")), self.stores.get(reloc.get("to", ""))
        if src is None or dst is None:
            raise ConfigError(
                f"entry {name!r} was being relocated between stores {reloc.get('from')!r} and "
                f"{reloc.get('to')!r}; configure both stores again to finish the recovery"
            )
        staging = staging_name(name)
        phase = reloc.get("phase")
        if phase == Phase.COMMITTED:
            if not (backing.exists_at(dst.root_fd, staging + "/tree")
                    or backing.exists_at(dst.root_fd, name)):
                # neither the staged tree nor its renamed copy: the destination is not
                # what the commit left (a store not mounted, or restored from a
                # backup). The source is all there is: it is served, and stays the
                # truth (the record ends, so that no later mount removes it); a copy
                # that turns up on the destination later is ignored, not merged.
                log.error(
                    "relocation of %r from %r to %r was committed, but %r holds neither the "
                    "staged tree nor the entry (is %s the store's right directory, and "
                    "mounted?); serving the old copy on %r, which stays the truth; nothing "
                    "was removed", name, src.name, dst.name, dst.name, dst.path, src.name,
                )
                return
            if backing.exists_at(dst.root_fd, staging + "/tree"):
                staging_fd = backing.open_path(dst.root_fd, staging)
                try:
                    backing.renameat2(staging_fd, "tree", dst.root_fd, name, 0)
                finally:
                    backing.close(staging_fd)
            placement[name] = dst.name
            try:
                backing.remove_tree(dst.root_fd, staging)
                if backing.exists_at(src.root_fd, name):
                    if reloc.get("keep_source"):
                        backing.remove_tree(src.root_fd, kept_source_name(name))
                        backing.renameat2(src.root_fd, name, src.root_fd,
                                          kept_source_name(name), 0)
                    else:
                        backing.remove_tree(src.root_fd, name)
            except OSError as e:
                # the entry is served from the destination all the same; one
                # store in trouble must not keep the others from being served
                self.relocations[name] = {**reloc, "phase": str(Phase.COMMITTED)}
                log.error(
                    "relocation of %r from %r to %r was committed; removing the old copy "
                    "failed (%s); %r serves it, the next mount retries the removal",
                    name, src.name, dst.name, e.strerror or e, dst.name,
                )
                return
            log.warning(
                "relocation of %r from %r to %r was committed before a crash; finished it",
                name, src.name, dst.name,
            )
        elif phase == Phase.COPYING:
            self.relocations[name] = reloc
            self.resumable[name] = reloc
            log.warning(
                "relocation of %r from %r to %r was interrupted before its commit; %r is "
                "authoritative; it resumes from what %r holds", name, src.name, dst.name,
                src.name, dst.name,
            )
        else:
            try:
                backing.remove_tree(dst.root_fd, staging)
            except OSError as e:
                self.relocations[name] = reloc
                log.error(
                    "relocation of %r to %r was interrupted before its commit; %r is "
                    "authoritative; removing the partial copy failed (%s), the next mount "
                    "retries it", name, dst.name, src.name, e.strerror or e,
                )
                return
            log.warning(
                "relocation of %r from %r to %r was interrupted before its commit; %r is "
                "authoritative, the partial copy was removed", name, src.name, dst.name, src.name,
            )

    def _drop_resumable(self, name: str) -> None:
        """An interrupted relocation whose entry is gone (or moved): remove its copy."""
        reloc = self.resumable.pop(name)
        dst = self.stores[reloc["to"]]
        try:
            backing.remove_tree(dst.root_fd, staging_name(name))
        except OSError as e:
            reloc["phase"] = str(Phase.ABANDONED)
            log.error("relocation of %r: removing the partial copy failed (%s), the next "
                      "mount retries it", name, e.strerror or e)
            return
        self.relocations.pop(name, None)
        log.warning("relocation of %r is not resumed: the entry is not on %r any more; the "
                    "partial copy was removed", name, reloc["from"])

    def _adopt(self, placement: dict[str, str]) -> None:
        found: dict[str, list[str]] = {}
        for store in self.stores.values():
            for name in backing.list_dir(store.root_fd):
                if name == SNAPSHOT_VIEW_NAME:
                    log.warning("store %r holds %r at its root: not served (the mount shows "
                                "its snapshots under that name); rename it on the store",
                                store.name, name)
                elif not name.startswith(RESERVED_PREFIX) and name not in STORE_OWN_NAMES:
                    found.setdefault(name, []).append(store.name)
        for name, store_name in sorted(placement.items()):
            holders = found.get(name, [])
            if store_name in holders:
                self.entries[name] = Entry(name, self.stores[store_name])
                for other in holders:
                    if other != store_name:
                        log.warning(
                            "entry %r also exists on store %r; ignored, placement says %r",
                            name, other, store_name,
                        )
            elif len(holders) == 1:
                log.warning(
                    "entry %r is placed on %r but found only on %r; following the data",
                    name, store_name, holders[0],
                )
                self.entries[name] = Entry(name, self.stores[holders[0]])
            elif not holders:
                log.warning("entry %r is on no store any more; dropped from placement", name)
            else:
                self.conflicts[name] = sorted(holders)
        for name, holders in sorted(found.items()):
            if name in placement:
                continue
            if len(holders) == 1:
                log.info("adopted entry %r found on store %r", name, holders[0])
                self.entries[name] = Entry(name, self.stores[holders[0]])
            else:
                self.conflicts[name] = sorted(holders)
        for name, holders in sorted(self.conflicts.items()):
            log.error(
                "entry %r exists on several stores (%s) and is not served; "
                "remove all copies but one, then mount again",
                name, ", ".join(holders),
            )

    def close(self) -> None:
        for store in self.stores.values():
            os.close(store.root_fd)

    # -- persistence -------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        placement = {name: e.store.name for name, e in sorted(self.entries.items())}
        for name, reloc in self.relocations.items():
            if reloc["phase"] == Phase.COMMITTED and name in placement:
                placement[name] = reloc["to"]  # committed: the destination is the truth
        return {
            "stores": dict(self._store_ids),
            "placement": placement,
            "relocations": dict(self.relocations),
        }

    def save_nowait_blocking(self) -> None:
        """Save the placement record synchronously (startup and shutdown)."""
        self.state.save(_RECORD, self._record())

    async def save(self) -> None:
        """Durably save the placement as it is now; concurrent calls serialise."""
        async with self._save_lock:
            record = self._record()
            await stall("record-save")
            await backing.run_blocking(self.state.save, _RECORD, record)

    # -- namespace changes (backing first, then the record) -----------------------

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def is_reserved(self, name: str) -> bool:
        return (name.startswith(RESERVED_PREFIX) or name in STORE_OWN_NAMES
                or name == SNAPSHOT_VIEW_NAME or name in self.conflicts)

    async def added(self, name: str, store: Store) -> Entry:
        """Record a new entry whose backing object was just created on *store*."""
        entry = Entry(name, store)
        self.entries[name] = entry
        await self._namespace_changed()
        return entry

    async def removed(self, name: str) -> None:
        """Forget an entry whose backing object was just removed."""
        self.entries.pop(name, None)
        await self._namespace_changed()

    async def relocation_started(
        self, entry: Entry, dst: Store, keep_source: bool, options: dict[str, Any] | None = None
    ) -> None:
        """Durably record that *entry* is being copied to *dst* (the source stays
        the truth), with the *options* a resumed relocation runs with."""
        self.relocations[entry.name] = {
            "from": entry.store.name, "to": dst.name, "phase": str(Phase.COPYING),
            "keep_source": keep_source, "options": dict(options or {}),
        }
        self.resumable.pop(entry.name, None)
        await self.save()

    async def relocation_phase(self, entry: Entry, phase: Phase) -> None:
        """Durably record the relocation's new *phase* (lifecycle.py decides when).

        The save of :attr:`Phase.COMMITTED` is THE commit record: one atomic
        save flips the placement to the destination. In memory the entry
        keeps its store until :meth:`relocation_switched` (the switchover
        renames the staged tree into place first). A failed save leaves the
        record as it was, and raises.
        """
        reloc = self.relocations[entry.name]
        before = reloc["phase"]
        reloc["phase"] = str(phase)
        try:
            await self.save()
        except BaseException:
            reloc["phase"] = before
            raise

    def relocation_switched(self, entry: Entry, dst: Store) -> None:
        """The staged tree now has the entry's name on *dst*: serve it from there."""
        entry.store = dst

    async def relocation_ended(self, entry: Entry) -> None:
        """Forget the relocation record (after cleanup, committed or not)."""
        self.relocations.pop(entry.name, None)
        await self.save()

    def relocating(self, name: str) -> bool:
        """Whether *name* has a relocation record: from the start of a relocation to
        the end of its clean-up (renames and removals of the entry are refused)."""
        return name in self.relocations

    async def renamed(self, old: str, new: str, exchange: bool) -> None:
        """Record a rename (or exchange) that just happened on the backing store."""
        moved = self.entries.pop(old)
        displaced = self.entries.pop(new, None)
        moved.name = new
        self.entries[new] = moved
        if exchange and displaced is not None:
            displaced.name = old
            self.entries[old] = displaced
        await self._namespace_changed()

    async def _namespace_changed(self) -> None:
        """A top-level change happened on a store: save the record, or have
        :meth:`run` save it soon.

        Write-behind is safe because the stores are the truth for names:
        :meth:`open` adopts an entry found on one store only and drops one found
        on none, so a crash before the save leaves what a failed save leaves
        (see :meth:`_save_namespace`), and the mount that follows shows exactly
        the names the stores hold. What a crash must not lose (a relocation's
        records, the commit above all) is saved by :meth:`save`, durably, with
        every name as it is then. sqlite's journal at the top level made two
        such saves (four fsyncs of the state directory) per transaction.
        """
        self._changes += 1
        if not self._saver_running:
            await self._save_namespace()
            self._changes_saved = self._changes
            return
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Save the top-level changes behind the requests that made them, at most
        one save per :data:`NAMESPACE_SAVE_DELAY_S` (a service of the daemon's nursery).
        The daemon's unmount saves whatever is left (``save_nowait_blocking``)."""
        self._saver_running = True
        try:
            task_status.started()
            while True:
                await self._changed.wait()
                with trio.move_on_after(NAMESPACE_SAVE_DELAY_S):
                    await self._hurry.wait()
                self._changed = trio.Event()
                self._hurry = trio.Event()
                covered = self._changes
                await self._save_namespace()
                self._changes_saved = covered
                self._saved.set()
                self._saved = trio.Event()
        finally:
            self._saver_running = False

    async def wait_saved(self) -> None:
        """Return once a save attempt covered every top-level change made so far
        (``status`` waits for it, so ``record_stale`` says how the record stands)."""
        target = self._changes
        while self._saver_running and self._changes_saved < target:
            self._hurry.set()
            await self._saved.wait()

    async def _save_namespace(self) -> None:
        """Save after a top-level change that already happened on the store.

        A failed save (state directory full or read-only) does not undo it or
        report it failed: the record is then as a crash between the two steps
        would leave it, which :meth:`open` repairs from the stores. The mount
        stays up; ``status`` shows ``record_stale`` and the log says it once.
        """
        try:
            await self.save()
        except OSError as e:
            if self.record_stale is None:
                log.warning("cannot save the placement record (%s); serving on, the next "
                            "mount repairs it from the stores", e.strerror or e)
            self.record_stale = e.strerror or str(e)
            return
        if self.record_stale is not None:
            log.info("placement record saved again")
            self.record_stale = None

    def resolve(self, parts: Sequence[str]) -> tuple[Entry, int]:
        """Open the path *parts* (from the mount root) as an O_PATH handle.

        Walks one component at a time without following symlinks, so a
        request from the control socket reaches only what a FUSE request
        could. Returns the entry and the handle (the caller closes it);
        raises OSError (ENOENT, ELOOP for a symlink on the way, EINVAL for
        ``..`` or an empty path).
        """
        if not parts or any(p in ("", ".", "..") or "/" in p for p in parts):
            raise OSError(errno.EINVAL, "not a path inside the datastore")
        entry = self.entries.get(parts[0])
        if entry is None:
            raise OSError(errno.ENOENT, f"no entry {parts[0]!r} in this datastore")
        return entry, backing.open_parts(entry.store.root_fd, parts)

    def statistics(self) -> dict[str, Any]:
        """Stores with their space, and the placement, for ``status``."""
        stores = {}
        for name, store in sorted(self.stores.items()):
            try:
                vfs = store.statvfs()
                free, size = vfs.f_bavail * vfs.f_frsize, vfs.f_blocks * vfs.f_frsize
            except OSError:
                free = size = -1
            stores[name] = {"path": str(store.path), "free_bytes": free, "size_bytes": size}
        return {
            "stores": stores,
            "default_store": self.default_store.name,
            "placement": {name: e.store.name for name, e in sorted(self.entries.items())},
            "conflicts": dict(self.conflicts),
            "record_stale": self.record_stale,
        }
