"""The control socket: one JSON request per line, one JSON reply (or a stream) back.

Protocol (``docs/control-protocol.md`` has the full text)::

    → {"cmd": "status"}
    ← {"ok": true, "result": {...}}
    ← {"ok": false, "code": "unknown-command", "error": "one-line message"}

A handler may answer with a :class:`Stream` instead: every item it yields
goes out as ``{"event": ...}``, and a final ``{"ok": ...}`` line ends it.

The socket lives in :data:`RUN_DIR` under a name derived from the
mountpoint, so the CLI finds it from the mountpoint alone. It is created
with mode 0600 (root only) before it gets its public name, so there is no
moment in which anyone else could connect.

Robustness rules, each with a test: every request is validated and a bad
one gets a structured error while the connection stays usable; a line
longer than :data:`MAX_LINE` gets an error and the connection is closed; a
client that stops reading is dropped once a reply has waited
:data:`SEND_TIMEOUT_S` for it; a client that does not complete a request
line within :data:`IDLE_TIMEOUT_S` (of connecting, or of its previous reply)
is dropped; at most :data:`MAX_CLIENTS` connections are served at once, and
when that many are open a new one takes the place of the one that has been
idle longest, so idle clients can never lock commands out — only when every
connection is busy with a request is a new one turned away; running out of
file descriptors pauses accepting instead of ending the daemon; a handler
that fails unexpectedly is logged as an error and answered with
``internal-error`` — the mount outlives a bug in a control command. Clients
are served concurrently, so one of them can never hold up another.

This room knows nothing of FUSE or the datastore, nor what a command
means (``api.py`` does): the daemon hands it a table of :class:`Command`
(a handler and the arguments it takes; the server refuses any other key
before the handler runs), usually built with :func:`typed`, which decodes
the request into its ``api`` dataclass first. The client side
(:func:`call`, :func:`watch`) sends those dataclasses and decodes replies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from .api import Request, RequestError, check_args
from .errors import ControlError

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("FUSEDISK_RUN_DIR", "/run/fusedisk"))
#: Longest request line, newline excluded.
MAX_LINE = 64 * 1024
#: How long one reply may wait for a client to read it before the client is dropped.
SEND_TIMEOUT_S = 10.0
#: How long a client may take to send a complete request line, counted from
#: its connection or its previous reply; then it is answered ``idle-timeout``
#: and closed. (Counted per line, not per byte: a byte now and then is no line.)
IDLE_TIMEOUT_S = 10.0
#: Connections served at once. When that many are open, a new one takes the
#: place of the one idle longest (``idle-evicted``); only when none is idle is
#: the new one answered ``too-many-clients`` and closed.
MAX_CLIENTS = 64
#: Pause before accepting again when the process is out of file descriptors.
ACCEPT_RETRY_S = 0.5

_RECV_SIZE = 64 * 1024
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: Error codes that mean the client broke the protocol (logged as warnings).
_PROTOCOL_ERRORS = {"bad-json", "bad-request", "unknown-command", "bad-argument"}


class RequestRefused(ControlError):
    """The daemon answered a request with an error (client side); carries its ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Stream:
    """A handler's answer that is a series of events, ended by ``{"ok": true, "result": null}``.

    The server closes *events* (``aclose``) when the client goes away.
    """

    events: AsyncIterator[Any]


Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Q = TypeVar("Q", bound=Request[Any])
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Command:
    """A control command: its handler and the argument names it takes besides ``cmd``.

    The server refuses a request with any other key (``bad-argument``) before
    the handler runs, so no command can forget to. A bare handler in the
    server's table is a command that takes no arguments.
    """

    handler: Handler
    arguments: tuple[str, ...] = ()


def typed(kind: type[Q], handler: Callable[[Q], Awaitable[Any]]) -> Command:
    """The command *kind*: its request decoded (and checked) by ``api``, then *handler*."""

    async def decoded(request: dict[str, Any]) -> Any:
        return await handler(kind.decode(request))

    return Command(decoded, kind.arguments())


@dataclass(frozen=True, slots=True)
class ControlStatistics:
    clients: int  #: connections open now
    requests: int  #: request lines answered, ok or not
    refused: int  #: of those, answered with an error
    dropped: int  #: connections closed by the server (line too long, stopped reading, too many)


def socket_path(mountpoint: Path) -> Path:
    """Where the daemon serving *mountpoint* listens."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:20]
    return RUN_DIR / f"{digest}.sock"


def mount_relative(mountpoint: Path, path: str | os.PathLike[str]) -> str:
    """*path* (absolute, or relative to the current directory) relative to *mountpoint*.

    For the CLI: raises ControlError when *path* is not inside the mount.
    Purely lexical, so it never stats anything on the mount.
    """
    root = os.path.abspath(mountpoint)
    full = os.path.abspath(path)
    if full == root or not full.startswith(root.rstrip("/") + "/"):
        raise ControlError(f"{path} is not a path inside the datastore {mountpoint}")
    return full[len(root.rstrip("/")) + 1 :]


# -- the server ----------------------------------------------------------------------


class _Connection:
    """The server's view of one client (only the server's tasks change it)."""

    __slots__ = ("evicted", "idle_since", "waiting")

    def __init__(self) -> None:
        #: when it began to wait for its next request line; None while one is served
        self.idle_since: float | None = None
        #: the scope of its wait for input, while it waits: cancelled to evict it
        self.waiting: trio.CancelScope | None = None
        #: it gave its place to a new connection and is being closed
        self.evicted = False


class ControlServer:
    """Serves the commands in *commands* on the socket for *mountpoint*."""

    def __init__(self, mountpoint: Path, commands: Mapping[str, Command | Handler]) -> None:
        self.path = socket_path(mountpoint)
        self._commands = {
            name: command if isinstance(command, Command) else Command(command)
            for name, command in commands.items()
        }
        #: connections being served (not those turned away or evicted)
        self._serving: set[_Connection] = set()
        self._clients = 0
        self._requests = 0
        self._refused = 0
        self._dropped = 0

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(self._clients, self._requests, self._refused, self._dropped)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = await self._bind()
        try:
            listener = trio.SocketListener(sock)
        except BaseException:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                log.info("control socket listening on %s", self.path)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        if e.errno not in _ACCEPT_RESOURCE_ERRORS:
                            raise
                        log.warning("control socket: cannot accept (%s); retrying", e.strerror)
                        await trio.sleep(ACCEPT_RETRY_S)
                        continue
                    nursery.start_soon(self._serve_client, stream)
        finally:
            self.path.unlink(missing_ok=True)

    async def _bind(self) -> trio.socket.SocketType:
        """A listening socket at :attr:`path`, mode 0600 from the moment it has that name.

        The daemon runs with umask 0, so the socket is bound inside a private
        (0700) directory, restricted there, then renamed into place.
        """
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        private = RUN_DIR / f".{self.path.stem}.{os.getpid()}.tmp"
        _remove_private_dir(private)
        os.mkdir(private, 0o700)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staged = private / "sock"
            await sock.bind(str(staged))
            os.chmod(staged, 0o600)
            os.rename(staged, self.path)
            # a burst of connections waits in the queue (a client with a timeout
            # would get EAGAIN from a full one); the limit applies once accepted
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        finally:
            _remove_private_dir(private)
        return sock

    def _admit(self) -> bool:
        """Whether a new connection may be served: a free place, or an idle client's.

        No await: the count and the eviction are one step.
        """
        if len(self._serving) < MAX_CLIENTS:
            return True
        idle = [c for c in self._serving if c.waiting is not None and c.idle_since is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since or 0.0)
        oldest.evicted = True
        self._serving.discard(oldest)
        assert oldest.waiting is not None
        oldest.waiting.cancel()
        return True

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        peer = _peer_pid(stream)
        self._clients += 1
        connection = _Connection()
        admitted = self._admit()
        if admitted:
            self._serving.add(connection)
        try:
            async with stream:
                if not admitted:
                    log.warning("control client pid %s turned away: too many clients", peer)
                    self._dropped += 1
                    await self._send(stream, _error(
                        "too-many-clients", f"too many control connections busy with a "
                        f"request (at most {MAX_CLIENTS})"))
                    return
                await self._serve_lines(stream, connection, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except trio.TooSlowError:
            log.warning("control client pid %s stopped reading its replies: dropped", peer)
            self._dropped += 1
        finally:
            self._serving.discard(connection)
            self._clients -= 1

    async def _serve_lines(
        self, stream: trio.SocketStream, connection: _Connection, peer: int | None
    ) -> None:
        """Answer request lines in order until the client hangs up, sends too much,
        takes too long to send a line, or gives its place to a new client."""
        buffer = bytearray()
        while True:
            newline = buffer.find(b"\n")
            if newline > MAX_LINE or (newline < 0 and len(buffer) > MAX_LINE):
                log.warning("control client pid %s sent a line over %d bytes: dropped",
                            peer, MAX_LINE)
                self._dropped += 1
                await self._send(stream, _error(
                    "line-too-long", f"request line longer than {MAX_LINE} bytes"))
                return
            if newline < 0:
                if connection.idle_since is None:
                    connection.idle_since = trio.current_time()
                chunk = None
                with trio.CancelScope(deadline=connection.idle_since + IDLE_TIMEOUT_S) as scope:
                    connection.waiting = scope
                    chunk = await stream.receive_some(_RECV_SIZE)
                connection.waiting = None
                if chunk is None:
                    await self._drop_idle(stream, connection, peer, partial=bool(buffer))
                    return
                if not chunk:
                    return
                buffer += chunk
                continue
            connection.idle_since = None
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            await self._answer(stream, line, peer)

    async def _drop_idle(
        self, stream: trio.SocketStream, connection: _Connection, peer: int | None,
        partial: bool,
    ) -> None:
        """Tell an idle client why it is closed (if it still listens), then let it go."""
        self._dropped += 1
        if connection.evicted:
            log.info("control client pid %s, idle, closed to make room for a new one", peer)
            reply = _error("idle-evicted", "closed to make room for a new connection: "
                           f"{MAX_CLIENTS} were open and this one sent no request")
        else:
            report = log.warning if partial else log.info
            report("control client pid %s sent no complete request line in %g s: closed",
                   peer, IDLE_TIMEOUT_S)
            reply = _error("idle-timeout",
                           f"no complete request line within {IDLE_TIMEOUT_S:g} s")
        with contextlib.suppress(trio.TooSlowError):
            await self._send(stream, reply)

    async def _answer(self, stream: trio.SocketStream, line: bytes, peer: int | None) -> None:
        self._requests += 1
        reply = await self._dispatch(line)
        if isinstance(reply, Stream):
            reply = await self._send_stream(stream, reply)
        if not reply["ok"]:
            self._refused += 1
            if reply["code"] in _PROTOCOL_ERRORS:
                log.warning("control client pid %s: %s", peer, reply["error"])
        await self._send(stream, reply)

    async def _dispatch(self, line: bytes) -> dict[str, Any] | Stream:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return _error("bad-json", "request is not valid JSON")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error("bad-request", 'request must be a JSON object with a string "cmd"')
        cmd = request["cmd"]
        command = self._commands.get(cmd)
        if command is None:
            known = ", ".join(sorted(self._commands))
            return _error("unknown-command", f"unknown command {cmd[:64]!r} (known: {known})")
        try:
            check_args(request, *command.arguments)
            result = await command.handler(request)
        except RequestError as e:
            return _error(e.code, str(e))
        except Exception:
            log.exception("control command %r failed", cmd)
            return _internal_error(cmd)
        if isinstance(result, Stream):
            return result
        return {"ok": True, "result": result}

    async def _send_stream(self, stream: trio.SocketStream, events: Stream) -> dict[str, Any]:
        """Send every event; return the closing line (the caller sends it)."""
        iterator = events.events
        try:
            async for event in iterator:
                await self._send(stream, {"event": event})
        except RequestError as e:
            return _error(e.code, str(e))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # the client hung up (it has what it wanted): no error of ours
            log.debug("control event stream: the client went away")
            return {"ok": True, "result": None}
        except Exception:
            log.exception("control event stream failed")
            return _internal_error("stream")
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
        return {"ok": True, "result": None}

    async def _send(self, stream: trio.SocketStream, reply: dict[str, Any]) -> None:
        try:
            data = json.dumps(reply).encode() + b"\n"
        except (TypeError, ValueError):
            log.exception("control reply cannot be encoded as JSON")
            data = json.dumps(_error("internal-error", "the reply could not be encoded")).encode()
            data += b"\n"
        with trio.fail_after(SEND_TIMEOUT_S):
            await stream.send_all(data)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


def _internal_error(cmd: str) -> dict[str, Any]:
    return _error("internal-error", f"command {cmd!r} failed inside the daemon; see its log")


def _peer_pid(stream: trio.SocketStream) -> int | None:
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def _remove_private_dir(path: Path) -> None:
    try:
        (path / "sock").unlink(missing_ok=True)
        path.rmdir()
    except FileNotFoundError:
        pass


# -- the client (blocking, for the CLI) ---------------------------------------------------


def _connect(mountpoint: Path, timeout_s: float | None) -> socket.socket:
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlError(f"{mountpoint} is not served by a running fusedisk daemon") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"permission denied on the control socket of {mountpoint} "
                           "(only root may control a datastore)") from None
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot reach the daemon of {mountpoint}: {e.strerror}") from None
    return sock


def _lines(sock: socket.socket, mountpoint: Path) -> Iterator[dict[str, Any]]:
    """The daemon's reply lines, parsed; ControlError on anything unexpected."""
    buffer = b""
    while True:
        newline = buffer.find(b"\n")
        if newline >= 0:
            line, buffer = buffer[:newline], buffer[newline + 1 :]
            try:
                reply = json.loads(line)
            except ValueError:
                raise ControlError(f"the daemon of {mountpoint} sent a garbled reply") from None
            if not isinstance(reply, dict):
                raise ControlError(f"the daemon of {mountpoint} sent a garbled reply")
            yield reply
            continue
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            raise ControlError(f"the daemon of {mountpoint} did not answer in time") from None
        except OSError as e:
            raise ControlError(f"control connection failed: {e.strerror}") from None
        if not chunk:
            raise ControlError("the daemon closed the connection without answering")
        buffer += chunk


def _send_request(sock: socket.socket, mountpoint: Path, cmd: str, args: dict[str, Any]) -> None:
    try:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
    except TimeoutError:
        raise ControlError(f"the daemon of {mountpoint} did not answer in time") from None
    except OSError as e:
        raise ControlError(f"control connection failed: {e.strerror}") from None


def _result(reply: dict[str, Any]) -> Any:
    if reply.get("ok") is True:
        return reply.get("result")
    raise RequestRefused(str(reply.get("code", "error")), str(reply.get("error", "request failed")))


def request(mountpoint: Path, cmd: str, timeout_s: float = 30.0, **args: Any) -> Any:
    """Send one request to the daemon of *mountpoint* and return its result.

    Raises ControlError (RequestRefused when the daemon said no) with a
    one-line message on any failure.
    """
    with _connect(mountpoint, timeout_s) as sock:
        _send_request(sock, mountpoint, cmd, args)
        for reply in _lines(sock, mountpoint):
            return _result(reply)
    raise AssertionError("unreachable")


def events(mountpoint: Path, cmd: str, timeout_s: float | None = None,
           **args: Any) -> Iterator[Any]:
    """Send a streaming request; yield each event until the daemon ends the stream.

    A plain (non-streaming) reply ends the iteration at once. Closing the
    generator closes the connection, which ends the stream in the daemon.
    """
    with _connect(mountpoint, timeout_s) as sock:
        _send_request(sock, mountpoint, cmd, args)
        for reply in _lines(sock, mountpoint):
            if "event" in reply and "ok" not in reply:
                yield reply["event"]
                continue
            _result(reply)
            return


def call(mountpoint: Path, req: Request[R], timeout_s: float = 30.0) -> R:
    """Send *req* to the daemon of *mountpoint*; its reply, decoded (see api.Request.reply)."""
    return req.reply(request(mountpoint, req.command, timeout_s, **_arguments(req)))


def watch(mountpoint: Path, req: Request[Any], timeout_s: float | None = None) -> Iterator[Any]:
    """The events of the streaming request *req*, raw (the caller knows their type)."""
    return events(mountpoint, req.command, timeout_s, **_arguments(req))


def _arguments(req: Request[Any]) -> dict[str, Any]:
    wire = req.encode()
    del wire["cmd"]
    return wire
