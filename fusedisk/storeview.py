"""A remote store seen as a local directory: ``fusedisk store-view NAME=SPEC MOUNTPOINT``.

The datastore (fs.py, vdisk.py, the copier, the staging, the switchover)
works on store *directories*, through descriptors and ``*at()`` calls
(backing.py). A remote store (remote.py) is made one: this process mounts a
FUSE filesystem of its own whose every request is carried out on the
remote host, the namespace, attributes, extended attributes and small
files by the store agent (agent.py, JSON lines over ssh), the data of large
files over NBD (nbdkit's ``file`` plugin, libnbd). The datastore then
serves an entry on a remote store with exactly the code, the guarantees
and the tests of a local one: the staging tree is built and fsynced on the
remote host before the commit record is written here, and so on.

The rules that make that safe:

- **Write-through.** No writeback cache: the kernel hands every write to
  this process, which answers only once the agent or nbdkit has done it,
  so an acknowledged write is on the remote host (in its page cache) and
  survives a crash of this host; ``fsync`` is an NBD flush on every
  connection of the file and an ``fsync`` by the agent.
- **Names of objects still in use outlive unlink.** A regular file the
  kernel still knows (the datastore holds a handle on it, a guest may have
  it open) is not unlinked but moved to ``.fusedisk-orphan-<ino>`` at the
  top of the store (a rename over one first links it there), and removed
  when the kernel forgets it; orphans left by a crash are removed at the
  next start. The top-level names ``.fusedisk-x*`` (NBD exports, agent.py)
  and ``.fusedisk-orphan-*`` are never shown.
- **One path per inode.** Inode numbers are the remote ones (the root is
  FUSE's 1); each known inode remembers its parent and name, so a rename
  of a directory moves everything below it at no cost.
- **A broken agent link** fails the requests that were in flight with EIO
  (whether the agent did them is unknown) and the requests after it wait
  while the view reconnects (a new agent, a new nbdkit) for up to
  ``--reconnect-timeout`` seconds, then fail with EIO too.

The data of a regular file of at least :data:`NBD_MIN_BYTES` (at open) goes
over NBD through its export (agent.py ``export``); smaller files, and the
bytes of a file beyond its export's size (a file that grew since), go
through the agent's ``read``/``write``.

``FUSEDISK_VIEW_TRACE=PREFIX`` (a debugging aid) appends the view's inode
bookkeeping (lookups, forgets, drops, ESTALE answers) to ``PREFIX.<pid>``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from . import extraops, fuseshim, mountinfo, nbdfile, remote
from .agent import EXPORT_PREFIX, MAX_DATA, ORPHAN_PREFIX, PAYLOAD_KEY
from .errors import FusediskError

log = logging.getLogger(__name__)

#: Files at least this large (when opened, or once they grew so) carry their data over NBD.
NBD_MIN_BYTES = 1 << 20
#: A file that grew by writes past its export's size by this much makes the export learn
#: its new size (every connection reconnects), so that the bytes past it stop going
#: through the agent.
GROW_REFRESH_BYTES = 16 << 20
#: FUSE inode numbers given where the remote number is still taken (far above any
#: real filesystem's numbers).
FRESH_INO_BASE = 1 << 60
#: How long the kernel may keep names and attributes (this view is the store's only writer).
CACHE_TIMEOUT_S = 1.0
DEFAULT_RECONNECT_TIMEOUT_S = 30.0
_HIDDEN_AT_ROOT = (EXPORT_PREFIX, ORPHAN_PREFIX, ".fusedisk-agent")


_TRACE = os.environ.get("FUSEDISK_VIEW_TRACE")


def _trace(*what: Any) -> None:
    if _TRACE:
        with open(f"{_TRACE}.{os.getpid()}", "a") as f:
            f.write(" ".join(map(str, what)) + "\n")


def _fail(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


# -- the agent, asynchronously -------------------------------------------------------


class LinkDown(Exception):
    """The agent channel broke under a request."""


class AgentLink:
    """Requests to the store's agent from many trio tasks at once, pipelined.

    The agent answers in order; each request waits for the reply with its id.
    A refused request raises ``OSError`` with the agent's errno. When the
    channel breaks, requests in flight fail with EIO; later ones wait for
    :meth:`_reconnect`, which starts a new agent (and nbdkit) for up to
    *reconnect_timeout_s*.
    """

    def __init__(self, spec: remote.RemoteSpec, reconnect_timeout_s: float,
                 claim: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.reconnect_timeout_s = reconnect_timeout_s
        #: what each new agent claims the store with (agent.py ``Agent._claim``)
        self.claim = claim
        #: why the store is lost for good: another datastore claimed it meanwhile
        self.claim_lost = ""
        #: the remote host's boot id at the last handshake (None: none yet), and how
        #: often a reconnect found it changed or unknown (the host restarted, or may
        #: have): every handle open then hears of it at its next fsync, once
        self.boot_id: str | None = None
        self.restarts = 0
        self.store: remote.RemoteStore | None = None
        self._send: trio.lowlevel.FdStream | None = None
        self._recv: trio.lowlevel.FdStream | None = None
        self._send_lock = trio.Lock()
        self._waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._id = 0
        self._up = trio.Event()
        self._reconnecting = False
        self.reconnects = 0
        self.calls = 0
        self.latency_s = 0.0
        self._nursery: trio.Nursery | None = None

    def attach(self, store: remote.RemoteStore, nursery: trio.Nursery) -> None:
        """Take over a checked store's agent channel (its blocking client is not used again)."""
        boot = store.hello.boot_id
        if self.boot_id is not None and (not boot or boot != self.boot_id):
            self.restarts += 1
            log.warning("store %r: %s restarted since the last connection (or cannot tell): "
                        "every open file's next fsync fails with EIO once", self.spec.name,
                        self.spec.where)
        self.boot_id = boot
        self.store = store
        self._nursery = nursery
        proc = store.agent.proc
        assert proc.stdin is not None and proc.stdout is not None
        self._send = trio.lowlevel.FdStream(os.dup(proc.stdin.fileno()))
        self._recv = trio.lowlevel.FdStream(os.dup(proc.stdout.fileno()))
        leftover = store.agent._buffer  # a partial line the blocking client read ahead
        nursery.start_soon(self._reader, self._recv, leftover)
        self._up.set()

    @property
    def nursery(self) -> trio.Nursery | None:
        return self._nursery

    @property
    def endpoint(self) -> remote.Endpoint:
        if self.store is None:
            raise remote.RemoteError(f"store {self.spec.name!r}: not connected")
        return self.store.endpoint

    async def _reader(self, stream: trio.lowlevel.FdStream, leftover: bytes) -> None:
        buffer = bytearray(leftover)

        async def more() -> None:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                raise LinkDown("the agent ended")
            buffer.extend(chunk)

        try:
            while True:
                start = 0
                while (end := buffer.find(b"\n", start)) < 0:
                    start = len(buffer)
                    await more()
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                try:
                    reply = json.loads(line.decode("utf-8", errors="surrogateescape"))
                except ValueError:
                    raise LinkDown(f"the agent answered {line[:80]!r}") from None
                size = reply.get(PAYLOAD_KEY) if isinstance(reply, dict) else None
                if isinstance(size, int) and size >= 0:  # its raw bytes follow the line
                    while len(buffer) < size:
                        await more()
                    reply["payload"] = bytes(buffer[:size])
                    del buffer[:size]
                rid = reply.get("id") if isinstance(reply, dict) else None
                waiter = self._waiting.pop(rid, None) if isinstance(rid, int) else None
                if waiter is None:
                    raise LinkDown(f"the agent answered out of step: {line[:80]!r}")
                waiter[1].append(reply)
                waiter[0].set()
        except (LinkDown, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if stream is self._recv:
                self._broken(str(e))

    def _broken(self, why: str) -> None:
        """The channel is gone: fail what is in flight, and start reconnecting."""
        if not self._up.is_set():
            return
        log.warning("store %r: the link to the agent on %s broke (%s); reconnecting for up "
                    "to %g s", self.spec.name, self.spec.where, why, self.reconnect_timeout_s)
        self._up = trio.Event()
        waiting, self._waiting = self._waiting, {}
        for event, slot in waiting.values():
            slot.append(None)
            event.set()
        old = self.store
        self.store = None
        self._close_streams()
        if old is not None:
            with contextlib.suppress(Exception):
                old.agent.proc.kill()
            with contextlib.suppress(Exception):
                old.close()
        if self._nursery is not None and not self._reconnecting:
            self._reconnecting = True
            self._nursery.start_soon(self._reconnect)

    async def _reconnect(self) -> None:
        deadline = trio.current_time() + self.reconnect_timeout_s
        delay = 0.05
        try:
            while True:
                try:
                    store = await trio.to_thread.run_sync(remote.connect, self.spec, self.claim)
                except remote.StoreBusy as e:
                    # another datastore claimed the store while the link was down: it
                    # may be writing there now, so nothing of ours may go on
                    log.error("store %r: cannot reconnect, and will not try again: %s",
                              self.spec.name, e)
                    self.claim_lost = str(e)
                    self._up.set()
                    return
                except remote.RemoteError as e:
                    if trio.current_time() + delay > deadline:
                        log.error("store %r: gave up reconnecting after %g s: %s",
                                  self.spec.name, self.reconnect_timeout_s, e)
                        self._up.set()  # wakes the waiters, who see no store and fail
                        return
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                assert self._nursery is not None
                self.reconnects += 1
                log.warning("store %r: reconnected to %s (nbdkit at %s)", self.spec.name,
                            self.spec.where, store.endpoint)
                self.attach(store, self._nursery)
                return
        finally:
            self._reconnecting = False

    async def call(self, op: str, payload: bytes | memoryview | None = None,
                   **args: Any) -> dict[str, Any]:
        """One request; its reply, or ``OSError`` (the agent's errno; EIO if the link broke).

        *payload*: raw bytes sent after the request's line (agent.py
        :data:`~fusedisk.agent.PAYLOAD_KEY`); a reply's raw bytes are its ``payload``.
        """
        if payload is not None:
            args[PAYLOAD_KEY] = len(payload)
        if self.store is None and self._up.is_set() and self._nursery is not None \
                and not self._reconnecting and not self.claim_lost:
            # an earlier reconnect gave up: this request waits for one more try
            self._up = trio.Event()
            self._reconnecting = True
            self._nursery.start_soon(self._reconnect)
        if not self._up.is_set():
            await self._up.wait()
        send = self._send
        if self.store is None or send is None:
            raise OSError(errno.EIO, f"store {self.spec.name!r}: no link to the agent")
        self._id += 1
        request_id = self._id
        event = trio.Event()
        slot: list[Any] = []
        self._waiting[request_id] = (event, slot)
        line = json.dumps({"op": op, "id": request_id, **args},
                          separators=(",", ":")).encode("ascii") + b"\n"
        started = time.monotonic()
        try:
            async with self._send_lock:
                if send is not self._send:  # the link broke while this waited its turn
                    raise trio.ClosedResourceError
                await send.send_all(line)
                if payload is not None:
                    await send.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._waiting.pop(request_id, None)
            if send is self._send:  # not a link already replaced
                self._broken(f"sending failed: {e}")
            raise OSError(errno.EIO, f"store {self.spec.name!r}: the agent link broke") from None
        await event.wait()
        reply = slot[0]
        if reply is None:
            raise OSError(errno.EIO, f"store {self.spec.name!r}: the agent link broke "
                          f"during {op}")
        self.calls += 1
        self.latency_s = time.monotonic() - started
        if not reply.get("ok"):
            name = str(reply.get("errno", "EIO"))
            raise OSError(getattr(errno, name, errno.EIO), str(reply.get("error", name)))
        return reply  # type: ignore[no-any-return]

    def detach(self) -> None:
        """Stop using the channel (inside trio): no reconnect from here on."""
        self._nursery = None
        self._close_streams()

    def _close_streams(self) -> None:
        for stream in (self._send, self._recv):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        self._send = self._recv = None

    def close(self) -> None:
        """End the agent (EOF: it stops nbdkit); after :meth:`detach`, outside trio."""
        if self.store is not None:
            self.store.close()
            self.store = None


# -- inodes ----------------------------------------------------------------------------


@dataclass(slots=True)
class Node:
    """An inode the kernel knows (or an open file's), and where it is on the remote host."""

    ino: int  #: the FUSE inode number (the remote one unless taken, see _fuse_ino)
    remote: int  #: the remote inode number
    #: the names it is known by, ``(parent inode, name)``, the latest last; a directory
    #: has one, a file with hard links may have several
    names: list[tuple[int, str]]
    is_reg: bool = False
    lookups: int = 0
    opens: int = 0
    orphan: bool = False  #: its only name is ``.fusedisk-orphan-<ino>`` at the top
    gone: bool = False  #: removed: no path leads to it any more
    data: Any = None  #: its NBD file while open, if it carries data over NBD
    #: the bytes that go over NBD: the export's size at open, less any shrinking since
    #: (nbdkit fails a read past the file's end; the agent serves the rest)
    nbd_size: int = 0

    def named(self, parent: int, name: str) -> None:
        """Known by this name too (now the latest)."""
        with contextlib.suppress(ValueError):
            self.names.remove((parent, name))
        self.names.append((parent, name))

    def unnamed(self, parent: int, name: str) -> bool:
        """No longer known by this name; whether it was."""
        try:
            self.names.remove((parent, name))
        except ValueError:
            return False
        return True

    @property
    def parent(self) -> int:
        return self.names[-1][0] if self.names else pyfuse3.ROOT_INODE


def _b(name: bytes) -> str:
    return os.fsdecode(name)


class StoreView(pyfuse3.Operations):
    """The FUSE operations of a remote store's view (module docstring)."""

    enable_writeback_cache = False  # acknowledged writes must be on the remote host

    def __init__(self, link: AgentLink, *, nbd_connections: int = 2,
                 nbd_min_bytes: int = NBD_MIN_BYTES,
                 open_nbd: Callable[[str, int], Awaitable[Any]] | None = None) -> None:
        super().__init__()
        self.agent = link
        self.nodes: dict[int, Node] = {}
        self.root_ino = 0  #: the remote root's inode number
        self._by_remote: dict[int, int] = {}  #: remote inode number -> FUSE inode number
        self._by_name: dict[tuple[int, str], int] = {}  #: (parent, name) -> FUSE inode number
        self._fresh = 0
        self._fhs: dict[int, int] = {}  # fh -> ino
        self._fh_epoch: dict[int, int] = {}  # fh -> the NBD loss epoch it was told of
        self._fh_restarts: dict[int, int] = {}  # fh -> the remote restarts it was told of
        self._next_fh = 1
        self._dirs: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        self._open_nbd = open_nbd
        self.nbd_connections = nbd_connections
        self.nbd_min = nbd_min_bytes
        #: NBD traffic of files closed since (their NbdFile is gone)
        self._nbd_done = {"read": 0, "written": 0, "reconnects": 0}

    # -- mapping ------------------------------------------------------------------

    def _fuse_ino(self, remote_ino: int) -> int:
        """The FUSE inode number of a remote object: its remote number, unless an earlier
        object the kernel may still know had it (the remote filesystem reuses the
        numbers of removed inodes at once, and the kernel must never see one number
        for two objects: their lookup counts would mix)."""
        if remote_ino == self.root_ino:
            return pyfuse3.ROOT_INODE
        nid = self._by_remote.get(remote_ino)
        if nid is None:
            nid = remote_ino
            if nid in self.nodes or nid == pyfuse3.ROOT_INODE:
                self._fresh += 1
                nid = FRESH_INO_BASE + self._fresh
            self._by_remote[remote_ino] = nid
        return nid

    def _name(self, node: Node, parent: int, name: str) -> None:
        node.named(parent, name)
        self._by_name[(parent, name)] = node.ino

    def _unname(self, node: Node, parent: int, name: str) -> bool:
        if not node.unnamed(parent, name):
            return False
        if self._by_name.get((parent, name)) == node.ino:
            del self._by_name[(parent, name)]
        return True

    def _set_names(self, node: Node, names: list[tuple[int, str]]) -> None:
        for key in node.names:
            if self._by_name.get(key) == node.ino:
                del self._by_name[key]
        node.names = list(names)
        for key in names:
            self._by_name[key] = node.ino

    def _removed(self, remote_ino: int) -> None:
        """The remote object is gone: a node of it leads nowhere, its number is free."""
        nid = self._by_remote.pop(remote_ino, None)
        node = self.nodes.get(nid) if nid is not None else None
        if node is not None and not node.orphan:
            node.gone = True
            self._set_names(node, [])

    async def path(self, ino: int) -> str:
        """The path of a known inode below the store ("" for the root); ESTALE if gone.

        An inode whose every known name went (another hard link of it is left, by a
        name the kernel had not told of) is looked for on the remote host."""
        parts: list[str] = []
        while ino != pyfuse3.ROOT_INODE:
            node = self.nodes.get(ino)
            if node is None or node.gone:
                log.warning("store %r: inode %d is %s (ESTALE)", self.agent.spec.name, ino,
                            "gone" if node is not None else "not known")
                _trace("ESTALE", ino, node)
                raise _fail(errno.ESTALE)
            if not node.names:
                await self._find(node)
                if not node.names:
                    raise _fail(errno.ESTALE)
            parent, name = node.names[-1]
            parts.append(name)
            ino = parent
        return "/".join(reversed(parts))

    async def _find(self, node: Node) -> None:
        try:
            found = await self.agent.call("find", ino=node.ino)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise _fail(e.errno or errno.EIO) from None
            node.gone = True
            return
        # the whole path as one name below the root: good until a directory on the
        # way is renamed, when the inode is looked for again
        self._set_names(node, [(pyfuse3.ROOT_INODE, str(found["path"]))])

    async def _child(self, parent: int, name: str) -> str:
        base = await self.path(parent)
        return f"{base}/{name}" if base else name

    def _attrs(self, st: dict[str, Any]) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        ino = self._fuse_ino(int(st["ino"]))
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT_S
        a.attr_timeout = CACHE_TIMEOUT_S
        a.st_mode = int(st["st_mode"])
        nlink = int(st["nlink"])
        node = self.nodes.get(ino)
        if node is not None and node.orphan:
            nlink = max(0, nlink - 1)  # its orphan name is none of the guest's
        a.st_nlink = nlink
        a.st_uid = int(st["uid"])
        a.st_gid = int(st["gid"])
        a.st_rdev = int(st.get("rdev", 0))
        a.st_size = int(st["size"])
        a.st_blksize = 4096
        a.st_blocks = int(st["blocks"])
        a.st_atime_ns = int(st["atime_ns"])
        a.st_mtime_ns = int(st["mtime_ns"])
        a.st_ctime_ns = int(st["ctime_ns"])
        return a

    def _known(self, parent: int, name: str, st: dict[str, Any]) -> pyfuse3.EntryAttributes:
        """Record a name the kernel is about to learn (one more lookup) and its attributes."""
        attrs = self._attrs(st)
        ino = attrs.st_ino
        node = self.nodes.get(ino)
        if node is None or node.gone:
            node = Node(ino, int(st["ino"]), [], is_reg=stat.S_ISREG(attrs.st_mode))
            self.nodes[ino] = node
            self._name(node, parent, name)
        elif not node.orphan and ino != pyfuse3.ROOT_INODE:
            if stat.S_ISDIR(attrs.st_mode):
                self._set_names(node, [(parent, name)])
            else:
                self._name(node, parent, name)
        node.lookups += 1
        _trace("known", ino, parent, name, node)
        return attrs

    def _resized(self, ino: int, size: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.nbd_size = min(node.nbd_size, size)

    def _release_node(self, node: Node) -> None:
        """Drop a node nobody uses any more whose object is gone; an orphan's last name
        goes too. A node of an object that still exists is kept although the kernel
        forgot it: the datastore reopens objects by file handle, and the kernel then
        asks for the inode by number (a lookup of "." in it)."""
        if node.lookups > 0 or node.opens > 0 or node.ino == pyfuse3.ROOT_INODE:
            return
        if not node.gone and not node.orphan:
            return
        if self.nodes.get(node.ino) is node:
            _trace("drop", node.ino, node)
            del self.nodes[node.ino]
            self._set_names(node, [])
            if self._by_remote.get(node.remote) == node.ino:
                del self._by_remote[node.remote]
        if node.orphan and not node.gone:
            node.gone = True
            assert self._nursery is not None
            self._nursery.start_soon(self._remove_orphan, node.ino)

    async def _remove_orphan(self, ino: int) -> None:
        try:
            await self.agent.call("unlink", path=f"{ORPHAN_PREFIX}{ino}")
        except OSError as e:
            log.warning("store %r: cannot remove orphan %s%d: %s (removed at the next start)",
                        self.agent.spec.name, ORPHAN_PREFIX, ino, e)

    _nursery: trio.Nursery | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Learn the root; remove the orphans a previous run left."""
        self._nursery = nursery
        st = await self.agent.call("stat", path="")
        self.root_ino = int(st["ino"])
        self.nodes[pyfuse3.ROOT_INODE] = Node(pyfuse3.ROOT_INODE, self.root_ino, [])
        swept = await self.agent.call("sweep")
        if swept["orphans"] or swept["exports"]:
            log.info("store %r: removed %d orphans and %d export links an earlier run left",
                     self.agent.spec.name, swept["orphans"], swept["exports"])

    # -- errors -------------------------------------------------------------------

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return await self.agent.call(op, **args)
        except OSError as e:
            if e.errno == errno.EIO:
                log.error("store %r: %s: %s", self.agent.spec.name, op, e.strerror or e)
            raise _fail(e.errno or errno.EIO) from None

    def _visible(self, parent: int, name: str) -> None:
        if parent == pyfuse3.ROOT_INODE and name.startswith(_HIDDEN_AT_ROOT):
            raise _fail(errno.ENOENT)

    # -- names --------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = _b(name)
        if text in (".", ".."):  # by file handle (open_by_handle_at), or its parent
            node = self.nodes.get(parent_inode)
            if node is None or node.gone:
                raise _fail(errno.ESTALE)
            if text == "..":
                node = self.nodes.get(node.parent)
                if node is None or node.gone:
                    raise _fail(errno.ESTALE)
            attrs = self._attrs(await self._call("stat", path=await self.path(node.ino)))
            if attrs.st_ino != node.ino:
                raise _fail(errno.ESTALE)  # the name leads to another object now
            node.lookups += 1
            return attrs
        self._visible(parent_inode, text)
        st = await self._call("stat", path=await self._child(parent_inode, text))
        return self._known(parent_inode, text, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            _trace("forget", ino, count, self.nodes.get(ino))
            node = self.nodes.get(ino)
            if node is not None:
                node.lookups = max(0, node.lookups - count)
                self._release_node(node)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attrs(await self._call("stat", path=await self.path(inode)))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = await self.path(inode)
        st: dict[str, Any] | None = None
        kill = fh is not None and bool(fh & fuseshim.FH_KILL_SUIDGID)
        if kill and fields.update_size and not fields.update_mode:
            node = self.nodes.get(inode)
            if node is not None:
                await self._kill_suid(node)
        if fields.update_size:
            st = (await self._call("truncate", path=path, size=attr.st_size))["stat"]
            self._resized(inode, attr.st_size)
            node = self.nodes.get(inode)
            if node is not None:
                await self._grown(node, attr.st_size)
        args: dict[str, Any] = {}
        if fields.update_uid:
            args["uid"] = attr.st_uid
        if fields.update_gid:
            args["gid"] = attr.st_gid
        if fields.update_mode:
            args["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_atime:
            args["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            args["mtime_ns"] = attr.st_mtime_ns
        if args:
            st = (await self._call("setattr", path=path, **args))["stat"]
        if st is None:
            st = await self._call("stat", path=path)
        return self._attrs(st)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode((await self._call("readlink", path=await self.path(inode)))["target"])

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = _b(name)
        self._visible(parent_inode, text)
        reply = await self._call("mkdir", path=await self._child(parent_inode, text), mode=mode)
        return self._known(parent_inode, text, reply["stat"])

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = _b(name)
        self._visible(parent_inode, text)
        reply = await self._call("mknod", path=await self._child(parent_inode, text), st_mode=mode,
                                 rdev=rdev, export=self._open_nbd is not None)
        return self._known(parent_inode, text, reply["stat"])

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = _b(name)
        self._visible(parent_inode, text)
        reply = await self._call("symlink", path=await self._child(parent_inode, text),
                                 target=os.fsdecode(target))
        return self._known(parent_inode, text, reply["stat"])

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = _b(new_name)
        self._visible(new_parent_inode, text)
        reply = await self._call("link", path=await self.path(inode),
                                 to=await self._child(new_parent_inode, text))
        return self._known(new_parent_inode, text, reply["stat"])

    def _in_use_node(self, st: dict[str, Any]) -> Node | None:
        """The node of a regular file (by its stat) whose last name would go, if the
        kernel still knows it."""
        node = self.nodes.get(self._fuse_ino(int(st["ino"])))
        if node is None or not stat.S_ISREG(int(st["st_mode"])) or int(st["nlink"]) > 1:
            return None  # unknown, or another name keeps it
        if node.lookups == 0 and node.opens == 0:
            return None
        return node

    async def _orphan(self, node: Node, path: str, *, keep: bool) -> None:
        """Give a file in use its orphan name: moved there, or (*keep*) linked there."""
        orphan = f"{ORPHAN_PREFIX}{node.ino}"
        await self._call("link" if keep else "rename", path=path, to=orphan)
        self._set_names(node, [(pyfuse3.ROOT_INODE, orphan)])
        node.orphan = True

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = _b(name)
        self._visible(parent_inode, text)
        path = await self._child(parent_inode, text)
        st = await self._call("stat", path=path)
        node = self._in_use_node(st)
        if node is not None:
            await self._orphan(node, path, keep=False)
            return
        await self._call("unlink", path=path)
        self._unnamed(parent_inode, text)
        if int(st["nlink"]) <= 1:
            self._removed(int(st["ino"]))

    def _unnamed(self, parent: int, name: str, keep: int = 0) -> None:
        """A name is gone (except for inode *keep*, which it still names)."""
        node = self.nodes.get(self._by_name.get((parent, name), 0))
        if node is None or node.ino == keep or node.orphan:
            return
        self._unname(node, parent, name)
        if not node.names and not node.is_reg:
            node.gone = True  # a directory, a symlink...: one name, now none

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = _b(name)
        self._visible(parent_inode, text)
        path = await self._child(parent_inode, text)
        st = await self._call("stat", path=path)
        await self._call("rmdir", path=path)
        self._unnamed(parent_inode, text)
        self._removed(int(st["ino"]))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old, new = _b(name_old), _b(name_new)
        self._visible(parent_inode_old, old)
        self._visible(parent_inode_new, new)
        src = await self._child(parent_inode_old, old)
        dst = await self._child(parent_inode_new, new)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        src_st = await self._call("stat", path=src)
        moved_ino = self._fuse_ino(int(src_st["ino"]))
        try:
            dst_st: dict[str, Any] | None = await self.agent.call("stat", path=dst)
        except OSError:
            dst_st = None
        target_ino = self._fuse_ino(int(dst_st["ino"])) if dst_st is not None else 0
        if target_ino == moved_ino:  # two names of one inode: rename(2) does nothing
            await self._call("rename", path=src, to=dst, exchange=exchange,
                             noreplace=noreplace)
            return
        replaced = None
        if dst_st is not None and not exchange and not noreplace:
            replaced = self._in_use_node(dst_st)
            if replaced is not None:  # keep the replaced file's data for its users
                await self._orphan(replaced, dst, keep=True)
        try:
            await self._call("rename", path=src, to=dst, exchange=exchange, noreplace=noreplace)
        except pyfuse3.FUSEError:
            if replaced is not None:  # undo the orphan link: the file keeps its name
                with contextlib.suppress(Exception):
                    await self.agent.call("unlink", path=f"{ORPHAN_PREFIX}{replaced.ino}")
                self._set_names(replaced, [(parent_inode_new, new)])
                replaced.orphan = False
            raise
        moved = self.nodes.get(moved_ino)
        target = self.nodes.get(target_ino) if target_ino else None
        if exchange:
            if target is not None and self._unname(target, parent_inode_new, new):
                self._name(target, parent_inode_old, old)
        elif replaced is None:
            self._unnamed(parent_inode_new, new, keep=moved_ino)
            if dst_st is not None and (int(dst_st["nlink"]) <= 1 or
                                       stat.S_ISDIR(int(dst_st["st_mode"]))):
                self._removed(int(dst_st["ino"]))  # replaced: its last name went
        if moved is not None and self._unname(moved, parent_inode_old, old):
            self._name(moved, parent_inode_new, new)

    # -- directories ------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        reply = await self._call("list", path=await self.path(inode), stat=True)
        entries = [(name, st) for name, st in reply["entries"]
                   if not (inode == pyfuse3.ROOT_INODE and name.startswith(_HIDDEN_AT_ROOT))]
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = entries
        self._fhs[fh] = inode
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        parent = self._fhs[fh]
        for index in range(start_id, len(entries)):
            name, st = entries[index]
            attrs = self._attrs(st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                return
            self._known(parent, name, st)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._fhs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._call("fsync", path=await self.path(self._fhs[fh]))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        fs = await self._call("statfs")
        out = pyfuse3.StatvfsData()
        out.f_bsize = int(fs["bsize"])
        out.f_frsize = int(fs["frsize"])
        out.f_blocks = int(fs["blocks"])
        out.f_bfree = int(fs["bfree"])
        out.f_bavail = int(fs["bavail"])
        out.f_files = int(fs["files"])
        out.f_ffree = int(fs["ffree"])
        out.f_favail = int(fs["favail"])
        out.f_namemax = int(fs["namemax"])
        return out

    # -- extended attributes ----------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        reply = await self._call("getxattr", path=await self.path(inode), name=os.fsdecode(name))
        return base64.b64decode(reply["value"])

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._call("setxattr", path=await self.path(inode), name=os.fsdecode(name),
                         value=base64.b64encode(value).decode("ascii"))

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        reply = await self._call("listxattr", path=await self.path(inode))
        return [os.fsencode(n) for n in reply["names"]]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._call("removexattr", path=await self.path(inode), name=os.fsdecode(name))

    # -- files ------------------------------------------------------------------------

    def _new_fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._fhs[fh] = ino
        data = self.nodes[ino].data
        # like Linux's writeback errors: every handle open when NBD may have lost
        # acknowledged writes hears of it at its next fsync, once
        self._fh_epoch[fh] = data.loss_epoch if data is not None else 0
        self._fh_restarts[fh] = self.agent.restarts
        return fh

    async def _opened(self, node: Node, size: int, truncate: bool) -> None:
        node.opens += 1
        if truncate:
            await self._call("truncate", path=await self.path(node.ino), size=0)
            self._resized(node.ino, 0)
            size = 0
        try:
            await self._grown(node, size)
        except pyfuse3.FUSEError:
            node.opens -= 1
            raise

    async def _grown(self, node: Node, size: int) -> None:
        """An open file is *size* bytes now: large enough, its data goes over NBD from
        here on; grown past its export's size, the export learns the new size (a disk
        image made empty and then truncated to its size by a copy, say)."""
        if node.opens <= 0 or self._open_nbd is None:
            return
        if node.data is None and size >= max(1, self.nbd_min):
            reply = await self._call("export", path=await self.path(node.ino))
            try:
                data = await self._open_nbd(str(reply["export"]), self.nbd_connections)
            except (OSError, remote.RemoteError) as e:
                log.error("store %r: NBD for %s failed: %s", self.agent.spec.name,
                          reply["export"], e)
                raise _fail(errno.EIO) from None
            if node.data is not None:  # another request opened it meanwhile
                await data.close()
                return
            node.data, node.nbd_size = data, int(data.size)
            for fh, ino in self._fhs.items():
                if ino == node.ino:
                    self._fh_epoch[fh] = data.loss_epoch
        elif node.data is not None and size > node.nbd_size:
            await self._nbd(node.data.refresh(), "refresh")
            node.nbd_size = min(int(node.data.size), size)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        kill = flags & fuseshim.OPEN_KILL_SUIDGID
        flags &= ~fuseshim.OPEN_KILL_SUIDGID
        node = self.nodes.get(inode)
        if node is None or node.gone:
            raise _fail(errno.ESTALE)
        st = await self._call("stat", path=await self.path(inode))
        if not stat.S_ISREG(int(st["st_mode"])):
            raise _fail(errno.EINVAL)
        await self._opened(node, int(st["size"]), bool(flags & os.O_TRUNC))
        if kill and flags & os.O_TRUNC:
            await self._kill_suid(node)
        return pyfuse3.FileInfo(fh=self._new_fh(inode), keep_cache=False)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = _b(name)
        flags &= ~fuseshim.OPEN_KILL_SUIDGID  # a file it makes has no set-id bits to drop
        self._visible(parent_inode, text)
        path = await self._child(parent_inode, text)
        try:
            st = (await self.agent.call("mknod", path=path,
                                        st_mode=stat.S_IFREG | (mode & 0o7777),
                                        export=self._open_nbd is not None))["stat"]
            truncate = False
        except OSError as e:
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise _fail(e.errno or errno.EIO) from None
            st = await self._call("stat", path=path)
            if not stat.S_ISREG(int(st["st_mode"])):
                raise _fail(errno.EEXIST) from None
            truncate = bool(flags & os.O_TRUNC)
        attrs = self._known(parent_inode, text, st)
        node = self.nodes[attrs.st_ino]
        await self._opened(node, int(st["size"]), truncate)
        if truncate:
            attrs = self._attrs(await self._call("stat", path=path))
        return pyfuse3.FileInfo(fh=self._new_fh(attrs.st_ino), keep_cache=False), attrs

    def _node_of(self, fh: int) -> Node:
        ino = self._fhs.get(fh & fuseshim.FH_MASK)
        node = self.nodes.get(ino) if ino is not None else None
        if node is None:
            raise _fail(errno.EBADF)
        return node

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node_of(fh)
        data = node.data
        if data is not None and off < node.nbd_size:
            length = min(size, node.nbd_size - off)
            head = await self._nbd(_split_read(data, length, off), "read")
            if len(head) == size or off + len(head) < node.nbd_size:
                return head  # type: ignore[no-any-return]
            off += len(head)
            size -= len(head)
            prefix = head
        else:
            prefix = b""
        chunks = [prefix]
        while size > 0:
            reply = await self._call("read", path=await self.path(node.ino), offset=off,
                                     length=min(size, MAX_DATA), binary=True)
            chunk = reply["payload"]
            chunks.append(chunk)
            if not chunk or reply.get("eof"):
                break
            off += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    async def _nbd(self, request: Awaitable[Any], what: str) -> Any:
        try:
            return await request
        except OSError as e:
            log.error("store %r: NBD %s: %s", self.agent.spec.name, what, e)
            raise _fail(e.errno or errno.EIO) from None
        except remote.RemoteError as e:
            log.error("store %r: NBD %s: %s", self.agent.spec.name, what, e)
            raise _fail(errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._node_of(fh)
        sync = (fh >> fuseshim.FH_SYNC_SHIFT) & fuseshim.FH_SYNC_BITS
        if fh & fuseshim.FH_KILL_SUIDGID:
            await self._kill_suid(node)
        data = node.data
        done = 0
        if data is not None and off < node.nbd_size:
            head = min(len(buf), node.nbd_size - off)
            await self._nbd(_split_write(data, memoryview(buf)[:head], off, bool(sync)),
                            "write")
            done = head
        view = memoryview(buf)
        while done < len(buf):
            piece = view[done:done + MAX_DATA]
            await self._call("write", path=await self.path(node.ino), offset=off + done,
                             payload=piece)
            done += len(piece)
        if sync and (data is None or (len(buf) > 0 and off + len(buf) > node.nbd_size)):
            await self._call("fsync", path=await self.path(node.ino))
        end = off + len(buf)
        if (data is None and end >= max(1, self.nbd_min)) or (
                data is not None and end >= node.nbd_size + GROW_REFRESH_BYTES):
            # a file that grows by writes (a qcow2 image, a log): its data goes over NBD
            # from here on, or its export learns its new size
            await self._grown(node, end)
        return len(buf)

    async def flush(self, fh: int) -> None:
        return None

    async def _kill_suid(self, node: Node) -> None:
        """What the kernel asks for with FUSE_HANDLE_KILLPRIV_V2 (fuseshim.py): a write
        or truncate by a caller without CAP_FSETID drops set-uid, and set-gid of a
        group-executable file."""
        path = await self.path(node.ino)
        mode = int((await self._call("stat", path=path))["st_mode"])
        drop = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & drop:
            await self._call("setattr", path=path, mode=stat.S_IMODE(mode) & ~drop)

    # the requests pyfuse3 has no handlers for, served through the shim (extraops.py)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        node = self._node_of(fh)
        reply = await self._call("fallocate", path=await self.path(node.ino), mode=mode,
                                 offset=offset, length=length)
        self._resized(node.ino, int(reply["stat"]["size"]))
        await self._grown(node, int(reply["stat"]["size"]))

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        node = self._node_of(fh)
        how = {os.SEEK_DATA: "data", os.SEEK_HOLE: "hole"}.get(whence)
        if how is None:
            raise _fail(errno.EINVAL)
        return int((await self._call("seek", path=await self.path(node.ino), offset=offset,
                                     whence=how))["offset"])

    async def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int,
                              length: int, flags: int) -> int:
        raise _fail(errno.ENOSYS)  # the kernel copies through read and write instead

    def fsync_done(self, cookie: int, err: int) -> None:
        return None  # no FSYNC is detached here (fast fsync is not enabled)

    async def fsync(self, fh: int, datasync: bool) -> None:
        node = self._node_of(fh)
        key = fh & fuseshim.FH_MASK
        data = node.data
        if data is not None:
            failed = False
            try:
                await data.flush()
            except OSError as e:
                if e.errno != errno.EIO:
                    raise _fail(e.errno or errno.EIO) from None
                log.error("%s", e)
                failed = True
            if failed or data.loss_epoch != self._fh_epoch.get(key, 0):
                # one report of a loss, whichever way it was learnt
                self._fh_epoch[key] = data.loss_epoch
                self._fh_restarts[key] = self.agent.restarts
                raise _fail(errno.EIO)
        await self._call("fsync", path=await self.path(node.ino))
        if self._fh_restarts.get(key, 0) != self.agent.restarts:
            # the remote host restarted (or could not say) since this handle was told
            # last: what the agent wrote for it and had not synced may be gone
            self._fh_restarts[key] = self.agent.restarts
            raise _fail(errno.EIO)

    async def release(self, fh: int) -> None:
        self._fh_epoch.pop(fh, None)
        self._fh_restarts.pop(fh, None)
        ino = self._fhs.pop(fh, None)
        node = self.nodes.get(ino) if ino is not None else None
        if node is None:
            return
        node.opens = max(0, node.opens - 1)
        if node.data is not None and node.opens == 0:
            data, node.data = node.data, None
            self._nbd_done["read"] += int(data.stats["bytes_read"])
            self._nbd_done["written"] += int(data.stats["bytes_written"])
            self._nbd_done["reconnects"] += int(data.stats.get("reconnects", 0))
            with contextlib.suppress(Exception):
                await data.close()
        self._release_node(node)

    # -- statistics ---------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        nbd = [n.data for n in self.nodes.values() if n.data is not None]
        return {"store": self.agent.spec.name, "where": self.agent.spec.where,
                "connected": self.agent.store is not None, "reconnects": self.agent.reconnects,
                "claim_lost": self.agent.claim_lost, "remote_restarts": self.agent.restarts,
                "agent_calls": self.agent.calls,
                "agent_latency_ms": round(self.agent.latency_s * 1e3, 3),
                "known_inodes": len(self.nodes), "nbd_files": len(nbd),
                "nbd_bytes_read": self._nbd_done["read"] + sum(
                    int(d.stats["bytes_read"]) for d in nbd),
                "nbd_bytes_written": self._nbd_done["written"] + sum(
                    int(d.stats["bytes_written"]) for d in nbd),
                "nbd_reconnects": self._nbd_done["reconnects"] + sum(
                    int(d.stats.get("reconnects", 0)) for d in nbd)}


#: A large request of the kernel's goes over NBD in pieces of this size, all in flight
#: at once: one writer's 1 MiB then keeps both connections (and both cores: TLS here,
#: nbdkit there) busy instead of waiting for one round trip after another.
NBD_PIECE = 256 << 10


async def _split_write(data: Any, buf: memoryview, off: int, fua: bool) -> None:
    if len(buf) <= NBD_PIECE:
        await data.pwrite(buf, off, fua=fua)
        return
    errors: list[BaseException] = []

    async def piece(start: int) -> None:
        try:
            await data.pwrite(buf[start:start + NBD_PIECE], off + start, fua=fua)
        except (OSError, remote.RemoteError) as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for start in range(0, len(buf), NBD_PIECE):
            nursery.start_soon(piece, start)
    if errors:
        raise errors[0]


async def _split_read(data: Any, length: int, off: int) -> bytes:
    if length <= NBD_PIECE:
        return bytes(await data.pread(length, off))
    parts: dict[int, bytes] = {}
    errors: list[BaseException] = []

    async def piece(start: int) -> None:
        try:
            parts[start] = bytes(await data.pread(min(NBD_PIECE, length - start), off + start))
        except (OSError, remote.RemoteError) as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for start in range(0, length, NBD_PIECE):
            nursery.start_soon(piece, start)
    if errors:
        raise errors[0]
    out = bytearray()
    for start in sorted(parts):
        chunk = parts[start]
        out += chunk
        if len(chunk) < min(NBD_PIECE, length - start):
            break  # the export ended there
    return bytes(out)


# -- the process ---------------------------------------------------------------------


def _clear_stale_mount(mountpoint: str) -> None:
    """A view killed earlier leaves its mount behind ("transport endpoint not connected")."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            subprocess.run(["fusermount3", "-uz", mountpoint], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _serve(view: StoreView, link: AgentLink, store: remote.RemoteStore,
                 ready_fd: int | None, watch_fd: int | None, status_path: str | None,
                 mountpoint: str) -> None:
    try:
        await _serve_in(view, link, store, ready_fd, watch_fd, status_path, mountpoint)
    finally:
        link.detach()


async def _serve_in(view: StoreView, link: AgentLink, store: remote.RemoteStore,
                    ready_fd: int | None, watch_fd: int | None, status_path: str | None,
                    mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        link.attach(store, nursery)
        try:
            await view.start(nursery)
        except OSError as e:
            raise FusediskError(f"store-view: store {link.spec.name!r}: cannot read the store "
                                f"directory on {link.spec.where}: {e.strerror or e}") from None
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

        async def watch() -> None:
            assert watch_fd is not None
            stream = trio.lowlevel.FdStream(watch_fd)
            while await stream.receive_some(64):
                pass
            log.info("store %r: the datastore daemon is gone; unmounting", link.spec.name)
            nursery.cancel_scope.cancel()

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        event_fd = fuseshim.extra_ops_fd()
        if event_fd is not None:
            await nursery.start(extraops.ExtraOps(view, event_fd).run)
        if watch_fd is not None:
            nursery.start_soon(watch)
        if status_path is not None:
            nursery.start_soon(_report, view, status_path)
        nursery.start_soon(on_signal)

        async def widen_readahead() -> None:
            # the kernel caps the read-ahead when the INIT reply arrives: after it, so
            # after a request of the mount's own (a stat answered by this loop)
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(os.stat, mountpoint)
            _widen_readahead(mountpoint)

        nursery.start_soon(widen_readahead)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


#: How often the view rewrites its status file (``--status-file``).
STATUS_INTERVAL_S = 1.0


async def _report(view: StoreView, path: str) -> None:
    """Keep *path* holding the view's statistics as JSON (the daemon's ``status`` reads
    it: a file, so that a view that hangs cannot hang the daemon's status)."""
    while True:
        _write_status(path, {**view.statistics(), "pid": os.getpid(), "updated": time.time()})
        await trio.sleep(STATUS_INTERVAL_S)


def _write_status(path: str, stats: dict[str, Any]) -> None:
    """On the run directory's tmpfs: no disk behind it, the write does not block."""
    tmp = f"{path}.tmp"
    with contextlib.suppress(OSError):
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, path)


def main(spec_text: str, mountpoint: str, *, ready_fd: int | None = None,
         status_path: str | None = None,
         watch_fd: int | None = None,
         reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S,
         nbd_min_bytes: int = NBD_MIN_BYTES, nbd_connections: int = 2,
         claim: dict[str, Any] | None = None) -> int:
    """``fusedisk store-view``: mount the view of a remote store until signalled.

    *claim* (``{"owner": ID, ...}``) claims the store on its host for the life of
    the view (agent.py ``Agent._claim``): another datastore's view is refused.
    """
    name, sep, text = spec_text.partition("=")
    if not sep or not name or not remote.is_remote_spec(text):
        raise FusediskError(f"store-view {spec_text!r}: expected NAME=nbd+ssh://[user@]host/DIR "
                            "or NAME=nbd+local:///DIR")
    spec = remote.parse_spec(name, text)
    if not os.path.isdir(mountpoint):
        _clear_stale_mount(mountpoint)
        if not os.path.isdir(mountpoint):
            raise FusediskError(f"store-view: mount point {mountpoint} is not a directory")
    store = remote.connect(spec, claim)
    link = AgentLink(spec, reconnect_timeout_s, claim)
    view = StoreView(link, open_nbd=_nbd_opener(link), nbd_min_bytes=nbd_min_bytes,
                     nbd_connections=nbd_connections)
    fuseshim.enable_extra_ops()  # fallocate and SEEK_DATA/SEEK_HOLE reach the agent
    # no GETXATTR security.capability before every write (an agent round trip each):
    # the view drops set-id bits itself where the kernel says so
    fuseshim.enable_killpriv()
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname=fusedisk-remote:{spec.name}", "subtype=fusedisk-store"}
    try:
        pyfuse3.init(view, mountpoint, options)
    except RuntimeError as e:
        store.close()
        raise FusediskError(f"store-view: cannot mount on {mountpoint}: {e}") from None
    try:
        trio.run(_serve, view, link, store, ready_fd, watch_fd, status_path, mountpoint)
    except BaseExceptionGroup as group:
        matched, rest = group.split(FusediskError)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        raise
    finally:
        link.close()
        pyfuse3.close(unmount=True)
    return 0


#: The view's read-ahead (its bdi's ``read_ahead_kb``). The kernel's default of 128 KiB
#: makes a sequential reader's READs 128 KiB each, one round trip after another; at
#: 4 MiB the kernel sends its READs of up to 1 MiB (max_pages) several at a time, and
#: the view reads them over NBD at once (a relocation off a remote store, a guest's
#: sequential reads). Random reads do not read ahead, whatever the window.
VIEW_READ_AHEAD_KB = 4096


def _widen_readahead(mountpoint: str) -> None:
    """Set the view's read-ahead (:data:`VIEW_READ_AHEAD_KB`) through sysfs, once the
    mount's INIT is answered (the kernel sets it to at most what INIT negotiated,
    which libfuse keeps at the kernel's own 128 KiB); the bdi is named by the mount's
    device numbers in the mount table. Logged if it cannot."""
    mount = mountinfo.mount_at(mountpoint)
    path = f"/sys/class/bdi/{mount.device}/read_ahead_kb" if mount and mount.device else ""
    try:
        if not path:
            raise FileNotFoundError(errno.ENOENT, "not in the mount table")
        with open(path, "w") as f:
            f.write(f"{VIEW_READ_AHEAD_KB}\n")
    except OSError as e:
        log.warning("store view %s: read-ahead left as it is (%s: %s)", mountpoint,
                 path or "its bdi", e.strerror)


def _nbd_opener(link: AgentLink) -> Callable[[str, int], Awaitable[Any]]:
    """How the view opens a file's export (nbdfile.py). A connection that breaks asks
    the agent where nbdkit listens now (``serve`` starts a new one if it died), after
    the agent itself was replaced if need be."""

    async def endpoint() -> remote.Endpoint:
        reply = await link.call("serve")
        assert link.store is not None
        return remote.served_endpoint(link.spec, reply, link.store.endpoint.tls_username)

    async def opener(export: str, connections: int) -> Any:
        assert link.nursery is not None
        f = nbdfile.NbdFile(endpoint, export, connections=connections,
                            reconnect_timeout_s=link.reconnect_timeout_s,
                            name=f"store {link.spec.name!r}: {export}")
        await f.open(link.nursery)
        return f

    return opener


if __name__ == "__main__":  # pragma: no cover - run through the CLI
    sys.exit(main(sys.argv[1], sys.argv[2]))
