"""The only room that touches backing file descriptors.

Every backing object is reached through an ``O_PATH | O_NOFOLLOW`` descriptor
and ``*at()`` system calls relative to a directory descriptor, never through
a joined path string: a name handed in by FUSE is a single component, and no
symlink on a store is ever followed by the daemon. That is what keeps every
request inside the store directory that holds its entry.

Colour (see STYLE.md, habit 2): ``pread``/``pwrite``/``fstat`` and the
namespace calls run on the trio thread. Measured on this machine they cost
less than the hand-off to a worker thread (PERF-NOTES.md: 2.5x slower at
QD1 when every call is offloaded); on a healthy local store they do not
block for long. ``fsync``/``fdatasync`` and whole-file scans can block for
a long time and are offloaded with :func:`run_blocking`.

Backing files are opened *without* ``O_DIRECT``: a write that fusedisk
acknowledged is in the kernel's page cache of the backing filesystem, where
it survives a crash (even ``kill -9``) of the daemon, and ``fsync``/
``fdatasync`` on the mount are passed through so data is on stable storage
when the guest asks for it. The guest's own ``O_DIRECT`` (QEMU
``cache=none``) bypasses the FUSE page cache in the kernel, so data is
cached once, in the backing store.
"""

from __future__ import annotations

import contextvars
import ctypes
import dataclasses
import errno
import logging
import os
import queue
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

import outcome
import trio

from . import fuseshim

_T = TypeVar("_T")

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
UTIME_OMIT = (1 << 30) - 2

#: Longest name a store accepts through the mount (checked against every store).
NAME_MAX = 255

class _Workers:
    """Long-lived worker threads for :func:`run_blocking`.

    ``trio.to_thread.run_sync`` costs ~90 µs a hop here (it hands each job to
    a thread cache and names the thread twice with ``prctl``); these threads
    take jobs from one queue and hand results back with one
    ``TrioToken.run_sync_soon``: ~45 µs. An fsync of a small file is ~85 µs,
    so the hop was most of a guest's fsync. A thread is added while jobs
    wait and fewer than *limit* exist, so a slow store cannot take more
    threads than that (the jobs queue instead); idle threads stay parked.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._waiting = 0
        #: jobs handed to a thread so far (``status``: a hop costs the loop ~45 µs)
        self.jobs = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self.jobs += 1
            self._waiting += 1
            spawn = self._waiting > self._idle and self._threads < self.limit
            if spawn:
                self._threads += 1
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._serve, name="fusedisk-io", daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._waiting -= 1
            job()


_workers = _Workers(16)


def close_behind(fd: int) -> None:
    """Close *fd* on the shim's closer thread, with no Python and no GIL: for the last
    descriptor of a removed object, whose close is where the store frees the inode
    and blocks (~200 µs on ext4, most of a small file's life on the loop). Nobody
    waits for that close, and the number stays taken until it, so nothing reuses it
    meanwhile. Closed here when the shim cannot."""
    if not fuseshim.close_behind(fd):
        os.close(fd)


def closes_behind() -> int:
    """How many descriptors :func:`close_behind` handed to the closer so far."""
    return fuseshim.closes()[0]


def closes_pending() -> int:
    """Of those, how many are not closed yet."""
    submitted, closed = fuseshim.closes()
    return submitted - closed


def drain_closes() -> None:
    """Wait until every descriptor handed to the closer is closed (blocking, short)."""
    fuseshim.drain_closes()


def blocking_jobs() -> int:
    """How many calls :func:`run_blocking` has handed to a worker thread so far."""
    return _workers.jobs


async def run_blocking(fn: Callable[..., _T], *args: object) -> _T:
    """Run a call that may block for long (fsync, scans) on a worker thread.

    Not cancellable once submitted (as ``trio.to_thread.run_sync`` by
    default): the caller waits for the call it started, so no descriptor it
    uses is closed under it.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    context = contextvars.copy_context()

    def job() -> None:
        result = outcome.capture(context.run, fn, *args)
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    _workers.submit(job)

    def abort(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED

    value: _T = await trio.lowlevel.wait_task_rescheduled(abort)
    return value


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def proc_path(fd: int) -> str:
    """The ``/proc`` path that re-opens what *fd* refers to (an O_PATH fd too)."""
    return f"/proc/self/fd/{fd}"


def check_name(name: bytes) -> str:
    """Return *name* as str if it is a single path component, else raise OSError.

    The kernel never hands FUSE a name with ``/``; this is the belt to that
    braces, and also catches ``.``/``..`` and over-long names.
    """
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, "invalid name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return os.fsdecode(name)


def open_path(dir_fd: int, name: str) -> int:
    """Open *name* in *dir_fd* as an O_PATH handle, never following a symlink."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def open_dir_path(path: str) -> int:
    """Open the directory at *path* (a store root) as an O_PATH handle."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def reopen(path_fd: int, flags: int) -> int:
    """Open the object behind an O_PATH handle for I/O with *flags*."""
    # The /proc magic link resolves to the object itself, not by walking a path.
    return os.open(proc_path(path_fd), flags | os.O_CLOEXEC)


def open_for_io(path_fd: int) -> tuple[int, bool]:
    """Open a regular file read-write, or read-only where the store refuses writes.

    Returns ``(fd, writable)``. One descriptor serves every handle of an
    inode; permission checks are the kernel's (``default_permissions``).
    """
    try:
        return reopen(path_fd, os.O_RDWR), True
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ETXTBSY):
            raise
    return reopen(path_fd, os.O_RDONLY), False


def fstat(fd: int) -> os.stat_result:
    """``fstat`` of any handle, O_PATH included; never follows a symlink."""
    return os.fstat(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def fchown(path_fd: int, uid: int, gid: int) -> None:
    """Change owner of the object behind an O_PATH handle (symlinks included)."""
    _check(
        _libc.fchownat(path_fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    )


def fchmod(path_fd: int, st_mode: int, mode: int) -> None:
    """Change the mode of what an O_PATH handle refers to; symlinks have none."""
    if stat.S_ISLNK(st_mode):
        raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
    os.chmod(proc_path(path_fd), stat.S_IMODE(mode))


def futimens(path_fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set access/modification times; ``None`` leaves a time as it is."""
    times = (_Timespec * 2)()
    for slot, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            times[slot].tv_sec, times[slot].tv_nsec = 0, UTIME_OMIT
        else:
            times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
    _check(_libc.utimensat(path_fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


# -- namespace calls: relative to a directory descriptor, never following a link -----


def open_at(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """``openat`` of one name (always ``O_NOFOLLOW | O_CLOEXEC``); the caller closes it."""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def mkdir_at(dir_fd: int, name: str, mode: int) -> None:
    os.mkdir(name, mode, dir_fd=dir_fd)


def mknod_at(dir_fd: int, name: str, mode: int, rdev: int = 0) -> None:
    os.mknod(name, mode, rdev, dir_fd=dir_fd)


def symlink_at(dir_fd: int, name: str, target: str | bytes) -> None:
    os.symlink(target, name, dir_fd=dir_fd)


def link_at(src_dir_fd: int, src: str, dst_dir_fd: int, name: str) -> None:
    """A new name *name* in *dst_dir_fd* for *src* (relative to *src_dir_fd*), not followed."""
    os.link(src, name, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)


def unlink_at(dir_fd: int, name: str, *, is_dir: bool = False) -> None:
    """Remove one name: ``unlinkat``, with ``AT_REMOVEDIR`` for a directory."""
    if is_dir:
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def renameat2(old_dir_fd: int, old: str, new_dir_fd: int, new: str, flags: int) -> None:
    _check(
        _libc.renameat2(old_dir_fd, os.fsencode(old), new_dir_fd, os.fsencode(new), flags)
    )


def link(path_fd: int, new_dir_fd: int, new: str) -> None:
    """Hard-link the object behind an O_PATH handle as *new* in *new_dir_fd*."""
    os.link(proc_path(path_fd), new, dst_dir_fd=new_dir_fd, follow_symlinks=True)


def readlink(path_fd: int) -> bytes:
    return os.fsencode(os.readlink("", dir_fd=path_fd))


def pread(fd: int, length: int, offset: int) -> bytes:
    return os.pread(fd, length, offset)


#: The largest single write issued to a backing file. The page cache sizes a
#: folio after the write that creates it, and ext4 (6.x, large folios) walks
#: every buffer head of a folio on each write into it: a 4 KiB guest write
#: into a folio made by a 1 MiB write costs about 20-30 µs instead of 3-4 µs
#: (measured here with buffered pwrite on a 1 GiB file). Pieces of 64 KiB
#: keep later small writes cheap and cost a sequential 1 MiB write little.
WRITE_PIECE = 64 * 1024
#: The same for a store whose every write is a round trip to another host (a remote
#: store's view, storeviews.py): there pieces of 64 KiB cost a round trip each
#: (a copy onto a loopback remote store ran at 48 MB/s), and no ext4 folio of
#: this host is behind it.
REMOTE_WRITE_PIECE = 4 << 20


def pwrite_all(fd: int, data: bytes | memoryview, offset: int,
               piece: int = WRITE_PIECE) -> int:
    """Write all of *data* at *offset*, in pieces of at most *piece* (:data:`WRITE_PIECE`).

    Returns how much landed. A short count is returned only when an error
    stopped the write after some bytes had landed; an error before any byte
    landed is raised.
    """
    size = len(data)
    if size <= piece:
        done = os.pwrite(fd, data, offset)  # almost always all of it
        if done == size:
            return done
    else:
        done = 0
    view = memoryview(data)
    while done < size:
        try:
            n = os.pwrite(fd, view[done:done + piece], offset + done)
        except OSError:
            if done == 0:
                raise
            return done
        if n == 0:
            break
        done += n
    return done


# xattrs go through the /proc path of the O_PATH handle: the kernel resolves
# that magic link to the object itself, so no store path is re-walked.


#: What an object keeps of the identity the mount shows, on its backing object:
#: ``b"<ino>"`` or ``b"<ino> <ctime_ns>"`` (decimal; ino 0: no number kept, the
#: store's own). Written by a relocation (the number and ctime the mount showed
#: before the move) and by CBT when it gives a file its id (the ctime before
#: that xattr moved it). The mount drops the ctime (rewriting the xattr, which
#: sets the backing ctime to now) before it changes the object in any way.
INO_XATTR = "trusted.fusedisk.ino"


def kept_identity(path_fd: int) -> tuple[int | None, int | None]:
    """``(inode number, ctime_ns)`` an object keeps (:data:`INO_XATTR`); None
    for what it does not keep. Blocking."""
    try:
        fields = getxattr(path_fd, INO_XATTR).split()
        ino = int(fields[0])
        ctime_ns = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None, None
    if ino == 0:
        return None, ctime_ns
    if not 1 < ino < 1 << 63:
        return None, None
    return ino, ctime_ns


def keep_identity(path_fd: int, ino: int | None, ctime_ns: int | None) -> None:
    """Write what :func:`kept_identity` reads (*ino* None: no number kept). Blocking."""
    number = 0 if ino is None else ino
    value = f"{number}" if ctime_ns is None else f"{number} {ctime_ns}"
    setxattr(path_fd, INO_XATTR, value.encode(), 0)


def getxattr(path_fd: int, name: str) -> bytes:
    return os.getxattr(proc_path(path_fd), name)


def setxattr(path_fd: int, name: str, value: bytes, flags: int) -> None:
    os.setxattr(proc_path(path_fd), name, value, flags)


def listxattr(path_fd: int) -> list[str]:
    return os.listxattr(proc_path(path_fd))


def removexattr(path_fd: int, name: str) -> None:
    os.removexattr(proc_path(path_fd), name)


def statvfs(path_fd: int) -> os.statvfs_result:
    return os.fstatvfs(path_fd)


def list_dir(path_fd: int) -> list[str]:
    """Names in the directory behind an O_PATH handle (no ``.``/``..``)."""
    fd = reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def fsync(fd: int, datasync: bool) -> None:
    (os.fdatasync if datasync else os.fsync)(fd)


def start_writeback(fd: int) -> None:
    """Start writing *fd*'s dirty pages to disk, on a shim thread
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, fuseshim.py). Never blocks, never
    fails, promises nothing: harmless if *fd* is closed or reused before it runs."""
    fuseshim.write_behind(fd)


def fsync_dir(path_fd: int) -> None:
    """Make a directory's entries durable (after create/rename/unlink)."""
    fd = reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ftruncate(fd: int, length: int) -> None:
    os.ftruncate(fd, length)


def close(fd: int) -> None:
    os.close(fd)


def data_extents(fd: int) -> list[tuple[int, int]]:
    """Allocated extents of a file as ``(offset, length)``, via SEEK_DATA/SEEK_HOLE.

    Blocking (it walks the whole file): call it through :func:`run_blocking`.
    """
    size = os.fstat(fd).st_size
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size) - start))
        offset = end
    return out


def open_parts(dir_fd: int, parts: Sequence[str]) -> int:
    """Open ``dir_fd/parts...`` as an O_PATH handle, one component at a time,
    never following a symlink. The caller closes the result (for no parts, a
    duplicate of *dir_fd*)."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            next_fd = open_path(fd, part)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def exists_at(dir_fd: int, relpath: str) -> bool:
    """Whether *relpath* (no symlinks followed on the way) exists under *dir_fd*."""
    try:
        os.close(open_parts(dir_fd, relpath.split("/")))
    except FileNotFoundError:
        return False
    return True


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove *name* in *dir_fd* and everything below it; never follows a symlink.

    A missing *name* is not an error. Blocking (it walks the tree).
    """
    try:
        st = lstat_at(dir_fd, name)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = open_path(dir_fd, name)
        try:
            for child in list_dir(fd):
                remove_tree(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def copy_attributes(src_fd: int, dst_fd: int, st: os.stat_result) -> None:
    """Give the object behind O_PATH *dst_fd* the owner, mode, xattrs and times of *src_fd*.

    *st* is the source's stat. Times come last: setting anything else would
    touch ctime only, but writing xattrs may move mtime on some stores.
    """
    fchown(dst_fd, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(proc_path(dst_fd), stat.S_IMODE(st.st_mode))
        for name in listxattr(src_fd):
            setxattr(dst_fd, name, getxattr(src_fd, name), 0)
    futimens(dst_fd, st.st_atime_ns, st.st_mtime_ns)


def sync_attributes(src_fd: int, dst_fd: int, st: os.stat_result,
                    rewritten: Collection[str] = ()) -> None:
    """:func:`copy_attributes` onto an object that may hold attributes already:
    xattrs the source no longer has are removed as well, but for those in
    *rewritten*, which the caller sets again right after (removing one only to
    write it again cost two journalled changes per object, the most of a
    staging sync's time)."""
    if not stat.S_ISLNK(st.st_mode):
        wanted = set(listxattr(src_fd)).union(rewritten)
        for name in listxattr(dst_fd):
            if name not in wanted:
                removexattr(dst_fd, name)
    copy_attributes(src_fd, dst_fd, st)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with *mode* as given (``os.posix_fallocate`` takes no mode)."""
    _check(_libc.fallocate(fd, mode, ctypes.c_longlong(offset), ctypes.c_longlong(length)))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)``, keeping the size; reads give zeros."""
    fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length)


def seek(fd: int, offset: int, whence: int) -> int:
    """``lseek(2)``; fusedisk's descriptors are used only with positioned I/O,
    so moving the position of a shared one disturbs nothing."""
    return os.lseek(fd, offset, whence)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    """Copy up to *length* bytes inside the kernel; OSError (EXDEV, EOPNOTSUPP,
    EINVAL) where the backing filesystems cannot, for the caller to copy itself."""
    return os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)


# -- bounded O_PATH handles ------------------------------------------------------------
#
# The mount must not hold a descriptor for every inode the kernel remembers
# (it may remember millions). :class:`PathTable` keeps a bounded LRU of
# O_PATH fds and a file handle (``name_to_handle_at``) for each object, and
# reopens an evicted one by handle (``open_by_handle_at``, needs
# CAP_DAC_READ_SEARCH: the daemon is root). A handle names the inode, not a
# path: it survives renames, and it goes stale (ESTALE) only once the object
# is gone, which is why objects whose last name goes are pinned (see fs.py).

MAX_HANDLE_SZ = 128


class _FileHandleStruct(ctypes.Structure):
    _fields_ = (
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    )


def handle_of(fd: int) -> bytes | None:
    """The file handle of the object behind *fd*, as opaque bytes; None when its
    filesystem has no handles (EOPNOTSUPP) or the handle is too large."""
    fh = _FileHandleStruct()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    ret = _libc.name_to_handle_at(
        fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH
    )
    if ret != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENOSYS, errno.EPERM):
            return None
        raise OSError(err, os.strerror(err))
    size: int = fh.handle_bytes
    handle_type: int = fh.handle_type
    return handle_type.to_bytes(4, "little", signed=True) + bytes(fh.f_handle[:size])


def open_by_handle(
    mount_fd: int, handle: bytes, flags: int = os.O_PATH | os.O_NOFOLLOW
) -> int:
    """Open the object a :func:`handle_of` value names (as an O_PATH fd by
    default); *mount_fd* is any fd on its filesystem that is not O_PATH.

    Raises ``OSError(ESTALE)`` when the object no longer exists."""
    fh = _FileHandleStruct()
    body = handle[4:]
    fh.handle_type = int.from_bytes(handle[:4], "little", signed=True)
    fh.handle_bytes = len(body)
    ctypes.memmove(fh.f_handle, body, len(body))
    fd = _libc.open_by_handle_at(
        mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def path_fd_cap(nofile: int) -> int:
    """How many evictable O_PATH fds a mount keeps open at an fd limit of
    *nofile*: a quarter, so that open files, a relocation's pool, the state
    directory and the control socket have the rest."""
    return max(16, min(nofile // 4, 1 << 16))


class PathRef:
    """One object's O_PATH fd (``fd``, -1 while evicted) and file handle.

    ``pins`` counts users that need the fd to stay open (an open file, an
    unlinked object whose handle would be stale, a request in progress); a
    pinned or handle-less ref is never evicted. ``tag`` is the owner's (fs.py:
    the inode number), so that :meth:`PathTable.pinned` leads back to it."""

    __slots__ = ("dev", "fd", "handle", "pins", "tag")

    def __init__(self, fd: int, dev: int, handle: bytes | None) -> None:
        self.fd = fd
        self.dev = dev
        self.handle = handle
        self.pins = 0
        self.tag = 0


@dataclasses.dataclass(frozen=True, slots=True)
class PathTableStatistics:
    refs: int
    open_fds: int
    evictable: int
    cap: int
    reopens: int
    evictions: int
    without_handle: int


class _Scope:
    """One request's :meth:`PathTable.scope`."""

    __slots__ = ("_pinned", "_table", "_token")

    def __init__(self, table: PathTable) -> None:
        self._table = table

    def __enter__(self) -> None:
        self._pinned: list[PathRef] = []
        self._token = self._table._scope.set(self._pinned)

    def __exit__(self, *exc_info: object) -> None:
        self._table._scope.reset(self._token)
        self._table._end_scope(self._pinned)


class PathTable:
    """A bounded LRU of O_PATH fds, reopened by file handle on demand.

    Only evictable refs (open, unpinned, with a handle) are in the LRU, and
    at most ``cap`` of them stay open. A request takes its fds through
    :meth:`fd` inside :meth:`scope`: what it touched stays pinned until it
    ends, across its awaits too, so no fd it holds as a number is closed
    under it (and its number reused by another open). Outside a scope an fd
    may be used until the next call into the table.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lru: dict[PathRef, None] = {}  # insertion order = least recent first
        #: the refs with pins (few: open files, requests in progress, unlinked
        #: objects), kept on each 0 <-> 1 change, so that a switchover finds
        #: what is in use without walking every ref
        self._pinned: dict[PathRef, None] = {}
        self._mount_fds: dict[int, int] = {}
        self._no_handles: set[int] = set()
        self._scope: contextvars.ContextVar[list[PathRef] | None] = contextvars.ContextVar(
            "fusedisk_path_scope", default=None)
        self.refs = 0
        self.open_fds = 0
        self.reopens = 0
        self.evictions = 0
        self.without_handle = 0

    def add_filesystem(self, dev: int, root_fd: int) -> None:
        """Register the directory *root_fd* (a store root, O_PATH) as the way into
        filesystem *dev*. ``open_by_handle_at`` refuses an O_PATH mount fd, so
        the table holds a plain one, until :meth:`close`."""
        if dev not in self._mount_fds:
            self._mount_fds[dev] = reopen(root_fd, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        """Close the filesystems' fds (after every ref was dropped)."""
        for fd in self._mount_fds.values():
            close(fd)
        self._mount_fds.clear()

    def add(self, fd: int, dev: int) -> PathRef:
        """Take over the O_PATH *fd* of an object on filesystem *dev*."""
        handle = handle_of(fd) if dev in self._mount_fds else None
        if handle is None:
            self.without_handle += 1
            if dev not in self._no_handles:
                self._no_handles.add(dev)
                log.warning("the filesystem of device %d:%d has no file handles: every "
                            "object the kernel remembers there keeps an open descriptor",
                            os.major(dev), os.minor(dev))
        ref = PathRef(fd, dev, handle)
        self.refs += 1
        self.open_fds += 1
        self._touch(ref)
        self._pin_in_scope(ref)
        self._evict()
        return ref

    def fd(self, ref: PathRef) -> int:
        """The open fd of *ref*, reopened by handle if it was evicted."""
        if ref.fd < 0:
            assert ref.handle is not None
            ref.fd = open_by_handle(self._mount_fds[ref.dev], ref.handle)
            self.open_fds += 1
            self.reopens += 1
            self._touch(ref)
            self._pin_in_scope(ref)
            self._evict()
        else:
            self._touch(ref)
            self._pin_in_scope(ref)
        return ref.fd

    def replace(self, ref: PathRef, fd: int, dev: int) -> None:
        """Point *ref* at another object (a relocation's re-point); takes over *fd*."""
        old = ref.fd
        ref.fd, ref.dev = fd, dev
        ref.handle = handle_of(fd) if dev in self._mount_fds else None
        if old >= 0:
            close(old)
        else:
            self.open_fds += 1
        self._lru.pop(ref, None)
        self._touch(ref)
        self._evict()

    def retarget(self, ref: PathRef, dev: int, handle: bytes,
                 close_later: Callable[[int], None]) -> bool:
        """Point the unpinned *ref* at the object *handle* names on filesystem *dev*
        without opening it (a relocation's re-point: it is reopened by handle when
        next used); its old fd goes to *close_later*. False, changing nothing, when
        that cannot be (pinned: a request may hold its fd; or *dev* has no fd to
        open handles by)."""
        if ref.pins or dev not in self._mount_fds:
            return False
        if ref.fd >= 0:
            self._lru.pop(ref, None)
            close_later(ref.fd)
            ref.fd = -1
            self.open_fds -= 1
        ref.dev, ref.handle = dev, handle
        return True

    def open_handle(self, dev: int, handle: bytes) -> int:
        """An O_PATH fd of the object *handle* names on filesystem *dev* (which
        must be registered); ``OSError(ESTALE)`` when it is gone."""
        return open_by_handle(self._mount_fds[dev], handle)

    def drop(self, ref: PathRef, *, removed: bool = False) -> None:
        """The object is forgotten: close its fd (*removed*: the object has no name
        left, so this may be its last reference and the close is slow: behind)."""
        self._lru.pop(ref, None)
        self._pinned.pop(ref, None)
        self.refs -= 1
        if ref.fd >= 0:
            if removed:
                close_behind(ref.fd)
            else:
                close(ref.fd)
            ref.fd = -1
            self.open_fds -= 1

    def pin(self, ref: PathRef) -> None:
        """Keep *ref* open until :meth:`unpin` (reopening it first if needed)."""
        self.fd(ref)
        ref.pins += 1
        if ref.pins == 1:
            self._pinned[ref] = None
        self._lru.pop(ref, None)

    def unpin(self, ref: PathRef) -> None:
        ref.pins -= 1
        if ref.pins == 0:
            self._pinned.pop(ref, None)
            if ref.fd >= 0:
                self._touch(ref)
                self._evict()

    def pinned(self) -> list[PathRef]:
        """The refs pinned now (see :meth:`pin` and :meth:`scope`)."""
        return list(self._pinned)

    def scope(self) -> _Scope:
        """Pin every ref a request touches until it ends (see the class doc). A
        context manager; a plain class, not a generator's: every request enters one."""
        return _Scope(self)

    def _end_scope(self, pinned: list[PathRef]) -> None:
        for ref in pinned:
            ref.pins -= 1
            if ref.pins == 0:
                self._pinned.pop(ref, None)
                if ref.fd >= 0:
                    self._touch(ref)
        self._evict()

    def statistics(self) -> PathTableStatistics:
        return PathTableStatistics(
            refs=self.refs, open_fds=self.open_fds, evictable=len(self._lru), cap=self.cap,
            reopens=self.reopens, evictions=self.evictions,
            without_handle=self.without_handle,
        )

    def _touch(self, ref: PathRef) -> None:
        if ref.pins == 0 and ref.handle is not None and ref.fd >= 0:
            self._lru.pop(ref, None)
            self._lru[ref] = None

    def _pin_in_scope(self, ref: PathRef) -> None:
        pinned = self._scope.get()
        if pinned is not None and (not pinned or pinned[-1] is not ref):
            pinned.append(ref)
            ref.pins += 1
            if ref.pins == 1:
                self._pinned[ref] = None
            self._lru.pop(ref, None)

    def _evict(self) -> None:
        while len(self._lru) > self.cap:
            ref = next(iter(self._lru))
            del self._lru[ref]
            close(ref.fd)
            ref.fd = -1
            self.open_fds -= 1
            self.evictions += 1
