"""How the mount hands file data to the kernel: ``direct_io`` or the page cache.

One policy, in one place (fs.py only asks it):

- **Who gets direct_io.** An ``O_DIRECT`` opener (QEMU ``cache=none``, fio
  ``--direct=1``) wants no page cache. Served the ordinary way, the kernel
  sends a ``getxattr("security.capability")`` round trip before *every*
  write, to drop file capabilities (pyfuse3 cannot negotiate
  FUSE_HANDLE_KILLPRIV_V2, which would spare it); with ``direct_io`` it sends
  the write alone. So O_DIRECT opens are served with ``direct_io``, unless
  the file has set-id bits or capabilities.
- **What the kernel then does not do.** On a ``direct_io`` write the kernel
  neither clears set-id bits nor capabilities, so a file that *gains* some
  while direct handles are open is marked (``killpriv``) and its next direct
  write drops them, as a write must. The writer's capabilities are unknown
  (a FUSE write carries no credentials), so they are dropped even for a
  writer with CAP_FSETID.
- **The page cache.** Buffered opens keep the kernel's cache (``keep_cache``:
  every change passes through this mount), except after a ``direct_io``
  write that the cache did not see (``cache_stale``). A file open both ways
  gets its cache dropped after each direct write: recent kernels do that
  themselves (seen on 6.18), older ones such as Debian 12's 6.1 are not known
  to.
- **Set-id bits under FUSE_HANDLE_KILLPRIV_V2** (fuseshim.py). The kernel
  then leaves dropping set-uid/set-gid to the filesystem and flags each write,
  truncate, chown and ``open(O_TRUNC)`` whose caller lacks CAP_FSETID;
  :func:`drop_set_id` does what the kernel would have done. A file found
  without set-id bits (``no_set_id``) is not looked at again until a chmod
  through this mount (the only way to gain them).
- **The capability probe.** The kernel asks for ``security.capability``
  before every buffered write; once a file is known to have none
  (``no_caps``), the answer comes from memory. Every change of that xattr
  passes through this mount, and resets it.

The state lives on each inode (:class:`CachedFile` is what this room needs of
one); this room alone changes it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Protocol

import pyfuse3
import trio

from . import backing

CAPS_XATTR = b"security.capability"


class CachedFile(Protocol):
    """What the policy keeps on an inode (fs.Inode has these)."""

    ino: int
    handles: int
    #: of ``handles``, those opened with O_DIRECT and served with ``direct_io``
    direct_handles: int
    #: the kernel's page cache may be older than the file: the next cached open drops it
    cache_stale: bool
    #: set-id bits or capabilities appeared while direct handles are open
    killpriv: bool
    #: the file is known to carry no ``security.capability``
    no_caps: bool
    #: the file is known to have neither set-uid nor group-executable set-gid
    no_set_id: bool

    @property
    def path_fd(self) -> int: ...


def without_set_id(mode: int) -> int:
    """*mode* without the bits a write drops: set-uid, and set-gid if group-executable."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def _on_caps(call: Callable[[int, str], object], path_fd: int) -> bool:
    """Apply *call* to the file's ``security.capability``; False if it has none."""
    try:
        call(path_fd, os.fsdecode(CAPS_XATTR))
    except OSError as e:
        if e.errno != pyfuse3.ENOATTR:
            raise
        return False
    return True


def serve_direct(node: CachedFile, flags: int) -> bool:
    """Whether an open with *flags* is served with ``direct_io``."""
    if not flags & os.O_DIRECT:
        return False
    mode = stat.S_IMODE(backing.fstat(node.path_fd).st_mode)
    if without_set_id(mode) != mode:
        return False
    if not node.no_caps:
        node.no_caps = not _on_caps(backing.getxattr, node.path_fd)
    return node.no_caps


def created(node: CachedFile) -> None:
    """The mount has just made this file (``O_EXCL``): it carries no capabilities
    (``security.capability`` is never inherited), so the first write's probe is
    answered from memory too."""
    node.no_caps = True


def opened(node: CachedFile, direct: bool) -> None:
    """A handle was opened (``handles`` already counts it)."""
    if direct:
        node.direct_handles += 1
        node.cache_stale = True


def released(node: CachedFile, direct: bool) -> None:
    if direct:
        node.direct_handles -= 1


def file_info(node: CachedFile, fh: int, direct: bool) -> pyfuse3.FileInfo:
    """What the kernel is told of a new handle."""
    if direct:
        return pyfuse3.FileInfo(fh=fh, direct_io=True)
    keep_cache = not node.cache_stale
    node.cache_stale = node.direct_handles > 0
    return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)


def mode_set(node: CachedFile, mode: int) -> None:
    """The file's mode became *mode* (a chmod through the mount)."""
    mode = stat.S_IMODE(mode)
    node.no_set_id = without_set_id(mode) == mode
    if node.direct_handles and without_set_id(mode) != mode:
        node.killpriv = True


def xattr_changed(node: CachedFile, name: bytes, *, set_: bool) -> None:
    """An xattr was set (or removed) through the mount: the capability answer is unknown."""
    node.no_caps = False
    if set_ and name == CAPS_XATTR and node.direct_handles:
        node.killpriv = True


def known_without(node: CachedFile | None, name: bytes) -> bool:
    """A getxattr that can be answered ENOATTR from memory (one per buffered write)."""
    return node is not None and node.no_caps and name == CAPS_XATTR


def learned_without(node: CachedFile, name: bytes) -> None:
    """A getxattr of *name* found none."""
    if name == CAPS_XATTR:
        node.no_caps = True


def drop_set_id(node: CachedFile) -> None:
    """A write, truncate, chown or ``open(O_TRUNC)`` by a caller without CAP_FSETID
    (the kernel's kill flag): drop set-uid, and set-gid if group-executable."""
    if node.no_set_id:
        return
    st = backing.fstat(node.path_fd)
    mode = stat.S_IMODE(st.st_mode)
    cleared = without_set_id(mode)
    if cleared != mode:
        backing.fchmod(node.path_fd, st.st_mode, cleared)
    node.no_set_id = True


def direct_write_needs_work(node: CachedFile) -> bool:
    """Whether :func:`after_direct_write` has anything to do (the common answer, no,
    costs the write path no coroutine)."""
    return node.killpriv or node.handles != node.direct_handles


async def after_direct_write(node: CachedFile) -> None:
    """What a ``direct_io`` write must do that the kernel did not."""
    if node.killpriv:
        _kill_privileges(node)
    if node.handles != node.direct_handles:
        await _invalidate(node)


def _kill_privileges(node: CachedFile) -> None:
    st = backing.fstat(node.path_fd)
    mode = stat.S_IMODE(st.st_mode)
    cleared = without_set_id(mode)
    if cleared != mode:
        backing.fchmod(node.path_fd, st.st_mode, cleared)
    _on_caps(backing.removexattr, node.path_fd)
    node.no_caps = True
    node.killpriv = False


async def _invalidate(node: CachedFile) -> None:
    """Drop the kernel's page cache of a file that buffered handles also use.

    On a thread: the kernel takes page locks that a buffered READ, served by
    this loop, may be holding.
    """
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, node.ino, False)
    except OSError as e:  # ENOENT: the kernel no longer caches it at all
        if e.errno != errno.ENOENT:
            raise
