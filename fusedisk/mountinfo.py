"""The mount table (``/proc/self/mountinfo``), read one way for the daemon, CLI, bench and tests.

Reading the table never touches a mounted filesystem, so it works on a
mount whose daemon died and cannot hang on one that stalls. Fields are
as proc(5) gives them; the kernel escapes space, tab, newline and
backslash in paths as ``\\ooo`` octal, which :func:`unescape` undoes (on
bytes: a mountpoint need not be UTF-8).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> bytes:
    """A path field of the table as the bytes of the path."""
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


@dataclass(frozen=True, slots=True)
class Mount:
    mountpoint: bytes  #: as the kernel shows it to this process (absolute, unescaped)
    fstype: str  #: e.g. ``fuse.fusedisk``, ``xfs``
    source: str
    device: str = ""  #: ``MAJOR:MINOR`` of the filesystem (its st_dev; its bdi's name)


def parse(text: bytes) -> list[Mount]:
    """Every line of a mountinfo table, in order (a malformed line is skipped)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)  # optional fields may precede the separator
            mounts.append(Mount(unescape(fields[4]), fields[sep + 1].decode(errors="replace"),
                                unescape(fields[sep + 2]).decode(errors="replace"),
                                fields[2].decode(errors="replace")))
        except (ValueError, IndexError):
            continue
    return mounts


def table() -> list[Mount]:
    with open(MOUNTINFO, "rb") as f:
        return parse(f.read())


def mount_at(path: str | os.PathLike[str]) -> Mount | None:
    """The topmost mount exactly on *path* (lexically absolute), if any."""
    target = os.fsencode(os.path.abspath(path))
    found = None
    for mount in table():
        if mount.mountpoint == target:
            found = mount  # later lines are mounted over earlier ones
    return found


def fstype_at(path: str | os.PathLike[str]) -> str | None:
    """The fstype of the topmost mount exactly on *path* (lexically absolute), if any."""
    mount = mount_at(path)
    return mount.fstype if mount is not None else None


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return fstype_at(path) is not None


def mounts_under(root: str | os.PathLike[str]) -> list[Path]:
    """Mountpoints strictly below *root* (resolved), in table order."""
    prefix = os.fsencode(os.path.realpath(root)).rstrip(b"/") + b"/"
    return [Path(os.fsdecode(m.mountpoint)) for m in table() if m.mountpoint.startswith(prefix)]


def fstype_holding(path: str | os.PathLike[str]) -> str | None:
    """The fstype of the filesystem *path* (resolved) is on: the deepest mount above it."""
    target = os.fsencode(os.path.realpath(path))
    best, found = b"", None
    for mount in table():
        point = mount.mountpoint
        inside = target == point or target.startswith(point.rstrip(b"/") + b"/")
        if inside and len(point) >= len(best):
            best, found = point, mount.fstype
    return found
