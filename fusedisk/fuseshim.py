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

If the library is missing or pyfuse3 was loaded first, fusedisk still serves
(per-open ``O_DSYNC``/``O_SYNC`` is known from the open flags); only
per-write ``RWF_DSYNC`` on ``O_DIRECT`` descriptors then goes unseen. The
daemon logs that as a warning at mount, and ``status`` shows it
(``fuse_shim``).
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
#: ``fh >> FH_SYNC_SHIFT`` is 0, 1 (data) or 2 (full).
FH_SYNC_SHIFT = 61

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
        _lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as e:
        _load_error = f"cannot load {path.name}: {e}"


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


def statistics() -> dict[str, object]:
    return {"loaded": _lib is not None, "sessions": sessions(), "problem": problem()}
