"""The control socket: one JSON request per line, one JSON response per line.

Protocol (documented in README.md, "Control protocol")::

    → {"cmd": "status"}
    ← {"ok": true, "result": {...}}
    ← {"ok": false, "error": "one-line message", "code": "unknown-command"}

The socket lives in :data:`RUN_DIR` under a name derived from the
mountpoint, so the CLI finds it from the mountpoint alone. It is a Unix
socket with mode 0600 (root only). Every request is validated; a bad one
gets a structured error and the connection stays usable. Lines longer than
:data:`MAX_LINE` close the connection. The server never waits on a client
for long: a client that stops reading is dropped after
:data:`SEND_TIMEOUT_S`.

This room knows nothing of FUSE or the datastore: the composition root hands
it a table of command handlers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .errors import ControlError

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("FUSEDISK_RUN_DIR", "/run/fusedisk"))
MAX_LINE = 64 * 1024
SEND_TIMEOUT_S = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class RequestError(Exception):
    """A request was understood but refused; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def socket_path(mountpoint: Path) -> Path:
    """Where the daemon serving *mountpoint* listens."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:20]
    return RUN_DIR / f"{digest}.sock"


class ControlServer:
    """Serves the handlers in *handlers* on the socket for *mountpoint*."""

    def __init__(self, mountpoint: Path, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(mountpoint)
        self._handlers = handlers

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)
            await sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
            listener = trio.SocketListener(sock)
        except BaseException:
            sock.close()
            raise
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                log.info("control socket listening on %s", self.path)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_client, stream)
        finally:
            self.path.unlink(missing_ok=True)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = bytearray()
            try:
                while True:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        if len(buffer) > MAX_LINE:
                            await self._send(stream, _error("line-too-long", "request too long"))
                            return
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buffer += chunk
                        continue
                    line = bytes(buffer[:newline])
                    del buffer[: newline + 1]
                    if len(line) > MAX_LINE:
                        await self._send(stream, _error("line-too-long", "request too long"))
                        return
                    await self._send(stream, await self._dispatch(line))
            except (trio.BrokenResourceError, trio.ClosedResourceError, TimeoutError):
                return

    async def _send(self, stream: trio.SocketStream, reply: dict[str, Any]) -> None:
        with trio.fail_after(SEND_TIMEOUT_S):
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return _error("bad-json", "request is not valid JSON")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _error("bad-request", 'request must be an object with a string "cmd"')
        handler = self._handlers.get(request["cmd"])
        if handler is None:
            return _error("unknown-command", f"unknown command {request['cmd']!r}")
        try:
            return {"ok": True, "result": await handler(request)}
        except RequestError as e:
            return _error(e.code, str(e))


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


def request(mountpoint: Path, cmd: str, timeout_s: float = 30.0, **args: Any) -> Any:
    """Send one request to the daemon of *mountpoint*; blocking client for the CLI.

    Raises ControlError with a one-line message on any failure.
    """
    path = socket_path(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"{mountpoint} is not served by a running fusedisk daemon") from None
        except OSError as e:
            raise ControlError(f"cannot reach the daemon of {mountpoint}: {e.strerror}") from None
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ControlError("the daemon closed the connection without answering")
                data += chunk
        except TimeoutError:
            raise ControlError(f"the daemon of {mountpoint} did not answer in time") from None
        except OSError as e:
            raise ControlError(f"control connection failed: {e.strerror}") from None
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return reply["result"]
