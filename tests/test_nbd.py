"""The NBD server (fusedisk/nbd.py) against real clients, malformed input, and ``fusedisk export``.

Real clients (libnbd's ``nbdinfo`` and ``nbdcopy``, ``qemu-img``) read
random sparse files whose allocation and dirty maps are known, and what they
report is compared with that reference. A raw-socket client then breaks
every rule it can: each broken connection is closed or answered with an
error, and the server goes on serving the next client. Last, ``fusedisk
export`` serves a file of a mounted datastore with a CBT change id as a
dirty bitmap, for an incremental backup taken with nbdcopy.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusedisk import backing, nbd

from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk

CLIENT_TIMEOUT_S = 60


@asynccontextmanager
async def serving(tmp_path: Path, export: nbd.Export) -> AsyncIterator[tuple[str, Path]]:
    """*export* served on a Unix socket by an in-process server: (URI, socket path)."""
    path = tmp_path / "nbd.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(32)
    server = nbd.Server([export])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [trio.SocketListener(sock)])
        try:
            yield f"nbd+unix:///?socket={path}", path
        finally:
            nursery.cancel_scope.cancel()


async def run(*argv: str) -> str:
    result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True,
                                    check=False)
    assert result.returncode == 0, (argv, result.stderr.decode())
    return result.stdout.decode()


def sparse_file(path: Path, rng: random.Random) -> tuple[int, bytes]:
    """A file with random data runs and holes; (fd, its content)."""
    size = rng.choice((1, 7, 64)) << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(rng.randrange(1, 12)):
            offset = rng.randrange(0, size // 4096) * 4096
            f.seek(offset)
            f.write(rng.randbytes(min(size - offset, rng.choice((4096, 65536, 300000)))))
    return os.open(path, os.O_RDONLY), path.read_bytes()


def nbdinfo_map(text: str) -> list[tuple[int, int, int]]:
    """(offset, length, flags) rows of ``nbdinfo --map`` output."""
    rows = []
    for line in text.splitlines():
        offset, length, flags = line.split()[:3]
        rows.append((int(offset), int(length), int(flags)))
    return rows


def expected_map(extents: list[tuple[int, int]], size: int, inside: int,
                 outside: int) -> list[tuple[int, int, int]]:
    return [(o, n, f) for (n, f), o in _with_offsets(
        nbd.descriptors(extents, inside, outside, 0, size, False))]


def _with_offsets(rows: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    out, pos = [], 0
    for n, f in rows:
        out.append(((n, f), pos))
        pos += n
    return out


@pytest.mark.parametrize("seed", range(4))
async def test_real_clients_read_data_allocation_and_dirty_map(tmp_path: Path,
                                                               seed: int) -> None:
    require_tools("nbdinfo", "nbdcopy", "qemu-img")
    rng = random.Random(seed)
    fd, content = sparse_file(tmp_path / "disk.img", rng)
    try:
        size = len(content)
        allocated = backing.data_extents(fd)
        dirty: list[tuple[int, int]] = []
        pos = 0
        while pos < size and len(dirty) < 20:  # random, sorted, disjoint
            pos += rng.randrange(1, size // 8 + 2)
            length = rng.randrange(1, 200000)
            if pos + length <= size:
                dirty.append((pos, length))
            pos += length
        export = nbd.file_export("", fd, allocated, {"cid-7": dirty})
        async with serving(tmp_path, export) as (uri, _):
            info = json.loads(await run("nbdinfo", "--json", uri))["exports"][0]
            assert info["export-size"] == size and info["is_read_only"]
            assert info["contexts"] == ["base:allocation", "qemu:dirty-bitmap:cid-7"]
            assert nbdinfo_map(await run("nbdinfo", "--map", uri)) \
                == expected_map(allocated, size, 0, 3)
            assert nbdinfo_map(await run(
                "nbdinfo", "--map=qemu:dirty-bitmap:cid-7", uri)) \
                == expected_map(dirty, size, 1, 0)
            out = tmp_path / "copy.img"
            await run("nbdcopy", uri, str(out))
            assert out.read_bytes() == content
            qmap = json.loads(await run("qemu-img", "map", "--output=json", uri))
            data = [(e["start"], e["length"]) for e in qmap if e["data"]]
            merged = [(o, n) for o, n, f in expected_map(allocated, size, 0, 3) if f == 0]
            assert data == merged
    finally:
        os.close(fd)


# -- a client that breaks the rules ----------------------------------------------------


class Raw:
    """A blocking NBD client that speaks the protocol byte by byte (or does not)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CLIENT_TIMEOUT_S)
        self.sock.connect(str(path))

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.read(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT) and flags & 1
        self.sock.sendall(struct.pack(">I", 3))

    def option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.read(20))
            assert magic == nbd.REPLY_MAGIC and opt == option
            replies.append((kind, self.read(length)))
            if kind != nbd.REP_INFO and kind != nbd.REP_META_CONTEXT \
                    and kind != nbd.REP_SERVER:
                return replies

    def go(self) -> None:
        assert self.option(nbd.OPT_STRUCTURED_REPLY, b"")[-1][0] == nbd.REP_ACK
        assert self.option(nbd.OPT_GO, struct.pack(">IH", 0, 0))[-1][0] == nbd.REP_ACK

    def request(self, kind: int, offset: int, length: int, data: bytes = b"",
                magic: int = nbd.REQUEST_MAGIC) -> tuple[int, int, bytes]:
        """(reply type, error, payload) of one structured reply chunk."""
        self.sock.sendall(struct.pack(">IHHQQI", magic, 0, kind, 42, offset, length) + data)
        magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", self.read(20))
        assert magic == nbd.STRUCTURED_REPLY_MAGIC and cookie == 42 and flags & 1
        payload = self.read(n)
        error = struct.unpack(">I", payload[:4])[0] if rtype == nbd.REPLY_TYPE_ERROR else 0
        return rtype, error, payload


async def test_malformed_input_ends_only_that_connection(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"x" * 8192, 0)
    export = nbd.file_export("", fd, [(0, 8192)])

    def abuse(path: Path) -> None:
        bad = Raw(path)
        bad.read(18)
        bad.sock.sendall(struct.pack(">I", 0))  # not fixed newstyle
        assert bad.closed()

        bad = Raw(path)
        bad.greet()
        bad.sock.sendall(struct.pack(">QII", 0x1234, 1, 0))  # wrong option magic
        assert bad.closed()

        c = Raw(path)
        c.greet()
        big = c.option(nbd.OPT_INFO, bytes(nbd.MAX_OPTION + 1))
        assert big == [(nbd.REP_ERR_TOO_BIG, b"option too long")]  # the connection lives on
        assert c.option(nbd.OPT_INFO, b"\0\0")[-1][0] == nbd.REP_ERR_INVALID  # truncated
        assert c.option(nbd.OPT_GO, struct.pack(">I", 4) + b"nope" + b"\0\0")[-1][0] \
            == nbd.REP_ERR_UNKNOWN
        assert c.option(nbd.OPT_SET_META_CONTEXT, struct.pack(">II", 0, 0))[-1][0] \
            == nbd.REP_ERR_INVALID  # before structured replies
        assert c.option(nbd.OPT_STARTTLS, b"")[-1][0] == nbd.REP_ERR_POLICY
        assert c.option(99, b"")[-1][0] == nbd.REP_ERR_UNSUP
        c.go()
        assert c.request(nbd.CMD_READ, 0, 4096)[2][8:] == b"x" * 4096
        assert c.request(nbd.CMD_READ, 8000, 4096)[1] == 22  # past the end: EINVAL
        assert c.request(nbd.CMD_READ, 0, nbd.MAX_REQUEST + 1)[1] == 22
        assert c.request(nbd.CMD_READ, 0, 0)[1] == 22
        assert c.request(nbd.CMD_WRITE, 0, 3, b"abc")[1] == 1  # read-only: EPERM
        assert c.request(nbd.CMD_BLOCK_STATUS, 0, 4096)[1] == 22  # no context chosen
        assert c.request(77, 0, 1)[1] == 22
        assert c.request(nbd.CMD_FLUSH, 0, 0)[0] == nbd.REPLY_TYPE_NONE
        assert c.request(nbd.CMD_READ, 4096, 4096)[2][8:] == b"x" * 4096  # still in step
        c.sock.sendall(struct.pack(">IHHQQI", 0xDEAD, 0, 0, 1, 0, 1))  # bad request magic
        assert c.closed()

        many = [Raw(path) for _ in range(nbd.MAX_CLIENTS)]
        for m in many:
            m.read(18)
        extra = Raw(path)
        assert extra.closed()  # one too many: closed at once
        for m in many:
            m.sock.close()

    try:
        async with serving(tmp_path, export) as (uri, path):
            await trio.to_thread.run_sync(abuse, path)
            # and the next well-behaved client is served as if nothing happened
            assert json.loads(await run("nbdinfo", "--json", uri))["exports"][0][
                "export-size"] == 8192
    finally:
        os.close(fd)


def test_descriptors_cover_the_range_exactly() -> None:
    rng = random.Random(5)
    for _ in range(500):
        size = rng.randrange(1, 1 << 20)
        extents, pos = [], 0
        while True:
            pos += rng.randrange(0, size // 4 + 1)
            n = rng.randrange(1, size // 4 + 2)
            if pos + n > size:
                break
            extents.append((pos, n))
            pos += n + 1
        offset = rng.randrange(size)
        length = rng.randrange(1, size - offset + 1)
        rows = nbd.descriptors(extents, 1, 0, offset, length, False)
        assert sum(n for n, _ in rows) == length
        at = offset
        for n, flags in rows:
            for probe in (at, at + n - 1):
                inside = any(o <= probe < o + m for o, m in extents)
                assert flags == (1 if inside else 0), (extents, offset, length, rows)
            at += n
        assert all(a[1] != b[1] for a, b in itertools.pairwise(rows))  # merged
        one = nbd.descriptors(extents, 1, 0, offset, length, True)
        assert one == rows[:1]


# -- fusedisk export on a mount -----------------------------------------------------------


def test_export_serves_an_incremental_backup_of_a_file_on_the_mount(
    datastore: MountedDatastore, tmp_path: Path
) -> None:
    require_tools("nbdinfo", "nbdcopy")
    (datastore.mnt / "vm1").mkdir()
    disk = datastore.mnt / "vm1" / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(256 << 10))
    change_id = fusedisk("cbt", "checkpoint", str(datastore.mnt), "vm1/disk.img").stdout.strip()
    with open(disk, "r+b") as g:
        g.seek(5 << 20)
        g.write(os.urandom(64 << 10))
    sock = tmp_path / "export.sock"
    argv = [sys.executable, "-m", "fusedisk", "export", str(datastore.mnt), "vm1/disk.img",
            "--since", change_id, "--socket", str(sock)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()  # printed once clients can connect
            assert uri == f"nbd+unix:///vm1/disk.img?socket={sock}", uri
            dirty = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{change_id}", uri],
                                   capture_output=True, text=True, check=True,
                                   timeout=CLIENT_TIMEOUT_S).stdout
            rows = [tuple(int(x) for x in line.split()[:3]) for line in dirty.splitlines()]
            assert [(o, n) for o, n, f in rows if f == 1] == [(5 << 20, 64 << 10)]
            copy = tmp_path / "full.img"
            subprocess.run(["nbdcopy", uri, str(copy)], check=True, timeout=CLIENT_TIMEOUT_S)
            assert copy.read_bytes() == disk.read_bytes()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=CLIENT_TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "export ended" in err and "Traceback" not in err
    assert not sock.exists()


@pytest.mark.parametrize("args, message", [
    (["vm1/disk.img", "--tcp", "nowhere"], "--tcp 'nowhere': expected HOST:PORT"),
    (["vm1/missing.img", "--socket", "S"], "vm1/missing.img"),
    (["vm1/disk.img", "--since", "no-such-id", "--socket", "S"], "no-such-id"),
    (["vm1/disk.img@nightly", "--socket", "S"], "'vm1' has no snapshot named 'nightly'"),
    (["../../etc/passwd", "--socket", "S"], "is not a path inside the datastore"),
    (["/etc/passwd", "--socket", "S"], "is not a path inside the datastore"),
])
def test_export_bad_input_is_one_line(datastore: MountedDatastore, tmp_path: Path,
                                      args: list[str], message: str) -> None:
    (datastore.mnt / "vm1").mkdir(exist_ok=True)
    (datastore.mnt / "vm1" / "disk.img").write_bytes(b"x" * 4096)
    args = [str(tmp_path / a) if a == "S" else a for a in args]
    result = fusedisk("export", str(datastore.mnt), *args)
    assert result.returncode == 1, result
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "S").exists()


def test_a_second_export_on_a_used_address_is_refused_and_the_first_serves_on(
    datastore: MountedDatastore, tmp_path: Path
) -> None:
    require_tools("nbdinfo")
    (datastore.mnt / "vm1").mkdir()
    (datastore.mnt / "vm1" / "disk.img").write_bytes(b"x" * 65536)
    with socket.socket() as probe:  # a port nobody listens on, for the first export
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = tmp_path / "export.sock"
    first = [sys.executable, "-m", "fusedisk", "export", str(datastore.mnt), "vm1/disk.img"]
    with subprocess.Popen([*first, "--tcp", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as tcp_proc, \
         subprocess.Popen([*first, "--socket", str(sock)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as unix_proc:
        try:
            assert tcp_proc.stdout is not None and unix_proc.stdout is not None
            uris = [tcp_proc.stdout.readline().strip(), unix_proc.stdout.readline().strip()]
            assert uris[0] == f"nbd://127.0.0.1:{port}/vm1/disk.img", uris
            for args, message in (
                (["--tcp", f"127.0.0.1:{port}"], f"cannot listen on 127.0.0.1:{port}"),
                (["--socket", str(sock)], "something is there already"),
            ):
                second = fusedisk("export", str(datastore.mnt), "vm1/disk.img", *args)
                assert second.returncode == 1, second
                assert len(second.stderr.splitlines()) == 1, second.stderr
                assert message in second.stderr and "Traceback" not in second.stderr
            for uri in uris:  # the first exports are untouched
                size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                                      text=True, check=True, timeout=CLIENT_TIMEOUT_S)
                assert size.stdout.strip() == "65536"
        finally:
            for proc in (tcp_proc, unix_proc):
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=CLIENT_TIMEOUT_S)
    assert tcp_proc.returncode == 0 and unix_proc.returncode == 0
    assert not sock.exists()


def test_tls_psk_export_serves_only_clients_with_the_key(
    datastore: MountedDatastore, tmp_path: Path
) -> None:
    require_tools("nbdinfo", "nbdcopy")
    (datastore.mnt / "vm1").mkdir()
    disk = datastore.mnt / "vm1" / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    keys = tmp_path / "keys.psk"
    keys.write_text("# made by hand, as psktool would\nalice:" + os.urandom(32).hex() + "\n")
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("alice:" + os.urandom(32).hex() + "\n")
    sock = tmp_path / "export.sock"
    argv = [sys.executable, "-m", "fusedisk", "export", str(datastore.mnt), "vm1/disk.img",
            "--socket", str(sock), "--tls-psk", str(keys)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            uri = proc.stdout.readline().strip()
            assert uri == f"nbds+unix:///vm1/disk.img?socket={sock}", uri

            def client(*args: str, key: Path = keys, user: str = "alice",
                       tls: bool = True) -> subprocess.CompletedProcess[str]:
                # libnbd 1.14 takes the PSK identity from the URI's user part
                target = (f"nbds+unix://{user}@/vm1/disk.img?socket={sock}&tls-psk-file={key}"
                          if tls else f"nbd+unix:///vm1/disk.img?socket={sock}")
                return subprocess.run([*args, target] if args[0] == "nbdinfo"
                                      else [args[0], target, *args[1:]],
                                      capture_output=True, text=True,
                                      timeout=CLIENT_TIMEOUT_S)

            for refused in (client("nbdinfo", "--size", key=wrong),
                            client("nbdinfo", "--size", user="mallory"),
                            client("nbdinfo", "--size", tls=False)):
                assert refused.returncode != 0 and refused.stdout == "", refused
            allowed = client("nbdinfo", "--size")
            assert allowed.returncode == 0 and allowed.stdout.strip() == str(1 << 20), allowed
            copy = tmp_path / "copy.img"
            copied = client("nbdcopy", str(copy))
            assert copied.returncode == 0, copied.stderr
            assert copy.read_bytes() == disk.read_bytes()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=CLIENT_TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "TLS with a pre-shared key required" in err and "Traceback" not in err
    # the wrong key and the unknown identity; the client without TLS was told and left
    assert "2 protocol error(s)" in err, err


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("alice\n", "line 1 is not IDENTITY:HEXKEY"),
    ("alice:abc\n", "line 1 is not IDENTITY:HEXKEY"),
    ("# nothing\n", "holds no key"),
])
def test_tls_psk_bad_key_file_is_one_line(datastore: MountedDatastore, tmp_path: Path,
                                          content: str | None, message: str) -> None:
    (datastore.mnt / "vm1").mkdir()
    (datastore.mnt / "vm1" / "disk.img").write_bytes(b"x" * 4096)
    keys = tmp_path / "keys.psk"
    if content is not None:
        keys.write_text(content)
    result = fusedisk("export", str(datastore.mnt), "vm1/disk.img", "--socket",
                      str(tmp_path / "S"), "--tls-psk", str(keys))
    assert result.returncode == 1, result
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "S").exists()
