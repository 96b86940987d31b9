"""On-disk state: a versioned, crc32c-checked record, atomically replaced.

Every state file is one *record*: a header line, then a JSON body::

    fusedisk-state <kind> v<version> len=<bytes> crc32c=<8 hex digits>\\n
    {...json...}

A record is written to a temporary name, fsynced, renamed over the old one,
and the directory is fsynced: after :meth:`StateDir.save` returns, either the
old or the new record is on stable storage, never a mix. Records are
committed only after the data they describe is durable (callers' duty).

The state directory is held with an exclusive ``flock`` for the life of the
daemon: a second daemon on the same state directory is refused, and a crashed
daemon's lock goes away with its process, so a crash never blocks the next
mount.

A state directory *is* a datastore: its ``identity`` record holds the
datastore's id (made once, when the directory is new) and the stores it
claims, which the owner file at each store's root refers to (datastore.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any

import crc32c

from .errors import StateError

#: The newest record format this fusedisk writes and reads.
FORMAT_VERSION = 1
_MAGIC = "fusedisk-state"
_LOCK_NAME = "lock"
_IDENTITY = "identity"
#: Slot size of the two-slot owner file at a store's root.
OWNER_SLOT_SIZE = 4096


def encode_record(kind: str, body: dict[str, Any]) -> bytes:
    """Serialise *body* as a record of *kind*."""
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    header = (
        f"{_MAGIC} {kind} v{FORMAT_VERSION} len={len(payload)} "
        f"crc32c={crc32c.crc32c(payload):08x}\n"
    )
    return header.encode() + payload


def decode_record(kind: str, data: bytes, where: str) -> dict[str, Any]:
    """Parse and verify a record of *kind*; *where* names it in errors."""
    header, sep, payload = data.partition(b"\n")
    fields = header.decode("ascii", "replace").split()
    if not sep or len(fields) != 5 or fields[0] != _MAGIC:
        raise StateError(f"{where}: not a fusedisk state file (bad header)")
    if fields[1] != kind:
        raise StateError(f"{where}: holds a {fields[1]!r} record, expected {kind!r}")
    try:
        version = int(fields[2].removeprefix("v"))
        length = int(fields[3].removeprefix("len="))
        crc = int(fields[4].removeprefix("crc32c="), 16)
    except ValueError:
        raise StateError(f"{where}: not a fusedisk state file (bad header)") from None
    if version > FORMAT_VERSION:
        raise StateError(
            f"{where} was written by a newer fusedisk (state format v{version}; "
            f"this version reads up to v{FORMAT_VERSION}); upgrade fusedisk"
        )
    if len(payload) != length or crc32c.crc32c(payload) != crc:
        raise StateError(f"{where}: checksum mismatch, the state file is corrupt")
    try:
        body = json.loads(payload)
    except ValueError:
        raise StateError(f"{where}: corrupt body") from None
    if not isinstance(body, dict):
        raise StateError(f"{where}: corrupt body")
    return body


class StateDir:
    """The daemon's state directory, locked for its lifetime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None
        #: The datastore's id, set by :meth:`open`: read from the ``identity``
        #: record, or new for a directory that has none yet (saved with it by
        #: :meth:`save_identity`, once a mount got that far).
        self.datastore_id = ""
        self._created = False

    def open(self) -> None:
        """Create the directory if needed, take the lock, read the id; raise StateError."""
        existed = os.path.lexists(self.path)
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create state directory {self.path}: {e.strerror}") from None
        if not self.path.is_dir():
            raise StateError(f"state directory {self.path} is not a directory")
        fd = os.open(self.path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(
                    f"state directory {self.path} is in use by another fusedisk daemon"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self._created = not existed
        try:
            identity = self.load(_IDENTITY)
            if identity is None:
                self.datastore_id = uuid.uuid4().hex
            elif isinstance(identity.get("datastore_id"), str) and identity["datastore_id"]:
                self.datastore_id = identity["datastore_id"]
            else:
                raise StateError(f"{self.path / (_IDENTITY + '.state')}: corrupt body")
        except BaseException:
            self.abandon()
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def abandon(self) -> None:
        """Close after a failed mount; a directory that :meth:`open` created goes again.

        Only the lock file is removed, and the directory only if that left it
        empty: whatever else is in it stays.
        """
        if self._lock_fd is not None and self._created:
            try:
                os.unlink(self.path / _LOCK_NAME)
                os.rmdir(self.path)
            except OSError:
                pass
        self.close()

    def save_identity(self, mountpoint: Path, stores: dict[str, str]) -> None:
        """Record this datastore's id and the stores (name → real path) it claims. Blocking."""
        self.save(_IDENTITY, {"datastore_id": self.datastore_id,
                              "mountpoint": str(mountpoint), "stores": stores})

    def load(self, kind: str) -> dict[str, Any] | None:
        """The record *kind*, or ``None`` if it was never saved."""
        path = self.path / f"{kind}.state"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return decode_record(kind, data, str(path))

    def save(self, kind: str, body: dict[str, Any]) -> None:
        """Durably and atomically replace the record *kind* (blocking: fsyncs)."""
        atomic_write(self.path, f"{kind}.state", encode_record(kind, body))

    def remove(self, kind: str) -> None:
        try:
            os.unlink(self.path / f"{kind}.state")
        except FileNotFoundError:
            return
        fsync_path(self.path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(directory: Path, name: str, data: bytes) -> None:
    """tmp + fsync + rename + directory fsync."""
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / name)
    fsync_path(directory)


def read_identity(state_dir: Path) -> dict[str, Any] | None:
    """The ``identity`` record of another datastore's state directory, read without its lock.

    None when the directory or the record does not exist; StateError when it
    cannot be read or is corrupt.
    """
    path = state_dir / f"{_IDENTITY}.state"
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    return decode_record(_IDENTITY, data, str(path))


def write_slotted(path: Path, kind: str, seq: int, body: dict[str, Any], slot_size: int) -> None:
    """Durably write record *seq* of a two-slot file, into slot ``seq % 2``. Blocking.

    For records rewritten often (the CBT activity log): one ``pwrite`` and one
    ``fdatasync``, no rename. A torn write spoils one slot only; the newest
    valid slot is the record, so a crash never loses one that was durable.
    A new file gets the space of both slots at once: a rewrite in place never
    needs more, also when the state directory has filled up since.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        created = os.fstat(fd).st_size == 0
        if created:
            os.posix_fallocate(fd, 0, 2 * slot_size)
        write_slot_fd(fd, kind, seq, body, slot_size, str(path))
    finally:
        os.close(fd)
    if created:  # the new file's name must be durable too
        fsync_path(path.parent)


def write_slot_fd(
    fd: int, kind: str, seq: int, body: dict[str, Any], slot_size: int, where: str
) -> None:
    """:func:`write_slotted` into an open file (one whose inode must not change). Blocking."""
    data = encode_record(kind, {"seq": seq, **body})
    if len(data) > slot_size:
        raise StateError(f"{where}: record too large for its slot")
    os.pwrite(fd, data.ljust(slot_size, b"\0"), (seq % 2) * slot_size)
    os.fdatasync(fd)


def read_slotted(path: Path, kind: str, slot_size: int) -> tuple[int, dict[str, Any]] | None:
    """The newest valid record of a two-slot file as ``(seq, body)``; None if it has none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_slots(data, kind, slot_size, str(path))


def parse_slots(
    data: bytes, kind: str, slot_size: int, where: str
) -> tuple[int, dict[str, Any]] | None:
    """The newest valid record in the bytes of a two-slot file; None if it holds none."""
    best: tuple[int, dict[str, Any]] | None = None
    for slot in range(2):
        chunk = data[slot * slot_size : (slot + 1) * slot_size].rstrip(b"\0")
        if not chunk:
            continue
        try:
            body = decode_record(kind, chunk, where)
            seq = int(body["seq"])
        except (StateError, KeyError, TypeError, ValueError):
            continue  # a torn or damaged slot: the other one holds the record
        if best is None or seq > best[0]:
            best = (seq, body)
    if best is None and data.strip(b"\0"):
        raise StateError(f"{where}: no valid record in either slot")
    return best
