"""The libfuse shim: what pyfuse3 3.5 does not pass on, read at libfuse's level.

pyfuse3 calls ``Operations.write(fh, offset, data)`` and drops the WRITE
request's flags, which say whether the write asked for ``O_DSYNC`` or
``O_SYNC`` (``RWF_DSYNC``/``RWF_SYNC`` from ``pwritev2``, or a descriptor
opened so). On a ``direct_io`` handle the kernel sends no FSYNC after such a
write, so without the flags an acknowledged write could still be volatile.

``fusedisk/_native/fuseshim.c``, built at install time, defines
``fuse_session_new``; loaded with ``RTLD_GLOBAL`` before pyfuse3 (this module
runs from ``fusedisk/__init__``, i.e. before any room imports pyfuse3),
pyfuse3 binds to it, and it hands libfuse a copy of pyfuse3's operations
whose write handlers add :data:`FH_SYNC_DATA` or :data:`FH_SYNC_FULL` to the
file handle. fs.py masks them off again.

The shim also registers the handlers pyfuse3 lacks (``fallocate``, ``lseek``,
``copy_file_range``) when :func:`enable_extra_ops` asked for them before the
session is made. They queue each request in C and signal an eventfd
(:func:`extra_ops_fd`); a trio task of the daemon takes them with
:func:`take_requests` and answers each exactly once with :func:`reply_err`,
:func:`reply_lseek` or :func:`reply_write`. No Python runs on libfuse's
side, so the GIL and the trio loop are never entered from C.

Two more take the trio loop out of a guest's writes (fuseshim.c says how):
:func:`enable_fast_fsync` lets the daemon hand a FSYNC that needs only the
backing fsync to the shim's threads (:func:`detach_fsync`), which answer the
kernel themselves and then queue an :data:`OP_FSYNC_DONE` for the daemon; the
same threads start writeback of a file's dirty pages (:func:`write_behind`).
:func:`enable_parallel_writes` answers ``direct_io`` opens with
``FOPEN_PARALLEL_DIRECT_WRITES``, which libfuse 3.14 cannot set.

:func:`enable_killpriv` negotiates FUSE_HANDLE_KILLPRIV_V2, which libfuse 3.14
does not know (fuseshim.c says how): the kernel then stops asking for
``security.capability`` before each write to a file known to have none, and
stops refreshing attributes before a chown, and the daemon drops set-uid/set-gid
itself where the request says so: :data:`FH_KILL_SUIDGID` in the handle of a
write or setattr, :data:`OPEN_KILL_SUIDGID` in the flags of an open or create.

If the library is missing or pyfuse3 was loaded first, fusedisk still serves
(per-open ``O_DSYNC``/``O_SYNC`` is known from the open flags); only
per-write ``RWF_DSYNC`` on ``O_DIRECT`` descriptors then goes unseen. The
daemon logs that as a warning at mount, and ``status`` shows it
(``fuse_shim``). The kernel then answers ``fallocate`` with EOPNOTSUPP and
sees no holes, as with pyfuse3 alone; ``status`` shows ``extra_ops: false``.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import sys
from pathlib import Path

#: Added to the file handle of a WRITE that asked for O_DSYNC / O_SYNC.
FH_SYNC_DATA = 1 << 61
FH_SYNC_FULL = 1 << 62
#: fusedisk's own file handle numbers stay below this.
FH_MASK = FH_SYNC_DATA - 1
#: ``(fh >> FH_SYNC_SHIFT) & FH_SYNC_BITS`` is 0, 1 (data) or 2 (full).
FH_SYNC_SHIFT = 61
FH_SYNC_BITS = 3
#: Added to the handle of a WRITE or SETATTR whose caller lacks CAP_FSETID, once
#: FUSE_HANDLE_KILLPRIV_V2 is in force: drop set-uid (and set-gid if
#: group-executable). A SETATTR without a handle gets this bit alone.
FH_KILL_SUIDGID = 1 << 63
#: The same for an OPEN or CREATE (with O_TRUNC), added to its flags.
OPEN_KILL_SUIDGID = 1 << 30

#: The number of the FSYNC a handler runs for (fuseshim.c's wrapper puts it in
#: the handle, 0: none); the snapshot view's handles (1 << 60) stay above it.
FH_TOKEN_SHIFT = 40
FH_TOKEN_MASK = (1 << 20) - 1

#: ``Request.op`` values (fuseshim.c's FUSEDISK_*). OP_FSYNC_DONE is no request:
#: a detached FSYNC was answered (``fh``: the cookie, ``mode``: its errno).
OP_FALLOCATE, OP_LSEEK, OP_COPY_FILE_RANGE, OP_FSYNC_DONE = 1, 2, 3, 4
OP_NAMES = {OP_FALLOCATE: "fallocate", OP_LSEEK: "lseek", OP_COPY_FILE_RANGE: "copy_file_range"}


class Request(ctypes.Structure):
    """One queued request (fuseshim.c's ``struct fusedisk_request``)."""

    _fields_ = (
        ("req", ctypes.c_uint64),
        ("op", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("fh", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("fh_out", ctypes.c_uint64),
        ("offset_out", ctypes.c_int64),
        ("flags", ctypes.c_uint64),
    )


_lib: ctypes.CDLL | None = None
_load_error = ""


def _library_path() -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_fuseshim{suffix}"
        if path.exists():
            return path
    return None


def load() -> None:
    """Load the shim if it can still take effect; idempotent, never raises."""
    global _lib, _load_error
    if _lib is not None:
        return
    if "pyfuse3" in sys.modules:
        _load_error = "pyfuse3 was loaded before the shim"
        return
    path = _library_path()
    if path is None:
        _load_error = "the shim library is not built (run: bash scripts/setup install)"
        return
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        for name in ("enable_extra", "enable_fast_fsync", "enable_parallel_writes",
                     "enable_killpriv", "disable_auto_inval"):
            enable = getattr(lib, f"fusedisk_shim_{name}")
            enable.argtypes = (ctypes.c_int,)
            enable.restype = None
        lib.fusedisk_shim_detach_fsync.argtypes = (ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
                                                   ctypes.c_uint64)
        lib.fusedisk_shim_detach_fsync.restype = ctypes.c_int
        lib.fusedisk_shim_write_behind.argtypes = (ctypes.c_int,)
        lib.fusedisk_shim_write_behind.restype = None
        lib.fusedisk_shim_drain.argtypes = ()
        lib.fusedisk_shim_drain.restype = None
        lib.fusedisk_shim_close_behind.argtypes = (ctypes.c_int,)
        lib.fusedisk_shim_close_behind.restype = ctypes.c_int
        lib.fusedisk_shim_drain_closes.argtypes = ()
        lib.fusedisk_shim_drain_closes.restype = None
        lib.fusedisk_shim_take.argtypes = (ctypes.POINTER(Request),)
        lib.fusedisk_shim_take.restype = ctypes.c_int
        lib.fusedisk_shim_reply_err.argtypes = (ctypes.c_uint64, ctypes.c_int)
        lib.fusedisk_shim_reply_lseek.argtypes = (ctypes.c_uint64, ctypes.c_int64)
        lib.fusedisk_shim_reply_write.argtypes = (ctypes.c_uint64, ctypes.c_uint64)
        for reply in ("err", "lseek", "write"):
            getattr(lib, f"fusedisk_shim_reply_{reply}").restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        _load_error = f"cannot load {path.name}: {e}"
        return
    _lib = lib


def enable_extra_ops(enable: bool = True) -> None:
    """Ask for the fallocate/lseek/copy_file_range handlers in sessions made from now on.

    Whoever asks must serve :func:`extra_ops_fd` for as long as the session
    lives: a request nobody takes is never answered."""
    if _lib is not None:
        _lib.fusedisk_shim_enable_extra(int(enable))


def enable_fast_fsync(enable: bool = True) -> None:
    """Wrap FSYNC in sessions made from now on, so that :func:`detach_fsync` can take
    one over. Only with :func:`enable_extra_ops` (the completions come through its queue)."""
    if _lib is not None:
        _lib.fusedisk_shim_enable_fast_fsync(int(enable))


def enable_parallel_writes(enable: bool = True) -> None:
    """Answer ``direct_io`` opens with FOPEN_PARALLEL_DIRECT_WRITES from now on."""
    if _lib is not None:
        _lib.fusedisk_shim_enable_parallel_writes(int(enable))


def enable_killpriv(enable: bool = True) -> None:
    """Negotiate FUSE_HANDLE_KILLPRIV_V2 in sessions made from now on; whoever asks
    must honour :data:`FH_KILL_SUIDGID` and :data:`OPEN_KILL_SUIDGID`."""
    if _lib is not None:
        _lib.fusedisk_shim_enable_killpriv(int(enable))


def disable_auto_inval(disable: bool = True) -> None:
    """Answer INIT without FUSE_AUTO_INVAL_DATA in sessions made from now on: the
    kernel then refreshes no attributes before a read (fuseshim.c says why that is
    safe for fusedisk)."""
    if _lib is not None:
        _lib.fusedisk_shim_disable_auto_inval(int(disable))


def auto_inval_off() -> bool:
    if _lib is None:
        return False
    return bool(ctypes.c_int.in_dll(_lib, "fusedisk_shim_auto_inval_off").value)


def killpriv_v2() -> bool:
    """Whether the kernel was told FUSE_HANDLE_KILLPRIV_V2 (the INIT reply carried it)."""
    if _lib is None:
        return False
    return bool(ctypes.c_int.in_dll(_lib, "fusedisk_shim_killpriv_v2").value)


def detach_fsync(token: int, fd: int, datasync: bool, cookie: int) -> bool:
    """Hand the running FSYNC (*token*: from its handle) to the shim's threads.

    True: the caller must return from its handler with no checkpoint; a thread
    then runs ``fsync``/``fdatasync`` of *fd*, queues an :data:`OP_FSYNC_DONE`
    with *cookie* once that returned, and answers the kernel; until the
    completion is taken *fd* must stay open and mean the same file.
    False: serve it the ordinary way."""
    if _lib is None or not token:
        return False
    return bool(_lib.fusedisk_shim_detach_fsync(token, fd, int(datasync), cookie))


def write_behind(fd: int) -> None:
    """Start writeback of *fd*'s dirty pages on a shim thread (one queued per fd). Never
    blocks, never fails, harmless if *fd* is closed (or reused) before it runs."""
    if _lib is not None:
        _lib.fusedisk_shim_write_behind(fd)


def drain() -> None:
    """Wait until no shim thread is running a detached FSYNC (before the session
    ends). Blocking, and short: each one is one fsync."""
    if _lib is not None:
        _lib.fusedisk_shim_drain()


def close_behind(fd: int) -> bool:
    """Hand *fd* to the shim's closer thread, which closes it soon; False: the shim
    cannot (not loaded, out of memory), the caller closes it. Never blocks."""
    return _lib is not None and bool(_lib.fusedisk_shim_close_behind(fd))


def closes() -> tuple[int, int]:
    """Descriptors handed to the closer thread so far, and of those closed."""
    return _counter("closes"), _counter("closed")


def drain_closes() -> None:
    """Wait until the closer thread closed every descriptor it was handed (blocking, short)."""
    if _lib is not None:
        _lib.fusedisk_shim_drain_closes()


def extra_ops_fd() -> int | None:
    """The eventfd that says requests are queued; None when the handlers are not registered."""
    if _lib is None:
        return None
    fd = int(ctypes.c_int.in_dll(_lib, "fusedisk_shim_eventfd").value)
    return fd if fd >= 0 else None


def take_requests() -> list[Request]:
    """Every queued request, oldest first (the caller answers each one). Never blocks."""
    assert _lib is not None
    out: list[Request] = []
    while True:
        request = Request()
        if not _lib.fusedisk_shim_take(ctypes.byref(request)):
            return out
        out.append(request)


def reply_err(request: Request, err: int) -> None:
    """Answer *request* with an error (0: success without data)."""
    assert _lib is not None
    _lib.fusedisk_shim_reply_err(request.req, err)


def reply_lseek(request: Request, offset: int) -> None:
    assert _lib is not None
    _lib.fusedisk_shim_reply_lseek(request.req, offset)


def reply_write(request: Request, count: int) -> None:
    assert _lib is not None
    _lib.fusedisk_shim_reply_write(request.req, count)


def queued() -> dict[str, int]:
    """Requests the extra handlers queued in this process, by operation."""
    if _lib is None:
        return {name: 0 for name in OP_NAMES.values()}
    counts = (ctypes.c_ulong * 5).in_dll(_lib, "fusedisk_shim_queued")
    return {name: int(counts[op]) for op, name in OP_NAMES.items()}


def sessions() -> int:
    """FUSE sessions created through the shim in this process."""
    if _lib is None:
        return 0
    return int(ctypes.c_int.in_dll(_lib, "fusedisk_shim_sessions").value)


def problem() -> str:
    """Why the shim is not in use ('' when it is, or no session was made yet)."""
    if _lib is None:
        return _load_error
    error = ctypes.c_char_p.in_dll(_lib, "fusedisk_shim_error").value
    return error.decode() if error else ""


def _counter(name: str) -> int:
    if _lib is None:
        return 0
    return int(ctypes.c_ulong.in_dll(_lib, f"fusedisk_shim_{name}").value)


def statistics() -> dict[str, object]:
    return {"loaded": _lib is not None, "sessions": sessions(), "problem": problem(),
            "extra_ops": extra_ops_fd() is not None, "extra_requests": queued(),
            "fsyncs_detached": _counter("fsyncs"), "fsync_errors": _counter("fsync_errors"),
            "write_behinds": _counter("write_behinds"),
            "write_behinds_merged": _counter("write_behinds_merged"),
            "parallel_opens": _counter("parallel_opens"), "killpriv_v2": killpriv_v2(),
            "auto_inval_off": auto_inval_off(),
            "kill_requests": _kills()}


def _kills() -> dict[str, int]:
    """Requests that asked to drop set-id bits, by kind."""
    if _lib is None:
        return {"write": 0, "setattr": 0, "open": 0}
    counts = (ctypes.c_ulong * 3).in_dll(_lib, "fusedisk_shim_kills")
    return {"write": int(counts[0]), "setattr": int(counts[1]), "open": int(counts[2])}
