"""The remote side of a remote store: ``fusedisk store-agent DIR``, JSON lines on stdio.

A remote store (remote.py) keeps disk data in files of DIR on another host,
served by nbdkit's ``file`` plugin; everything that is not block data goes
through this agent, started over ssh (or as a local command): the version
handshake, the namespace (mkdir, create a sparse file of a size, rename,
unlink, rmdir, list, remove a staging tree), attributes, ``fsync`` of a
file or a directory, the small files of a VM home (read and write, base64,
at most :data:`MAX_DATA` bytes a request), and starting nbdkit itself.

The protocol: one JSON object a line in, one a line out, in order. A
request is ``{"op": NAME, ...arguments}`` (an ``"id"`` is echoed back); a
reply is ``{"ok": true, ...}`` or ``{"ok": false, "errno": "ENOENT",
"error": "one line"}``. Nothing the client sends ends the agent but EOF
(then it stops nbdkit and exits 0): a line that is not JSON, not an object,
too long, or names an unknown operation gets an error reply. Paths are
text (names that are not UTF-8 travel as Python's surrogate escapes, which
both ends of this protocol are).

Confinement: a path is relative to DIR, made of plain names (no ``..``,
no ``.``, no empty component, not absolute). It is walked one component
at a time from an ``O_PATH`` handle on DIR with ``O_NOFOLLOW``, so a
symlink anywhere on the way is refused (``ELOOP``/``ENOTDIR``) rather than
followed, and the last component is acted on through its parent's handle
without following a symlink either: nothing outside DIR can be reached,
whatever a guest or an administrator planted inside it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import __version__

#: Bumped whenever a request or a reply changes meaning; both ends must agree.
#: 3: ``hello`` takes a ``claim`` (an agent of protocol 2 would ignore it, unlocked);
#: 4: file data as raw bytes after the line (:data:`PAYLOAD_KEY`).
PROTOCOL_VERSION = 4
#: The most file data one ``read`` or ``write`` carries (the small files of a VM
#: home; disk data goes over NBD).
MAX_DATA = 1 << 20
#: A request or a reply that carries file data says ``"bytes": N`` and its N raw
#: bytes follow its line: ``write`` (instead of base64 ``data``) and ``read`` with
#: ``binary: true``. No encoding on either side and a third fewer bytes: a file
#: growing by writes goes through the agent (an NBD export cannot grow).
PAYLOAD_KEY = "bytes"
#: The longest request line: MAX_DATA in base64 and room for the rest.
MAX_LINE = MAX_DATA * 4 // 3 + (64 << 10)
#: The most entries one ``list`` returns (a VM home holds a handful).
MAX_ENTRIES = 100_000
#: How long nbdkit gets to leave after SIGTERM before SIGKILL, at the agent's exit.
NBDKIT_STOP_S = 5.0

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: A regular file's NBD export is a second, hard link at the top of DIR under this
#: prefix and its inode number (nbdkit's ``dir=`` serves top-level files only):
#: the same inode, so writes over NBD are writes to the file in the tree.
EXPORT_PREFIX = ".fusedisk-x"
#: Where a store view parks a file unlinked while it is still open (its data
#: must outlive its last name until the view lets go of it).
ORPHAN_PREFIX = ".fusedisk-orphan-"
#: The claim of the store by one datastore (``hello`` with a ``claim``): the record
#: of who holds it, and the lock every agent of that datastore holds shared for its
#: life (a view's agent, and one a reconnect started while an old one lingers).
CLAIM_NAME = ".fusedisk-agent-claim"
#: The remote host's boot identity, in ``hello`` and ``serve`` replies: the same id
#: after a reconnect means its kernel did not restart, so what it acknowledged is
#: still in its page cache (nbdfile.py's flush-epoch rule). A test names a file of
#: its own in ``FUSEDISK_BOOT_ID_PATH`` to stand in for a reboot.
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
#: nbdkit filters that pass every write on to the file plugin before it is
#: answered: with only these, a write nbdkit acknowledged is in this host's page
#: cache even if nbdkit dies (``serve`` gives the boot id only then).
WRITE_THROUGH_FILTERS = frozenset({"delay", "error", "blocksize-policy", "log", "stats", "rate"})
#: How long a ``hello`` waits for another agent's claim step to end.
CLAIM_GUARD_S = 10.0
_SEEK = {"data": os.SEEK_DATA, "hole": os.SEEK_HOLE}
_libc = ctypes.CDLL(None, use_errno=True)


class Refused(Exception):
    """A request the agent will not carry out: its errno name and a one-line reason."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.errno_name = errno_name


@dataclass(frozen=True, slots=True)
class NbdConfig:
    """How the agent starts nbdkit (``serve``): where it listens, its key file, filters."""

    #: ``("tcp", HOST, PORT)`` (PORT 0: any free port) or ``("unix", PATH, 0)``
    listen: tuple[str, str, int]
    tls_psk: Path
    nbdkit: str = "nbdkit"
    filters: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    #: steer GnuTLS to AES-GCM where the CPU has AES instructions (see :func:`gnutls_env`)
    prefer_aes: bool = True


#: GnuTLS's system-wide configuration file; an administrator's policy lives there.
GNUTLS_SYSTEM_CONFIG = Path("/etc/gnutls/config")
_PREFER_AES = "[overrides]\ntls-disabled-cipher = CHACHA20-POLY1305\n"


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " aes " in f" {line.split(':', 1)[1]} "
                       for line in f)
    except OSError:
        return False


def gnutls_env(config_dir: Path) -> dict[str, str]:
    """Environment for nbdkit that makes GnuTLS choose AES-GCM instead of ChaCha20.

    nbdkit's GnuTLS priority (``NORMAL``) picked CHACHA20-POLY1305 for PSK
    sessions on this project's machines although the CPU has AES
    instructions, and the cipher was the copy's bottleneck: 256 MiB through
    nbdcopy took 2.6-3.4 s with it and 1.0 s with AES-128-GCM (plain NBD: 0.9 s).
    The override is a GnuTLS configuration file disabling ChaCha20, handed to
    nbdkit alone, and only where nothing else decides: no
    ``GNUTLS_SYSTEM_PRIORITY_FILE`` in the environment, no system-wide
    configuration file, and a CPU with AES instructions. Empty otherwise.
    """
    if "GNUTLS_SYSTEM_PRIORITY_FILE" in os.environ or GNUTLS_SYSTEM_CONFIG.exists() \
            or not _cpu_has_aes():
        return {}
    path = config_dir / "gnutls.config"
    path.write_text(_PREFER_AES)
    return {"GNUTLS_SYSTEM_PRIORITY_FILE": str(path)}


def parse_listen(text: str) -> tuple[str, str, int]:
    """``tcp:HOST:PORT`` or ``unix:PATH``; ValueError with a one-line reason."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return ("unix", rest, 0)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and int(port) < 65536:
            return ("tcp", host.strip("[]"), int(port))
    raise ValueError(f"--nbd-listen {text!r}: expected tcp:HOST:PORT or unix:PATH")


# -- arguments -------------------------------------------------------------------------

_MISSING: Any = object()


def _arg(req: dict[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    value = req.get(key, default)
    if value is _MISSING:
        raise Refused("EINVAL", f"{req['op']}: argument {key!r} is missing")
    if value is default and default is not _MISSING:
        return value
    # a bool is an int to Python, never to this protocol
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Refused("EINVAL", f"{req['op']}: argument {key!r} must be {kind.__name__}")
    return value


def _parts(path: str, op: str) -> list[str]:
    """The components of a confined path ([] is DIR itself); Refused if it could leave DIR."""
    if path in ("", "."):
        return []
    if path.startswith("/"):
        raise Refused("EPERM", f"{op}: {path!r} is absolute; paths are relative to the store")
    parts = path.split("/")
    if ".." in parts:
        raise Refused("EPERM", f"{op}: {path!r} leaves the store ('..')")
    if any(p in ("", ".") for p in parts) or "\0" in path:
        raise Refused("EINVAL", f"{op}: {path!r} is not a plain relative path")
    return parts


def boot_id() -> str:
    """This host's boot identity ("" if it cannot be read: then nothing is assumed)."""
    try:
        with open(os.environ.get("FUSEDISK_BOOT_ID_PATH", BOOT_ID_PATH)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_claim(fd: int) -> dict[str, Any]:
    """The claim record in the claim file (``{}`` if it holds none readable)."""
    try:
        record = json.loads(os.pread(fd, 64 << 10, 0).decode("utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _held_by(root: Path, holder: dict[str, Any]) -> str:
    """The one line that refuses a claim of *root* while *holder* holds it."""
    since = holder.get("since")
    when = (time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
            if isinstance(since, (int, float)) else "")
    parts = [f"datastore {holder.get('owner', '(unknown)')}"]
    for key, label in (("host", "on host"), ("note", ""), ("agent_pid", "agent pid")):
        if holder.get(key) not in (None, ""):
            parts.append(f"{label} {holder[key]}".strip())
    return (f"{root} is in use by another fusedisk datastore ({', '.join(parts)}{when}); "
            "it is free again once that datastore unmounts (or its agent process ends)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "other"


def _stat_reply(st: os.stat_result) -> dict[str, Any]:
    return {"type": _kind(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "size": st.st_size,
            "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink, "ino": st.st_ino,
            "blocks": st.st_blocks, "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "st_mode": st.st_mode, "rdev": st.st_rdev}


class Agent:
    """The operations on one store directory; :meth:`handle` answers one request line."""

    def __init__(self, root: Path, nbd: NbdConfig | None = None) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.nbd = nbd
        self._nbdkit: subprocess.Popen[bytes] | None = None
        self._nbdkit_log: IO[bytes] | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._endpoint: dict[str, Any] | None = None
        #: the claim file, held shared while this agent serves a claiming datastore
        self._claim_fd = -1
        self._claim_owner = ""
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "hello": self.op_hello, "stat": self.op_stat, "mkdir": self.op_mkdir,
            "create": self.op_create, "write": self.op_write, "read": self.op_read,
            "rename": self.op_rename, "unlink": self.op_unlink, "rmdir": self.op_rmdir,
            "setattr": self.op_setattr, "fsync": self.op_fsync, "list": self.op_list,
            "mknod": self.op_mknod, "symlink": self.op_symlink, "readlink": self.op_readlink,
            "link": self.op_link, "truncate": self.op_truncate, "fallocate": self.op_fallocate,
            "seek": self.op_seek, "statfs": self.op_statfs, "getxattr": self.op_getxattr,
            "setxattr": self.op_setxattr, "listxattr": self.op_listxattr,
            "removexattr": self.op_removexattr, "export": self.op_export,
            "sweep": self.op_sweep, "find": self.op_find,
            "remove-tree": self.op_remove_tree, "serve": self.op_serve,
            "nbd-status": self.op_nbd_status,
        }

    def close(self) -> None:
        self.stop_nbdkit()
        if self._claim_fd >= 0:
            os.close(self._claim_fd)  # the lock goes with the descriptor
            self._claim_fd = -1
        os.close(self.root_fd)

    # -- the walk ------------------------------------------------------------------

    @contextlib.contextmanager
    def _parent(self, path: Any, op: str) -> Iterator[tuple[int, str]]:
        """``(handle of the parent directory, last name)`` of a confined path below DIR."""
        if not isinstance(path, str):
            raise Refused("EINVAL", f"{op}: argument 'path' must be str")
        parts = _parts(path, op)
        if not parts:
            raise Refused("EINVAL", f"{op}: needs a path inside the store, not the store itself")
        fd = os.dup(self.root_fd)
        try:
            for name in parts[:-1]:
                # O_NOFOLLOW with O_DIRECTORY: a symlink on the way fails with ENOTDIR/ELOOP
                step = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=fd)
                os.close(fd)
                fd = step
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _open(self, path: Any, op: str, flags: int, mode: int = 0o644) -> Iterator[int]:
        """An fd on the object at *path* (DIR itself for ""), never through a symlink.

        ``O_NONBLOCK`` keeps a FIFO planted in the store from hanging the agent.
        """
        if isinstance(path, str) and not _parts(path, op):
            fd = os.open(".", flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.root_fd)
        else:
            with self._parent(path, op) as (parent, name):
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                             dir_fd=parent)
        try:
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _regular(fd: int, op: str, path: str) -> os.stat_result:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("EISDIR" if stat.S_ISDIR(st.st_mode) else "EINVAL",
                          f"{op}: {path!r} is not a regular file")
        return st

    # -- operations ----------------------------------------------------------------

    def op_hello(self, req: dict[str, Any]) -> dict[str, Any]:
        claim = _arg(req, "claim", dict, None)
        if claim is not None:
            self._claim(claim)
        fs = os.statvfs(f"/proc/self/fd/{self.root_fd}")
        return {"protocol": PROTOCOL_VERSION, "version": __version__, "dir": str(self.root),
                "free_bytes": fs.f_bavail * fs.f_frsize, "total_bytes": fs.f_blocks * fs.f_frsize,
                "max_data": MAX_DATA, "nbd": self.nbd is not None, "boot_id": boot_id()}

    def _claim(self, claim: dict[str, Any]) -> None:
        """Claim the store for the datastore *claim* names (``claim["owner"]``), or
        refuse with EBUSY naming the datastore that holds it.

        Every agent of the holding datastore keeps :data:`CLAIM_NAME` locked
        shared (``flock``) for its life, so the claim ends when the last of them
        exits, however it ends. The step itself (is it held? by whom? take it)
        runs under an exclusive lock of DIR, so two claims cannot interleave:
        nobody holds it -> write the record and lock shared; the record names
        this owner -> lock shared too (a view that reconnects while its old
        agent lingers on a cut link); another owner -> refused.
        """
        owner = claim.get("owner")
        if not isinstance(owner, str) or not owner or len(owner) > 200:
            raise Refused("EINVAL", "hello: claim.owner must be a non-empty string")
        if self._claim_fd >= 0:
            if owner != self._claim_owner:
                raise Refused("EINVAL", f"hello: this agent claims the store for "
                              f"{self._claim_owner}, not for {owner}")
            return
        guard = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            deadline = time.monotonic() + CLAIM_GUARD_S
            while True:
                try:
                    fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Refused("EBUSY", f"hello: another agent kept claiming "
                                      f"{self.root} for {CLAIM_GUARD_S:g} s") from None
                    time.sleep(0.01)
            fd = os.open(CLAIM_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self.root_fd)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    free = True
                except BlockingIOError:
                    free = False
                if not free:
                    holder = _read_claim(fd)
                    if holder.get("owner") != owner:
                        raise Refused("EBUSY", _held_by(self.root, holder))
                else:
                    record = {str(k): v for k, v in claim.items()
                              if isinstance(v, (str, int, float))}
                    record.update(agent_pid=os.getpid(), since=time.time())
                    body = json.dumps(record, sort_keys=True).encode() + b"\n"
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, body, 0)
                    os.fsync(fd)
                # from exclusive (or none) to shared: not atomic, but every claim step
                # holds the guard, so none can come between
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            self._claim_fd, self._claim_owner = fd, owner
        finally:
            os.close(guard)  # the guard's lock goes with it

    def _exported(self, st: os.stat_result) -> bool:
        """Whether a regular file has its NBD export link at the top of DIR."""
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return False
        try:
            link = os.stat(f"{EXPORT_PREFIX}{st.st_ino}", dir_fd=self.root_fd,
                           follow_symlinks=False)
        except OSError:
            return False
        return (link.st_dev, link.st_ino) == (st.st_dev, st.st_ino)

    def _reply(self, st: os.stat_result) -> dict[str, Any]:
        """A stat reply; the export link is not one of the file's names (``nlink``)."""
        reply = _stat_reply(st)
        if self._exported(st):
            reply["nlink"] -= 1
            reply["exported"] = True
        return reply

    def _stat_at(self, path: str, op: str) -> dict[str, Any]:
        if not _parts(path, op):
            return self._reply(os.stat(self.root_fd))
        with self._parent(path, op) as (parent, name):
            return self._reply(os.stat(name, dir_fd=parent, follow_symlinks=False))

    def op_stat(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._stat_at(_arg(req, "path", str), "stat")

    def op_mkdir(self, req: dict[str, Any]) -> dict[str, Any]:
        mode = _arg(req, "mode", int, 0o755)
        with self._parent(req.get("path"), "mkdir") as (parent, name):
            os.mkdir(name, mode & 0o7777, dir_fd=parent)
            return {"stat": self._reply(os.stat(name, dir_fd=parent, follow_symlinks=False))}

    def op_mknod(self, req: dict[str, Any]) -> dict[str, Any]:
        """A special file (FIFO, socket, device) or an empty regular file: ``st_mode`` with
        its type bits, ``rdev`` for a device."""
        st_mode = _arg(req, "st_mode", int)
        rdev = _arg(req, "rdev", int, 0)
        export = _arg(req, "export", bool, False)
        with self._parent(req.get("path"), "mknod") as (parent, name):
            os.mknod(name, st_mode, rdev, dir_fd=parent)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if export and stat.S_ISREG(st.st_mode):
                # linked at birth: a link made later would move the file's ctime
                self._link_export(parent, name, st)
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            return {"stat": self._reply(st)}

    def _link_export(self, parent: int, name: str, st: os.stat_result) -> str:
        export = f"{EXPORT_PREFIX}{st.st_ino}"
        if not self._exported(st):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(export, dir_fd=self.root_fd)
            os.link(name, export, src_dir_fd=parent, dst_dir_fd=self.root_fd,
                    follow_symlinks=False)
        return export

    def op_symlink(self, req: dict[str, Any]) -> dict[str, Any]:
        target = os.fsencode(_arg(req, "target", str))
        with self._parent(req.get("path"), "symlink") as (parent, name):
            os.symlink(target, name, dir_fd=parent)
            return {"stat": self._reply(os.stat(name, dir_fd=parent, follow_symlinks=False))}

    def op_readlink(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._parent(req.get("path"), "readlink") as (parent, name):
            return {"target": os.fsdecode(os.readlink(name, dir_fd=parent))}

    def op_link(self, req: dict[str, Any]) -> dict[str, Any]:
        """A new name ``to`` for the object at ``path`` (never a symlink's target)."""
        target = _arg(req, "to", str)
        with self._parent(req.get("path"), "link") as (src_dir, src), \
                self._parent(target, "link") as (dst_dir, dst):
            os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
            return {"stat": self._reply(os.stat(dst, dir_fd=dst_dir, follow_symlinks=False))}

    def op_truncate(self, req: dict[str, Any]) -> dict[str, Any]:
        size = _arg(req, "size", int)
        if not 0 <= size < 1 << 63:
            raise Refused("EINVAL", f"truncate: size {size} is out of range")
        with self._open(req.get("path"), "truncate", os.O_WRONLY) as fd:
            self._regular(fd, "truncate", req["path"])
            os.ftruncate(fd, size)
            return {"stat": self._reply(os.fstat(fd))}

    def op_fallocate(self, req: dict[str, Any]) -> dict[str, Any]:
        """``fallocate(2)`` with its mode bits (e.g. punching a hole)."""
        mode = _arg(req, "mode", int, 0)
        offset = _arg(req, "offset", int)
        length = _arg(req, "length", int)
        with self._open(req.get("path"), "fallocate", os.O_WRONLY) as fd:
            self._regular(fd, "fallocate", req["path"])
            if _libc.fallocate(fd, ctypes.c_int(mode), ctypes.c_int64(offset),
                               ctypes.c_int64(length)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return {"stat": self._reply(os.fstat(fd))}

    def op_seek(self, req: dict[str, Any]) -> dict[str, Any]:
        """``lseek`` with ``whence`` "data" or "hole": the next data or hole at or after
        ``offset`` (ENXIO: none, past the end)."""
        offset = _arg(req, "offset", int)
        whence = _SEEK.get(_arg(req, "whence", str))
        if whence is None:
            raise Refused("EINVAL", "seek: whence must be 'data' or 'hole'")
        with self._open(req.get("path"), "seek", os.O_RDONLY) as fd:
            self._regular(fd, "seek", req["path"])
            return {"offset": os.lseek(fd, offset, whence)}

    def op_statfs(self, req: dict[str, Any]) -> dict[str, Any]:
        fs = os.statvfs(f"/proc/self/fd/{self.root_fd}")
        return {"bsize": fs.f_bsize, "frsize": fs.f_frsize, "blocks": fs.f_blocks,
                "bfree": fs.f_bfree, "bavail": fs.f_bavail, "files": fs.f_files,
                "ffree": fs.f_ffree, "favail": fs.f_favail, "namemax": fs.f_namemax}

    # extended attributes: by name through the parent's handle, never following the last
    # component (a symlink's own attributes, where its filesystem has them)

    @contextlib.contextmanager
    def _xattr_path(self, req: dict[str, Any], op: str) -> Iterator[str]:
        path = _arg(req, "path", str)
        if not _parts(path, op):
            yield f"/proc/self/fd/{self.root_fd}"
            return
        with self._parent(path, op) as (parent, name):
            yield f"/proc/self/fd/{parent}/{name}"

    def op_getxattr(self, req: dict[str, Any]) -> dict[str, Any]:
        attr = _arg(req, "name", str)
        with self._xattr_path(req, "getxattr") as where:
            value = os.getxattr(where, attr, follow_symlinks=False)
        return {"value": base64.b64encode(value).decode("ascii")}

    def op_setxattr(self, req: dict[str, Any]) -> dict[str, Any]:
        attr = _arg(req, "name", str)
        flags = _arg(req, "flags", int, 0)
        try:
            value = base64.b64decode(_arg(req, "value", str), validate=True)
        except (binascii.Error, ValueError):
            raise Refused("EINVAL", "setxattr: 'value' is not base64") from None
        with self._xattr_path(req, "setxattr") as where:
            os.setxattr(where, attr, value, flags, follow_symlinks=False)
        return {}

    def op_listxattr(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._xattr_path(req, "listxattr") as where:
            return {"names": os.listxattr(where, follow_symlinks=False)}

    def op_removexattr(self, req: dict[str, Any]) -> dict[str, Any]:
        attr = _arg(req, "name", str)
        with self._xattr_path(req, "removexattr") as where:
            os.removexattr(where, attr, follow_symlinks=False)
        return {}

    def op_export(self, req: dict[str, Any]) -> dict[str, Any]:
        """The NBD export of a regular file: its link ``.fusedisk-x<ino>`` at the top of DIR,
        made if missing (a stale one, of an inode since reused, is replaced)."""
        with self._parent(req.get("path"), "export") as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("EINVAL", f"export: {req['path']!r} is not a regular file")
            return {"export": self._link_export(parent, name, st), "size": st.st_size}

    def op_find(self, req: dict[str, Any]) -> dict[str, Any]:
        """A path of the object with inode number ``ino`` (not a directory), looked for
        through the whole tree without following a symlink; ENOENT if none. For a
        store view that lost every name it knew of a file with hard links."""
        ino = _arg(req, "ino", int)
        with self._open("", "find", os.O_RDONLY | os.O_DIRECTORY) as top:
            pending: list[tuple[int, str]] = [(os.dup(top), "")]
            try:
                while pending:
                    fd, rel = pending.pop()
                    try:
                        with os.scandir(fd) as it:
                            entries = list(it)
                        for entry in entries:
                            if not rel and entry.name.startswith((EXPORT_PREFIX,
                                                                  ORPHAN_PREFIX)):
                                continue
                            path = f"{rel}/{entry.name}" if rel else entry.name
                            if entry.is_dir(follow_symlinks=False):
                                with contextlib.suppress(OSError):
                                    pending.append((os.open(
                                        entry.name, os.O_RDONLY | os.O_DIRECTORY |
                                        os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd), path))
                            elif entry.inode() == ino:
                                return {"path": path}
                    finally:
                        os.close(fd)
            finally:
                for fd, _ in pending:
                    os.close(fd)
        raise Refused("ENOENT", f"find: no object with inode {ino}")

    def op_sweep(self, req: dict[str, Any]) -> dict[str, Any]:
        """What a store view left behind when it ended without cleaning up (only at its
        start, when nothing is in use): its orphans (files unlinked while open), then
        export links whose file has no other name (orphans' and crashes' leftovers)."""
        orphans = exports = 0
        with self._open("", "sweep", os.O_RDONLY | os.O_DIRECTORY) as fd, os.scandir(fd) as it:
            names = [e.name for e in it if e.name.startswith((ORPHAN_PREFIX, EXPORT_PREFIX))]
        for name in sorted(names, key=lambda n: not n.startswith(ORPHAN_PREFIX)):
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=self.root_fd, follow_symlinks=False)
                if name.startswith(ORPHAN_PREFIX):
                    if stat.S_ISDIR(st.st_mode):
                        continue
                    os.unlink(name, dir_fd=self.root_fd)
                    orphans += 1
                    if self._exported(st) and st.st_nlink == 2:
                        os.unlink(f"{EXPORT_PREFIX}{st.st_ino}", dir_fd=self.root_fd)
                        exports += 1
                elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.unlink(name, dir_fd=self.root_fd)
                    exports += 1
        return {"orphans": orphans, "exports": exports}

    def op_create(self, req: dict[str, Any]) -> dict[str, Any]:
        """A regular file of ``size`` bytes, all a hole (the NBD export fills it)."""
        size = _arg(req, "size", int)
        mode = _arg(req, "mode", int, 0o644)
        exclusive = _arg(req, "exclusive", bool, True)
        if not 0 <= size < 1 << 63:
            raise Refused("EINVAL", f"create: size {size} is out of range")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else 0)
        with self._open(req.get("path"), "create", flags, mode & 0o7777) as fd:
            self._regular(fd, "create", req["path"])
            os.ftruncate(fd, size)
            return {"stat": self._reply(os.fstat(fd))}

    def op_write(self, req: dict[str, Any]) -> dict[str, Any]:
        payload = req.get("_payload")
        data = payload if isinstance(payload, bytes) else self._data(_arg(req, "data", str))
        offset = _arg(req, "offset", int, 0)
        create = _arg(req, "create", bool, False)
        truncate = _arg(req, "truncate", bool, False)
        mode = _arg(req, "mode", int, 0o644)
        if offset < 0:
            raise Refused("EINVAL", "write: offset must not be negative")
        flags = os.O_WRONLY | (os.O_CREAT if create else 0)
        with self._open(req.get("path"), "write", flags, mode & 0o7777) as fd:
            self._regular(fd, "write", req["path"])
            if truncate:
                os.ftruncate(fd, offset + len(data))
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], offset + done)
            return {"written": len(data), "stat": self._reply(os.fstat(fd))}

    @staticmethod
    def _data(text: str) -> bytes:
        if len(text) > (MAX_DATA + 2) // 3 * 4:
            raise Refused("EFBIG", f"write: at most {MAX_DATA} bytes a request")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("EINVAL", "write: 'data' is not base64") from None
        if len(data) > MAX_DATA:
            raise Refused("EFBIG", f"write: at most {MAX_DATA} bytes a request")
        return data

    def op_read(self, req: dict[str, Any]) -> dict[str, Any]:
        offset = _arg(req, "offset", int, 0)
        length = _arg(req, "length", int, MAX_DATA)
        if offset < 0 or not 0 <= length <= MAX_DATA:
            raise Refused("EINVAL", f"read: offset >= 0 and length 0..{MAX_DATA} bytes")
        with self._open(req.get("path"), "read", os.O_RDONLY) as fd:
            st = self._regular(fd, "read", req["path"])
            chunks: list[bytes] = []
            got = 0
            while got < length:
                chunk = os.pread(fd, length - got, offset + got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        data = b"".join(chunks)
        facts = {"size": st.st_size, "eof": offset + len(data) >= st.st_size}
        if _arg(req, "binary", bool, False):
            return {"_payload": data, **facts}
        return {"data": base64.b64encode(data).decode("ascii"), **facts}

    def op_rename(self, req: dict[str, Any]) -> dict[str, Any]:
        noreplace = _arg(req, "noreplace", bool, False)
        exchange = _arg(req, "exchange", bool, False)
        target = _arg(req, "to", str)
        if noreplace and exchange:
            raise Refused("EINVAL", "rename: noreplace and exchange exclude each other")
        with self._parent(req.get("path"), "rename") as (src_dir, src), \
                self._parent(target, "rename") as (dst_dir, dst):
            if noreplace or exchange:
                flags = _RENAME_NOREPLACE if noreplace else _RENAME_EXCHANGE
                if _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst),
                                   flags) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
                return {}
            # a replaced regular file's last name takes its export link along, as unlink
            try:
                old = os.stat(dst, dir_fd=dst_dir, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            exported = old is not None and self._exported(old)
            os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            if old is not None and exported and old.st_nlink == 2:
                now = os.stat(dst, dir_fd=dst_dir, follow_symlinks=False)
                if (now.st_dev, now.st_ino) != (old.st_dev, old.st_ino):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{EXPORT_PREFIX}{old.st_ino}", dir_fd=self.root_fd)
        return {}

    def op_unlink(self, req: dict[str, Any]) -> dict[str, Any]:
        """Remove a name; a regular file's last one takes its export link along."""
        with self._parent(req.get("path"), "unlink") as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            exported = self._exported(st)
            os.unlink(name, dir_fd=parent)
            if exported and st.st_nlink == 2:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{EXPORT_PREFIX}{st.st_ino}", dir_fd=self.root_fd)
        return {}

    def op_rmdir(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._parent(req.get("path"), "rmdir") as (parent, name):
            os.rmdir(name, dir_fd=parent)
        return {}

    def op_setattr(self, req: dict[str, Any]) -> dict[str, Any]:
        """mode, owner (uid/gid, -1 keeps one) and times (ns) of an object, never through
        a symlink: a symlink's own owner and times change, its mode cannot (EOPNOTSUPP)."""
        mode = _arg(req, "mode", int, None)
        uid = _arg(req, "uid", int, -1)
        gid = _arg(req, "gid", int, -1)
        atime_ns = _arg(req, "atime_ns", int, None)
        mtime_ns = _arg(req, "mtime_ns", int, None)
        with self._open(req.get("path"), "setattr", os.O_PATH) as fd:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                # a symlink's own owner and times, by name through its parent: the calls
                # below act on the link itself and cannot follow it
                if mode is not None:
                    raise Refused("EOPNOTSUPP", "setattr: a symlink has no mode of its own")
                with self._parent(req["path"], "setattr") as (parent, name):
                    if uid != -1 or gid != -1:
                        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
                    if atime_ns is not None or mtime_ns is not None:
                        os.utime(name, ns=self._times(st, atime_ns, mtime_ns), dir_fd=parent,
                                 follow_symlinks=False)
                    return {"stat": self._reply(os.stat(name, dir_fd=parent,
                                                        follow_symlinks=False))}
            # the O_PATH handle pins the object: /proc/self/fd/N leads to that inode, not
            # to a name that could be swapped for a symlink between a check and the change
            proc = f"/proc/self/fd/{fd}"
            if uid != -1 or gid != -1:  # first: a chown clears set-id bits
                os.chown(proc, uid, gid)
            if mode is not None:
                os.chmod(proc, mode & 0o7777)
            if atime_ns is not None or mtime_ns is not None:
                os.utime(proc, ns=self._times(st, atime_ns, mtime_ns))
            return {"stat": self._reply(os.fstat(fd))}

    @staticmethod
    def _times(st: os.stat_result, atime_ns: int | None, mtime_ns: int | None
               ) -> tuple[int, int]:
        return (st.st_atime_ns if atime_ns is None else atime_ns,
                st.st_mtime_ns if mtime_ns is None else mtime_ns)

    def op_fsync(self, req: dict[str, Any]) -> dict[str, Any]:
        """fsync of a regular file or a directory (its entries: a rename made durable)."""
        path = _arg(req, "path", str)
        with self._open(path, "fsync", os.O_RDONLY) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise Refused("EINVAL", f"fsync: {path!r} is neither a file nor a directory")
            os.fsync(fd)
        return {}

    def op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        """The names in a directory with their type, or with their whole ``stat`` (``stat``:
        true; an entry removed meanwhile is left out)."""
        path = _arg(req, "path", str, "")
        full = _arg(req, "stat", bool, False)
        entries: list[list[Any]] = []
        with self._open(path, "list", os.O_RDONLY | os.O_DIRECTORY) as fd:
            with os.scandir(fd) as it:
                for entry in it:
                    if len(entries) >= MAX_ENTRIES:
                        raise Refused("E2BIG", f"list: {path!r} holds more than "
                                      f"{MAX_ENTRIES} entries")
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    entries.append([entry.name, self._reply(st) if full else _kind(st.st_mode)])
        return {"entries": sorted(entries, key=lambda e: str(e[0]))}

    def op_remove_tree(self, req: dict[str, Any]) -> dict[str, Any]:
        """Remove a directory and everything below it (a staging tree), following no
        symlink (shutil's fd-based walk); a symlink or a file there is refused."""
        with self._parent(req.get("path"), "remove-tree") as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise Refused("ENOTDIR", f"remove-tree: {req['path']!r} is not a directory")
            failures: list[OSError] = []

            def onerror(function: Any, path: str, info: Any) -> None:
                failures.append(info[1])

            shutil.rmtree(name, dir_fd=parent, onerror=onerror)
            if failures:
                raise failures[0]
        return {}

    # -- nbdkit ----------------------------------------------------------------------

    def op_serve(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start nbdkit's ``file`` plugin on DIR (once) and say where it listens.

        The agent binds the socket and hands it over by socket activation
        (``LISTEN_FDS``), so nbdkit is reachable the moment this replies, and
        a port of 0 becomes a free port that the reply names. nbdkit runs
        with ``--exit-with-parent``: it ends with the agent, even a killed one.
        """
        if self.nbd is None:
            raise Refused("EOPNOTSUPP", "serve: this agent was started without --tls-psk, "
                          "so it serves no NBD")
        if self._nbdkit is not None and self._nbdkit.poll() is None and self._endpoint:
            return {**self._endpoint, "boot_id": self._write_through_boot_id()}
        self.stop_nbdkit()
        kind, where, port = self.nbd.listen
        if kind == "tcp":
            family = socket.AF_INET6 if ":" in where else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((where, port))
            endpoint: dict[str, Any] = {"tcp": [where, sock.getsockname()[1]]}
        else:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(where).st_mode):
                    os.unlink(where)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(where)
            endpoint = {"unix": where}
        try:
            sock.listen(64)
            fd = sock.fileno()
            # the socket must be fd 3 in nbdkit, and LISTEN_PID nbdkit's own pid: the
            # shell moves it there and then becomes nbdkit (so $$ is nbdkit's pid)
            move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
            argv = ["sh", "-c", move + 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh",
                    self.nbd.nbdkit, "--exit-with-parent", "--tls=require",
                    f"--tls-psk={self.nbd.tls_psk}", "--log=stderr"]
            argv += [f"--filter={f}" for f in self.nbd.filters]
            argv += ["file", f"dir={self.root}", *self.nbd.params]
            self._nbdkit_log = tempfile.TemporaryFile()
            self._scratch = tempfile.TemporaryDirectory(prefix="fusedisk-agent-")
            env = {**os.environ, **(gnutls_env(Path(self._scratch.name))
                                    if self.nbd.prefer_aes else {})}
            self._nbdkit = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                            stdout=self._nbdkit_log, stderr=self._nbdkit_log,
                                            env=env)
        finally:
            sock.close()
        self._endpoint = {**endpoint, "pid": self._nbdkit.pid}
        return {**self._endpoint, "boot_id": self._write_through_boot_id()}

    def _write_through_boot_id(self) -> str:
        """The boot id, if nbdkit's acknowledged writes survive nbdkit (no filter that
        keeps writes of its own); "" otherwise (the client then assumes the worst)."""
        assert self.nbd is not None
        if set(self.nbd.filters) <= WRITE_THROUGH_FILTERS:
            return boot_id()
        return ""

    def op_nbd_status(self, req: dict[str, Any]) -> dict[str, Any]:
        """Whether nbdkit runs, its exit code if not, and the last line it logged."""
        if self._nbdkit is None:
            return {"running": False, "exit": None, "last_log": ""}
        code = self._nbdkit.poll()
        last = ""
        if self._nbdkit_log is not None:
            self._nbdkit_log.seek(0)
            lines = [ln for ln in self._nbdkit_log.read()[-4096:].decode(
                errors="replace").splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
        return {"running": code is None, "exit": code, "last_log": last,
                "pid": self._nbdkit.pid}

    def stop_nbdkit(self) -> None:
        if self._nbdkit is not None:
            if self._nbdkit.poll() is None:
                self._nbdkit.send_signal(signal.SIGTERM)
                try:
                    self._nbdkit.wait(NBDKIT_STOP_S)
                except subprocess.TimeoutExpired:
                    self._nbdkit.kill()
                    self._nbdkit.wait()
            self._nbdkit = None
        if self._nbdkit_log is not None:
            self._nbdkit_log.close()
            self._nbdkit_log = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        self._endpoint = None

    # -- the request loop --------------------------------------------------------

    def handle(self, line: bytes, payload: bytes | None = None) -> dict[str, Any]:
        """The reply to one request line (without its newline) and the raw bytes that
        followed it (its ``"bytes"``). Never raises. A reply's own raw bytes are its
        ``_payload`` (:meth:`run` sends them after the line)."""
        request_id: Any = None
        req: Any = {}
        try:
            try:
                req = json.loads(line.decode("utf-8", errors="surrogateescape"))
            except ValueError as e:
                raise Refused("EINVAL", f"the request is not JSON ({e})") from None
            if not isinstance(req, dict):
                raise Refused("EINVAL", "the request must be a JSON object")
            req.pop("_payload", None)  # only ever the raw bytes after the line
            if payload is not None:
                req["_payload"] = payload
            request_id = req.get("id")
            op = req.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Refused("ENOSYS", f"unknown operation {op!r}")
            reply = {"ok": True, **handler(req)}
        except Refused as e:
            reply = {"ok": False, "errno": e.errno_name, "error": str(e)}
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, "EIO")
            reply = {"ok": False, "errno": name, "error": f"{req.get('op')}: {e.strerror or e}"}
        except ValueError as e:  # e.g. a name Python cannot pass to the kernel
            reply = {"ok": False, "errno": "EINVAL", "error": f"{req.get('op')}: {e}"}
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def run(self, stdin: IO[bytes], stdout: IO[bytes]) -> int:
        """Answer requests until EOF on *stdin*; returns the exit code (0)."""
        while True:
            line = stdin.readline(MAX_LINE + 1)
            if not line:
                return 0
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # drop the rest of the long line
                    line = stdin.readline(MAX_LINE)
                reply: dict[str, Any] = {"ok": False, "errno": "E2BIG",
                                         "error": f"the request is longer than {MAX_LINE} bytes"}
            else:
                line = line.rstrip(b"\n")
                size = _payload_size(line)
                if size is None:
                    reply = self.handle(line)
                elif size > MAX_DATA:
                    _skip(stdin, size)  # the next request starts after them
                    reply = {"ok": False, "errno": "EFBIG",
                             "error": f"at most {MAX_DATA} bytes of data a request"}
                else:
                    payload = stdin.read(size)
                    if len(payload) < size:
                        return 0  # EOF inside the data: the client is gone
                    reply = self.handle(line, payload)
            data = reply.pop("_payload", None)
            if data is not None:
                reply[PAYLOAD_KEY] = len(data)
            # ensure_ascii: surrogate escapes of non-UTF-8 names travel as \\udcXX
            stdout.write(json.dumps(reply, separators=(",", ":")).encode("ascii") + b"\n")
            if data is not None:
                stdout.write(data)
            stdout.flush()


def _payload_size(line: bytes) -> int | None:
    """How many raw bytes follow a request line (its ``"bytes"``), None if none do."""
    if f'"{PAYLOAD_KEY}"'.encode() not in line:
        return None
    try:
        req = json.loads(line.decode("utf-8", errors="surrogateescape"))
    except ValueError:
        return None  # handle() says what is wrong with it
    size = req.get(PAYLOAD_KEY) if isinstance(req, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return size


def _skip(stream: IO[bytes], size: int) -> None:
    while size > 0:
        chunk = stream.read(min(size, 1 << 20))
        if not chunk:
            return
        size -= len(chunk)


def main(root: Path, nbd: NbdConfig | None) -> int:
    """``fusedisk store-agent``: serve *root* on stdio until EOF."""
    # the client sends the modes it wants (a guest's umask was applied on its side)
    os.umask(0)
    agent = Agent(root, nbd)
    try:
        return agent.run(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the client went away mid-reply: as good as EOF
        return 0
    finally:
        agent.close()
