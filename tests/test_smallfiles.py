"""What a small file costs the daemon around its life (issue 16): no durable save,
worker-thread hop or backing syscall that the file's life does not need.

Two levels: a real mount (the placement record's write-behind, worker hops per
removal, seen through ``status``) and fs.Operations called directly, where the
backing room's calls are counted (spied on, still run) per request.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from fusedisk import backing
from fusedisk.fs import Operations

from .mounting import MountedDatastore, store_names, wait_for
from .test_ops_direct import unmounted_ops

CTX = pyfuse3.RequestContext()
#: what the stalled placement save of the first test would hold a request for
STALL_MS = 60_000
#: far below it, far above what the changes take on a loaded machine
BOUND_S = 20.0


def test_top_level_changes_do_not_wait_for_the_placement_save(tmp_path: Path) -> None:
    """A create, mkdir, rename and removal at the top level return while the
    placement record's save is stalled (sqlite's journal there cost two saves,
    four state-directory fsyncs, per transaction); a crash before that save loses
    nothing: the next mount serves exactly what the stores hold."""
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": f"record-save:{STALL_MS}:1"})
        started = time.monotonic()
        (ds.mnt / "db.sqlite").write_bytes(b"db")
        (ds.mnt / "db.sqlite-journal").write_bytes(b"journal")
        (ds.mnt / "db.sqlite-journal").unlink()
        (ds.mnt / "vm1").mkdir()
        (ds.mnt / "vm1" / "disk.img").write_bytes(b"x" * 4096)
        os.rename(ds.mnt / "vm1", ds.mnt / "vm2")
        (ds.mnt / "gone").mkdir()
        (ds.mnt / "gone").rmdir()
        assert time.monotonic() - started < BOUND_S, "a top-level change waited for the save"
        assert sorted(os.listdir(ds.mnt)) == ["db.sqlite", "vm2"]
        ds.kill()  # the save is still stalled: the record on disk is the one of the start
        assert store_names(ds.stores["a"]) == ["db.sqlite", "vm2"]
        ds.start()
        assert ds.status()["placement"] == {"db.sqlite": "a", "vm2": "a"}
        assert (ds.mnt / "vm2" / "disk.img").read_bytes() == b"x" * 4096
        (ds.mnt / "vm3").mkdir()
        assert ds.status()["placement"] == {"db.sqlite": "a", "vm2": "a", "vm3": "a"}
        assert ds.stop() == 0
        ds.start()  # the unmount saved the record; nothing is adopted anew
        assert "adopted entry" not in ds.log().split("serving")[-1]
        assert ds.status()["placement"] == {"db.sqlite": "a", "vm2": "a", "vm3": "a"}
    finally:
        ds.teardown()


def test_removing_files_without_history_costs_no_worker_hop(
    datastore: MountedDatastore,
) -> None:
    """A file with no saved CBT history (no change id ever asked for) has nothing
    to forget in the state directory: its unlink runs on the loop alone (it cost
    a worker thread's hop to look for the history, the most of ``rm -rf``'s CPU)."""
    home = datastore.mnt / "vm1"
    home.mkdir()
    names = [f"f{i}" for i in range(20)]
    for name in names:
        (home / name).write_bytes(b"s" * 2048)
    before = datastore.status()["fs"]["blocking_jobs"]
    assert datastore.status()["fs"]["blocking_jobs"] == before  # status itself hops not
    for name in names:
        (home / name).unlink()
    assert datastore.status()["fs"]["blocking_jobs"] == before
    assert os.listdir(home) == []


def test_removed_files_are_freed_off_the_loop(datastore: MountedDatastore) -> None:
    """The daemon holds the last reference to a removed file until the kernel
    forgets it, and closing that is where the store frees the inode (~200 µs on
    ext4, most of a small file's time on the loop): it is closed on the closer
    thread, and the store's inodes and blocks still all come back."""
    home = datastore.mnt / "vm1"
    home.mkdir()
    assert datastore.proc is not None
    fds = Path(f"/proc/{datastore.proc.pid}/fd")

    def removed_ones_held() -> list[str]:
        held = []
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:  # closed meanwhile
                continue
            if target.startswith(str(datastore.stores["a"])) and target.endswith("(deleted)"):
                held.append(target)
        return held

    behind_before = datastore.status()["fs"]["closes_behind"]
    for i in range(20):
        path = home / f"f{i}"
        path.write_bytes(b"r" * 65536)
        path.unlink()
    sub = home / "d"
    sub.mkdir()
    sub.rmdir()
    wait_for(lambda: datastore.status()["fs"]["closes_behind"] - behind_before >= 21, 30,
             "the removed objects' descriptors to go to the closer")
    wait_for(lambda: not removed_ones_held(), 30, "the removed objects' descriptors to close")
    assert os.listdir(home) == []


def test_closing_files_sends_no_flush_after_the_first(datastore: MountedDatastore) -> None:
    """FLUSH does nothing here (no buffered writes, locks are the kernel's): the
    daemon answers the first with ENOSYS and the kernel sends no more, so a
    close costs one request (RELEASE) instead of two."""
    home = datastore.mnt / "vm1"
    home.mkdir()
    for i in range(10):
        (home / f"f{i}").write_bytes(b"c" * 100)
        assert (home / f"f{i}").read_bytes() == b"c" * 100
    assert datastore.status()["fs"]["flush_requests"] == 1


def test_writes_ask_for_file_capabilities_once(datastore: MountedDatastore) -> None:
    """Without FUSE_HANDLE_KILLPRIV_V2 the kernel asks for ``security.capability``
    before every buffered write (a round trip each, answered from memory); with
    it (SB_NOSEC) only the first write of a file the kernel does not know to be
    without capabilities asks, and a chown no longer refreshes the attributes."""
    home = datastore.mnt / "vm1"
    home.mkdir()
    before = datastore.status()["fs"]["caps_probes"]
    fd = os.open(home / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i in range(20):
            os.pwrite(fd, b"w" * 512, i * 512)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert datastore.status()["fs"]["caps_probes"] - before == 1
    assert (home / "f").read_bytes() == b"w" * 512 * 20


def test_reading_after_writing_asks_for_no_attributes(datastore: MountedDatastore) -> None:
    """With FUSE_AUTO_INVAL_DATA (libfuse's default) the kernel refreshes a file's
    attributes before each read that follows a write, and drops its own cache when
    the mtime moved, by its own write; every change passes through this mount, so
    the shim turns it off: no GETATTR, and the reads come from the page cache."""
    assert datastore.status()["fuse_shim"]["auto_inval_off"] is True
    home = datastore.mnt / "vm1"
    home.mkdir()
    (home / "db").write_bytes(bytes(65536))
    fd = os.open(home / "db", os.O_RDWR)
    try:
        os.pread(fd, 65536, 0)
        before = datastore.status()["fs"]["getattrs"]
        for i in range(10):
            os.pwrite(fd, bytes([i]) * 4096, i * 4096)
            assert os.pread(fd, 4096, i * 4096) == bytes([i]) * 4096
        assert datastore.status()["fs"]["getattrs"] == before
    finally:
        os.close(fd)
    with open(home / "db", "rb") as f:  # and another opener sees the same bytes
        assert f.read(10 * 4096) == b"".join(bytes([i]) * 4096 for i in range(10))


def test_fsync_of_the_mount_root_reaches_the_stores(datastore: MountedDatastore) -> None:
    """The mount root's names live in the stores' root directories: fsync of the
    root (sqlite's, after it made or removed its journal there) syncs those (it
    was answered without touching any store)."""
    (datastore.mnt / "db.sqlite-journal").write_bytes(b"j")
    before = datastore.status()["fs"]["blocking_jobs"]
    fd = os.open(datastore.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert datastore.status()["fs"]["blocking_jobs"] == before + 1


# -- fs.Operations called directly: backing calls per request ---------------------------


class _Spy:
    """Counts calls of some of the backing room's functions (which still run)."""

    NAMES = ("getxattr", "setxattr", "lstat_at", "open_path", "fstat", "run_blocking",
             "reopen")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in self.NAMES:
            monkeypatch.setattr(backing, name, self._counting(name, getattr(backing, name)))

    def _counting(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return real(*args)
        return counted

    def take(self) -> Counter[str]:
        taken, self.calls = self.calls, Counter()
        return taken


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Operations]:
    """A real datastore with CBT on and its Operations, unmounted."""
    with unmounted_ops(tmp_path, cbt=True) as operations:
        yield operations


def run_with_files(ops: Operations, main: Callable[[], Awaitable[None]]) -> None:
    """Run *main* on trio with the open files' service (history saves) running."""

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(ops.files.run)
            await main()
            nursery.cancel_scope.cancel()

    trio.run(run)


def test_a_new_file_costs_no_xattr_reads(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the mount has just made carries no xattrs: its create reads no CBT id
    and the kernel's ``security.capability`` probe before its first write is answered
    from memory; its removal stats its name once and opens nothing more."""

    async def main() -> None:
        home = await ops.mkdir(pyfuse3.ROOT_INODE, b"vm1", 0o755, CTX)
        spy = _Spy(monkeypatch)
        info, attr = await ops.create(home.st_ino, b"f", 0o644,
                                      os.O_CREAT | os.O_EXCL | os.O_RDWR, CTX)
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await ops.getxattr(attr.st_ino, b"security.capability", CTX)
        assert caught.value.errno == pyfuse3.ENOATTR
        assert await ops.write(info.fh, 0, b"w" * 4096) == 4096
        calls = spy.take()
        assert calls["getxattr"] == 0, calls
        assert calls["setxattr"] == 1, calls  # the CBT id, so a later history is its own
        assert calls["reopen"] == 0, calls  # the create's descriptor serves the data path
        await ops.release(info.fh)
        spy.take()
        await ops.unlink(home.st_ino, b"f", CTX)
        calls = spy.take()
        assert calls["lstat_at"] == 1 and calls["open_path"] == 0, calls
        assert calls["run_blocking"] == 0, calls  # no history to look for on a thread
        await ops.forget([(attr.st_ino, 1)])
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await ops.lookup(home.st_ino, b"f", CTX)
        assert caught.value.errno == errno.ENOENT

    run_with_files(ops, main)


def test_reopening_a_file_without_history_rewrites_no_xattrs(
    ops: Operations, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file whose id this mount gave and saved nothing under takes the same id
    when it is opened again: no new id, no kept ctime (two xattr writes a reopen),
    and the ctime the mount shows stays the backing one."""

    async def main() -> None:
        home = await ops.mkdir(pyfuse3.ROOT_INODE, b"vm1", 0o755, CTX)
        info, attr = await ops.create(home.st_ino, b"f", 0o644,
                                      os.O_CREAT | os.O_EXCL | os.O_RDWR, CTX)
        await ops.write(info.fh, 0, b"w" * 4096)
        await ops.release(info.fh)
        await trio.testing.wait_all_tasks_blocked()  # the close's (empty) save is done
        assert ops.files.statistics()["open_files"] == 0
        store_file = Path(ops.datastore.default_store.path) / "vm1" / "f"
        first_id = os.getxattr(store_file, "trusted.fusedisk.id")
        spy = _Spy(monkeypatch)
        for _ in range(3):
            info = await ops.open(attr.st_ino, os.O_RDWR, CTX)
            await ops.write(info.fh, 0, b"v" * 4096)
            await ops.release(info.fh)
            await trio.testing.wait_all_tasks_blocked()
        calls = spy.take()
        assert calls["setxattr"] == 0, calls
        assert os.getxattr(store_file, "trusted.fusedisk.id") == first_id
        shown = await ops.getattr(attr.st_ino, CTX)
        assert shown.st_ctime_ns == os.stat(store_file).st_ctime_ns

    run_with_files(ops, main)
