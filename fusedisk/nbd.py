"""A read-only NBD server on trio: a file (or any :class:`Export`) to real NBD clients.

The protocol is NetworkBlockDevice/nbd ``doc/proto.md`` (written here from
that document: Python has no NBD server library to use): the fixed newstyle
handshake, ``NBD_OPT_GO``/``INFO``/``LIST``/``ABORT``/``EXPORT_NAME``,
structured replies, and the meta contexts ``base:allocation`` and
``qemu:dirty-bitmap:NAME`` (QEMU's ``docs/interop/nbd.rst``), so that
``nbdinfo --map``, ``nbdcopy``, ``qemu-img`` and libnbd read a full or an
incremental backup with no fusedisk code on their side. Commands: ``READ``,
``BLOCK_STATUS``, ``FLUSH`` and ``CACHE`` (no-ops on a read-only export),
``DISC``; writes are refused with ``EPERM``.

Limits, each with a test: a request reads at most :data:`MAX_REQUEST` bytes
(a longer one is refused with ``EINVAL``, as is one past the end); option
data is at most :data:`MAX_OPTION` bytes, meta-context queries at most
:data:`MAX_QUERIES`; at most :data:`MAX_CLIENTS` connections are served (a
further one is closed at once); a client that sends nothing for
:data:`IDLE_TIMEOUT_S` during the handshake is dropped. Malformed input (a
wrong magic, an impossible length) ends that connection, never the server:
the protocol has no way to resynchronise a stream that lost its framing.
TLS: a server made with a TLS context (tlspsk.py: pre-shared keys)
requires it, as ``nbdkit --tls=require`` does: before ``STARTTLS`` every
option but ``ABORT`` gets ``NBD_REP_ERR_TLS_REQD`` (``EXPORT_NAME``, which
cannot be refused, ends the connection), and after it the negotiation starts
afresh inside TLS. Without one, ``STARTTLS`` is refused with
``NBD_REP_ERR_POLICY``.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

# -- the protocol's numbers (doc/proto.md) ------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

#: Longest read one request may ask for (advertised as the maximum block size).
MAX_REQUEST = 32 << 20
#: Longest option payload accepted during the handshake.
MAX_OPTION = 64 << 10
#: Most meta-context queries in one option.
MAX_QUERIES = 64
#: Connections served at once; a further one is closed.
MAX_CLIENTS = 16
#: Seconds a client may stay silent during the handshake.
IDLE_TIMEOUT_S = 30.0
#: Longest export name.
MAX_NAME = 4096


class ProtocolError(Exception):
    """The client broke the protocol: its connection is closed."""


Extents = Sequence[tuple[int, int]]


@dataclass
class Export:
    """What one export serves: a size, a way to read, and its meta contexts.

    *allocated*: the data extents (``(offset, length)``, sorted, disjoint);
    the rest reads as zeros (``base:allocation`` says hole and zero there).
    *bitmaps*: name → dirty extents, served as ``qemu:dirty-bitmap:NAME``.
    """

    name: str
    size: int
    pread: Callable[[int, int], bytes]
    allocated: Extents
    bitmaps: dict[str, Extents] = field(default_factory=dict)
    description: str = ""

    def contexts(self) -> list[str]:
        return [BASE_ALLOCATION] + [DIRTY_BITMAP_PREFIX + n for n in sorted(self.bitmaps)]

    def extents_of(self, context: str) -> tuple[Extents, int, int]:
        """(extents, flags inside them, flags outside them) of a context."""
        if context == BASE_ALLOCATION:
            return self.allocated, 0, STATE_HOLE | STATE_ZERO
        return self.bitmaps[context[len(DIRTY_BITMAP_PREFIX):]], STATE_DIRTY, 0


def descriptors(extents: Extents, inside: int, outside: int, offset: int, length: int,
                one: bool) -> list[tuple[int, int]]:
    """Block-status descriptors ``(length, flags)`` covering ``[offset, offset+length)``."""
    end = offset + length
    starts = [start for start, _ in extents]
    i = max(0, bisect.bisect_right(starts, offset) - 1)
    out: list[tuple[int, int]] = []
    pos = offset

    def add(upto: int, flags: int) -> None:
        nonlocal pos
        upto = min(upto, end)
        if upto <= pos:
            return
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + upto - pos, flags)
        else:
            out.append((upto - pos, flags))
        pos = upto

    while pos < end and i < len(extents):
        start, size = extents[i]
        add(start, outside)
        add(start + size, inside)
        i += 1
    add(end, outside)
    return out[:1] if one else out


# -- framing --------------------------------------------------------------------------


class _Conn:
    """One client's byte stream, read exactly."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buffer)))
            if not chunk:
                raise EOFError
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Go on inside TLS (after the ACK of ``STARTTLS``); a failed handshake
        ends the connection."""
        if self._buffer:
            raise ProtocolError("bytes sent after STARTTLS before the TLS handshake")
        tls = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise ProtocolError(f"TLS handshake failed, a wrong identity or key? "
                                f"({e.__cause__ or e})") from None
        self.stream = tls


@dataclass
class Statistics:
    connections: int = 0
    requests: int = 0
    bytes_read: int = 0
    protocol_errors: int = 0


class Server:
    """Serves *exports* (by name; a client asking for "" gets the first one)."""

    def __init__(self, exports: Sequence[Export], tls: ssl.SSLContext | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        #: when set, TLS is required (see the module's docstring)
        self.tls = tls
        self.default = exports[0]
        self.statistics = Statistics()
        self._open = 0

    async def serve(
        self, listeners: list[trio.SocketListener],
        *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)

    async def handle(self, stream: trio.abc.Stream) -> None:
        if self._open >= MAX_CLIENTS:
            log.warning("NBD client turned away: %d connections open", MAX_CLIENTS)
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        self.statistics.connections += 1
        conn = _Conn(stream)
        try:
            async with stream:
                with trio.fail_after(IDLE_TIMEOUT_S):
                    session = await self._handshake(conn)
                if session is not None:
                    await self._transmission(conn, *session)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            log.warning("NBD client sent no complete handshake in %g s: closed",
                        IDLE_TIMEOUT_S)
        except ProtocolError as e:
            self.statistics.protocol_errors += 1
            log.warning("NBD client broke the protocol (%s): closed", e)
        finally:
            self._open -= 1

    # -- handshake ------------------------------------------------------------------

    async def _handshake(self, conn: _Conn) -> tuple[Export, bool, list[str]] | None:
        await conn.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                    FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await conn.read(4))
        if not client_flags & FLAG_FIXED_NEWSTYLE or client_flags & ~3:
            raise ProtocolError(f"client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        structured = False
        contexts: list[str] = []
        secured = self.tls is None  # nothing to wait for
        while True:
            magic, option, length = struct.unpack(">QII", await conn.read(16))
            if magic != IHAVEOPT:
                raise ProtocolError(f"option magic {magic:#x}")
            if length > MAX_OPTION:
                if option == OPT_EXPORT_NAME:
                    raise ProtocolError("export name too long")
                await self._skip(conn, length)
                await self._reply(conn, option, REP_ERR_TOO_BIG, b"option too long")
                continue
            data = await conn.read(length)
            if not secured and option not in (OPT_STARTTLS, OPT_ABORT):
                if option == OPT_EXPORT_NAME:
                    raise ProtocolError("EXPORT_NAME before STARTTLS on a TLS-only server")
                await self._reply(conn, option, REP_ERR_TLS_REQD, b"TLS is required")
                continue
            if option == OPT_EXPORT_NAME:
                export = self.exports.get(data.decode(errors="replace")) or (
                    self.default if not data else None)
                if export is None:
                    raise ProtocolError("unknown export (EXPORT_NAME cannot be refused)")
                await conn.send(struct.pack(">QH", export.size, self._flags()) +
                                (b"" if no_zeroes else bytes(124)))
                return export, False, []
            if option == OPT_ABORT:
                await self._reply(conn, option, REP_ACK)
                return None
            if option == OPT_LIST:
                if data:
                    await self._reply(conn, option, REP_ERR_INVALID, b"LIST takes no data")
                    continue
                for name in self.exports:
                    encoded = name.encode()
                    await self._reply(conn, option, REP_SERVER,
                                      struct.pack(">I", len(encoded)) + encoded)
                await self._reply(conn, option, REP_ACK)
            elif option == OPT_STRUCTURED_REPLY:
                if data:
                    await self._reply(conn, option, REP_ERR_INVALID, b"takes no data")
                    continue
                structured = True
                await self._reply(conn, option, REP_ACK)
            elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                chosen = await self._meta_context(conn, option, data, structured)
                if option == OPT_SET_META_CONTEXT and chosen is not None:
                    contexts = chosen
            elif option in (OPT_INFO, OPT_GO):
                export = await self._info(conn, option, data)
                if export is not None and option == OPT_GO:
                    return export, structured, contexts
            elif option == OPT_STARTTLS:
                if self.tls is None:
                    await self._reply(conn, option, REP_ERR_POLICY, b"TLS is not offered")
                elif secured or data:
                    await self._reply(conn, option, REP_ERR_INVALID,
                                      b"TLS is on already" if secured else b"takes no data")
                else:
                    await self._reply(conn, option, REP_ACK)
                    await conn.start_tls(self.tls)
                    secured = True
                    structured, contexts = False, []  # negotiated afresh inside TLS
            else:
                await self._reply(conn, option, REP_ERR_UNSUP, b"option not supported")

    async def _skip(self, conn: _Conn, length: int) -> None:
        while length:
            length -= len(await conn.read(min(length, 1 << 16)))

    async def _reply(self, conn: _Conn, option: int, kind: int, data: bytes = b"") -> None:
        await conn.send(struct.pack(">QIII", REPLY_MAGIC, option, kind, len(data)) + data)

    def _flags(self) -> int:
        return (TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN
                | TF_SEND_CACHE)

    def _export_named(self, data: bytes, at: int) -> tuple[Export | None, int]:
        if len(data) < at + 4:
            raise ValueError("truncated")
        (n,) = struct.unpack_from(">I", data, at)
        if n > MAX_NAME or len(data) < at + 4 + n:
            raise ValueError("bad name length")
        name = data[at + 4 : at + 4 + n].decode(errors="replace")
        export = self.exports.get(name) or (self.default if n == 0 else None)
        return export, at + 4 + n

    async def _info(self, conn: _Conn, option: int, data: bytes) -> Export | None:
        try:
            export, at = self._export_named(data, 0)
            (count,) = struct.unpack_from(">H", data, at)
            if len(data) != at + 2 + 2 * count:
                raise ValueError("bad information request list")
        except (ValueError, struct.error):
            await self._reply(conn, option, REP_ERR_INVALID, b"malformed request")
            return None
        if export is None:
            await self._reply(conn, option, REP_ERR_UNKNOWN, b"no such export")
            return None
        await self._reply(conn, option, REP_INFO,
                          struct.pack(">HQH", INFO_EXPORT, export.size, self._flags()))
        await self._reply(conn, option, REP_INFO,
                          struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        await self._reply(conn, option, REP_ACK)
        return export

    async def _meta_context(self, conn: _Conn, option: int, data: bytes,
                            structured: bool) -> list[str] | None:
        try:
            export, at = self._export_named(data, 0)
            (count,) = struct.unpack_from(">I", data, at)
            at += 4
            if count > MAX_QUERIES:
                raise ValueError("too many queries")
            queries = []
            for _ in range(count):
                (n,) = struct.unpack_from(">I", data, at)
                if n > MAX_NAME or len(data) < at + 4 + n:
                    raise ValueError("bad query length")
                queries.append(data[at + 4 : at + 4 + n].decode(errors="replace"))
                at += 4 + n
            if at != len(data):
                raise ValueError("trailing data")
        except (ValueError, struct.error):
            await self._reply(conn, option, REP_ERR_INVALID, b"malformed request")
            return None
        if option == OPT_SET_META_CONTEXT and not structured:
            await self._reply(conn, option, REP_ERR_INVALID,
                              b"structured replies must be negotiated first")
            return None
        if export is None:
            await self._reply(conn, option, REP_ERR_UNKNOWN, b"no such export")
            return None
        available = export.contexts()
        if not queries and option == OPT_LIST_META_CONTEXT:
            chosen = available
        else:
            chosen = []
            for query in queries:
                for name in available:
                    namespace = name.split(":", 1)[0] + ":"
                    matches = query == name or (option == OPT_LIST_META_CONTEXT and (
                        query in (namespace, "qemu:dirty-bitmap:")
                        and name.startswith(query)))
                    if matches and name not in chosen:
                        chosen.append(name)
        for context_id, name in enumerate(chosen, 1):
            encoded = name.encode()
            await self._reply(conn, option, REP_META_CONTEXT,
                              struct.pack(">I", context_id if option == OPT_SET_META_CONTEXT
                                          else 0) + encoded)
        await self._reply(conn, option, REP_ACK)
        return chosen

    # -- transmission ---------------------------------------------------------------

    async def _transmission(self, conn: _Conn, export: Export, structured: bool,
                            contexts: list[str]) -> None:
        while True:
            magic, flags, kind, cookie, offset, length = struct.unpack(
                ">IHHQQI", await conn.read(28))
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"request magic {magic:#x}")
            self.statistics.requests += 1
            if kind == CMD_DISC:
                return
            if kind in (CMD_WRITE,):
                if length > MAX_REQUEST:
                    raise ProtocolError("write payload too long to skip")
                await self._skip(conn, length)
            error = self._check(export, kind, offset, length, structured, contexts)
            if error:
                await self._error(conn, structured, cookie, error)
            elif kind == CMD_READ:
                await self._read(conn, export, structured, cookie, offset, length)
            elif kind == CMD_BLOCK_STATUS:
                await self._block_status(conn, export, contexts, cookie, offset, length,
                                         bool(flags & CMD_FLAG_REQ_ONE))
            else:  # FLUSH, CACHE: nothing to do on a read-only export
                await self._done(conn, structured, cookie)

    def _check(self, export: Export, kind: int, offset: int, length: int, structured: bool,
               contexts: list[str]) -> int:
        if kind in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return errno.EPERM
        if kind not in (CMD_READ, CMD_FLUSH, CMD_CACHE, CMD_BLOCK_STATUS):
            return errno.EINVAL
        if kind == CMD_FLUSH:
            return errno.EINVAL if offset or length else 0
        if offset + length > export.size:
            return errno.EINVAL
        if kind == CMD_READ and (length == 0 or length > MAX_REQUEST):
            return errno.EINVAL
        if kind == CMD_BLOCK_STATUS and (not structured or not contexts or length == 0):
            return errno.EINVAL
        return 0

    async def _read(self, conn: _Conn, export: Export, structured: bool, cookie: int,
                    offset: int, length: int) -> None:
        try:
            data = await trio.to_thread.run_sync(export.pread, offset, length)
        except OSError as e:
            await self._error(conn, structured, cookie, errno.EIO, str(e.strerror or e))
            return
        data = data.ljust(length, b"\0")  # past a shrunk end: zeros, as a disk reads
        self.statistics.bytes_read += length
        if structured:
            await conn.send(struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                        REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)
                            + data)
        else:
            await conn.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie) + data)

    async def _block_status(self, conn: _Conn, export: Export, contexts: list[str],
                            cookie: int, offset: int, length: int, one: bool) -> None:
        for context_id, name in enumerate(contexts, 1):
            extents, inside, outside = export.extents_of(name)
            found = descriptors(extents, inside, outside, offset, length, one)
            payload = struct.pack(">I", context_id) + b"".join(
                struct.pack(">II", n, f) for n, f in found)
            last = context_id == len(contexts)
            await conn.send(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC,
                                        REPLY_FLAG_DONE if last else 0,
                                        REPLY_TYPE_BLOCK_STATUS, cookie, len(payload))
                            + payload)

    async def _done(self, conn: _Conn, structured: bool, cookie: int) -> None:
        if structured:
            await conn.send(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                        REPLY_TYPE_NONE, cookie, 0))
        else:
            await conn.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))

    async def _error(self, conn: _Conn, structured: bool, cookie: int, error: int,
                     message: str = "") -> None:
        if structured:
            text = (message or os.strerror(error)).encode()[:4096]
            payload = struct.pack(">IH", error, len(text)) + text
            await conn.send(struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                        REPLY_TYPE_ERROR, cookie, len(payload)) + payload)
        else:
            await conn.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie))


def file_export(name: str, fd: int, allocated: Extents,
                bitmaps: dict[str, Extents] | None = None) -> Export:
    """An export of the open file *fd* (its size now), read with pread."""
    size = os.fstat(fd).st_size

    def pread(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return Export(name=name, size=size, pread=pread, allocated=list(allocated),
                  bitmaps=dict(bitmaps or {}))
