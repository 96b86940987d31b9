"""Synchronous-write flags reach the backing store's stable storage, on every path.

The kernel sends a FUSE FSYNC after an ``O_DSYNC``/``O_SYNC`` write only on
buffered handles; on ``direct_io`` handles (fusedisk serves ``O_DIRECT`` opens
that way) the daemon must sync itself before it replies. These tests watch the
daemon's own ``fsync``/``fdatasync`` calls with strace, per backing file,
idle, while writes are mirrored during a relocation, and after a switchover.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk, wait_for
from .straced import calls_of

pytestmark = pytest.mark.mount

WRITES = 20


def syncs_of(pid: int) -> AbstractContextManager[Counter[tuple[str, str]]]:
    """Count the ``fsync``/``fdatasync`` calls of process *pid* (all threads),
    by backing path, while the block runs: ``counts[(call, path)]``."""
    return calls_of(pid, "fsync,fdatasync")


def direct_writes(path: Path, flags: int, count: int = WRITES) -> None:
    """*count* aligned 4 KiB writes through one descriptor opened with *flags*."""
    buf = mmap.mmap(-1, 4096)
    buf.write(b"d" * 4096)
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        for i in range(count):
            assert os.pwrite(fd, buf, i * 4096) == 4096
    finally:
        os.close(fd)


SYNC_CASES = [
    ("O_DIRECT|O_DSYNC", os.O_DIRECT | os.O_DSYNC, "fdatasync"),
    ("O_DIRECT|O_SYNC", os.O_DIRECT | os.O_SYNC, "fsync"),
    ("O_DSYNC (buffered)", os.O_DSYNC, None),  # the kernel's FSYNC: either call
]


@pytest.mark.parametrize(("label", "flags", "call"), SYNC_CASES, ids=[c[0] for c in SYNC_CASES])
def test_sync_flags_reach_the_store(
    datastore: MountedDatastore, label: str, flags: int, call: str | None
) -> None:
    vm = datastore.mnt / "vm"
    vm.mkdir()
    disk = vm / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    backing = str(datastore.stores["a"] / "vm" / "disk.img")
    assert datastore.proc is not None
    with syncs_of(datastore.proc.pid) as counts:
        direct_writes(disk, flags)
    synced = sum(n for (c, path), n in counts.items() if path == backing
                 and (call is None or c == call))
    assert synced >= WRITES, (label, counts)


def test_o_direct_without_sync_flags_does_not_sync(datastore: MountedDatastore) -> None:
    """The control case: the strace oracle above can fail."""
    vm = datastore.mnt / "vm"
    vm.mkdir()
    disk = vm / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    assert datastore.proc is not None
    with syncs_of(datastore.proc.pid) as counts:
        direct_writes(disk, os.O_DIRECT)
    assert not [k for k in counts if k[1].endswith("/vm/disk.img")], counts


def test_o_dsync_while_mirroring_and_after_the_switchover(datastore: MountedDatastore) -> None:
    vm = datastore.mnt / "vm"
    vm.mkdir()
    disk = vm / "disk.img"
    disk.write_bytes(os.urandom(16 << 20))
    mnt = str(datastore.mnt)
    assert datastore.proc is not None
    result = fusedisk("migrate", mnt, "vm", "--to", "b", "--mode", "mirror", "--rate", "1M",
                      "--no-wait")
    assert result.returncode == 0, result.stderr
    assert fusedisk("pause", mnt, "vm").returncode == 0

    def state() -> str:
        return str(next(j for j in datastore.status()["jobs"] if j["entry"] == "vm")["state"])

    wait_for(lambda: state() == "mirroring", 30, "mirroring")
    source = str(datastore.stores["a"] / "vm" / "disk.img")
    with syncs_of(datastore.proc.pid) as counts:
        direct_writes(disk, os.O_DIRECT | os.O_DSYNC)
    assert counts[("fdatasync", source)] >= WRITES, counts
    fusedisk("rate", mnt, "vm", "0", check=True)
    assert fusedisk("resume", mnt, "vm").returncode == 0
    wait_for(lambda: state() in ("done", "failed"), 120, "the relocation")
    assert state() == "done"
    destination = str(datastore.stores["b"] / "vm" / "disk.img")
    with syncs_of(datastore.proc.pid) as counts:
        direct_writes(disk, os.O_DIRECT | os.O_DSYNC)
    assert counts[("fdatasync", destination)] >= WRITES, counts
    assert disk.read_bytes()[: WRITES * 4096] == b"d" * (WRITES * 4096)


@pytest.mark.parametrize("flag", ["RWF_DSYNC", "RWF_SYNC"])
def test_rwf_sync_writes_on_o_direct_reach_the_store(
    datastore: MountedDatastore, flag: str
) -> None:
    """A single synchronous write (``pwritev2``) on a plain O_DIRECT descriptor:
    only the libfuse shim lets the daemon see it, and status says it is in use."""
    shim = datastore.status()["fuse_shim"]
    assert shim["loaded"] and shim["sessions"] >= 1 and not shim["problem"], shim
    vm = datastore.mnt / "vm"
    vm.mkdir()
    disk = vm / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    backing = str(datastore.stores["a"] / "vm" / "disk.img")
    buf = mmap.mmap(-1, 4096)
    buf.write(b"r" * 4096)
    assert datastore.proc is not None
    with syncs_of(datastore.proc.pid) as counts:
        fd = os.open(disk, os.O_WRONLY | os.O_DIRECT)
        try:
            for i in range(WRITES):
                assert os.pwritev(fd, [buf], i * 4096, getattr(os, flag)) == 4096
            os.pwrite(fd, buf, WRITES * 4096)  # an ordinary write: no sync
        finally:
            os.close(fd)
    call = "fdatasync" if flag == "RWF_DSYNC" else "fsync"
    assert counts[(call, backing)] == WRITES, counts
    assert disk.read_bytes()[: (WRITES + 1) * 4096] == b"r" * ((WRITES + 1) * 4096)


def _fill(path: Path, chunk: int = 65536) -> None:
    with open(path, "ab", buffering=0) as f:  # fill what is left of its filesystem
        try:
            while True:
                f.write(b"\0" * chunk)
                f.flush()
        except OSError:
            pass


def _cbt(ds: MountedDatastore, *args: str) -> subprocess.CompletedProcess[str]:
    return fusedisk("cbt", args[0], str(ds.mnt), *args[1:])


def _extents(ds: MountedDatastore, file: str, since: str) -> list[list[int]]:
    result = _cbt(ds, "changes", file, "--since", since, "--json")
    assert result.returncode == 0, result
    extents: list[list[int]] = json.loads(result.stdout)["extents"]
    return extents


def _covers(extents: list[list[int]], offset: int, length: int) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in extents)


def test_a_full_or_read_only_state_directory_keeps_the_mount_up_and_answers_true(
    tmp_path: Path,
) -> None:
    """State directory full, then read-only (issue 11, item 8): the mount stays
    up and data keeps flowing. Top-level changes are done and reported ok (the
    record is repaired from the stores at the next mount). A change id is
    answered with a superset or refused, never answered wrongly: a write whose
    CBT log cannot be saved withdraws the file's history (its old change ids are
    refused, before and after a crash). status says degraded and why; once the
    directory takes saves again, a checkpoint makes a history whole."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], check=True)
    ds = MountedDatastore(tmp_path)
    try:
        ds.start()
        (ds.mnt / "vm0").mkdir()
        (ds.mnt / "vm1").mkdir()
        disk = ds.mnt / "vm1" / "disk.img"
        expected = bytearray(os.urandom(4 << 20))
        disk.write_bytes(expected)
        old_id = _cbt(ds, "checkpoint", "vm1/disk.img").stdout.strip()
        assert "/" in old_id, old_id
        ds.stop()  # its CBT history is saved (a clean close), then fill the rest
        ds.start()
        assert ds.status()["health"] == "ok"
        filler = state / "filler"
        _fill(filler)
        # full: the file's log is rewritten in place, its close cannot save.
        # It stays open until the status is read: a clean close that succeeds
        # in what the withdrawal freed would make the history whole again.
        data = os.urandom(1 << 20)
        held = open(disk, "r+b")  # closed below, after the status
        try:
            held.write(data)
            held.flush()
            os.fsync(held.fileno())  # the writes reached the daemon (and its log)
            expected[: 1 << 20] = data
            _fill(filler, chunk=4096)  # what the withdrawal freed, too
            new = ds.mnt / "vm1" / "new.img"
            new.write_bytes(b"x" * 4096)  # no change id: needs no record, the write is fine
            refused = _cbt(ds, "checkpoint", "vm1/new.img")  # cannot be made durable
            assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused
            assert "Traceback" not in refused.stderr, refused
            (ds.mnt / "vm4").mkdir()
            os.rename(ds.mnt / "vm0", ds.mnt / "vm2")
            status = ds.status()
        finally:
            held.close()
        assert status["health"] == "degraded", status
        assert any("CBT" in r for r in status["degraded"]), status
        assert any("record" in r for r in status["degraded"]), status
        assert status["record_stale"] and status["cbt_state"]["save_error"], status
        # the log of the disk is rewritten in place (its two slots were allocated
        # when it was made), and the new file needs none: nothing withdrawn yet
        assert status["cbt_state"]["withdrawn_histories"] == 0, status
        human = ds.cli("status", str(ds.mnt))
        assert human.returncode == 0 and "DEGRADED:" in human.stdout, human
        assert _covers(_extents(ds, "vm1/disk.img", old_id), 0, 1 << 20)  # a superset
        assert sorted(os.listdir(ds.mnt)) == ["vm1", "vm2", "vm4"]
        # read-only: the log cannot be rewritten either: the history is withdrawn
        filler.unlink()
        cbt_dir = state / "cbt"  # read-only over the daemon's open files: a bind mount
        subprocess.run(["mount", "--bind", str(cbt_dir), str(cbt_dir)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cbt_dir)], check=True)
        with open(disk, "r+b") as f:
            f.seek(2 << 20)
            f.write(b"w" * 4096)
            f.flush()
            os.fsync(f.fileno())
        expected[2 << 20: (2 << 20) + 4096] = b"w" * 4096
        refused = _cbt(ds, "changes", "vm1/disk.img", "--since", old_id)
        assert refused.returncode != 0 and "full backup" in refused.stderr, refused
        assert ds.status()["cbt_state"]["withdrawn_histories"] == 1
        assert ds.proc is not None and ds.proc.poll() is None
        # a crash while degraded: the old change id stays refused
        ds.kill()
        subprocess.run(["umount", str(cbt_dir)], check=True)
        ds.start()
        assert disk.read_bytes() == expected
        assert new.read_bytes() == b"x" * 4096
        refused = _cbt(ds, "changes", "vm1/disk.img", "--since", old_id)
        assert refused.returncode != 0 and "full backup" in refused.stderr, refused
        assert sorted(ds.status()["placement"]) == ["vm1", "vm2", "vm4"]
        # saves work again: a checkpoint gives an exact history
        fresh = _cbt(ds, "checkpoint", "vm1/disk.img")
        assert fresh.returncode == 0, fresh
        with open(disk, "r+b") as f:
            f.seek(3 << 20)
            f.write(b"z" * 4096)
        expected[3 << 20: (3 << 20) + 4096] = b"z" * 4096
        extents = _extents(ds, "vm1/disk.img", fresh.stdout.strip())
        assert extents == [[3 << 20, 64 << 10]], extents
        (ds.mnt / "vm3").mkdir()  # the record saves again
        assert ds.status()["health"] == "ok", ds.status()
        ds.stop()
        ds.start()
        assert sorted(ds.status()["placement"]) == ["vm1", "vm2", "vm3", "vm4"]
        assert disk.read_bytes() == expected
    finally:
        ds.teardown()
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_out_of_descriptors_the_mount_stays_up_and_answers_true(
    datastore: MountedDatastore,
) -> None:
    """The daemon out of file descriptors (issue 11, item 8): requests fail with
    EMFILE, a create that fails leaves nothing behind, the daemon stays up, and
    once descriptors are free again everything works."""
    require_tools("prlimit")
    assert datastore.proc is not None
    pid = datastore.proc.pid
    vm = datastore.mnt / "vm"
    vm.mkdir()
    held = [os.open(datastore.mnt, os.O_RDONLY)]  # keeps nothing of the daemon's
    soft = subprocess.run(["prlimit", f"--pid={pid}", "--nofile", "--raw", "--noheadings",
                           "--output=SOFT"], check=True, capture_output=True, text=True)
    subprocess.run(["prlimit", f"--pid={pid}", "--nofile=200:"], check=True)  # soft limit
    made: dict[str, bytes] = {}  # name → what it holds, as the guest was told
    refused = 0
    try:
        for i in range(400):  # each file the kernel remembers holds one of its fds
            name = f"f{i}"
            try:
                fd = os.open(vm / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as e:
                assert e.errno == errno.EMFILE, e
                refused += 1
                continue
            made[name] = b""
            try:
                if os.write(fd, b"x") == 1:
                    made[name] = b"x"
            except OSError as e:
                assert e.errno == errno.EMFILE, e
            finally:
                os.close(fd)
        assert refused > 0, "the limit was never reached: nothing was tested"
        assert datastore.proc.poll() is None
        # a create answered with an error left nothing on the store
        assert sorted(os.listdir(datastore.stores["a"] / "vm")) == sorted(made)
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft.stdout.strip()}:"],
                       check=True)
        for fd in held:
            os.close(fd)
    assert sorted(os.listdir(vm)) == sorted(made)
    for name, data in made.items():
        assert (vm / name).read_bytes() == data, name
    (vm / "after").write_bytes(b"works")
    assert (vm / "after").read_bytes() == b"works"
