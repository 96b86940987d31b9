"""Randomized differential testing: the mount against a plain directory (issue 11).

One seeded sequence of operations is applied to a tree inside one entry of a
real mount (``MNT/vm``) and to a reference tree in a plain directory on the
local filesystem; after every step both trees are compared completely.
Relocation events are interleaved with the operations: ``migrate
--no-wait`` to the other store (every mode, rate-limited so operations
really run during the pre-copy and the mirroring), pause/resume, rate
changes, cancel (also timed to land inside the switchover), waiting for the
job, ``kill -9`` of the daemon followed by a remount (which repairs),
unmount/mount and ``drop_caches``. The promise under test: a relocation is
invisible to the guest.

**Why a generator of our own, not hypothesis.** Every example needs a fresh
mount and usually a rate-limited relocation, so one run costs seconds, not
microseconds; hypothesis's shrinker would need hundreds of them and cannot
be bounded in wall time (nor told that a relocation event is worth more
than a chmod), and hypothesis is not installed here anyway. So: a seeded
generator (``random.Random(seed)``) picks each operation from the state of
the *reference* tree, which depends only on the operations before it, so a
seed always gives the same sequence (what the mount does in the background
may differ from run to run; a ``progress`` step waits for the copy to get
a given number of bytes further, which pins the interleavings that matter).
Besides single operations it sometimes plays a short scenario (shrink a
file while the copy runs, let the copy get ahead, grow it again). Each
:class:`Op` carries all its arguments (paths, offsets, the seed of its
bytes), so any subsequence can be replayed on its own. After a failure
:func:`shrink` first tries a backward slice over the names of the objects
that differ, then delta debugging (ddmin, keeping candidates that fail with
a failure of the same kind), bounded by ``FUSEDISK_SHRINK_SECONDS``, and
prints the result as Python that pastes into a regression test
(:func:`check_replay`). Every run, the shrunk ones too, ends with a fixed
epilogue that is not shrunk: finish the job, compare, ``drop_caches``,
compare, unmount/mount, compare.

**The oracle.** Each operation is run on both sides; the outcome must be the
same (the same value, or an OSError with the same errno). Then every object
of both trees is compared: names and types; mode, owner, nlink; size and
SHA-1 of every regular file; symlink targets; device numbers; every xattr
(the mount must not show fusedisk's own); link groups (which names share an
inode, by ``st_ino`` on each side); ``st_ino`` stability (each reference
inode is mapped to the mount inode it first showed, which must never
change while the object lives); mtime, and atime when it is in the future
(relatime never touches it then), while they are exactly what a
``utimens`` set and nothing changed the object since; and ctime: when the
reference's ctime of an object did not move, the mount's must not either.
Sizes of directories and ``st_blocks`` are not compared (they depend on
history, not on content). The mount side is read as the daemon serves it:
attributes with ``statx(AT_STATX_FORCE_SYNC)`` (the kernel's cached ones
show a ctime the kernel made up for a while after each change), contents
with ``O_DIRECT`` (FUSE ``direct_io``: not the page cache, which can hide
what a switchover put on the destination); the cached view is what the
``read`` and ``fd_read`` operations compare. After a relocation finished, each regular file's
backing copy is checked for holes with SEEK_DATA/SEEK_HOLE against the
reference: a hole of the reference that is data on the store is a
thin-provisioning regression, reported (``notes``) but not failed; the
content itself is compared through the mount.

**Kills.** A kill happens only between two operations, so the mount side is
in a known state: every operation before it returned, i.e. was
acknowledged, and nothing is in flight. Held descriptors are closed on
both sides first; half of the kills first fsync every file and directory
of the mount (the strict claim: fsynced data is exact), the other half
do not (the README's claim: the daemon writes to the backing file before it
acknowledges, so the backing page cache holds every acknowledged byte and
kill -9 loses nothing). Either way the reference is exact at the kill
point. Some kills first lift the copy's rate limit and wait a random
0–300 ms, so the daemon dies at a random moment of the job (passes,
mirroring, switchover). After the remount the entry must be on exactly one
store with no ``.fusedisk*`` leftovers, and the trees must be equal.

**Known gaps.** :data:`KNOWN_GAPS` names the bugs that are known and not
fixed yet. A mismatch whose signature belongs to an active gap is recorded
(and printed) instead of failing, and the run goes on (content is repaired
in the reference, an object whose links were split is no longer compared).
Remove a gap's entry once its fix lands, and the check fails again on any
regression; :data:`FIXED_GAPS` keeps the ones fixed so far.
``FUSEDISK_GAPS=none`` (or a comma list of names of either table) overrides
the set, e.g. to bisect on an older tree.

:func:`kill_loop` is the second engine: ``kill -9`` at random times (not
failpoints) while a relocation runs, under a journaling ``O_DIRECT`` writer
that ``fdatasync``\\ s every write; after each remount every acknowledged
write must read back and ``fusedisk cbt changes --since ID`` must cover
everything written after the checkpoint ID.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusedisk import agent as _agent
from fusedisk import api, control
from fusedisk import datastore as _datastore
from fusedisk.errors import ControlError

from . import journal_writer
from .mounting import MountedDatastore, fusedisk, wait_for

#: A job in one of these states has ended in this daemon (not suspended for the next).
ENDED = api.FINAL_STATES - {api.State.SUSPENDED}

#: Bugs known and not fixed yet: each name turns off the failure of exactly one
#: signature (see ``Comparator`` and ``Run``): the mismatch is recorded and
#: printed instead, and the run goes on. Remove an entry when its fix lands;
#: its replay in tests/test_differential.py then stops being an expected failure.
KNOWN_GAPS: dict[str, str] = {}

#: Gaps of the brief's list that are fixed now (their checks fail again on a
#: regression). Kept so ``FUSEDISK_GAPS`` can turn them back on for a run
#: against an older tree (bisecting).
FIXED_GAPS: dict[str, str] = {
    "ctime-after-crash": (
        "issue 11 (found by this engine): a file held open across a switchover and "
        "changed after it, when the daemon is killed before it is closed: its first "
        "open after the remount gave it a new CBT file id (its history was never "
        "saved), and writing that xattr moved its ctime (fixed: cbt keeps the ctime "
        "the mount showed beside the file's identity)"
    ),
    "pool-link-visible": (
        "issue 11 (found by this engine): from the commit until the source is "
        "cleaned up, every regular file of the entry shows one link more: its pool "
        "file's name in the destination's staging directory (fixed in 61b2e1e)"
    ),
    "ctime-failed-op": (
        "issue 11 (found by this engine, in the fix that keeps ctime through a "
        "switchover): after a relocation, an operation that fails (removexattr of a "
        "missing name; rmdir of a non-empty directory) still moves the ctime of its "
        "object (for rmdir, of the parent too): the kept ctime is dropped before it "
        "(fixed in 3de33fc: a failed request writes it back)"
    ),
    "ino-collision": (
        "issue 11 (found by this engine): an object whose store number equals a "
        "number another object kept through a relocation gets a private inode number "
        "(1 << 62 and up) that is kept nowhere: once the kernel forgets it "
        "(drop_caches, a remount) its st_ino changes (fixed in 7eb49df)"
    ),
    "truncate-gap": (
        "issue 11, 'truncate during pre-copy': a file truncated (or opened O_TRUNC) "
        "while the copy runs and extended later showed its old contents in the gap "
        "after the switchover (fixed in 33acdd6)"
    ),
    "special-links": (
        "issue 11, 'hard links of non-regular files': a relocation split hard links "
        "of FIFOs, device nodes, sockets and symlinks (nlink 2 -> 1, the second name "
        "owned by 0:0) (fixed in 02fd63d)"
    ),
    "ino-after-relocation": (
        "issue 11, 'st_ino across a switchover': st_ino changed after a relocation "
        "once the kernel forgot the inode (fixed in c731744)"
    ),
    "ctime-after-relocation": (
        "issue 11, 'ctime across a switchover': ctime jumped to the switchover time "
        "(fixed in 31be4ac)"
    ),
    "cancel-while-switching": (
        "issue 11, 'cancel while switching': a cancel during the switchover was "
        "accepted and the relocation committed anyway (fixed in 55f7e48: refused)"
    ),
}

ENTRY = "vm"
KiB, MiB = 1 << 10, 1 << 20
#: No operation writes or extends a file beyond this.
MAX_FILE = 6 * MiB
_CBT_BLOCK = 64 * KiB
_LOG_BUGS = ("Traceback", " ERROR ", " CRITICAL ")

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
_UTIME_OMIT = (1 << 30) - 2
SEEK_DATA, SEEK_HOLE = 3, 4
#: ``FUSEDISK_THIN_STRICT=1``: a hole of the reference that is data on the store
#: after a relocation fails the run (kind ``thin``; to shrink one) instead of
#: being reported.
THIN_STRICT = os.environ.get("FUSEDISK_THIN_STRICT") == "1"
#: fs.py's first inode number for objects whose store number is taken.
PRIVATE_INO = 1 << 62


#: A store's record of the datastore that owns it (not a leftover), where there is one.
_OWNER_NAME: str | None = getattr(_datastore, "OWNER_NAME", None)


def _leftover(path: Path) -> bool:
    """Whether a name at a store's root is something a relocation left behind.

    A remote store's directory also holds the store view's names (storeview.py):
    a file's NBD export link (a leftover only once the file has no other name) and
    the orphans of files unlinked while the kernel still knew them (the view's to
    remove when the kernel forgets them, or at its next start), and the agent's
    claim of the store."""
    name = path.name
    if name.startswith(_agent.EXPORT_PREFIX):
        try:
            return os.lstat(path).st_nlink < 2
        except FileNotFoundError:
            return False
    if name.startswith(_agent.ORPHAN_PREFIX) or name == _agent.CLAIM_NAME:
        return False  # (the claim of the store by its datastore, on the remote host)
    return name.startswith(".fusedisk") and name != _OWNER_NAME


def active_gaps() -> frozenset[str]:
    """The gaps tolerated in this run: :data:`KNOWN_GAPS`, or ``FUSEDISK_GAPS``
    (a comma list of names of either table, or ``none``)."""
    env = os.environ.get("FUSEDISK_GAPS")
    if env is None:
        return frozenset(KNOWN_GAPS)
    names = {n.strip() for n in env.split(",")} - {"", "none"}
    unknown = names - set(KNOWN_GAPS) - set(FIXED_GAPS)
    if unknown:
        raise ValueError(f"FUSEDISK_GAPS names no gap: {sorted(unknown)}")
    return frozenset(names)


# -- operations ------------------------------------------------------------------------


class Op:
    """One step: a kind and every argument it needs (so a replay needs nothing else).

    ``repr`` is Python that rebuilds it: a printed replay pastes into a test.
    """

    __slots__ = ("args", "kind")

    def __init__(self, kind: str, **args: Any) -> None:
        self.kind = kind
        self.args = args

    def __getattr__(self, name: str) -> Any:
        try:
            return self.args[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        parts = [repr(self.kind)]
        for key, value in self.args.items():
            text = oct(value) if key == "mode" and isinstance(value, int) else repr(value)
            parts.append(f"{key}={text}")
        return f"Op({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and (self.kind, self.args) == (other.kind, other.args)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.args.items()))))


#: Operations that act on the datastore (the daemon, the job), not on the trees.
EVENTS = frozenset({
    "hold_passes", "migrate", "pause", "resume", "rate", "progress", "cancel", "finish",
    "kill", "remount", "drop_caches",
})
EPILOGUE = (Op("finish"), Op("drop_caches"), Op("remount"))


def payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def format_replay(ops: list[Op]) -> str:
    lines = ["REPLAY = ["] + [f"    {op!r}," for op in ops] + ["]"]
    return "\n".join(lines)


# -- system calls Python has no binding for ---------------------------------------------


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def lutimens(path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
    """``utimensat(AT_SYMLINK_NOFOLLOW)``; ``None`` leaves that time alone."""
    times = (_Timespec * 2)()
    for slot, value in enumerate((atime_ns, mtime_ns)):
        times[slot].tv_sec, times[slot].tv_nsec = (
            (0, _UTIME_OMIT) if value is None else divmod(value, 1_000_000_000)
        )
    if _libc.utimensat(_AT_FDCWD, os.fsencode(path), times, _AT_SYMLINK_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every data region, by SEEK_DATA/SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, SEEK_HOLE)
        out.append((start, end))
        offset = end
    return out


# -- one side: a tree and its held descriptors -------------------------------------------

Outcome = tuple[Any, ...]

_FMT_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock",
}
_MKNOD_TYPES = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}
#: How long a held descriptor may stay open, in slots.
HELD_SLOTS = 3


class Side:
    """A tree (the mount's entry or the reference) that operations are applied to."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = str(root)
        self.held: dict[int, int] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def close_held(self) -> None:
        for fd in self.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held.clear()

    def apply(self, op: Op) -> Outcome:
        try:
            return _OPS[op.kind](self, op)
        except OSError as e:
            return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))

    def regular(self, rel: str) -> str | None:
        """The full path if *rel* is a regular file (never opens anything else)."""
        st = os.lstat(self.path(rel))
        return self.path(rel) if stat.S_ISREG(st.st_mode) else None


def _not_regular(side: Side, rel: str) -> Outcome:
    st = os.lstat(side.path(rel))
    return ("not-regular", _FMT_NAMES.get(stat.S_IFMT(st.st_mode), "?"))


def _write_all(fd: int, data: bytes | mmap.mmap, offset: int | None) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        chunk = view[done:]
        n = os.write(fd, chunk) if offset is None else os.pwritev(fd, [chunk], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _sync(fd: int, how: str) -> None:
    if how == "fsync":
        os.fsync(fd)
    elif how == "fdatasync":
        os.fdatasync(fd)


def _op_write(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= {"buffered": 0, "direct": os.O_DIRECT, "dsync": os.O_DSYNC,
              "direct-dsync": os.O_DIRECT | os.O_DSYNC}[op.how]
    data = payload(op.seed, op.length)
    fd = os.open(path, flags)
    try:
        if op.how.startswith("direct"):
            buf = mmap.mmap(-1, op.length)
            buf[:] = data
            try:
                written = _write_all(fd, buf, op.offset)
            finally:
                buf.close()
        else:
            written = _write_all(fd, data, op.offset)
        _sync(fd, op.sync)
    finally:
        os.close(fd)
    return ("ok", written)


def _op_append(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        written = _write_all(fd, payload(op.seed, op.length), None)
        end = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    return ("ok", written, end)


def _op_truncate(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    if op.via == "path":
        os.truncate(path, op.size)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, op.size)
        finally:
            os.close(fd)
    return ("ok",)


def _op_open_trunc(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        written = _write_all(fd, payload(op.seed, op.length), 0) if op.length else 0
    finally:
        os.close(fd)
    return ("ok", written)


def _op_mmap_write(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if op.offset >= size:
            return ("beyond-eof", size)
        end = min(op.offset + op.length, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[op.offset:end] = payload(op.seed, end - op.offset)
            mm.flush()  # msync(MS_SYNC)
    finally:
        os.close(fd)
    return ("ok", size, end - op.offset)


def _op_read(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECT if op.direct else 0)
    fd = os.open(path, flags)
    try:
        if op.direct:
            buf = mmap.mmap(-1, op.length)
            try:
                n = os.preadv(fd, [buf], op.offset)
                data = bytes(buf[:n])
            finally:
                buf.close()
        else:
            data = os.pread(fd, op.length, op.offset)
    finally:
        os.close(fd)
    return ("ok", len(data), hashlib.sha1(data).hexdigest())


def _op_fsync(side: Side, op: Op) -> Outcome:
    st = os.lstat(side.path(op.path))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return _not_regular(side, op.path)
    fd = os.open(side.path(op.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if op.data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)
    return ("ok",)


def _op_hold(side: Side, op: Op) -> Outcome:
    old = side.held.pop(op.slot, None)
    if old is not None:
        os.close(old)
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    extra = os.O_APPEND if op.append else 0
    side.held[op.slot] = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | extra)
    return ("ok",)


def _op_release(side: Side, op: Op) -> Outcome:
    fd = side.held.pop(op.slot, None)
    if fd is None:
        return ("no-slot",)
    os.close(fd)
    return ("ok",)


def _op_fd(side: Side, op: Op) -> Outcome:
    fd = side.held.get(op.slot)
    if fd is None:
        return ("no-slot",)
    if op.kind == "fd_write":
        return ("ok", _write_all(fd, payload(op.seed, op.length), op.offset))
    if op.kind == "fd_read":
        data = os.pread(fd, op.length, op.offset)
        return ("ok", len(data), hashlib.sha1(data).hexdigest())
    if op.kind == "fd_truncate":
        os.ftruncate(fd, op.size)
        return ("ok",)
    if op.kind == "fd_stat":
        st = os.fstat(fd)
        return ("ok", st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode))
    _sync(fd, op.how)
    return ("ok",)


def _op_create(side: Side, op: Op) -> Outcome:
    with contextlib.suppress(FileNotFoundError):  # never open a FIFO or a device node
        if not op.excl and not stat.S_ISREG(os.lstat(side.path(op.path)).st_mode):
            return ("exists", *_not_regular(side, op.path)[1:])
    flags = os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_EXCL if op.excl else 0
    os.close(os.open(side.path(op.path), flags, op.mode))
    return ("ok",)


def _op_mkdir(side: Side, op: Op) -> Outcome:
    os.mkdir(side.path(op.path), op.mode)
    return ("ok",)


def _op_mknod(side: Side, op: Op) -> Outcome:
    os.mknod(side.path(op.path), _MKNOD_TYPES[op.type] | op.mode,
             os.makedev(op.major, op.minor))
    return ("ok",)


def _op_socket(side: Side, op: Op) -> Outcome:
    parent, name = os.path.split(side.path(op.path))
    dir_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(f"/proc/self/fd/{dir_fd}/{name}")  # short, whatever the tree's path
    finally:
        os.close(dir_fd)
    return ("ok",)


def _op_symlink(side: Side, op: Op) -> Outcome:
    os.symlink(op.target, side.path(op.path))
    return ("ok",)


def _op_link(side: Side, op: Op) -> Outcome:
    os.link(side.path(op.src), side.path(op.path), follow_symlinks=False)
    return ("ok",)


def _op_unlink(side: Side, op: Op) -> Outcome:
    os.unlink(side.path(op.path))
    return ("ok",)


def _op_rmdir(side: Side, op: Op) -> Outcome:
    os.rmdir(side.path(op.path))
    return ("ok",)


def _op_rename(side: Side, op: Op) -> Outcome:
    if op.flags:
        renameat2(side.path(op.src), side.path(op.path), op.flags)
    else:
        os.rename(side.path(op.src), side.path(op.path))
    return ("ok",)


def _op_chmod(side: Side, op: Op) -> Outcome:
    if stat.S_ISLNK(os.lstat(side.path(op.path)).st_mode):
        return ("symlink",)  # chmod would follow it
    os.chmod(side.path(op.path), op.mode)
    return ("ok",)


def _op_chown(side: Side, op: Op) -> Outcome:
    os.chown(side.path(op.path), op.uid, op.gid, follow_symlinks=False)
    st = os.lstat(side.path(op.path))
    return ("ok", stat.S_IMODE(st.st_mode))  # chown may drop set-id bits


def _op_utimens(side: Side, op: Op) -> Outcome:
    lutimens(side.path(op.path), op.atime, op.mtime)
    return ("ok",)


def _op_setxattr(side: Side, op: Op) -> Outcome:
    os.setxattr(side.path(op.path), op.name, payload(op.seed, op.length), op.flags,
                follow_symlinks=False)
    return ("ok",)


def _op_removexattr(side: Side, op: Op) -> Outcome:
    os.removexattr(side.path(op.path), op.name, follow_symlinks=False)
    return ("ok",)


def _op_list(side: Side, op: Op) -> Outcome:
    return ("ok", tuple(sorted(os.listdir(side.path(op.path)))))


#: fallocate modes a guest uses: punch (discard), zero (± KEEP_SIZE), allocation (± KEEP_SIZE)
FALLOCATE_MODES = (0x03, 0x10, 0x11, 0x00, 0x01)


def _op_fallocate(side: Side, op: Op) -> Outcome:
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.fallocate(fd, op.mode, ctypes.c_longlong(op.offset),
                           ctypes.c_longlong(op.length)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return ("ok",)


def _op_seek(side: Side, op: Op) -> Outcome:
    """SEEK_DATA/SEEK_HOLE: allocation is each filesystem's own, so the answer is
    checked against the side's own bytes (what a hole skips reads as zeros)."""
    path = side.regular(op.path)
    if path is None:
        return _not_regular(side, op.path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        try:
            answer = os.lseek(fd, op.offset, op.whence)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            answer = size if op.whence == SEEK_DATA and op.offset < size else -1
        if op.offset >= size:
            return ("ok", "past-end" if answer == -1 else f"answered {answer}")
        if not op.offset <= answer <= size:
            return ("ok", f"answered {answer} outside [{op.offset}, {size}]")
        if op.whence == SEEK_DATA:
            skipped = os.pread(fd, answer - op.offset, op.offset)
            return ("ok", "skips data" if any(skipped) else "consistent")
        hole = answer == size or os.pread(fd, 1, answer) == b"\0"
        return ("ok", "consistent" if hole else "hole at data")
    finally:
        os.close(fd)


_OPS: dict[str, Callable[[Side, Op], Outcome]] = {
    "write": _op_write, "append": _op_append, "truncate": _op_truncate,
    "open_trunc": _op_open_trunc, "mmap_write": _op_mmap_write, "read": _op_read,
    "fsync": _op_fsync, "hold": _op_hold, "release": _op_release, "fd_write": _op_fd,
    "fd_read": _op_fd, "fd_truncate": _op_fd, "fd_sync": _op_fd, "fd_stat": _op_fd,
    "create": _op_create, "mkdir": _op_mkdir, "mknod": _op_mknod, "socket": _op_socket,
    "symlink": _op_symlink, "link": _op_link, "unlink": _op_unlink, "rmdir": _op_rmdir,
    "rename": _op_rename, "chmod": _op_chmod, "chown": _op_chown, "utimens": _op_utimens,
    "setxattr": _op_setxattr, "removexattr": _op_removexattr, "list": _op_list,
    "fallocate": _op_fallocate, "seek": _op_seek,
}


# -- the generator -----------------------------------------------------------------------

_NAMES = ("f0", "f1", "f2", "f3", "f4", "d0", "d1", "d2", "n0", "n1", "l0", "l1")
_FILE_MODES = (0o644, 0o644, 0o600, 0o755, 0o640, 0o4755, 0o2755, 0o000, 0o666)
_DIR_MODES = (0o755, 0o755, 0o700, 0o2775, 0o1777, 0o750)
_IDS = (0, 0, 1000, 1001, 65534, -1)
_XATTRS = ("user.a", "user.b", "user.c", "user.long.name")
_RATES = ("512K", "1M", "1M", "2M")


def listing(root: str) -> dict[str, tuple[int, int, int]]:
    """``rel path → (S_IFMT, size, nlink)`` of every object of a tree, the root as ``""``."""
    out: dict[str, tuple[int, int, int]] = {}

    def visit(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        out[rel] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_nlink)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(full)):
                visit(os.path.join(rel, name) if rel else name)

    visit("")
    return out


class Generator:
    """The seeded source of operations. ``next_op`` looks only at the reference."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.hot: list[str] = []
        self.job = False  # whether the generator believes a relocation runs
        self.migrations = 0
        self.idle = 0
        self.big = False  #: the first steps write a few MiB at a time
        self.pending: list[Op] = []  #: the rest of a scenario under way

    # -- picking things ----------------------------------------------------------------

    def _pick(self, paths: list[str]) -> str | None:
        if not paths:
            return None
        hot = [p for p in self.hot if p in paths]
        if hot and self.rng.random() < 0.6:
            return self.rng.choice(hot)
        return self.rng.choice(paths)

    def _touch(self, *paths: str) -> None:
        for p in paths:
            if p in self.hot:
                self.hot.remove(p)
            self.hot.append(p)
        del self.hot[:-5]

    def _new_path(self, tree: dict[str, tuple[int, int, int]]) -> str:
        dirs = [p for p, (fmt, _, _) in tree.items() if fmt == stat.S_IFDIR and p.count("/") < 2]
        parent = self._pick(dirs) or ""
        name = self.rng.choice(_NAMES)
        return os.path.join(parent, name) if parent else name

    def _offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.25:
            offset = self.rng.randrange(64 * KiB)
        elif r < 0.45:
            offset = max(0, size + self.rng.randrange(-8 * KiB, 128 * KiB))
        elif r < 0.65:
            offset = self.rng.randrange(4 * MiB)
        elif r < 0.85:
            offset = max(0, self.rng.randrange(1, 64) * _CBT_BLOCK + self.rng.randrange(-3, 4))
        else:
            offset = self.rng.randrange(max(size, 1))
        return min(offset, MAX_FILE - 1)

    def _length(self) -> int:
        r = self.rng.random()
        if self.big:
            return self.rng.randrange(MiB, 3 * MiB)
        if r < 0.65:
            return self.rng.randrange(1, 8 * KiB)
        if r < 0.9:
            return self.rng.randrange(8 * KiB, 256 * KiB)
        return self.rng.randrange(256 * KiB, MiB + 1)

    def _size(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.1:
            return 0
        if r < 0.5:
            return self.rng.randrange(size + 1)
        if r < 0.8:
            return min(MAX_FILE, size + self.rng.randrange(1, 2 * MiB))
        return self.rng.randrange(0, MAX_FILE // _CBT_BLOCK) * _CBT_BLOCK

    # -- the next step -----------------------------------------------------------------

    def next_op(self, step: int, ref: Side) -> Op:
        if self.pending:
            return self.pending.pop(0)
        if step == 0 and self.rng.random() < 0.5:
            return Op("hold_passes")
        event = self._event(step)
        if event is not None:
            return event
        tree = listing(ref.root)
        files = [p for p, (fmt, _, _) in tree.items() if fmt == stat.S_IFREG]
        if self.job and files and self.rng.random() < 0.05:
            return self._shrink_regrow(tree, files)
        if step < 8 or len(files) < 2:  # start with a few files of a few MiB
            weights = {"create": 3, "write": 6, "mkdir": 1}
            if not files or (step < 8 and len(files) < 3 and self.rng.random() < 0.4):
                weights = {"create": 1}
        else:
            weights = {
                "write": 22, "append": 2, "truncate": 7, "open_trunc": 3, "mmap_write": 4,
                "read": 3, "fsync": 2, "hold": 3, "fd": 6, "create": 5, "mkdir": 3,
                "mknod": 3, "socket": 1, "symlink": 3, "link": 6, "unlink": 4, "rmdir": 2,
                "rename": 7, "chmod": 3, "chown": 3, "utimens": 4, "setxattr": 4,
                "removexattr": 2, "list": 1, "fallocate": 6, "seek": 2,
            }
        kind = self.rng.choices(list(weights), list(weights.values()))[0]
        self.big = step < 8
        op = self._make(kind, tree, files, ref)
        for key in ("path", "src"):
            if key in op.args:
                self._touch(op.args[key])
        return op

    def _shrink_regrow(self, tree: dict[str, tuple[int, int, int]], files: list[str]) -> Op:
        """A scenario worth reaching on purpose while a copy runs: make a file
        shorter, let the copy get ahead, grow it again (by a write far out, or a
        truncate); the next steps come from ``pending``."""
        rng = self.rng
        path = self._pick(files) or files[0]
        size = tree[path][1]
        new = rng.choice((0, rng.randrange(size + 1), rng.randrange(size + 1) & ~4095))
        if rng.random() < 0.3:
            first = Op("open_trunc", path=path, length=min(new, 64 * KiB),
                       seed=rng.randrange(1 << 32))
            new = min(new, 64 * KiB)
        else:
            first = Op("truncate", path=path, size=new, via=rng.choice(("path", "fd")))
        grown = max(size, new + 4096, rng.randrange(new + 4096, new + 2 * MiB))
        grown = min(grown, MAX_FILE)
        if rng.random() < 0.75:
            length = rng.choice((1, 4096, rng.randrange(1, 64 * KiB)))
            offset = max(new, grown - length)
            regrow = Op("write", path=path, offset=offset, length=length,
                        seed=rng.randrange(1 << 32), how=rng.choice(("buffered", "dsync")),
                        sync="none")
        else:
            regrow = Op("truncate", path=path, size=grown, via="path")
        self.pending = [Op("progress", bytes=rng.choice((256 * KiB, MiB, 2 * MiB, 4 * MiB))),
                        regrow]
        others = [f for f in files if f != path]
        if others and rng.random() < 0.7:  # keeps the next pass busy elsewhere meanwhile
            busy = rng.choice(others)
            self.pending.insert(0, Op("write", path=busy, offset=0,
                                      length=rng.randrange(MiB, 3 * MiB),
                                      seed=rng.randrange(1 << 32), how="buffered",
                                      sync="none"))
        self._touch(path)
        return first

    def _event(self, step: int) -> Op | None:
        rng = self.rng
        if step < 4:
            return None
        self.idle = 0 if self.job else self.idle + 1
        if not self.job:
            p = 0.35 if (self.migrations == 0 and step >= 8) or self.idle > 12 else 0.06
            if rng.random() >= p:
                return None
            kind = rng.choices(["migrate", "kill", "remount", "drop_caches"], [8, 1, 1, 1])[0]
        else:
            if rng.random() < 0.1:  # let the copy get ahead of the guest for a while
                return Op("progress", bytes=rng.choice((64 * KiB, 256 * KiB, MiB, 2 * MiB)))
            if rng.random() >= 0.07:
                return None
            kind = rng.choices(
                ["pause", "resume", "rate", "cancel", "finish", "kill", "drop_caches",
                 "remount"], [2, 2, 1, 2, 3, 2, 1, 1])[0]
        if kind == "migrate":
            self.job = True
            self.migrations += 1
            mode = rng.choices(["auto", "precopy", "mirror"], [3, 2, 2])[0]
            return Op("migrate", mode=mode, rate=rng.choice(_RATES),
                      max_pause=rng.choice((100, 100, 1000)))
        if kind == "rate":
            return Op("rate", rate=rng.choice(_RATES))
        if kind == "cancel":
            self.job = False
            return Op("cancel", when=rng.choice(("now", "now", "switching")))
        if kind in ("finish", "remount"):
            self.job = False
            return Op(kind)
        if kind == "kill":
            hurry = rng.randrange(0, 300) if self.job and rng.random() < 0.6 else None
            self.job = False
            return Op("kill", sync=rng.random() < 0.5, hurry_ms=hurry)
        return Op(kind)

    def _make(
        self, kind: str, tree: dict[str, tuple[int, int, int]], files: list[str], ref: Side
    ) -> Op:
        rng = self.rng
        objects = [p for p in tree if p]
        dirs = [p for p, (fmt, _, _) in tree.items() if fmt == stat.S_IFDIR and p]
        nondirs = [p for p, (fmt, _, _) in tree.items() if fmt != stat.S_IFDIR]
        path = self._pick(files)
        size = tree[path][1] if path is not None else 0
        if kind in ("write", "append", "truncate", "open_trunc", "mmap_write", "read",
                    "fsync", "hold", "fallocate", "seek") and path is None:
            kind = "create"
        if kind == "fd" and not ref.held:
            kind = "hold" if path is not None else "create"
        if kind == "write":
            how = rng.choices(["buffered", "direct", "dsync", "direct-dsync"], [5, 3, 1, 1])[0]
            offset, length = self._offset(size), self._length()
            if how.startswith("direct"):
                offset &= ~4095
                length = max(4096, length & ~4095)
            length = max(1, min(length, MAX_FILE - offset))
            if how.startswith("direct"):
                length = max(4096, length & ~4095)
            return Op("write", path=path, offset=offset, length=length,
                      seed=rng.randrange(1 << 32), how=how,
                      sync=rng.choices(["none", "fsync", "fdatasync"], [6, 1, 1])[0])
        if kind == "fallocate":
            offset = self._offset(size)
            length = max(1, min(self._length(), MAX_FILE - offset))
            return Op("fallocate", path=path, mode=rng.choice(FALLOCATE_MODES), offset=offset,
                      length=length)
        if kind == "seek":
            return Op("seek", path=path, offset=self._offset(size),
                      whence=rng.choice((SEEK_DATA, SEEK_HOLE)))
        if kind == "append":
            return Op("append", path=path, length=rng.randrange(1, 16 * KiB),
                      seed=rng.randrange(1 << 32))
        if kind == "truncate":
            return Op("truncate", path=path, size=self._size(size),
                      via=rng.choice(("path", "fd")))
        if kind == "open_trunc":
            length = rng.choice((0, rng.randrange(1, 4 * KiB), rng.randrange(4 * KiB, 512 * KiB)))
            return Op("open_trunc", path=path, length=length, seed=rng.randrange(1 << 32))
        if kind == "mmap_write":
            offset = rng.randrange(max(size, 1))
            return Op("mmap_write", path=path, offset=offset,
                      length=rng.randrange(1, 64 * KiB), seed=rng.randrange(1 << 32))
        if kind == "read":
            direct = rng.random() < 0.4
            offset, length = self._offset(size), self._length()
            if direct:
                offset, length = offset & ~4095, max(4096, length & ~4095)
            return Op("read", path=path, offset=offset, length=length, direct=direct)
        if kind == "fsync":
            target = self._pick(files + dirs) if rng.random() < 0.5 else path
            return Op("fsync", path=target, data_only=rng.random() < 0.5)
        if kind == "hold":
            return Op("hold", path=path, slot=rng.randrange(HELD_SLOTS),
                      append=rng.random() < 0.1)
        if kind == "fd":
            slot = rng.choice(sorted(ref.held))
            try:
                held_size = os.fstat(ref.held[slot]).st_size
            except OSError:
                held_size = 0
            sub = rng.choices(["fd_write", "fd_read", "fd_truncate", "fd_sync", "fd_stat",
                               "release"], [6, 2, 2, 1, 1, 2])[0]
            if sub == "fd_write":
                offset = self._offset(held_size)
                length = max(1, min(self._length(), MAX_FILE - offset))
                return Op("fd_write", slot=slot, offset=offset, length=length,
                          seed=rng.randrange(1 << 32))
            if sub == "fd_read":
                return Op("fd_read", slot=slot, offset=self._offset(held_size),
                          length=self._length())
            if sub == "fd_truncate":
                return Op("fd_truncate", slot=slot, size=self._size(held_size))
            if sub == "fd_sync":
                return Op("fd_sync", slot=slot, how=rng.choice(("fsync", "fdatasync")))
            return Op(sub, slot=slot)
        if kind == "create":
            return Op("create", path=self._new_path(tree), mode=rng.choice(_FILE_MODES),
                      excl=rng.random() < 0.5)
        if kind == "mkdir":
            return Op("mkdir", path=self._new_path(tree), mode=rng.choice(_DIR_MODES))
        if kind == "mknod":
            node = rng.choice(("fifo", "chr", "blk"))
            return Op("mknod", path=self._new_path(tree), type=node,
                      mode=rng.choice((0o644, 0o600, 0o666)),
                      major=0 if node == "fifo" else rng.choice((1, 8, 250)),
                      minor=0 if node == "fifo" else rng.randrange(16))
        if kind == "socket":
            return Op("socket", path=self._new_path(tree))
        if kind == "symlink":
            new = self._new_path(tree)
            parent = os.path.dirname(new)
            siblings = [os.path.relpath(p, parent or ".") for p in objects
                        if os.path.dirname(p) == parent or
                        (os.path.dirname(os.path.dirname(p)) == parent and p.startswith(parent))]
            choices = [s for s in siblings if not s.startswith("..")] + ["nowhere", "d0/f0"]
            return Op("symlink", path=new, target=rng.choice(choices))
        if kind == "link":
            src = self._pick(nondirs if rng.random() < 0.9 else objects)
            if src is None:
                return Op("create", path=self._new_path(tree), mode=0o644, excl=False)
            return Op("link", src=src, path=self._new_path(tree))
        if kind == "unlink":
            target = self._pick(nondirs if rng.random() < 0.95 else objects)
            return Op("unlink", path=target or "f0")
        if kind == "rmdir":
            return Op("rmdir", path=self._pick(dirs) or "d0")
        if kind == "rename":
            src = self._pick(objects) or "f0"
            flags = rng.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], [7, 1, 2])[0]
            dst = self._pick(objects) if rng.random() < 0.4 else self._new_path(tree)
            return Op("rename", src=src, path=dst or "f1", flags=flags)
        target = self._pick(objects) if rng.random() < 0.9 else ""
        target = target or ""
        if kind == "chmod":
            modes = _DIR_MODES if tree.get(target, (0,))[0] == stat.S_IFDIR else _FILE_MODES
            return Op("chmod", path=target, mode=rng.choice(modes))
        if kind == "chown":
            return Op("chown", path=target, uid=rng.choice(_IDS), gid=rng.choice(_IDS))
        if kind == "utimens":
            now = time.time_ns()

            def when() -> int | None:
                r = rng.random()
                if r < 0.15:
                    return None
                if r < 0.6:  # in the future: relatime never moves it
                    return now + rng.randrange(1, 30 * 86400) * 10**9 + rng.randrange(10**9)
                return rng.randrange(10**9, 17 * 10**8) * 10**9 + rng.randrange(10**9)

            return Op("utimens", path=target, atime=when(), mtime=when())
        if kind == "setxattr":
            flags = rng.choices([0, os.XATTR_CREATE, os.XATTR_REPLACE], [4, 1, 1])[0]
            return Op("setxattr", path=target, name=rng.choice(_XATTRS),
                      length=rng.randrange(0, 300), seed=rng.randrange(1 << 32), flags=flags)
        if kind == "removexattr":
            return Op("removexattr", path=target, name=rng.choice(_XATTRS))
        return Op("list", path=self._pick(dirs) or "")


def generate(seed: int, steps: int, scratch: Path) -> list[Op]:
    """The first *steps* operations of *seed*, made by applying them to a scratch tree
    (no mount involved): what a run of that seed would do."""
    root = scratch / ENTRY
    shutil.rmtree(scratch, ignore_errors=True)
    root.mkdir(parents=True)
    side = Side("ref", root)
    gen = Generator(seed)
    ops = []
    try:
        for step in range(steps):
            op = gen.next_op(step, side)
            ops.append(op)
            if op.kind in ("kill", "remount"):
                side.close_held()
            elif op.kind not in EVENTS:
                side.apply(op)
    finally:
        side.close_held()
        shutil.rmtree(scratch, ignore_errors=True)
    return ops


# -- snapshots and the comparison ------------------------------------------------------


@dataclass(slots=True)
class Obj:
    """What a client sees of one object."""

    fmt: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    ino: int
    ctime: int
    mtime: int
    atime: int
    target: str | None = None
    sha: str | None = None
    xattrs: Any = None


class _StatxTime(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32),
                ("reserved", ctypes.c_int32))


class _Statx(ctypes.Structure):
    _fields_ = (
        ("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
        ("spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
        ("atime", _StatxTime), ("btime", _StatxTime), ("ctime", _StatxTime),
        ("mtime", _StatxTime), ("rdev_major", ctypes.c_uint32),
        ("rdev_minor", ctypes.c_uint32), ("dev_major", ctypes.c_uint32),
        ("dev_minor", ctypes.c_uint32), ("spare", ctypes.c_uint64 * 14),
    )


_AT_STATX_FORCE_SYNC = 0x2000
_STATX_BASIC_STATS = 0x7FF


def _ns(t: _StatxTime) -> int:
    return int(t.tv_sec) * 1_000_000_000 + int(t.tv_nsec)


def fresh_stat(path: str) -> Obj:
    """lstat with ``AT_STATX_FORCE_SYNC``: on FUSE, the daemon's answer, never the
    kernel's cached attributes (which after a change show a ctime the kernel made
    up until they expire)."""
    buf = _Statx()
    flags = _AT_SYMLINK_NOFOLLOW | _AT_STATX_FORCE_SYNC
    if _libc.statx(_AT_FDCWD, os.fsencode(path), flags, _STATX_BASIC_STATS,
                   ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return Obj(stat.S_IFMT(buf.mode), buf.mode, buf.uid, buf.gid, buf.nlink, buf.size,
               os.makedev(buf.rdev_major, buf.rdev_minor), buf.ino, _ns(buf.ctime),
               _ns(buf.mtime), _ns(buf.atime))


def read_chunks(path: str, direct: bool) -> Iterator[bytes]:
    """The bytes of a regular file, 1 MiB at a time; *direct*: with ``O_DIRECT``,
    which on the mount (FUSE ``direct_io``) reads what the daemon serves, not
    what the kernel's page cache remembers."""
    # O_NONBLOCK: should *path* not be a regular file after all (a FIFO, a device
    # node), the open must not wait for a writer, and nothing is read from it
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd, direct = os.open(path, flags), False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        buf = mmap.mmap(-1, MiB)
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                yield bytes(buf[:n])
                offset += n
        finally:
            buf.close()
    finally:
        os.close(fd)


def read_file(path: str, direct: bool = False) -> bytes:
    return b"".join(read_chunks(path, direct))


def scan(root: str, direct: bool = False) -> dict[str, Obj]:
    """Every object of the tree below *root* (``""`` is the root), without following
    links; *direct*: read file contents with ``O_DIRECT`` (see :func:`read_chunks`)."""
    out: dict[str, Obj] = {}

    def visit(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        obj = fresh_stat(full)
        fmt = obj.fmt
        if fmt == stat.S_IFLNK:
            obj.target = os.readlink(full)
        elif fmt == stat.S_IFREG:
            h = hashlib.sha1()
            for chunk in read_chunks(full, direct):
                h.update(chunk)
            obj.sha = h.hexdigest()
        try:
            obj.xattrs = {n: os.getxattr(full, n, follow_symlinks=False)
                          for n in sorted(os.listxattr(full, follow_symlinks=False))}
        except OSError as e:
            obj.xattrs = f"error {errno.errorcode.get(e.errno or 0)}"
        out[rel] = obj
        if fmt == stat.S_IFDIR:
            for name in sorted(os.listdir(full)):
                visit(os.path.join(rel, name) if rel else name)

    visit("")
    return out


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One difference between the mount and the reference (or a broken promise)."""

    kind: str
    path: str
    detail: str
    gap: str | None = None

    def __str__(self) -> str:
        where = f" {self.path!r}" if self.path else ""
        gap = f" [known gap {self.gap}]" if self.gap else ""
        return f"{self.kind}{where}: {self.detail}{gap}"


def _diff_ranges(a: bytes, b: bytes, block: int = 4096) -> list[tuple[int, int]]:
    """Block-granular ``[start, end)`` ranges where *a* and *b* differ."""
    out: list[tuple[int, int]] = []
    for start in range(0, max(len(a), len(b)), block):
        if a[start:start + block] != b[start:start + block]:
            end = start + block
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


def _fmt_ranges(ranges: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"[{s:#x}, {e:#x})" for s, e in ranges[:4])
    return shown + (f" and {len(ranges) - 4} more" if len(ranges) > 4 else "")


@dataclass
class _Known:
    """What the comparator remembers of one reference object between steps."""

    mount_ino: int
    ino_epoch: int
    ref_ctime: int
    mount_ctime: int
    ctime_epoch: int
    crashes: int  #: kills before the last change that the reference saw too


@dataclass
class Context:
    """What the run knows that a mismatch's classification needs."""

    epoch: int = 0  #: switchovers seen so far
    crashes: int = 0  #: kill -9s so far
    #: a switchover happened or was finishing while the last scans ran
    switching: bool = False
    #: reference inodes an operation that failed (on both sides) named, or whose
    #: directory it named, in the last step
    failed_targets: set[int] = field(default_factory=set)
    #: ``epoch``, less one while a switchover is still re-pointing or cleaning up (its
    #: effects may still be arriving): what an observation is recorded with
    settled: int = 0
    #: reference inodes truncated or opened O_TRUNC while a relocation ran
    shrunk_during_copy: set[int] = field(default_factory=set)
    #: reference inodes of non-regular files that had more than one name → epoch seen
    linked_specials: dict[int, int] = field(default_factory=dict)
    #: reference inode → (atime, mtime) a utimens set (None: left alone), and the
    #: reference's ctime right after it
    pins: dict[int, tuple[int | None, int | None, int]] = field(default_factory=dict)
    tainted: set[int] = field(default_factory=set)


class Comparator:
    """Compares two scans and keeps what must hold across steps (inode map, ctimes)."""

    def __init__(self, gaps: frozenset[str]) -> None:
        self.gaps = gaps
        self.known: dict[int, _Known] = {}

    def gap(self, name: str) -> str | None:
        return name if name in self.gaps else None

    def compare(self, ref_root: str, ref: dict[str, Obj], mnt_root: str,
                mnt: dict[str, Obj], ctx: Context) -> list[Mismatch]:
        out: list[Mismatch] = []
        by_ino: dict[int, list[str]] = {}
        for path, obj in ref.items():
            by_ino.setdefault(obj.ino, []).append(path)
            if obj.fmt not in (stat.S_IFREG, stat.S_IFDIR) and obj.nlink > 1:
                ctx.linked_specials.setdefault(obj.ino, ctx.settled)
        for path in sorted(set(ref) | set(mnt)):
            r, m = ref.get(path), mnt.get(path)
            if r is None or m is None:
                if r is not None and r.ino in ctx.tainted:
                    continue
                side = "mount" if r is None else "reference"
                out.append(self._special(Mismatch("names", path, f"only on the {side}"),
                                         r, ctx))
                continue
            if r.ino in ctx.tainted:
                continue
            out += self._compare_obj(path, r, m, ref_root, mnt_root, ctx)
        # link groups: names that share an inode on one side must share one on the other
        mount_owner: dict[int, int] = {}
        for ino, paths in by_ino.items():
            if ino in ctx.tainted:
                continue
            inos = {mnt[p].ino for p in paths if p in mnt}
            if len(inos) > 1:
                out.append(self._special(Mismatch(
                    "links", paths[0], f"one inode on the reference ({paths}), "
                    f"{len(inos)} on the mount"), ref[paths[0]], ctx))
            for mino in inos:
                other = mount_owner.setdefault(mino, ino)
                if other != ino:
                    out.append(Mismatch("links", paths[0], f"shares mount inode {mino:#x} "
                                        f"with {by_ino[other]}"))
        out += self._check_history(ref, mnt, by_ino, ctx)
        return out

    def _special(self, mm: Mismatch, r: Obj | None, ctx: Context) -> Mismatch:
        """Classify a mismatch that a split hard link of a special file explains."""
        if mm.gap is None and r is not None and r.ino in ctx.linked_specials and (
                ctx.epoch > ctx.linked_specials[r.ino]) and (gap := self.gap("special-links")):
            ctx.tainted.add(r.ino)
            return Mismatch(mm.kind, mm.path, mm.detail, gap)
        return mm

    def _compare_obj(self, path: str, r: Obj, m: Obj, ref_root: str, mnt_root: str,
                     ctx: Context) -> list[Mismatch]:
        out: list[Mismatch] = []
        fields = ["fmt", "mode", "uid", "gid", "nlink", "target", "xattrs"]
        if r.fmt != stat.S_IFDIR:
            fields.append("size")
        if r.fmt in (stat.S_IFCHR, stat.S_IFBLK):
            fields.append("rdev")
        for name in fields:
            a, b = getattr(r, name), getattr(m, name)
            if a != b:
                gap = None
                if name == "nlink" and r.fmt == stat.S_IFREG and b == a + 1 and ctx.switching:
                    gap = self.gap("pool-link-visible")
                if name == "mode":
                    a, b = oct(a), oct(b)
                out.append(self._special(Mismatch(name, path, f"reference {a} mount {b}", gap),
                                         r, ctx))
        if r.fmt == stat.S_IFREG == m.fmt and r.sha != m.sha:
            out.append(self._content(path, r, ref_root, mnt_root, ctx))
        pin = ctx.pins.get(r.ino)
        if pin is not None:
            atime, mtime, ctime = pin
            if r.ctime != ctime:
                del ctx.pins[r.ino]  # changed since: the times are no longer set by hand
            else:
                if mtime is not None and m.mtime != mtime:
                    out.append(self._special(Mismatch(
                        "mtime", path, f"set to {mtime} by utimens, mount shows {m.mtime}"),
                        r, ctx))
                # relatime moves an atime only when it is not after mtime and ctime
                if atime is not None and atime > max(ctime, r.mtime) and m.atime != atime:
                    out.append(self._special(Mismatch(
                        "atime", path, f"set to {atime} by utimens, mount shows {m.atime}"),
                        r, ctx))
        return out

    def _content(self, path: str, r: Obj, ref_root: str, mnt_root: str,
                 ctx: Context) -> Mismatch:
        ref_path, mnt_path = os.path.join(ref_root, path), os.path.join(mnt_root, path)
        a, b = read_file(ref_path), read_file(mnt_path, direct=True)
        ranges = _diff_ranges(a, b)
        # the reference holds zeros wherever the two differ: old bytes came back
        stale = len(a) == len(b) and all(
            x == 0 for start, end in ranges for x, y in zip(a[start:end], b[start:end],
                                                            strict=True) if x != y)
        detail = (f"{len(a)} bytes; differ in {_fmt_ranges(ranges)}"
                  + ("; the reference has zeros there" if stale else ""))
        if stale and r.ino in ctx.shrunk_during_copy and (gap := self.gap("truncate-gap")):
            with open(ref_path, "r+b") as f:  # adopt the mount's bytes: the run goes on
                f.write(b)
            return Mismatch("content", path, detail, gap)
        return Mismatch("content", path, detail)

    def _check_history(self, ref: dict[str, Obj], mnt: dict[str, Obj],
                       by_ino: dict[int, list[str]], ctx: Context) -> list[Mismatch]:
        """st_ino stability and ctime-unchanged-when-nothing-changed."""
        out: list[Mismatch] = []
        for ino in [i for i in self.known if i not in by_ino]:
            del self.known[ino]
        for ino, paths in by_ino.items():
            present = [p for p in paths if p in mnt]
            if not present or ino in ctx.tainted:
                continue
            path = present[0]
            r, m = ref[path], mnt[path]
            known = self.known.get(ino)
            if known is None:
                self.known[ino] = _Known(m.ino, ctx.settled, r.ctime, m.ctime, ctx.settled,
                                         ctx.crashes)
                continue
            if m.ino != known.mount_ino:
                explained = []
                if max(m.ino, known.mount_ino) >= PRIVATE_INO:
                    explained.append("ino-collision")
                if ctx.epoch > known.ino_epoch:
                    explained.append("ino-after-relocation")
                gap = next((g for g in explained if self.gap(g)), None)
                out.append(self._special(Mismatch(
                    "ino", path, f"st_ino was {known.mount_ino:#x}, now {m.ino:#x}", gap), r,
                    ctx))
                known.mount_ino, known.ino_epoch = m.ino, ctx.settled
            if r.ctime == known.ref_ctime and m.ctime != known.mount_ctime:
                explained = []  # the gaps whose signature this has
                if ctx.epoch > known.ctime_epoch:
                    explained.append("ctime-after-relocation")
                if ctx.crashes > known.crashes and r.fmt == stat.S_IFREG:
                    explained.append("ctime-after-crash")
                if ino in ctx.failed_targets and ctx.epoch > 0:
                    explained.append("ctime-failed-op")
                gap = next((g for g in explained if self.gap(g)), None)
                out.append(self._special(Mismatch(
                    "ctime", path, f"nothing changed it, but the mount's ctime moved from "
                    f"{known.mount_ctime} to {m.ctime}", gap), r, ctx))
                known.mount_ctime = m.ctime
            elif r.ctime != known.ref_ctime:
                known.ref_ctime, known.mount_ctime = r.ctime, m.ctime
                known.ctime_epoch, known.crashes = ctx.settled, ctx.crashes
        return out


# -- a run: the mount, the reference, the job -------------------------------------------


class Failed(Exception):
    """A step broke the promise; carries the step number and what differed."""

    def __init__(self, step: int, op: Op | None, mismatches: list[Mismatch]) -> None:
        self.step = step
        self.op = op
        self.mismatches = mismatches
        super().__init__(self.describe())

    @property
    def kind(self) -> str:
        return self.mismatches[0].kind

    def describe(self) -> str:
        lines = [f"step {self.step} ({self.op!r}):"] + [f"  {m}" for m in self.mismatches[:12]]
        if len(self.mismatches) > 12:
            lines.append(f"  ... {len(self.mismatches) - 12} more")
        return "\n".join(lines)


@dataclass
class Report:
    """What a run saw besides a failure."""

    steps: int = 0
    relocations: int = 0
    kills: int = 0
    gap_hits: list[tuple[int, Mismatch]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the slowest steps: (seconds, step, op)
    slowest: list[tuple[float, int, Op]] = field(default_factory=list)

    def timed(self, seconds: float, step: int, op: Op) -> None:
        self.slowest.append((seconds, step, op))
        self.slowest.sort(key=lambda t: -t[0])
        del self.slowest[5:]


class Run:
    """One datastore (stores a and b) and one reference tree, driven op by op."""

    def __init__(self, workdir: Path, gaps: frozenset[str],
                 say: Callable[[str], None] = lambda _: None,
                 env: dict[str, str] | None = None, remote: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.ds = MountedDatastore(workdir / "ds", remote=remote)
        self.ds.env = dict(env or {})
        self.ref = Side("reference", workdir / "ref" / ENTRY)
        self.mnt = Side("mount", self.ds.mnt / ENTRY)
        self.cmp = Comparator(gaps)
        self.ctx = Context()
        self.report = Report()
        self.say = say
        self.placement = "a"
        self.job_src: str | None = None
        self._log_seen = 0
        self._step_epoch = 0
        #: relocations pause themselves after each pass (FUSEDISK_PAUSE_AFTER_PASS):
        #: what happens between two passes is then up to the sequence
        self.hold = False

    # -- life cycle ------------------------------------------------------------------

    def __enter__(self) -> Run:
        (self.workdir / "ref").mkdir(parents=True, exist_ok=True)
        self.ds.start()
        os.mkdir(self.ref.root, 0o755)
        os.mkdir(self.mnt.root, 0o755)
        return self

    def __exit__(self, *exc: object) -> None:
        self.ref.close_held()
        self.mnt.close_held()
        self.ds.teardown()

    # -- the daemon's view -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = control.request(self.ds.mnt, "status")
        return result

    def job(self, status: dict[str, Any] | None = None) -> dict[str, Any] | None:
        jobs = [j for j in (status or self.status())["jobs"] if j["entry"] == ENTRY]
        return jobs[-1] if jobs else None

    def running(self) -> dict[str, Any] | None:
        job = self.job()
        return job if job is not None and job["state"] not in api.FINAL_STATES else None

    def poll(self) -> dict[str, Any]:
        """Note a switchover (the placement moved) since the last poll."""
        status = self.status()
        where = status["placement"].get(ENTRY)
        if where is not None and where != self.placement:
            self.placement = where
            self.ctx.epoch += 1
            self.report.relocations += 1
        job = self.job(status)
        busy = job is not None and job["state"] in (api.State.SWITCHING, api.State.FINISHING)
        self.ctx.settled = self.ctx.epoch - 1 if busy else self.ctx.epoch
        return status

    def other_store(self) -> str:
        return "b" if self.placement == "a" else "a"

    # -- steps ---------------------------------------------------------------------------

    def step(self, index: int, op: Op) -> list[Mismatch]:
        """Apply *op* to both sides (or to the datastore), compare; return what differed."""
        out: list[Mismatch] = []
        self._step_epoch = self.ctx.epoch
        self.ctx.failed_targets.clear()
        if op.kind in EVENTS:
            out += getattr(self, f"_ev_{op.kind}")(op)
        else:
            out += self._apply(op)
        self.poll()
        out += self.compare()
        if op.kind in EVENTS:
            out += self._daemon_log()
        return out

    def _apply(self, op: Op) -> list[Mismatch]:
        shrinking = self._shrinking(op)
        a = self.ref.apply(op)
        b = self.mnt.apply(op)
        if a[0] == "err":
            for key in ("path", "src"):
                for rel in (op.args.get(key), os.path.dirname(op.args.get(key) or "")):
                    if isinstance(rel, str) and key in op.args:
                        with contextlib.suppress(OSError):
                            self.ctx.failed_targets.add(os.lstat(self.ref.path(rel)).st_ino)
        if shrinking is not None:
            self.ctx.shrunk_during_copy.add(shrinking)
        if op.kind == "utimens" and a[0] == "ok":
            with contextlib.suppress(OSError):
                st = os.lstat(self.ref.path(op.path))
                self.ctx.pins[st.st_ino] = (op.atime, op.mtime, st.st_ctime_ns)
        if a == b:
            return []
        tainted = False
        for key in ("path", "src"):
            if key in op.args:
                with contextlib.suppress(OSError):
                    tainted |= os.lstat(self.ref.path(op.args[key])).st_ino in self.ctx.tainted
        if tainted:
            return []
        return [Mismatch("outcome", op.args.get("path", ""), f"reference {a}, mount {b}")]

    def _shrinking(self, op: Op) -> int | None:
        """The reference inode that *op* makes shorter while a relocation runs, if any."""
        if op.kind not in ("truncate", "open_trunc", "fd_truncate"):
            return None
        try:
            if op.kind == "fd_truncate":
                fd = self.ref.held.get(op.slot)
                if fd is None:
                    return None
                st = os.fstat(fd)
            else:
                st = os.lstat(self.ref.path(op.path))
        except OSError:
            return None
        new = op.size if op.kind != "open_trunc" else 0
        if new >= st.st_size or self.running() is None:
            return None
        return st.st_ino

    def compare(self) -> list[Mismatch]:
        before = min(self.ctx.epoch, self._step_epoch)
        ref = scan(self.ref.root)
        mnt = scan(self.mnt.root, direct=True)
        self.poll()  # a switchover while the scans ran explains what they saw
        self.ctx.switching = self.ctx.epoch > before or self.ctx.settled < self.ctx.epoch
        return self.cmp.compare(self.ref.root, ref, self.mnt.root, mnt, self.ctx)

    def _daemon_log(self) -> list[Mismatch]:
        log = self.ds.log()
        new, self._log_seen = log[self._log_seen:], len(log)
        bad = [line for line in new.splitlines() if any(b in line for b in _LOG_BUGS)]
        return [Mismatch("daemon-log", "", "\n    ".join(bad[:10]))] if bad else []

    # -- relocation events ---------------------------------------------------------------

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return fusedisk(*args[:1], str(self.ds.mnt), *args[1:])

    def _ev_migrate(self, op: Op) -> list[Mismatch]:
        if self.running() is not None:
            return []
        src, dst = self.placement, self.other_store()
        result = self._cli("migrate", ENTRY, "--to", dst, "--mode", op.mode, "--rate", op.rate,
                           "--max-pause", str(op.max_pause), "--no-wait")
        if result.returncode != 0:
            return [Mismatch("relocation", "", f"migrate refused: {result.stderr.strip()}")]
        self.job_src = src
        self.say(f"migrate {src} -> {dst} ({op.mode}, {op.rate}/s)")
        return []

    def _ev_pause(self, op: Op) -> list[Mismatch]:
        return self._job_cli("pause", ENTRY)

    def _ev_resume(self, op: Op) -> list[Mismatch]:
        return self._job_cli("resume", ENTRY)

    def _ev_rate(self, op: Op) -> list[Mismatch]:
        return self._job_cli("rate", ENTRY, op.rate)

    def _job_cli(self, *args: str) -> list[Mismatch]:
        if self.running() is None:
            return []
        result = self._cli(*args)
        if result.returncode != 0 and self.running() is not None:
            return [Mismatch("relocation", "", f"{args[0]} failed: {result.stderr.strip()}")]
        return []

    def _ev_finish(self, op: Op) -> list[Mismatch]:
        job = self.running()
        if job is None:
            return self._after_job(self.job())
        self._cli("rate", ENTRY, "0")
        if job["paused"]:
            self._cli("resume", ENTRY)
        return self._after_job(self.wait_final())

    def wait_final(self, timeout_s: float = 180) -> dict[str, Any]:
        """Wait for the job to end (resuming it whenever it holds after a pass)."""
        final: dict[str, Any] = {}

        def ended() -> bool:
            job = self.job()
            if job is not None and job["state"] in ENDED:
                final.update(job)
                return True
            if self.hold and job is not None and job["paused"]:
                self._resume()
            return False

        wait_for(ended, timeout_s, "the relocation to end")
        return final

    def _ev_cancel(self, op: Op) -> list[Mismatch]:
        """Cancel; an accepted cancel must end the job cancelled, with the source kept."""
        if self.running() is None:
            return []
        asked_in: str | None = None  # the job's state when the cancel was accepted
        if op.when == "switching":  # lift the limit, cancel the moment the copy is over
            with contextlib.suppress(control.RequestRefused):  # it may just have ended
                control.request(self.ds.mnt, "rate", entry=ENTRY, rate=0)
                control.request(self.ds.mnt, "resume", entry=ENTRY)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                job = self.job()
                if job is None or job["state"] not in api.PRE_SWITCH_STATES:
                    break
                if job["paused"]:
                    self._resume()
            with contextlib.suppress(control.RequestRefused):
                asked_in = control.request(self.ds.mnt, "cancel", entry=ENTRY)["state"]
        else:
            result = self._cli("cancel", ENTRY)
            if result.returncode == 0:
                asked_in = result.stdout.split()[2]  # "vm a->b STATE ..."
            elif "already committed" not in result.stderr and self.running() is not None:
                return [Mismatch("relocation", "", f"cancel failed: {result.stderr.strip()}")]
        final = self.wait_final()
        self.poll()
        self.say(f"cancel ({op.when}) accepted while {asked_in}: {final['state']}")
        out = []
        if asked_in is not None and final["state"] != api.State.CANCELLED:
            switching = asked_in == api.State.SWITCHING
            gap = self.cmp.gap("cancel-while-switching") if switching else None
            out.append(Mismatch("cancel", "", f"cancel accepted while {asked_in}, but the job "
                                f"ended {final['state']} (now on {self.placement})", gap))
        return out + self._after_job(final)

    def _after_job(self, job: dict[str, Any] | None) -> list[Mismatch]:
        """Check what an ended job left: placement, the source, leftovers, holes."""
        if job is None or self.job_src is None:
            return []
        src, self.job_src = self.job_src, None
        dst = job["to"]
        self.poll()
        out: list[Mismatch] = []
        where = self.placement
        if job["state"] == api.State.DONE:
            if where != dst:
                out.append(Mismatch("relocation", "", f"job done but placement is {where}"))
            self.say(f"relocated to {dst}, pause {job.get('pause_ms')} ms")
        elif job["state"] == api.State.FAILED and "did not converge" not in (job["error"] or ""):
            out.append(Mismatch("relocation", "", f"relocation failed: {job['error']}"))
        elif where != src:
            out.append(Mismatch("relocation", "", f"job {job['state']} but placement {where}"))
        elif job["state"] == api.State.CANCELLED:
            self.say("cancelled")
        out += self._leftovers()
        if job["state"] == api.State.DONE:
            notes = self._thin_check()
            if THIN_STRICT:
                out += [Mismatch("thin", "", note) for note in notes]
            else:
                self.report.notes += notes
        return out

    def _leftovers(self) -> list[Mismatch]:
        """The entry on exactly its store, nothing of fusedisk's own on any store."""
        stores = self.ds.stores

        def clean() -> bool:
            return not any(_leftover(p) for s in stores.values()
                           for p in s.iterdir()) and not any(
                (s / ENTRY).exists() for name, s in stores.items() if name != self.placement)

        try:  # a cancelled job removes its partial copy after it reports the state
            wait_for(clean, 15, "the relocation's leftovers to go")
        except AssertionError:
            found = sorted(str(p.relative_to(self.ds.root)) for s in stores.values()
                           for p in s.iterdir())
            return [Mismatch("leftovers", "", f"placement {self.placement}, stores hold {found}")]
        if not (stores[self.placement] / ENTRY).exists():
            return [Mismatch("leftovers", "", f"{ENTRY} missing on its store {self.placement}")]
        return []

    def _thin_check(self) -> list[str]:
        """Holes of the reference that are data on the store (reported, not failed)."""
        notes = []
        seen: set[int] = set()
        store_root = self.ds.stores[self.placement] / ENTRY
        for rel, (fmt, size, _) in listing(self.ref.root).items():
            if fmt != stat.S_IFREG or size == 0:
                continue
            ino = os.lstat(self.ref.path(rel)).st_ino
            if ino in seen:
                continue
            seen.add(ino)
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                ref_fd = os.open(self.ref.path(rel), flags)
                try:
                    store_fd = os.open(store_root / rel, flags)
                    try:
                        if not stat.S_ISREG(os.fstat(store_fd).st_mode):
                            continue  # the comparison reports it
                        ref_data = data_extents(ref_fd, size)
                        store_data = data_extents(store_fd, size)
                    finally:
                        os.close(store_fd)
                finally:
                    os.close(ref_fd)
            except OSError:
                continue
            extra = _subtract(store_data, ref_data)
            if extra:
                notes.append(f"thin: {rel} is data on store {self.placement} where the "
                             f"reference has holes: {_fmt_ranges(extra)}")
        return notes

    def _ev_kill(self, op: Op) -> list[Mismatch]:
        if op.sync:
            self._sync_mount()
        self.ref.close_held()
        self.mnt.close_held()
        if op.hurry_ms is not None and self.running() is not None:
            with contextlib.suppress(ControlError):
                control.request(self.ds.mnt, "rate", entry=ENTRY, rate=0)
                control.request(self.ds.mnt, "resume", entry=ENTRY)
            time.sleep(op.hurry_ms / 1000)  # a random moment of the job, on purpose
        state = (self.job() or {}).get("state")
        self.ds.kill()
        self.ds.start(env=self._env())
        self.report.kills += 1
        self.ctx.crashes += 1
        self.job_src = None
        self.poll()
        self.say(f"kill -9 (job {state}), remounted: on {self.placement}")
        return self._resumed_or_clean()

    def _resumed_or_clean(self) -> list[Mismatch]:
        """After a remount: a relocation interrupted before its commit resumes
        (issue 12) and is checked when it ends; otherwise nothing is left over."""
        job = self.running()
        if job is not None:
            self.job_src = job["from"]
            self.say(f"the relocation resumed ({job['state']}, kept {job['resumed_bytes']} B)")
            if not job["resumed"] or job["from"] != self.placement:
                return [Mismatch("relocation", "", f"after the remount a job runs that is "
                                 f"not the interrupted one resumed: {job}")]
            return []
        return self._leftovers()

    def _sync_mount(self) -> None:
        for rel, (fmt, _, _) in listing(self.mnt.root).items():
            if fmt in (stat.S_IFREG, stat.S_IFDIR):
                fd = os.open(self.mnt.path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def _ev_remount(self, op: Op) -> list[Mismatch]:
        self.ref.close_held()
        self.mnt.close_held()
        job = self.running()
        self.ds.stop()
        self.ds.start(env=self._env())
        self.poll()
        self.job_src = None
        self.say(f"unmount/mount (job {job and job['state']}): on {self.placement}")
        return self._resumed_or_clean()

    def _env(self) -> dict[str, str]:
        return {"FUSEDISK_PAUSE_AFTER_PASS": "1"} if self.hold else {}

    def _ev_hold_passes(self, op: Op) -> list[Mismatch]:
        """From now on the daemon holds every relocation after each pass (a test hook
        of fusedisk's; a daemon without it just does not hold)."""
        if not self.hold:
            self.hold = True
            self.ref.close_held()
            self.mnt.close_held()
            self.ds.stop()
            self.ds.start(env=self._env())
            self.job_src = None
        return []

    def _resume(self) -> None:
        with contextlib.suppress(control.RequestRefused):  # it may just have ended
            control.request(self.ds.mnt, "resume", entry=ENTRY)

    def _ev_progress(self, op: Op) -> list[Mismatch]:
        """A sync point for replays: wait until the running copy has copied *bytes*
        more; held between passes, run the next pass."""
        job = self.running()
        if job is None or (job["paused"] and not self.hold):
            return []
        target = job["bytes_copied"] + op.bytes
        if job["paused"]:
            self._resume()  # synchronous: not paused any more once it answers

        def there() -> bool:  # (paused again: held after the pass, or paused by a user)
            now = self.running()
            return now is None or now["state"] not in (api.State.COPYING, api.State.MIRRORING) or (
                now["bytes_copied"] >= target) or now["paused"]

        wait_for(there, 120, "the copy to progress")
        return []

    def _ev_drop_caches(self, op: Op) -> list[Mismatch]:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        return []


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ranges *a* that no range of *b* covers."""
    out = []
    for start, end in a:
        pos = start
        for bs, be in b:
            if be <= pos or bs >= end:
                continue
            if bs > pos:
                out.append((pos, bs))
            pos = max(pos, be)
        if pos < end:
            out.append((pos, end))
    return out


# -- running sequences, seeds and shrinking -----------------------------------------------


def run_ops(
    workdir: Path, ops: list[Op], gaps: frozenset[str],
    say: Callable[[str], None] = lambda _: None, remote: Sequence[str] = (),
) -> tuple[Failed | None, Report]:
    """Run *ops* and the epilogue on a fresh datastore (*remote*: stores served as remote
    stores); the first failing step, if any."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with Run(workdir, gaps, say, remote=remote) as run:
        steps = [*ops, *EPILOGUE]
        for index, op in enumerate(steps):
            found = run.step(index, op)
            run.report.steps = index + 1
            bad = [m for m in found if m.gap is None]
            run.report.gap_hits += [(index, m) for m in found if m.gap is not None]
            if bad:
                run.poll()
                return Failed(index, op, bad), run.report
    shutil.rmtree(workdir, ignore_errors=True)
    return None, run.report


def run_seed(
    workdir: Path, seed: int, steps: int, gaps: frozenset[str],
    say: Callable[[str], None] = lambda _: None, env: dict[str, str] | None = None,
    remote: Sequence[str] = (),
) -> tuple[list[Op], Failed | None, Report]:
    """Generate and run *steps* operations of *seed* (the generator follows the run);
    *env* goes into the daemon's environment at every start."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    gen = Generator(seed)
    ops: list[Op] = []
    with Run(workdir, gaps, say, env, remote) as run:
        for index in range(steps + len(EPILOGUE)):
            op = gen.next_op(index, run.ref) if index < steps else EPILOGUE[index - steps]
            if index < steps:
                ops.append(op)
            began = time.monotonic()
            found = run.step(index, op)
            run.report.timed(time.monotonic() - began, index, op)
            run.report.steps = index + 1
            bad = [m for m in found if m.gap is None]
            run.report.gap_hits += [(index, m) for m in found if m.gap is not None]
            if bad:
                return ops, Failed(index, op, bad), run.report
    shutil.rmtree(workdir, ignore_errors=True)
    return ops, None, run.report


def _ancestors(path: str) -> set[str]:
    out = {""}
    while path:
        path = os.path.dirname(path)
        out.add(path)
    return out


def slice_ops(ops: list[Op], paths: set[str]) -> list[Op]:
    """The operations that can have touched *paths*: a backward slice over names.

    Keeps every event, and every operation on a name that the objects at
    *paths* (or their directories) had at some time, following renames,
    links, symlink targets and held descriptors (an ``fd_*`` operation
    touches the path its slot was opened on).
    """
    bound: dict[int, str] = {}
    touched: list[set[str]] = []
    for op in ops:  # what each operation touches, with slots resolved
        names = {op.args[k] for k in ("path", "src") if k in op.args}
        if op.kind == "symlink":
            names.add(os.path.normpath(os.path.join(os.path.dirname(op.path), op.target)))
        if op.kind == "hold":
            bound[op.slot] = op.path
        elif "slot" in op.args and op.slot in bound:
            names.add(bound[op.slot])
        touched.append(names)
    wanted = set().union(*(_ancestors(p) | {p} for p in paths)) if paths else {""}
    keep: list[Op] = []
    for op, names in zip(reversed(ops), reversed(touched), strict=True):
        if op.kind in EVENTS or names & wanted:
            keep.append(op)
            for name in names:
                wanted |= _ancestors(name) | {name}
    keep.reverse()
    return keep


def shrink(
    workdir: Path, ops: list[Op], failure: Failed, gaps: frozenset[str], budget_s: float,
    say: Callable[[str], None] = lambda _: None, remote: Sequence[str] = (),
) -> tuple[list[Op], Failed]:
    """Delta debugging over *ops*: a shorter sequence that fails the same way.

    First a backward slice over the names of the failing objects
    (:func:`slice_ops`), then ddmin. A candidate counts when it fails with a
    mismatch of the same kind; one that fails at an earlier step is cut
    there. Bounded by *budget_s*; each candidate is a whole run on a fresh mount.
    """
    deadline = time.monotonic() + budget_s
    kind = failure.kind
    best, best_failure = list(ops[: failure.step + 1]), failure
    tried: set[tuple[Op, ...]] = set()

    def fails(candidate: list[Op]) -> Failed | None:
        key = tuple(candidate)
        if key in tried:
            return None
        tried.add(key)
        try:
            got, _ = run_ops(workdir, candidate, gaps, remote=remote)
        except Exception as e:  # a candidate the engine trips over is not a reduction
            say(f"candidate of {len(candidate)} operations broke the run: {e!r}")
            return None
        if got is not None and got.kind == kind:
            return got
        return None

    paths = {m.path for m in failure.mismatches if m.kind == kind}
    for candidate in (slice_ops(best, paths), [op for op in best if op.kind not in EVENTS]):
        if len(candidate) < len(best) and time.monotonic() < deadline:
            got = fails(candidate)
            if got is not None:
                best, best_failure = candidate[: got.step + 1], got
                say(f"sliced to {len(best)} operations")
    n = 2
    while len(best) >= 2 and time.monotonic() < deadline:
        size = max(1, len(best) // n)
        chunks = [best[i:i + size] for i in range(0, len(best), size)]
        reduced = False
        for i in range(len(chunks)):
            if time.monotonic() >= deadline:
                break
            candidate = [op for j, c in enumerate(chunks) if j != i for op in c]
            got = fails(candidate)
            if got is not None:
                best = candidate[: got.step + 1] if got.step < len(candidate) else candidate
                best_failure = got
                n = max(n - 1, 2)
                reduced = True
                say(f"shrunk to {len(best)} operations")
                break
        if not reduced:
            if n >= len(best):
                break
            n = min(len(best), n * 2)
    shutil.rmtree(workdir, ignore_errors=True)
    return best, best_failure


def check_replay(workdir: Path, ops: list[Op], gaps: frozenset[str] = frozenset(),
                 remote: Sequence[str] = ()) -> Report:
    """Run a replay (e.g. one printed by a failure); raise AssertionError if it fails."""
    failure, report = run_ops(workdir, ops, gaps, remote=remote)
    if failure is not None:
        raise AssertionError(f"replay failed at {failure.describe()}\n{format_replay(ops)}")
    return report


def explain(seed: int, steps: int, ops: list[Op], failure: Failed, shrunk: list[Op],
            shrunk_failure: Failed) -> str:
    return "\n".join([
        f"differential run failed: seed {seed} ({steps} steps), step {failure.step}",
        failure.describe(),
        f"minimal replay ({len(shrunk)} of {failure.step + 1} operations; the epilogue "
        f"{list(EPILOGUE)} runs after it), failing with:",
        shrunk_failure.describe(),
        format_replay(shrunk),
        f"reproduce: differential.check_replay(tmp_path, REPLAY)  "
        f"or FUSEDISK_DIFF_SEED={seed} pytest tests/test_differential.py",
    ])


# -- a probe the step-by-step engine only hits by chance ---------------------------------


def probe_switchover(workdir: Path, nfiles: int = 16, rounds: int = 3) -> dict[str, Any]:
    """Relocate an entry back and forth while a thread stats every file of it in a
    tight loop (``statx`` forced to ask the daemon); what it saw.

    A switchover must be invisible to this too: every file keeps ``nlink`` 1
    and its ``st_ino``. Returns ``{"nlink": {value: count}, "ino_changes": n}``.
    """
    import threading

    ds = MountedDatastore(workdir)
    seen: dict[int, int] = {}
    inos: dict[int, int] = {}
    changes = [0]
    stop = threading.Event()
    try:
        ds.start()
        home = ds.mnt / ENTRY
        home.mkdir()
        paths = [str(home / f"f{i}") for i in range(nfiles)]
        for i, path in enumerate(paths):
            with open(path, "wb") as f:
                f.write(payload(i, 64 * KiB))

        def look() -> None:
            while not stop.is_set():
                for i, path in enumerate(paths):
                    obj = fresh_stat(path)
                    seen[obj.nlink] = seen.get(obj.nlink, 0) + 1
                    if inos.setdefault(i, obj.ino) != obj.ino:
                        changes[0] += 1
                        inos[i] = obj.ino

        thread = threading.Thread(target=look, daemon=True)
        thread.start()
        try:
            for index in range(rounds):
                to = "b" if index % 2 == 0 else "a"
                result = fusedisk("migrate", str(ds.mnt), ENTRY, "--to", to)
                assert result.returncode == 0, result.stderr
        finally:
            stop.set()
            thread.join(timeout=30)
    finally:
        ds.teardown()
    return {"nlink": seen, "ino_changes": changes[0]}


# -- the kill -9 loop under a journaling O_DIRECT + fdatasync writer ---------------------


#: The guest of :func:`kill_loop`: journal_writer.py's, but each write is
#: fdatasynced before it is journaled as done (``D``), so acknowledged means
#: durable. Same journal format (:func:`journal_writer.check` reads it).
#: Self-contained (run with ``python -c``): it imports nothing of the project.
DURABLE_WRITER = """
import hashlib, mmap, os, random, sys
path, journal_path, seed, nblocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
buf = mmap.mmap(-1, 4096)
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
with open(journal_path, "a", buffering=1) as journal:
    while True:
        offset = rng.randrange(nblocks) * 4096
        data = rng.randbytes(4096)
        digest = hashlib.sha1(data).hexdigest()
        buf[:] = data
        journal.write(f"I {offset} {digest}\\n")
        try:
            os.pwritev(fd, [buf], offset)
            os.fdatasync(fd)
        except OSError:
            sys.exit(0)
        journal.write(f"D {offset} {digest}\\n")
"""


def _wait_switch(ds: MountedDatastore) -> None:
    """Poll (fast) until the job has stopped copying: switching, finishing or ended."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = control.request(ds.mnt, "status", timeout_s=5)["jobs"]
        if jobs and jobs[-1]["state"] not in api.PRE_SWITCH_STATES:
            return


def _wait_journal(journal: Path, size: int) -> None:
    wait_for(lambda: journal.exists() and journal.stat().st_size > size, 30, "the writer")


def _journal_since(journal: Path, start: int) -> list[tuple[str, int, str]]:
    with open(journal) as f:
        f.seek(start)
        lines = f.read().splitlines()
    out = []
    for line in lines:
        kind, offset, digest = line.split()
        out.append((kind, int(offset), digest))
    return out


def _covered(extents: list[list[int]], offset: int, length: int) -> bool:
    pos, end = offset, offset + length
    for start, ext_len in sorted(extents):
        if start <= pos < start + ext_len:
            pos = start + ext_len
        if pos >= end:
            return True
    return pos >= end


@dataclass
class KillReport:
    rounds: int = 0
    acked: int = 0
    states: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def kill_loop(
    workdir: Path, seed: int, rounds: int, deadline: float | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> KillReport:
    """kill -9 at random times while a relocation runs under a durable writer; see module doc."""
    rng = random.Random(seed)
    report = KillReport()
    ds = MountedDatastore(workdir)
    writer: subprocess.Popen[bytes] | None = None
    journal = workdir / "journal"
    disk_rel = f"{ENTRY}/disk.img"
    nblocks = (24 * MiB) // journal_writer.BLOCK
    try:
        ds.start()
        home = ds.mnt / ENTRY
        home.mkdir()
        (home / "vm.cfg").write_text("memsize = 1024\n")
        disk = home / "disk.img"
        data_mib = 12
        with open(disk, "wb") as f:  # sparse, with data here and there
            f.truncate(nblocks * journal_writer.BLOCK)
            for i in range(0, 2 * data_mib, 2):
                f.seek(i * MiB)
                f.write(os.urandom(MiB))
        placement = "a"
        for index in range(rounds):
            if deadline is not None and time.monotonic() > deadline:
                break
            checkpoint = fusedisk("cbt", "checkpoint", str(ds.mnt), disk_rel)
            if checkpoint.returncode != 0:
                report.problems.append(f"round {index}: checkpoint failed: "
                                       f"{checkpoint.stderr.strip()}")
                break
            change_id = checkpoint.stdout.strip()
            start = journal.stat().st_size if journal.exists() else 0
            writer = subprocess.Popen(
                [sys.executable, "-c", DURABLE_WRITER, str(disk), str(journal),
                 str(rng.randrange(1 << 32)), str(nblocks)])
            _wait_journal(journal, start + 4000)
            target = "b" if placement == "a" else "a"
            mode = rng.choice(("auto", "auto", "precopy", "mirror"))
            rate_mib = rng.choice((8, 16, 32, 0))
            started = fusedisk("migrate", str(ds.mnt), ENTRY, "--to", target, "--mode", mode,
                               "--rate", f"{rate_mib}M", "--no-wait")
            if started.returncode != 0:
                report.problems.append(f"round {index}: migrate failed: "
                                       f"{started.stderr.strip()}")
                break
            rate = f"{rate_mib}M" if rate_mib else "unlimited"
            began = time.monotonic()
            if rng.random() < 0.3:  # right after the copy ended: inside or just after the pause
                _wait_switch(ds)
                time.sleep(rng.uniform(0, 0.01))
            else:  # any moment of the job's expected life, and a little after
                expected_s = data_mib / rate_mib if rate_mib else 0.5
                time.sleep(rng.uniform(0, 1.3 * expected_s + 0.2))  # the random moment
            delay_s = time.monotonic() - began
            try:
                jobs = control.request(ds.mnt, "status", timeout_s=5)["jobs"]
                state = jobs[-1]["state"] if jobs else "?"
            except ControlError:
                state = "?"
            ds.kill()
            report.states[state] = report.states.get(state, 0) + 1
            writer.wait(timeout=30)  # it stops at its first error
            writer = None
            ds.start()
            problems = _wait_resumed(ds)
            status = ds.status()
            placement = status["placement"][ENTRY]
            say(f"round {index}: {mode} at {rate}/s, killed after {delay_s:.2f} s in "
                f"{state}; now on {placement}")
            report.rounds += 1
            problems += _check_after_kill(ds, placement, disk, journal, start, change_id,
                                          disk_rel)
            acked = sum(1 for k, _, _ in _journal_since(journal, start) if k == "D")
            report.acked += acked
            if acked < 5:
                problems.append("the writer got fewer than 5 writes acknowledged")
            report.problems += [f"round {index} ({mode}, {rate}/s, killed in {state} after "
                                f"{delay_s:.2f} s): {p}" for p in problems]
            if problems:
                break
        log = ds.log()
        bad = [line for line in log.splitlines() if "Traceback" in line or " CRITICAL " in line]
        if bad:
            report.problems.append("daemon log: " + "; ".join(bad[:5]))
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        ds.teardown()
    return report


def _wait_resumed(ds: MountedDatastore) -> list[str]:
    """A relocation the kill interrupted before its commit resumes at the mount
    (issue 12): let it end, and say so if it did not end done."""
    jobs = ds.status()["jobs"]
    if not jobs:
        return []

    def final() -> dict[str, Any]:
        job: dict[str, Any] = ds.status()["jobs"][-1]
        return job

    wait_for(lambda: final()["state"] in ENDED, 180,
             "the resumed relocation to end")
    job = final()
    if not job["resumed"] or job["state"] != api.State.DONE:
        return [f"the resumed relocation ended {job['state']}: {job.get('error')}"]
    return []


def _check_after_kill(ds: MountedDatastore, placement: str, disk: Path, journal: Path,
                      start: int, change_id: str, disk_rel: str) -> list[str]:
    problems = []
    for name, store in ds.stores.items():
        leftovers = [p.name for p in store.iterdir() if _leftover(p)]
        if leftovers:
            problems.append(f"leftovers on store {name}: {leftovers}")
        if name != placement and (store / ENTRY).exists():
            problems.append(f"{ENTRY} also on store {name} (placement {placement})")
    _, wrong = journal_writer.check(disk, journal)
    if wrong:
        problems.append(f"{len(wrong)} of the acknowledged writes lost, e.g. offsets "
                        f"{sorted(wrong)[:5]}")
    changes = fusedisk("cbt", "changes", str(ds.mnt), disk_rel, "--since", change_id, "--json")
    if changes.returncode != 0:
        problems.append(f"cbt changes --since {change_id} refused after the remount: "
                        f"{changes.stderr.strip()}")
        return problems
    extents = json.loads(changes.stdout)["extents"]
    written: dict[int, str] = {}
    landed: set[int] = set()
    for kind, offset, digest in _journal_since(journal, start):
        if kind == "D":
            landed.add(offset)
        written[offset] = digest
    with open(disk, "rb") as f:  # a write in flight counts if its bytes landed
        for offset, digest in written.items():
            if offset not in landed:
                f.seek(offset)
                if hashlib.sha1(f.read(journal_writer.BLOCK)).hexdigest() == digest:
                    landed.add(offset)
    missing = sorted(o for o in landed if not _covered(extents, o, journal_writer.BLOCK))
    if missing:
        problems.append(f"cbt changes --since {change_id} misses {len(missing)} of "
                        f"{len(landed)} written blocks, e.g. {missing[:5]}")
    return problems

