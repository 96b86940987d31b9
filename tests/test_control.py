"""The control socket: argument helpers, the server in-process, the protocol against a daemon.

In-process tests run :class:`ControlServer` on a trio loop with the
autojump clock, so timeouts are exercised deterministically. Protocol tests
talk raw bytes to a real daemon in a subprocess and, after every abuse,
check that the same daemon still serves its mount and a second client.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fusedisk import api, control
from fusedisk.api import RequestError
from fusedisk.control import ControlServer, Stream
from fusedisk.errors import ControlError

from .mounting import READY_TIMEOUT_S, MountedDatastore, fusedisk

# -- argument helpers --------------------------------------------------------------------


def refused(call: Any, *args: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "../etc", "a\0b", "x" * 256,
                                  "\ud800"])
def test_entry_arg_refuses_what_is_not_a_single_name(name: str) -> None:
    error = refused(api.entry_arg, {"cmd": "x", "entry": name})
    assert error.code == "bad-argument"
    assert "'entry'" in str(error)


def test_entry_arg_accepts_names_and_checks_types() -> None:
    assert api.entry_arg({"entry": "web01"}) == "web01"
    assert api.entry_arg({"entry": ".hidden vm"}) == ".hidden vm"
    assert api.entry_arg({"entry": "é" * 127}) == "é" * 127  # 254 bytes
    assert refused(api.entry_arg, {}).args == ("argument 'entry' is missing",)
    for wrong in (5, None, ["web01"], {"name": "web01"}, True):
        assert str(refused(api.entry_arg, {"entry": wrong})) == \
            "argument 'entry' must be a string"


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "vm1/../../etc", "vm1//disk",
                                  "vm1/./disk", "vm1/", "", "vm1/\0"])
def test_path_arg_refuses_paths_that_could_leave_an_entry(path: str) -> None:
    assert refused(api.path_arg, {"path": path}).code == "bad-argument"


def test_path_arg_splits_into_components() -> None:
    assert api.path_arg({"path": "vm1/disk0.qcow2"}) == ("vm1", "disk0.qcow2")
    assert api.path_arg({"path": "top.img"}) == ("top.img",)


def test_scalar_arguments() -> None:
    req = {"n": 5, "flag": True, "s": "x", "size": "64K", "bytes": 4096}
    assert api.int_arg(req, "n", minimum=0, maximum=10) == 5
    assert api.int_arg(req, "absent", 7) == 7
    assert str(refused(api.int_arg, req, "flag")) == "argument 'flag' must be an integer"
    assert str(refused(api.int_arg, req, "n", maximum=4)) == "argument 'n' must be at most 4"
    assert str(refused(api.int_arg, req, "n", minimum=6)) == \
        "argument 'n' must be at least 6"
    assert api.bool_arg(req, "flag") is True
    assert api.bool_arg(req, "absent", False) is False
    assert refused(api.bool_arg, req, "n").code == "bad-argument"
    assert api.str_arg(req, "s") == "x"
    assert api.str_arg(req, "absent", None) is None
    assert api.size_arg(req, "size") == 64 << 10
    assert api.size_arg(req, "bytes") == 4096
    assert "is not a size" in str(refused(api.size_arg, {"r": "fast"}, "r"))
    assert refused(api.size_arg, {"r": -1}, "r").code == "bad-argument"
    api.check_args({"cmd": "x", "entry": "a"}, "entry")
    assert str(refused(api.check_args, {"cmd": "x", "entyr": "a"}, "entry")) == \
        "unknown argument 'entyr'"


@pytest.mark.parametrize("value", ["1e400", "inf", "-inf", "nan", "1e30", "2T", 2 << 40,
                                   10 ** 30, 1.5, float("inf"), -1, True, None])
def test_size_arg_refuses_what_is_past_its_maximum_or_no_size(value: Any) -> None:
    error = refused(api.size_arg, {"rate": value}, "rate", maximum=1 << 40)
    assert error.code == "bad-argument" and "'rate'" in str(error)
    assert "\n" not in str(error)


def test_size_arg_accepts_its_maximum() -> None:
    assert api.size_arg({"rate": "1T"}, "rate", maximum=1 << 40) == 1 << 40
    assert api.size_arg({"rate": 1 << 40}, "rate", maximum=1 << 40) == 1 << 40
    assert api.size_arg({"rate": 0}, "rate", maximum=1 << 40) == 0


def test_mount_relative_is_lexical_and_stays_inside(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    assert control.mount_relative(mnt, mnt / "vm1" / "disk") == "vm1/disk"
    assert control.mount_relative(mnt, f"{mnt}/vm1/../vm2/disk") == "vm2/disk"
    for outside in (mnt, tmp_path, f"{mnt}/../etc", f"{mnt}2/vm1"):
        with pytest.raises(ControlError, match="not a path inside the datastore"):
            control.mount_relative(mnt, outside)


# -- the server, in-process ------------------------------------------------------------


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private RUN_DIR (socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fdc", dir="/tmp"))
    monkeypatch.setattr(control, "RUN_DIR", path)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


class Client:
    """A trio client that sends raw lines and reads reply lines."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
        await self.stream.send_all(data)

    async def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def ask(self, obj: Any) -> dict[str, Any]:
        await self.send(obj)
        reply = await self.line()
        assert reply is not None, "connection closed without a reply"
        return reply


async def ping(request: dict[str, Any]) -> str:
    return "pong"


@pytest.fixture
async def serve(run_dir: Path) -> AsyncIterator[Any]:
    """``await serve(handlers)`` starts a ControlServer for the test's lifetime."""
    async with trio.open_nursery() as nursery:

        async def start(handlers: dict[str, control.Handler]) -> ControlServer:
            server = ControlServer(Path("/test/mnt"), {"ping": ping, **handlers})
            await nursery.start(server.run)
            return server

        yield start
        nursery.cancel_scope.cancel()


async def test_socket_is_root_only_from_the_start(serve: Any, run_dir: Path) -> None:
    server = await serve({})
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    leftovers = [p.name for p in await trio.Path(run_dir).iterdir()]
    assert leftovers == [server.path.name]  # no staging directory left behind
    assert (await (await Client.connect(server.path)).ask({"cmd": "ping"})) == \
        {"ok": True, "result": "pong"}


async def test_client_that_stops_reading_is_dropped_and_others_are_served(
    serve: Any, autojump_clock: trio.testing.MockClock
) -> None:
    async def big(request: dict[str, Any]) -> str:
        return "x" * (8 << 20)  # far more than the socket buffers hold

    server = await serve({"big": big})
    stuck = await Client.connect(server.path)
    await stuck.send({"cmd": "big"})
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().clients == 1

    other = await Client.connect(server.path)
    assert await other.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}

    for _ in range(int(control.SEND_TIMEOUT_S) + 1):  # `other` keeps talking meanwhile
        await trio.sleep(1)
        assert await other.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    stats = server.statistics()
    assert stats.dropped == 1
    assert stats.clients == 1  # `other`, still connected
    received = 0
    while chunk := await stuck.stream.receive_some(1 << 20):
        received += len(chunk)
    assert 0 < received < 8 << 20  # part of the reply, then the server hung up
    assert await other.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}


async def test_stream_sends_events_then_a_final_line(serve: Any) -> None:
    async def count(request: dict[str, Any]) -> Stream:
        async def events() -> AsyncIterator[dict[str, int]]:
            for n in range(3):
                yield {"n": n}
        return Stream(events())

    server = await serve({"count": count})
    client = await Client.connect(server.path)
    await client.send({"cmd": "count"})
    assert [await client.line() for _ in range(4)] == [
        {"event": {"n": 0}}, {"event": {"n": 1}}, {"event": {"n": 2}},
        {"ok": True, "result": None},
    ]
    assert await client.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}


async def test_stream_is_closed_when_its_client_goes_away(
    serve: Any, autojump_clock: trio.testing.MockClock
) -> None:
    closed = trio.Event()

    async def watch(request: dict[str, Any]) -> Stream:
        async def events() -> AsyncIterator[int]:
            try:
                n = 0
                while True:
                    yield n
                    n += 1
                    await trio.sleep(1)
            finally:
                closed.set()
        return Stream(events())

    server = await serve({"watch": watch})
    client = await Client.connect(server.path)
    await client.send({"cmd": "watch"})
    assert await client.line() == {"event": 0}
    assert await client.line() == {"event": 1}
    await client.stream.aclose()
    await closed.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().clients == 0


async def test_stream_error_ends_with_a_structured_error(serve: Any) -> None:
    async def failing(request: dict[str, Any]) -> Stream:
        async def events() -> AsyncIterator[str]:
            yield "started"
            raise RequestError("copy-failed", "destination full")
        return Stream(events())

    server = await serve({"failing": failing})
    client = await Client.connect(server.path)
    await client.send({"cmd": "failing"})
    assert await client.line() == {"event": "started"}
    assert await client.line() == {"ok": False, "code": "copy-failed",
                                   "error": "destination full"}


async def test_a_failing_handler_is_an_internal_error_not_a_crash(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def buggy(request: dict[str, Any]) -> None:
        raise KeyError("oops")

    async def unencodable(request: dict[str, Any]) -> object:
        return object()

    server = await serve({"buggy": buggy, "unencodable": unencodable})
    client = await Client.connect(server.path)
    reply = await client.ask({"cmd": "buggy"})
    assert reply["ok"] is False and reply["code"] == "internal-error"
    assert "'buggy' failed inside the daemon" in reply["error"]
    reply = await client.ask({"cmd": "unencodable"})
    assert reply["ok"] is False and reply["code"] == "internal-error"
    assert await client.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and errors[0].exc_info is not None


async def test_too_many_busy_clients_turn_the_next_one_away(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    release = trio.Event()

    async def hold(request: dict[str, Any]) -> str:
        await release.wait()
        return "released"

    server = await serve({"hold": hold})
    first, second = [await Client.connect(server.path) for _ in range(2)]
    for client in (first, second):
        await client.send({"cmd": "hold"})
    await trio.testing.wait_all_tasks_blocked()
    third = await Client.connect(server.path)  # both slots are serving a request
    reply = await third.line()
    assert reply is not None and reply["code"] == "too-many-clients"
    assert await third.line() is None  # and closed
    release.set()
    for client in (first, second):
        assert await client.line() == {"ok": True, "result": "released"}
    await first.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    fourth = await Client.connect(server.path)
    assert await fourth.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    assert (await second.ask({"cmd": "ping"}))["ok"]


async def test_a_client_that_sends_no_complete_line_is_dropped(
    serve: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await serve({})
    slow = await Client.connect(server.path)
    await slow.send(b'{"cmd": "pi')  # half a line, then a byte now and then
    talker = await Client.connect(server.path)
    for _ in range(2):
        await trio.sleep(control.IDLE_TIMEOUT_S * 0.4)
        await slow.send(b" ")
        assert await talker.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    await trio.sleep(control.IDLE_TIMEOUT_S * 0.4)
    assert await talker.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    reply = await slow.line()  # the bytes never made a line in time
    assert reply is not None and reply["code"] == "idle-timeout"
    assert await slow.line() is None
    assert await talker.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    await trio.sleep(control.IDLE_TIMEOUT_S + 1)  # an idle connection goes as well
    reply = await talker.line()
    assert reply is not None and reply["code"] == "idle-timeout"
    assert await talker.line() is None
    await trio.testing.wait_all_tasks_blocked()
    stats = server.statistics()
    assert (stats.clients, stats.dropped) == (0, 2)


async def test_when_full_the_longest_idle_client_makes_room(
    serve: Any, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    server = await serve({})
    oldest = await Client.connect(server.path)
    await oldest.send(b'{"cmd": "pi')
    await trio.sleep(1)
    newer = await Client.connect(server.path)
    assert await newer.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    await trio.testing.wait_all_tasks_blocked()
    # Full, both idle: a new client is served at once, and the oldest idle one goes.
    late = await Client.connect(server.path)
    assert await late.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    reply = await oldest.line()
    assert reply is not None and reply["code"] == "idle-evicted"
    assert await oldest.line() is None
    assert await newer.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().clients == 2


async def test_every_handler_declares_its_arguments(serve: Any) -> None:
    async def echo(request: dict[str, Any]) -> Any:
        return request.get("x")

    server = await serve({"echo": control.Command(echo, ("x",))})
    client = await Client.connect(server.path)
    assert await client.ask({"cmd": "echo", "x": 1}) == {"ok": True, "result": 1}
    for request in ({"cmd": "echo", "y": 1}, {"cmd": "ping", "x": 1}):
        reply = await client.ask(request)
        assert reply["code"] == "bad-argument"
        assert reply["error"].startswith("unknown argument ")


async def test_running_out_of_descriptors_pauses_accepting(
    serve: Any, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_accept = trio.SocketListener.accept
    failures = [OSError(errno.EMFILE, os.strerror(errno.EMFILE))]

    async def accept(self: trio.SocketListener) -> trio.SocketStream:
        if failures:
            await trio.lowlevel.checkpoint()
            raise failures.pop()
        return await real_accept(self)

    monkeypatch.setattr(trio.SocketListener, "accept", accept)
    server = await serve({})
    client = await Client.connect(server.path)
    assert await client.ask({"cmd": "ping"}) == {"ok": True, "result": "pong"}
    assert failures == []
    assert any("cannot accept" in r.getMessage() for r in caplog.records)


# -- the protocol against a real daemon -----------------------------------------------------


class RawClient:
    """A blocking client on the daemon's control socket that sends raw bytes."""

    def __init__(self, mnt: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(READY_TIMEOUT_S)  # a hang guard, not a measurement
        self.sock.connect(str(control.socket_path(mnt)))
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, data: bytes | dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        reply = self.line()
        assert reply is not None, "the daemon closed the connection"
        return reply


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert isinstance(reply["error"], str) and "\n" not in reply["error"]
    code: str = reply["code"]
    return code


def assert_still_serving(ds: MountedDatastore) -> None:
    """The daemon is alive, its mount answers and a fresh client gets a status."""
    assert ds.proc is not None and ds.proc.poll() is None
    probe = ds.mnt / "probe.bin"
    data = os.urandom(100_000)
    probe.write_bytes(data)
    assert probe.read_bytes() == data
    probe.unlink()
    status = ds.status()
    assert set(status) >= {"stores", "placement", "jobs"}


@pytest.fixture
def client(datastore: MountedDatastore) -> Iterator[RawClient]:
    c = RawClient(datastore.mnt)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("line", [
    b"{not json\n", b"\xff\xfe\n", b'{"cmd": "status"\n', b"\n", b"[" * 60_000 + b"\n",
    b'{"cmd": "status", "n": ' + b"9" * 5000 + b"}\n",
])
def test_malformed_json(datastore: MountedDatastore, client: RawClient, line: bytes) -> None:
    assert error_code(client.ask(line)) == "bad-json"
    assert client.ask({"cmd": "status"})["ok"] is True  # the same connection goes on
    assert_still_serving(datastore)


@pytest.mark.parametrize("line", [b"[]\n", b'"status"\n', b"5\n", b"null\n", b"{}\n",
                                  b'{"cmd": 5}\n', b'{"cmd": ["status"]}\n',
                                  b'{"command": "status"}\n'])
def test_not_a_request_object(datastore: MountedDatastore, client: RawClient,
                              line: bytes) -> None:
    reply = client.ask(line)
    assert error_code(reply) == "bad-request"
    assert reply["error"] == 'request must be a JSON object with a string "cmd"'
    assert_still_serving(datastore)


def test_unknown_command(datastore: MountedDatastore, client: RawClient) -> None:
    reply = client.ask({"cmd": "format-everything"})
    assert error_code(reply) == "unknown-command"
    assert reply["error"].startswith("unknown command 'format-everything' (known: ")
    assert "status" in reply["error"]
    assert client.ask({"cmd": "status"})["ok"] is True
    assert_still_serving(datastore)


def test_wrong_argument_types(datastore: MountedDatastore, client: RawClient) -> None:
    (datastore.mnt / "vm1").mkdir()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cmd": "locate"}, "argument 'entry' is missing"),
        ({"cmd": "locate", "entry": 5}, "argument 'entry' must be a string"),
        ({"cmd": "locate", "entry": None}, "argument 'entry' must be a string"),
        ({"cmd": "locate", "entry": ["vm1"]}, "argument 'entry' must be a string"),
        ({"cmd": "locate", "entry": "vm1", "force": True}, "unknown argument 'force'"),
    ]
    for request, message in cases:
        reply = client.ask(request)
        assert error_code(reply) == "bad-argument"
        assert reply["error"] == message
    assert client.ask({"cmd": "locate", "entry": "vm1"}) == {"ok": True, "result": {
        "entry": "vm1", "store": "a", "path": str(datastore.stores["a"] / "vm1")}}
    assert_still_serving(datastore)


def test_names_that_are_not_entries(datastore: MountedDatastore, client: RawClient) -> None:
    (datastore.mnt / "vm1").mkdir()
    for name in ["..", ".", "", "../state", "vm1/..", "/etc", "vm1/../../etc"]:
        assert error_code(client.ask({"cmd": "locate", "entry": name})) == "bad-argument", name
    for name in ["nosuch", ".fusedisk-scratch", "VM1"]:
        reply = client.ask({"cmd": "locate", "entry": name})
        assert error_code(reply) == "unknown-entry"
        assert reply["error"] == f"{name!r} is not an entry of {datastore.mnt}"
    assert_still_serving(datastore)


def test_paths_that_try_to_leave_the_datastore(
    datastore: MountedDatastore, client: RawClient
) -> None:
    vm = datastore.mnt / "vm1"
    vm.mkdir()
    (vm / "disk").write_bytes(b"\0" * 4096)
    os.symlink("/etc/passwd", vm / "passwd")
    os.symlink("../../state", vm / "state")
    for path in ["../state/datastore.state", "/etc/passwd", "vm1/../../etc/passwd",
                 "vm1/./disk", "vm1//disk"]:
        reply = client.ask({"cmd": "cbt-info", "path": path})
        assert error_code(reply) == "bad-argument", path
    for path in ["vm1/passwd", "vm1/state/datastore.state", "vm1/nosuch", "nosuch/disk"]:
        reply = client.ask({"cmd": "cbt-info", "path": path})
        assert error_code(reply) == "bad-path", (path, reply)
    assert client.ask({"cmd": "cbt-info", "path": "vm1/disk"})["ok"] is True
    assert_still_serving(datastore)


def test_oversized_line_is_refused_and_closed(
    datastore: MountedDatastore, client: RawClient
) -> None:
    huge = b'{"cmd": "status", "pad": "' + b"x" * (4 * control.MAX_LINE)
    try:
        client.sock.sendall(huge)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon hung up before taking it all: as it should
    reply = client.line()
    assert reply is not None
    assert error_code(reply) == "line-too-long"
    try:  # closed by the daemon: end of file, or a reset for the bytes it never read
        assert client.line() is None
    except ConnectionResetError:
        pass
    assert_still_serving(datastore)


def test_a_line_at_the_limit_is_still_read(datastore: MountedDatastore,
                                           client: RawClient) -> None:
    request = b'{"cmd": "status", "pad": "'
    request += b"x" * (control.MAX_LINE - len(request) - 2) + b'"}'
    assert len(request) == control.MAX_LINE
    reply = client.ask(request + b"\n")
    assert reply.get("code") != "line-too-long"  # read and answered (ok, or "pad" refused)
    assert client.ask({"cmd": "status"})["ok"] is True


def test_client_that_never_reads_does_not_block_others(datastore: MountedDatastore) -> None:
    flooder = RawClient(datastore.mnt)
    try:
        flooder.sock.setblocking(False)
        request = json.dumps({"cmd": "status"}).encode() + b"\n"
        sent = 0
        # Send until the daemon stops reading from us: it is then blocked writing
        # replies we never read, and our own send buffer fills up.
        while True:
            try:
                sent += flooder.sock.send(request * 64)
            except BlockingIOError:
                break
        assert sent > 64 * len(request)
        other = RawClient(datastore.mnt)
        try:
            assert other.ask({"cmd": "status"})["ok"] is True
        finally:
            other.close()
        assert_still_serving(datastore)
    finally:
        flooder.close()
    assert_still_serving(datastore)


def test_only_root_may_connect(datastore: MountedDatastore) -> None:
    path = control.socket_path(datastore.mnt)
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    pid = os.fork()
    if pid == 0:  # child: become nobody and try
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
        except PermissionError:
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a non-root user could connect"
    assert_still_serving(datastore)


def known_commands(client: RawClient) -> list[str]:
    reply = client.ask({"cmd": "no-such-command"})
    assert error_code(reply) == "unknown-command"
    known: str = reply["error"].split("(known: ", 1)[1].rstrip(")")
    return known.split(", ")


def test_every_command_refuses_unknown_arguments(
    datastore: MountedDatastore, client: RawClient
) -> None:
    (datastore.mnt / "vm1").mkdir()
    commands = known_commands(client)
    assert {"status", "locate", "migrate", "pause", "resume", "cancel", "rate",
            "cbt-checkpoint", "cbt-changes", "cbt-info"} <= set(commands)
    for cmd in commands:
        reply = client.ask({"cmd": cmd, "frobnicate": True})
        assert error_code(reply) == "bad-argument", cmd
        assert reply["error"] == "unknown argument 'frobnicate'", cmd
    assert datastore.status()["jobs"] == []  # no migrate ran with a bad request
    assert_still_serving(datastore)


@pytest.mark.parametrize("rate", ["1e400", "inf", "nan", "1e30", "2T", 2 << 40, 10 ** 30,
                                  -1, 1.5])
def test_migrate_refuses_absurd_rates(datastore: MountedDatastore, client: RawClient,
                                      rate: Any) -> None:
    (datastore.mnt / "vm1").mkdir()
    for cmd in ({"cmd": "migrate", "entry": "vm1", "to": "b", "rate": rate},
                {"cmd": "rate", "entry": "vm1", "rate": rate}):
        reply = client.ask(cmd)
        assert error_code(reply) == "bad-argument", (cmd, reply)
        assert "'rate'" in reply["error"]
    assert datastore.status()["jobs"] == []
    assert_still_serving(datastore)


def test_idle_clients_holding_half_a_line_never_lock_commands_out(
    datastore: MountedDatastore,
) -> None:
    """More idle connections than the daemon serves at once, each with half a
    request: an operator's command is still answered at once (an idle client
    makes room), not after the idle timeout, and not refused."""
    path = str(control.socket_path(datastore.mnt))
    idle: list[socket.socket] = []
    try:
        for _ in range(control.MAX_CLIENTS + 8):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(sock)
            sock.connect(path)  # blocking: waits for room in the listen queue
            sock.settimeout(READY_TIMEOUT_S)  # a hang guard, not a measurement
            sock.sendall(b'{"cmd": "sta')
        result = fusedisk("status", str(datastore.mnt), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["placement"] == {}
        result = fusedisk("status", str(datastore.mnt))
        assert result.returncode == 0, result.stderr
    finally:
        for sock in idle:
            sock.close()
    assert_still_serving(datastore)
