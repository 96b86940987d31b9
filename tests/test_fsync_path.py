"""A guest's fsync and direct writes off the trio loop (issue 16), on a real mount.

- An FSYNC that needs nothing but the backing fsync is answered by one of the
  libfuse shim's threads (fuseshim.c): the daemon's fsync/fdatasync of the
  backing file still happens before the guest's call returns, and every one
  is reported back to the daemon (which keeps the fd and the entry's gate).
- ``direct_io`` opens carry FOPEN_PARALLEL_DIRECT_WRITES, so the kernel sends
  two writes to one file without waiting for the first one's reply.
- A relocation's switchover waits for an FSYNC on a shim thread to be answered.
- Write-behind: after enough written bytes the daemon starts writeback of the
  backing file (``sync_file_range``) on the shim's threads.

The daemon's system calls are watched with strace (all threads, with paths).
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from .mounting import MountedDatastore, wait_for
from .straced import calls_of

pytestmark = pytest.mark.mount

FSYNCS = 10


def _shim(ds: MountedDatastore) -> dict[str, Any]:
    shim: dict[str, Any] = ds.status()["fuse_shim"]
    return shim


def _disk(ds: MountedDatastore, size: int = 1 << 20) -> tuple[Path, str]:
    vm = ds.mnt / "vm"
    vm.mkdir()
    disk = vm / "disk.img"
    disk.write_bytes(bytes(size))
    return disk, str(ds.stores["a"] / "vm" / "disk.img")


def _aligned(byte: bytes, size: int = 4096) -> mmap.mmap:
    buf = mmap.mmap(-1, size)
    buf.write(byte * size)
    return buf


@pytest.mark.parametrize("flags", [os.O_DIRECT, 0], ids=["O_DIRECT", "buffered"])
def test_a_guest_fsync_is_answered_by_a_shim_thread_after_the_backing_sync(
    datastore: MountedDatastore, flags: int
) -> None:
    disk, backing = _disk(datastore)
    before = _shim(datastore)["fsyncs_detached"]
    buf = _aligned(b"s")
    assert datastore.proc is not None
    with calls_of(datastore.proc.pid, "fsync,fdatasync") as counts:
        fd = os.open(disk, os.O_RDWR | flags)
        try:
            for i in range(FSYNCS):
                assert os.pwrite(fd, buf, i * 4096) == 4096
                os.fsync(fd)
                os.fdatasync(fd)
        finally:
            os.close(fd)
    # each guest call was answered only after the daemon's own call on the backing file
    assert counts[("fsync", backing)] >= FSYNCS, counts
    assert counts[("fdatasync", backing)] >= FSYNCS, counts
    shim = _shim(datastore)
    assert shim["fsyncs_detached"] - before >= 2 * FSYNCS, shim
    assert shim["fsync_errors"] == 0, shim
    # and the daemon heard of every one (it lets go of the fd and gate then)
    wait_for(lambda: _shim(datastore)["extra_served"]["fsyncs_done"]
             == _shim(datastore)["fsyncs_detached"], 30, "the fsync completions")
    assert disk.read_bytes()[: FSYNCS * 4096] == b"s" * (FSYNCS * 4096)


def test_fsync_on_the_shim_threads_can_be_turned_off(tmp_path: Path) -> None:
    """The A/B switch of the bench (FUSEDISK_SHIM_OFF): the daemon's own path then."""
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_SHIM_OFF": "fsync"})
        disk, backing = _disk(ds)
        assert ds.proc is not None
        with calls_of(ds.proc.pid, "fsync") as counts:
            with open(disk, "r+b") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
        assert counts[("fsync", backing)] >= 1, counts
        assert _shim(ds)["fsyncs_detached"] == 0
    finally:
        ds.teardown()


def test_two_direct_writes_to_one_file_are_in_the_daemon_at_once(tmp_path: Path) -> None:
    """FOPEN_PARALLEL_DIRECT_WRITES reaches the kernel: while the daemon holds one
    O_DIRECT write (a stall point), a second one to the same file arrives. Without
    the flag the kernel holds the inode lock until the first is answered."""
    stall_ms = 15_000
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": f"direct-write:{stall_ms}:2"})
        disk, _ = _disk(ds)
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        done: list[int] = []
        errors: list[BaseException] = []

        def write(byte: bytes, offset: int) -> None:
            try:
                assert os.pwrite(fd, _aligned(byte), offset) == 4096
                done.append(offset)
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        def stalls() -> int:
            return ds.log().count("stall point direct-write reached")

        first = threading.Thread(target=write, args=(b"1", 0))
        second = threading.Thread(target=write, args=(b"2", 65536))
        try:
            first.start()
            wait_for(lambda: stalls() >= 1 or errors, 30, "the first write in the daemon")
            second.start()
            wait_for(lambda: stalls() >= 2 or done or errors, stall_ms / 1000 + 30,
                     "the second write, or the first one's reply")
            in_flight_at_once = stalls() >= 2 and not done
        finally:
            first.join(timeout=stall_ms / 1000 + 60)
            second.join(timeout=stall_ms / 1000 + 60)
            os.close(fd)
        assert not errors, errors
        assert in_flight_at_once, (done, ds.log()[-2000:])
        assert _shim(ds)["parallel_opens"] >= 1
        data = disk.read_bytes()
        assert data[:4096] == b"1" * 4096 and data[65536:65536 + 4096] == b"2" * 4096
    finally:
        ds.teardown()


def test_written_data_is_written_behind(datastore: MountedDatastore) -> None:
    """Past the write-behind threshold the daemon starts writeback of the backing file
    (so a later fsync has little to write), and the guest's data is intact."""
    disk, backing = _disk(datastore, 4 << 20)
    buf = _aligned(b"w", 65536)
    assert datastore.proc is not None
    with calls_of(datastore.proc.pid, "sync_file_range") as counts:
        fd = os.open(disk, os.O_WRONLY | os.O_DIRECT)
        try:
            for i in range(32):  # 2 MiB
                assert os.pwrite(fd, buf, i * 65536) == 65536
        finally:
            os.close(fd)
        wait_for(lambda: _shim(datastore)["write_behinds"] >= 1, 30, "a write-behind")
    assert counts[("sync_file_range", backing)] >= 1, counts
    assert disk.read_bytes()[: 2 << 20] == b"w" * (2 << 20)


def _job_state(ds: MountedDatastore, entry: str) -> str | None:
    jobs = [j for j in ds.status()["jobs"] if j["entry"] == entry]
    return str(jobs[0]["state"]) if jobs else None


def test_a_switchover_waits_for_an_fsync_on_a_shim_thread(tmp_path: Path) -> None:
    """The daemon keeps a detached FSYNC inside its entry's gate until the shim
    reports it answered: a relocation's switchover (which re-points and closes the
    backing fd) waits for it, and the guest's fsync succeeds on the file it named.
    The shim's stall point holds the fsync on its thread."""
    stall_ms = 4000
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": f"shim-fsync:{stall_ms}:1"})
        disk, _ = _disk(ds)
        fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        outcome: list[BaseException | None] = []

        def sync() -> None:
            try:
                os.fsync(fd)
                outcome.append(None)
            except BaseException as e:  # reported by the test thread
                outcome.append(e)

        syncer = threading.Thread(target=sync)
        try:
            assert os.pwrite(fd, _aligned(b"f"), 0) == 4096
            syncer.start()
            wait_for(lambda: _shim(ds)["fsyncs_detached"] >= 1 or outcome, 30,
                     "the fsync on a shim thread")
            assert not outcome, "the fsync returned before the stall ended"
            result = ds.cli("migrate", str(ds.mnt), "vm", "--to", "b", "--no-wait")
            assert result.returncode == 0, result.stderr
            # (state, completions the daemon had seen) in one snapshot of the daemon's:
            # the job may be done only after the fsync's completion came back
            seen = []
            while syncer.is_alive():
                status = ds.status()
                jobs = [j for j in status["jobs"] if j["entry"] == "vm"]
                seen.append((jobs[0]["state"] if jobs else None,
                             status["fuse_shim"]["extra_served"]["fsyncs_done"]))
                syncer.join(timeout=0.05)
            assert outcome == [None], outcome
            assert ("done", 0) not in seen, seen
            assert ("switching", 0) in seen, seen  # it did wait for it
            wait_for(lambda: _job_state(ds, "vm") in ("done", "failed"), 60, "the relocation")
            assert _job_state(ds, "vm") == "done", ds.status()["jobs"]
        finally:
            syncer.join(timeout=stall_ms / 1000 + 60)
            os.close(fd)
        assert disk.read_bytes()[:4096] == b"f" * 4096
        assert (ds.stores["b"] / "vm" / "disk.img").exists()
    finally:
        ds.teardown()
