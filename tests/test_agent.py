"""``fusedisk store-agent DIR``: each operation, confinement, bad input, EOF.

The agent runs as the real program (``python -m fusedisk store-agent``) and
is spoken to over its stdin/stdout, as ssh would carry it; every effect is
checked on the store directory itself, and every escape attempt against a
file outside it.
"""

from __future__ import annotations

import base64
import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusedisk.agent import MAX_DATA, MAX_LINE, PROTOCOL_VERSION


class Agent:
    """A running agent and a blocking request/reply helper."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fusedisk", "store-agent", str(root), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def send_line(self, line: bytes) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        assert isinstance(reply, dict)
        return reply

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        return self.send_line(json.dumps({"op": op, **args}).encode())

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self(op, **args)
        assert reply["ok"], reply
        return reply

    def refused(self, errno_name: str, op: str, **args: Any) -> str:
        reply = self(op, **args)
        assert reply == {"ok": False, "errno": errno_name, "error": reply["error"]}, reply
        assert "\n" not in reply["error"] and "Traceback" not in reply["error"]
        return str(reply["error"])

    def finish(self) -> tuple[int, bytes]:
        """EOF on stdin; the exit code and stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(30)
        return code, self.proc.stderr.read()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the store, with a file that must never change."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious").write_bytes(b"precious")
    os.chmod(out / "precious", 0o640)
    return out


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    root = tmp_path / "store"
    root.mkdir()
    running = Agent(root)
    try:
        yield running
        code, err = running.finish()
        assert code == 0 and err == b"", err
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()


def untouched(outside: Path) -> None:
    st = os.stat(outside / "precious")
    assert (outside / "precious").read_bytes() == b"precious"
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    assert sorted(os.listdir(outside)) == ["precious"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_hello(agent: Agent) -> None:
    hello = agent.ok("hello", protocol=PROTOCOL_VERSION)
    assert hello["protocol"] == PROTOCOL_VERSION and hello["version"]
    assert hello["dir"] == str(agent.root) and hello["max_data"] == MAX_DATA
    fs = os.statvfs(agent.root)
    assert 0 < hello["free_bytes"] <= hello["total_bytes"] == fs.f_blocks * fs.f_frsize
    assert hello["nbd"] is False
    assert "--tls-psk" in agent.refused("EOPNOTSUPP", "serve")


def test_create_is_sparse_and_exclusive(agent: Agent) -> None:
    agent.ok("create", path="disk0", size=(1 << 30) + 7, mode=0o600)
    st = os.lstat(agent.root / "disk0")
    assert st.st_size == (1 << 30) + 7 and st.st_blocks == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    agent.refused("EEXIST", "create", path="disk0", size=1)
    agent.ok("create", path="disk0", size=4096, exclusive=False)  # resized, still a hole
    assert os.lstat(agent.root / "disk0").st_size == 4096
    agent.refused("EINVAL", "create", path="big", size=-1)
    agent.refused("ENOENT", "create", path="no/such", size=1)
    reply = agent.ok("stat", path="disk0")
    assert (reply["type"], reply["size"], reply["mode"], reply["blocks"]) == ("file", 4096,
                                                                              0o600, 0)


def test_mkdir_stat_list(agent: Agent) -> None:
    agent.ok("mkdir", path="web01", mode=0o750)
    agent.ok("mkdir", path="web01/logs")
    agent.refused("EEXIST", "mkdir", path="web01")
    agent.ok("create", path="web01/disk0", size=10)
    os.symlink("disk0", agent.root / "web01" / "alias")
    os.mkfifo(agent.root / "web01" / "fifo")
    st = agent.ok("stat", path="web01")
    assert (st["type"], st["mode"]) == ("dir", 0o750)
    assert st["ino"] == os.lstat(agent.root / "web01").st_ino
    assert agent.ok("stat", path="web01/alias")["type"] == "symlink"  # not followed
    assert agent.ok("list", path="web01")["entries"] == [
        ["alias", "symlink"], ["disk0", "file"], ["fifo", "other"], ["logs", "dir"]]
    assert agent.ok("list")["entries"] == [["web01", "dir"]]
    assert agent.ok("stat", path="")["type"] == "dir"
    agent.refused("ENOTDIR", "list", path="web01/disk0")
    agent.refused("ENOENT", "stat", path="nothing")


def test_write_and_read_small_files(agent: Agent) -> None:
    agent.ok("mkdir", path="vm")
    agent.refused("ENOENT", "write", path="vm/vm.conf", data=b64(b"x"))  # no create
    assert agent.ok("write", path="vm/vm.conf", data=b64(b"memory=4G\n"), create=True,
                    mode=0o600)["written"] == 10
    assert (agent.root / "vm" / "vm.conf").read_bytes() == b"memory=4G\n"
    assert stat.S_IMODE(os.lstat(agent.root / "vm" / "vm.conf").st_mode) == 0o600
    agent.ok("write", path="vm/vm.conf", data=b64(b"8"), offset=7)
    assert (agent.root / "vm" / "vm.conf").read_bytes() == b"memory=8G\n"
    agent.ok("write", path="vm/vm.conf", data=b64(b"cpus=2"), truncate=True)
    assert (agent.root / "vm" / "vm.conf").read_bytes() == b"cpus=2"
    reply = agent.ok("read", path="vm/vm.conf")
    assert (base64.b64decode(reply["data"]), reply["size"], reply["eof"]) == (b"cpus=2", 6, True)
    reply = agent.ok("read", path="vm/vm.conf", offset=2, length=2)
    assert (base64.b64decode(reply["data"]), reply["eof"]) == (b"us", False)
    big = os.urandom(MAX_DATA)
    agent.ok("write", path="vm/nvram", data=b64(big), create=True)
    assert base64.b64decode(agent.ok("read", path="vm/nvram")["data"]) == big
    agent.refused("EFBIG", "write", path="vm/nvram", data=b64(big + b"x"))
    agent.refused("EINVAL", "read", path="vm/nvram", length=MAX_DATA + 1)
    agent.refused("EINVAL", "write", path="vm/nvram", data="not base64!")
    agent.refused("EINVAL", "write", path="vm/nvram", data=b64(b"x"), offset=-1)
    agent.refused("EISDIR", "read", path="vm")
    agent.refused("ENOENT", "read", path="vm/none")


def test_file_data_as_raw_bytes_after_the_line(agent: Agent) -> None:
    """``"bytes": N`` and N raw bytes after the request line (write), and after the
    reply line of a ``read`` with ``binary``; random pieces against a reference file,
    one too large refused with the channel still in step, a ``_payload`` key in the
    JSON never taken for data."""
    assert agent.proc.stdin is not None and agent.proc.stdout is not None
    rng = random.Random(99)

    def send(req: dict[str, Any], data: bytes) -> dict[str, Any]:
        assert agent.proc.stdin is not None and agent.proc.stdout is not None
        agent.proc.stdin.write(json.dumps({**req, "bytes": len(data)}).encode() + b"\n" + data)
        agent.proc.stdin.flush()
        reply = json.loads(agent.proc.stdout.readline())
        assert isinstance(reply, dict)
        return reply

    def read(offset: int, length: int) -> bytes:
        reply = agent.ok("read", path="f", offset=offset, length=length, binary=True)
        assert agent.proc.stdout is not None
        data = agent.proc.stdout.read(reply["bytes"])
        assert reply["bytes"] == len(data) and "data" not in reply
        return data

    reference = bytearray()
    assert send({"op": "write", "path": "f", "create": True}, b"")["ok"]
    for _ in range(40):
        offset = rng.randrange(0, 3 * MAX_DATA)
        data = rng.randbytes(rng.choice([1, 4096, rng.randrange(1, MAX_DATA + 1)]))
        reply = send({"op": "write", "path": "f", "offset": offset, "id": 5}, data)
        assert reply["ok"] and reply["written"] == len(data) and reply["id"] == 5, reply
        reference.extend(bytes(max(0, offset + len(data) - len(reference))))
        reference[offset:offset + len(data)] = data
        offset = rng.randrange(0, len(reference) + 10)
        length = rng.randrange(0, MAX_DATA + 1)
        assert read(offset, length) == bytes(reference[offset:offset + length])
    assert (agent.root / "f").read_bytes() == bytes(reference)
    too_big = send({"op": "write", "path": "f"}, bytes(MAX_DATA + 1))
    assert too_big["ok"] is False and too_big["errno"] == "EFBIG", too_big
    assert agent.ok("stat", path="f")["size"] == len(reference)  # still in step
    # a "_payload" in the JSON is no data: write wants its base64 "data" then
    agent.refused("EINVAL", "write", path="f", _payload="x")
    assert (agent.root / "f").read_bytes() == bytes(reference)


def test_rename_unlink_rmdir(agent: Agent) -> None:
    agent.ok("mkdir", path=".staging-web01")
    agent.ok("write", path=".staging-web01/a", data=b64(b"A"), create=True)
    agent.ok("write", path="b", data=b64(b"B"), create=True)
    agent.refused("EEXIST", "rename", path=".staging-web01/a", to="b", noreplace=True)
    assert (agent.root / "b").read_bytes() == b"B"
    agent.ok("rename", path=".staging-web01/a", to="b")
    assert (agent.root / "b").read_bytes() == b"A"
    agent.ok("rename", path=".staging-web01", to="web01", noreplace=True)
    assert sorted(os.listdir(agent.root)) == ["b", "web01"]
    agent.ok("write", path="web01/x", data=b64(b""), create=True)
    agent.refused("ENOTEMPTY", "rmdir", path="web01")
    agent.refused("EISDIR", "unlink", path="web01")
    agent.ok("unlink", path="web01/x")
    agent.ok("rmdir", path="web01")
    agent.ok("unlink", path="b")
    assert os.listdir(agent.root) == []
    agent.refused("ENOENT", "unlink", path="b")
    agent.refused("EINVAL", "rename", path="", to="x")  # the store itself cannot move


def test_setattr(agent: Agent, outside: Path) -> None:
    agent.ok("create", path="f", size=1)
    agent.ok("setattr", path="f", mode=0o4640, uid=1234, gid=5678,
             atime_ns=1_000_000_001, mtime_ns=2_000_000_002)
    st = os.lstat(agent.root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4640, 1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    agent.ok("setattr", path="f", mtime_ns=3_000_000_000)  # atime kept
    st = os.lstat(agent.root / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 3_000_000_000)
    agent.ok("setattr", path="f", gid=42)  # uid kept
    assert (os.lstat(agent.root / "f").st_uid, os.lstat(agent.root / "f").st_gid) == (1234, 42)
    # a symlink to the outside: its own owner and times change, the target's never
    os.symlink(outside / "precious", agent.root / "lnk")
    agent.refused("EOPNOTSUPP", "setattr", path="lnk", mode=0o777)
    agent.ok("setattr", path="lnk", uid=99, mtime_ns=5_000_000_000)
    st = os.lstat(agent.root / "lnk")
    assert (st.st_uid, st.st_mtime_ns) == (99, 5_000_000_000)
    untouched(outside)
    agent.refused("EINVAL", "setattr", path="f", mode="0644")
    agent.refused("EINVAL", "setattr", path="f", uid=True)


def test_fsync(agent: Agent) -> None:
    agent.ok("mkdir", path="d")
    agent.ok("create", path="d/f", size=4096)
    agent.ok("fsync", path="d/f")
    agent.ok("fsync", path="d")
    agent.ok("fsync", path="")
    os.mkfifo(agent.root / "fifo")  # opened non-blocking: the agent does not hang on it
    agent.refused("EINVAL", "fsync", path="fifo")
    agent.refused("ENOENT", "fsync", path="none")


def test_remove_tree(agent: Agent, outside: Path) -> None:
    base = agent.root / ".staging"
    (base / "a" / "b").mkdir(parents=True)
    (base / "a" / "b" / "f").write_bytes(b"x")
    (base / "top").write_bytes(b"y")
    os.symlink(outside, base / "a" / "out")  # removed as a link, never followed
    os.symlink(outside / "precious", base / "p")
    agent.ok("remove-tree", path=".staging")
    assert os.listdir(agent.root) == []
    untouched(outside)
    os.symlink(outside, agent.root / "linkdir")
    agent.refused("ENOTDIR", "remove-tree", path="linkdir")
    agent.refused("ENOTDIR", "remove-tree", path="linkdir/precious")
    untouched(outside)
    agent.ok("create", path="file", size=0)
    agent.refused("ENOTDIR", "remove-tree", path="file")
    agent.refused("ENOENT", "remove-tree", path="gone")
    agent.refused("EINVAL", "remove-tree", path="")


@pytest.mark.parametrize("path", ["..", "../outside/precious", "a/../../outside/precious",
                                  "/etc/passwd", "/"])
def test_paths_that_leave_the_store(agent: Agent, outside: Path, path: str) -> None:
    for op, args in (("stat", {}), ("read", {}), ("unlink", {}), ("fsync", {}),
                     ("write", {"data": b64(b"owned"), "create": True}),
                     ("setattr", {"mode": 0o777}), ("remove-tree", {}),
                     ("create", {"size": 0}), ("mkdir", {})):
        agent.refused("EPERM", op, path=path, **args)
    agent.refused("EPERM", "rename", path="x", to=path)
    untouched(outside)


def test_symlinks_are_never_followed(agent: Agent, outside: Path) -> None:
    os.symlink(outside, agent.root / "dirlink")
    os.symlink(outside / "precious", agent.root / "filelink")
    agent.ok("mkdir", path="real")
    os.symlink("../dirlink", agent.root / "real" / "hop")
    for via in ("dirlink/precious", "real/hop/precious"):
        for op, args in (("stat", {}), ("read", {}), ("unlink", {}), ("fsync", {}),
                         ("write", {"data": b64(b"owned"), "create": True}),
                         ("create", {"size": 0, "exclusive": False}),
                         ("setattr", {"mode": 0o777, "uid": 7}), ("mkdir", {}),
                         ("truncate", {"size": 0}), ("export", {}),
                         ("fallocate", {"mode": 0, "offset": 0, "length": 4096}),
                         ("seek", {"offset": 0, "whence": "data"}),
                         ("setxattr", {"name": "user.x", "value": b64(b"owned")}),
                         ("getxattr", {"name": "user.x"}), ("listxattr", {}),
                         ("removexattr", {"name": "user.x"}), ("readlink", {}),
                         ("mknod", {"st_mode": stat.S_IFIFO | 0o644}),
                         ("symlink", {"target": "/etc"}), ("link", {"to": "real/l"})):
            reply = agent(op, path=via, **args)
            assert reply["ok"] is False and reply["errno"] in ("ENOTDIR", "ELOOP"), (op, reply)
        reply = agent("rename", path="real", to=via)
        assert reply["ok"] is False and reply["errno"] in ("ENOTDIR", "ELOOP")
        reply = agent("link", path="real", to=via)
        assert reply["ok"] is False and reply["errno"] in ("ENOTDIR", "ELOOP")
    final: list[tuple[str, dict[str, Any]]] = [
        ("read", {}), ("fsync", {}), ("write", {"data": b64(b"owned")}),
        ("create", {"size": 0, "exclusive": False}), ("list", {}), ("truncate", {"size": 0}),
        ("export", {}), ("fallocate", {"mode": 0, "offset": 0, "length": 4096}),
        ("seek", {"offset": 0, "whence": "data"})]
    for op, extra in final:
        reply = agent(op, path="filelink" if op != "list" else "dirlink", **extra)
        # an O_PATH handle on the link itself is no regular file (EINVAL): also refused
        refusals = ("ELOOP", "ENOTDIR", "EINVAL") if op == "export" else ("ELOOP", "ENOTDIR")
        assert reply["ok"] is False and reply["errno"] in refusals, (op, reply)
    # a symlink's own extended attributes, never its target's: user.* has none (EPERM)
    reply = agent("setxattr", path="filelink", name="user.x", value=b64(b"owned"))
    assert reply["ok"] is False and reply["errno"] == "EPERM", reply
    assert agent.ok("readlink", path="filelink")["target"] == str(outside / "precious")
    agent.ok("link", path="filelink", to="real/samelink")  # the link itself, not its target
    assert os.path.islink(agent.root / "real" / "samelink")
    os.unlink(agent.root / "real" / "samelink")
    agent.ok("unlink", path="filelink")  # the link goes, its target stays
    untouched(outside)
    assert sorted(os.listdir(agent.root)) == ["dirlink", "real"]


def test_exports_are_no_names_of_a_file(agent: Agent) -> None:
    """An export link is the same inode at the top; stat does not count it, and the
    file's last name takes it along (unlink, or a rename over it)."""
    agent.ok("mkdir", path="vm")
    st = agent.ok("create", path="vm/disk", size=1 << 20)["stat"]
    export = agent.ok("export", path="vm/disk")
    assert export == {"ok": True, "export": f".fusedisk-x{st['ino']}", "size": 1 << 20}
    assert agent.ok("export", path="vm/disk")["export"] == export["export"]  # idempotent
    assert os.stat(agent.root / export["export"]).st_ino == st["ino"]
    seen = agent.ok("stat", path="vm/disk")
    assert seen["nlink"] == 1 and seen["exported"] is True
    agent.ok("link", path="vm/disk", to="vm/twin")
    assert agent.ok("stat", path="vm/twin")["nlink"] == 2
    agent.ok("unlink", path="vm/twin")
    assert (agent.root / export["export"]).exists()  # one name left: the export stays
    agent.ok("unlink", path="vm/disk")
    assert sorted(os.listdir(agent.root)) == ["vm"]
    # the same by a rename over the last name
    agent.ok("create", path="vm/a", size=4096)
    agent.ok("create", path="vm/b", size=4096)
    agent.ok("export", path="vm/b")
    agent.ok("rename", path="vm/a", to="vm/b")
    assert sorted(os.listdir(agent.root)) == ["vm"]


def test_the_rest_of_posix(agent: Agent) -> None:
    agent.ok("create", path="f", size=0, mode=0o640)
    assert stat.S_IMODE(os.stat(agent.root / "f").st_mode) == 0o640  # no umask of its own
    agent.ok("write", path="f", data=b64(b"x" * 8192), offset=1 << 20)
    assert agent.ok("seek", path="f", offset=0, whence="data")["offset"] == 1 << 20
    assert agent.ok("seek", path="f", offset=0, whence="hole")["offset"] == 0
    agent.refused("ENXIO", "seek", path="f", offset=2 << 20, whence="data")
    agent.refused("EINVAL", "seek", path="f", offset=0, whence="end")
    punched = agent.ok("fallocate", path="f", mode=0x3, offset=1 << 20, length=4096)
    assert punched["stat"]["size"] == (1 << 20) + 8192
    assert agent.ok("seek", path="f", offset=1 << 20, whence="data")["offset"] == \
        (1 << 20) + 4096
    assert agent.ok("truncate", path="f", size=10)["stat"]["size"] == 10
    agent.ok("setxattr", path="f", name="user.k", value=b64(b"\0v"))
    assert agent.ok("getxattr", path="f", name="user.k")["value"] == b64(b"\0v")
    assert agent.ok("listxattr", path="f")["names"] == ["user.k"]
    agent.refused("EEXIST", "setxattr", path="f", name="user.k", value=b64(b"w"), flags=1)
    agent.ok("removexattr", path="f", name="user.k")
    agent.refused("ENODATA", "getxattr", path="f", name="user.k")
    fifo = agent.ok("mknod", path="p", st_mode=stat.S_IFIFO | 0o600)["stat"]
    assert fifo["type"] == "other" and stat.S_ISFIFO(fifo["st_mode"])
    agent.ok("symlink", path="s", target="f")
    assert agent.ok("readlink", path="s")["target"] == "f"
    agent.ok("create", path="g", size=0)
    agent.ok("rename", path="f", to="g", exchange=True)
    assert agent.ok("stat", path="g")["size"] == 10
    agent.refused("EEXIST", "rename", path="f", to="g", noreplace=True)
    agent.refused("EINVAL", "rename", path="f", to="g", noreplace=True, exchange=True)
    fs = agent.ok("statfs")
    assert fs["blocks"] > 0 and fs["namemax"] == 255
    listed = agent.ok("list", path="", stat=True)["entries"]
    assert [name for name, _ in listed] == ["f", "g", "p", "s"]
    assert listed[1][1]["size"] == 10


@pytest.mark.parametrize("path", ["a//b", "./a", "a/./b", "a/", "a\0b"])
def test_malformed_paths(agent: Agent, path: str) -> None:
    agent.refused("EINVAL", "stat", path=path)


def test_bad_input_gets_an_error_reply(agent: Agent) -> None:
    for line in (b"not json", b"[1, 2]", b'"hello"', b"{", b"\xff\xfe{}", b""):
        reply = agent.send_line(line)
        assert reply["ok"] is False and reply["errno"] == "EINVAL", (line, reply)
    assert agent.send_line(b'{"id": 7}')["errno"] == "ENOSYS"
    assert agent.send_line(b'{"op": "format-disk", "id": "x"}') == {
        "ok": False, "errno": "ENOSYS", "error": "unknown operation 'format-disk'", "id": "x"}
    agent.refused("EINVAL", "stat")  # no path
    agent.refused("EINVAL", "stat", path=7)
    agent.refused("EINVAL", "create", path="f", size="12")
    agent.refused("EINVAL", "create", path="f", size=True)
    agent.refused("EINVAL", "create", path="f", size=1, exclusive="yes")
    assert "longer than" in agent.refused(
        "E2BIG", "write", path="f", data="A" * (MAX_LINE + 10))
    # after all that, the agent still answers, and knows the id it is given
    assert agent.ok("hello", id=12)["id"] == 12


def test_eof_ends_the_agent_cleanly(tmp_path: Path) -> None:
    running = Agent(tmp_path)
    try:
        running.ok("hello")
        assert running.finish() == (0, b"")
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()


def test_store_agent_command_line_errors(tmp_path: Path) -> None:
    for argv, message in (
        ([str(tmp_path / "none")], "is not a directory"),
        ([str(tmp_path), "--tls-psk", str(tmp_path / "none")], "cannot read it"),
        ([str(tmp_path), "--tls-psk", "/dev/null", "--nbd-listen", "udp:x"], "expected tcp:"),
    ):
        done = subprocess.run([sys.executable, "-m", "fusedisk", "store-agent", *argv],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def _claim(owner: str, **more: Any) -> dict[str, Any]:
    return {"owner": owner, "host": "host-" + owner, **more}


def test_a_store_is_claimed_by_one_datastore_at_a_time(tmp_path: Path) -> None:
    """Agents of one owner share the claim (a view reconnecting while its old agent
    lingers); another owner is refused with a line naming the holder; the claim ends
    with the last agent of its owner, however it ends (EOF, SIGKILL)."""
    root = tmp_path / "store"
    root.mkdir()
    first, again, other = Agent(root), Agent(root), Agent(root)
    try:
        first.ok("hello", protocol=PROTOCOL_VERSION, claim=_claim("A", note="state /x"))
        again.ok("hello", protocol=PROTOCOL_VERSION, claim=_claim("A"))
        said = other.refused("EBUSY", "hello", protocol=PROTOCOL_VERSION, claim=_claim("B"))
        assert "in use by another fusedisk datastore" in said and "datastore A" in said
        assert "host-A" in said and "state /x" in said and str(root) in said
        # asking without a claim (store-check) is no claim and is not refused
        other.ok("hello", protocol=PROTOCOL_VERSION)
        assert first.finish()[0] == 0
        other.refused("EBUSY", "hello", protocol=PROTOCOL_VERSION, claim=_claim("B"))
        again.proc.kill()  # the last agent of A ends without a word
        again.proc.wait()
        other.ok("hello", protocol=PROTOCOL_VERSION, claim=_claim("B"))
        other.ok("hello", protocol=PROTOCOL_VERSION, claim=_claim("B"))  # again: still B's
        assert "claims the store for B" in other.refused("EINVAL", "hello", claim=_claim("C"))
        assert "non-empty" in other.refused("EINVAL", "hello", claim={"owner": ""})
        third = Agent(root)
        try:
            said = third.refused("EBUSY", "hello", protocol=PROTOCOL_VERSION,
                                 claim=_claim("A"))
            assert "datastore B" in said
            assert third.refused("EINVAL", "hello", claim={"owner": 7})
        finally:
            third.finish()
    finally:
        for running in (first, again, other):
            if running.proc.poll() is None:
                running.proc.kill()
                running.proc.wait()


def test_claims_against_a_reference(tmp_path: Path) -> None:
    """Random starts, hellos and ends of agents of three owners, against a model:
    a claim is granted exactly when no live claiming agent has another owner."""
    rng = random.Random(1717)
    root = tmp_path / "store"
    root.mkdir()
    live: list[tuple[Agent, str | None]] = []  # agents, and what they claimed
    try:
        for _ in range(60):
            holders = {owner for _, owner in live if owner is not None}
            assert len(holders) <= 1
            if live and rng.random() < 0.35:
                running, _ = live.pop(rng.randrange(len(live)))
                if rng.random() < 0.5:
                    running.finish()
                else:
                    running.proc.kill()
                    running.proc.wait()
                continue
            owner = rng.choice("ABC")
            running = Agent(root)
            reply = running("hello", protocol=PROTOCOL_VERSION, claim=_claim(owner))
            granted = not holders or holders == {owner}
            assert reply["ok"] is granted, (owner, holders, reply)
            if not granted:
                assert reply["errno"] == "EBUSY"
                assert f"datastore {holders.pop()}" in reply["error"]
            live.append((running, owner if granted else None))
    finally:
        for running, _ in live:
            if running.proc.poll() is None:
                running.proc.kill()
                running.proc.wait()
