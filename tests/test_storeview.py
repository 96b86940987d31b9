"""The view of a remote store (storeview.py), mounted for real over a real agent and nbdkit.

The remote host is this one (``nbd+local:///DIR``). What is proven: seeded
random sequences of the differential engine's operations (tests/differential.py:
writes, truncates, holds of open files, renames over them, links, special
files, xattrs, times, owners) give the same results and the same trees on the
view as on a plain directory, and what the view shows is what the remote
directory holds; a file unlinked or renamed over while open keeps its data
for its holder and leaves nothing behind once closed; the store's own
names (exports, orphans) are never shown; a broken agent link fails the
requests in flight, and the view reconnects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusedisk import mountinfo, storeview

from . import differential as diff
from .mounting import wait_for
from .test_remote import Site, stop_nbdkits, write_keys

MiB = 1 << 20


class View:
    """A running ``fusedisk store-view`` on *mnt* for the store directory *site.dir*."""

    def __init__(self, site: Site, mnt: Path, *extra: str) -> None:
        self.site = site
        self.mnt = mnt
        mnt.mkdir(exist_ok=True)
        self.log = mnt.parent / f"{mnt.name}.log"
        ready_r, ready_w = os.pipe()
        with open(self.log, "wb") as log:
            self.status_file = mnt.parent / f"{mnt.name}.json"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fusedisk", "store-view", f"far={site.spec_text()}",
                 str(mnt), "--ready-fd", str(ready_w), "--status-file", str(self.status_file),
                 *extra],
                pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            said = ready.read()
        if said != b"ready\n":
            self.stop()
            raise AssertionError(f"the view did not start: {self.log.read_text()}")

    def agent_pid(self) -> int:
        """The pid of the view's agent (a child of the view)."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = next(int(ln.split()[1]) for ln in status.splitlines()
                        if ln.startswith("PPid:"))
            if ppid == self.proc.pid and b"store-agent" in argv:
                return int(pid)
        raise AssertionError("the view runs no agent")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True, check=False)
        return self.log.read_text()


@contextlib.contextmanager
def running_view(tmp_path: Path, *extra: str) -> Iterator[View]:
    """A view of a fresh store directory; stopped, and checked clean, at the end."""
    site = Site(tmp_path)
    v = View(site, tmp_path / "view", *extra)
    try:
        yield v
    finally:
        log = v.stop()
        assert stop_nbdkits(site.dir) == [], "an nbdkit outlived its agent"
        assert "Traceback" not in log, log


@pytest.fixture
def view(tmp_path: Path) -> Iterator[View]:
    with running_view(tmp_path) as v:
        yield v


def _seeded_ops(seed: int, steps: int, scratch: Path) -> list[diff.Op]:
    return [op for op in diff.generate(seed, steps, scratch) if op.kind not in diff.EVENTS]


@pytest.fixture
def nbd_view(tmp_path: Path) -> Iterator[View]:
    """A view that carries the data of every file with data at open over NBD."""
    with running_view(tmp_path, "--nbd-min-bytes", "1") as v:
        yield v


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_operations_match_a_plain_directory(tmp_path: Path, view: View,
                                                   seed: int) -> None:
    """The differential engine's operations, on the view and on a plain directory."""
    differential(tmp_path, view, seed)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_random_operations_over_nbd(tmp_path: Path, nbd_view: View, seed: int) -> None:
    """The same with file data over NBD wherever a file held data when opened."""
    differential(tmp_path, nbd_view, seed)
    assert "NBD" not in nbd_view.log.read_text()  # no NBD error was logged


def differential(tmp_path: Path, view: View, seed: int) -> None:
    ref_root = tmp_path / "ref" / diff.ENTRY
    ref_root.mkdir(parents=True)
    (view.mnt / diff.ENTRY).mkdir()
    ref, mnt = diff.Side("ref", ref_root), diff.Side("view", view.mnt / diff.ENTRY)
    comparator = diff.Comparator(frozenset())
    ctx = diff.Context()
    ops = _seeded_ops(seed, 120, tmp_path / "scratch")
    try:
        for index, op in enumerate(ops):
            expected, got = ref.apply(op), mnt.apply(op)
            assert got == expected, f"step {index} {op!r}: view {got}, reference {expected}"
            found = comparator.compare(ref.root, diff.scan(ref.root), mnt.root,
                                       diff.scan(mnt.root), ctx)
            assert not found, f"step {index} {op!r}: {found}"
    finally:
        ref.close_held()
        mnt.close_held()
    # what the view shows is what the remote directory holds
    remote_tree = diff.scan(str(view.site.dir / diff.ENTRY))
    shown = diff.scan(mnt.root)
    assert {p: (o.fmt, o.sha, o.size) for p, o in remote_tree.items()} == \
        {p: (o.fmt, o.sha, o.size) for p, o in shown.items()}


def test_open_files_outlive_their_names(view: View) -> None:
    m, d = view.mnt, view.site.dir
    (m / "a").write_bytes(b"one")
    (m / "b").write_bytes(b"two")
    held_a = os.open(m / "a", os.O_RDWR)
    held_b = os.open(m / "b", os.O_RDONLY)
    try:
        os.unlink(m / "a")
        (m / "c").write_bytes(b"three")
        os.rename(m / "c", m / "b")  # over a file still open
        assert sorted(os.listdir(m)) == ["b"]
        assert (m / "b").read_bytes() == b"three"
        os.pwrite(held_a, b"ONE", 0)
        assert os.pread(held_a, 3, 0) == b"ONE"
        assert os.pread(held_b, 3, 0) == b"two"
        orphans = [n for n in os.listdir(d) if n.startswith(".fusedisk-orphan-")]
        assert len(orphans) == 2, os.listdir(d)
    finally:
        os.close(held_a)
        os.close(held_b)
    # once closed, the kernel forgets them (dropping its inode cache makes it say so
    # now), and their orphans go; the view removes them in the background
    left: set[str] = set()
    for _ in range(100):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        os.listdir(m)  # a request after the FORGETs: the view has seen them
        left = {n for n in os.listdir(d) if n.startswith(".fusedisk-orphan-")}
        if not left:
            break
    assert not left, left
    # b and its export link (files made through the view are exported at birth), and
    # the view's claim of the store
    assert sorted(os.listdir(d)) == sorted(["b", f".fusedisk-x{os.stat(d / 'b').st_ino}",
                                            ".fusedisk-agent-claim"])


def test_the_stores_own_names_are_hidden(view: View) -> None:
    d = view.site.dir
    (d / ".fusedisk-x12345").write_bytes(b"an export")
    (d / ".fusedisk-orphan-9").write_bytes(b"an orphan")
    (d / "disk").write_bytes(b"x")
    assert sorted(os.listdir(view.mnt)) == ["disk"]
    for name in (".fusedisk-x12345", ".fusedisk-orphan-9"):
        with pytest.raises(FileNotFoundError):
            os.stat(view.mnt / name)
        with pytest.raises(FileNotFoundError):
            (view.mnt / name).write_bytes(b"")


def test_the_view_reads_ahead_4_mib(view: View) -> None:
    """Its bdi's read-ahead is widened (the kernel's 128 KiB made a sequential reader's
    READs one 128 KiB round trip after another), and a sequential read is right."""
    data = os.urandom(16 << 20)
    (view.site.dir / "seq.img").write_bytes(data)
    assert (view.mnt / "seq.img").read_bytes() == data  # INIT long answered by now
    mount = mountinfo.mount_at(view.mnt)
    assert mount is not None and mount.device.startswith("0:"), mount
    ra = Path(f"/sys/class/bdi/{mount.device}/read_ahead_kb")
    # set by a task of the view's once it serves: wait for it, not for a time
    wait_for(lambda: int(ra.read_text()) == storeview.VIEW_READ_AHEAD_KB == 4096, 30,
             f"the view's read-ahead ({ra.read_text().strip()} KiB)")
    assert (view.mnt / "seq.img").read_bytes() == data


def test_an_agent_that_dies_is_replaced(view: View) -> None:
    (view.mnt / "f").write_bytes(b"before")
    first = view.agent_pid()
    os.kill(first, signal.SIGKILL)
    # a request may land on the dead link (EIO) while the view notices; then it reconnects
    for _ in range(100):
        try:
            data = (view.mnt / "f").read_bytes()
            (view.mnt / "g").write_bytes(b"after")
            break
        except OSError as e:
            assert e.errno == errno.EIO, e
    else:
        raise AssertionError("the view never reconnected")
    assert data == b"before"
    assert (view.site.dir / "g").read_bytes() == b"after"
    assert view.agent_pid() != first
    assert "reconnected" in view.log.read_text()


@pytest.mark.parametrize("host", ["same", "restarted"])
def test_a_restart_of_the_remote_host_fails_each_open_files_next_fsync_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """The agent killed (and with it nbdkit) while a small file (agent path) and a
    large one (NBD) hold writes not yet synced. The remote host still runs the same
    kernel (same boot id): those writes are in its page cache, every fsync succeeds.
    It restarted meanwhile (a new boot id; FUSEDISK_BOOT_ID_PATH stands in for
    /proc/sys/kernel/random/boot_id): each handle's next fsync fails with EIO once."""
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setenv("FUSEDISK_BOOT_ID_PATH", str(boot))  # the view's agents inherit it
    with running_view(tmp_path) as view:
        (view.mnt / "big").write_bytes(bytes(2 << 20))
        small = os.open(view.mnt / "small", os.O_CREAT | os.O_RDWR, 0o644)
        big = os.open(view.mnt / "big", os.O_RDWR)
        try:
            os.pwrite(small, b"small data", 0)
            os.pwrite(big, b"big data", 4096)
            if host == "restarted":
                boot.write_text("boot-2\n")
            first = view.agent_pid()
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: view.agent_pid() != first if _has_agent(view) else False, 30,
                     "the view's new agent")
            for fd in (small, big):
                if host == "same":
                    os.fsync(fd)
                else:
                    with pytest.raises(OSError) as caught:
                        os.fsync(fd)
                    assert caught.value.errno == errno.EIO
                os.fsync(fd)  # told once
            assert os.pread(small, 100, 0) == b"small data"
            assert os.pread(big, 8, 4096) == b"big data"
        finally:
            os.close(small)
            os.close(big)
        said = view.log.read_text()
        assert ("restarted since the last connection" in said) is (host == "restarted"), said


def _has_agent(view: View) -> bool:
    try:
        view.agent_pid()
    except AssertionError:
        return False
    return True


def test_no_store_means_eio_not_a_hang(tmp_path: Path) -> None:
    """A remote store that goes away for good: requests fail with EIO after the timeout."""
    site = Site(tmp_path)
    v = View(site, tmp_path / "view", "--reconnect-timeout", "1")
    try:
        (v.mnt / "f").write_bytes(b"x")
        held = site.dir.rename(tmp_path / "moved-away")  # the agent cannot start again
        os.kill(v.agent_pid(), signal.SIGKILL)
        failures = 0
        for _ in range(20):
            try:
                os.stat(v.mnt / "f")
            except OSError as e:
                assert e.errno in (errno.EIO, errno.ENOENT), e
                failures += 1
                if e.errno == errno.EIO and failures > 1:
                    break
        assert failures > 1
        held.rename(site.dir)
    finally:
        log = v.stop()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp_path / "moved-away")
        assert stop_nbdkits(site.dir) == []
    assert "gave up reconnecting" in log, log


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "k.psk")
    for argv, words in (
        (["far=/not/remote", str(tmp_path)], "expected NAME=nbd+ssh"),
        ([f"far=nbd+local://{tmp_path}/missing?tls-psk={keys}", str(tmp_path)], "far"),
        ([f"far=nbd+local://{tmp_path}?tls-psk={keys}", str(tmp_path / "nowhere")],
         "not a directory"),
    ):
        done = subprocess.run([sys.executable, "-m", "fusedisk", "store-view", *argv],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert done.stderr.startswith("fusedisk: error: ") and done.stderr.count("\n") == 1, \
            done.stderr
        assert words in done.stderr, done.stderr


def test_hard_links_lose_names_in_any_order(view: View) -> None:
    """Names of one inode come and go; every remaining name, and a descriptor, still
    lead to it (the view looks it up by inode when it lost every name it knew)."""
    m = view.mnt
    (m / "d").mkdir()
    (m / "d" / "a").write_bytes(b"data")
    os.link(m / "d" / "a", m / "d" / "b")
    os.link(m / "d" / "a", m / "c")
    fd = os.open(m / "d" / "b", os.O_RDWR)
    try:
        os.rename(m / "d" / "a", m / "d" / "b")  # two names of one inode: nothing happens
        assert sorted(os.listdir(m / "d")) == ["a", "b"]
        os.unlink(m / "d" / "b")
        os.unlink(m / "d" / "a")  # the names the kernel learnt first are gone
        os.pwrite(fd, b"DATA", 0)
        os.fsync(fd)
        assert os.fstat(fd).st_nlink == 1
        assert (m / "c").read_bytes() == b"DATA"
        os.rename(m / "d", m / "e")
        assert os.pread(fd, 4, 0) == b"DATA"
    finally:
        os.close(fd)
    assert (view.site.dir / "c").read_bytes() == b"DATA"


def test_a_file_that_grows_by_writes_goes_over_nbd(view: View) -> None:
    """Appended to from empty (a qcow2 image, a log) and then rewritten in place through
    the same descriptor: the appends go through the agent (an NBD export cannot grow),
    but the export keeps learning the file's size, so the rewrite goes over NBD; every
    byte arrives."""
    import json

    path = view.mnt / "growing.qcow2"
    chunks = [os.urandom(256 << 10) for _ in range(160)]  # 40 MiB
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for chunk in chunks:
            os.write(fd, chunk)
        again = os.urandom(32 << 20)
        os.pwrite(fd, again, 0)
    finally:
        os.close(fd)
    expected = again + b"".join(chunks)[32 << 20:]
    assert (view.site.dir / "growing.qcow2").read_bytes() == expected
    assert path.read_bytes() == expected
    wait_for(lambda: view.status_file.exists() and json.loads(
        view.status_file.read_text())["nbd_bytes_written"] >= 16 << 20, 30,
        "the view to report the rewrite's NBD writes")
