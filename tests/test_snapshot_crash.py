"""kill -9 of a real daemon with a copy-before-write snapshot open, guest writes
running: after it the snapshot is intact (and then exact) or reported lost,
never read wrong.

The guest writes through the mount (4 KiB pwrites, fsyncs now and then); the
daemon dies by SIGKILL — at a random moment, after an fsync with nothing
saved since, or at the failpoint between saving a block and overwriting it.
Then the rooms of a daemon (loader, open_file) read the snapshot back in
this process, the way the next mount does, and a real remount lists the
same state.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import threading
from pathlib import Path

import pytest

from fusedisk.snapshots import SnapshotError, open_file

from .mounting import MountedDatastore, force_unmount, fusedisk, wait_for
from .test_snapshot_cbw import rig

DISK = 4 << 20
DAEMON_BLOCK = 64 << 10  #: the daemon's default block size


class Guest(threading.Thread):
    """Random 4 KiB writes to the disk through the mount (*direct*: O_DIRECT, as
    a VM's cache=none: each reaches the daemon at once), an fsync every few;
    stops at its first error (the daemon died)."""

    def __init__(self, disk: Path, seed: int, direct: bool, fsync_every: int = 8) -> None:
        super().__init__(daemon=True)
        self.disk, self.rng, self.fsync_every = disk, random.Random(seed), fsync_every
        self.direct = direct
        self.writes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        fd = os.open(self.disk, os.O_RDWR | (os.O_DIRECT if self.direct else 0))
        buf = mmap.mmap(-1, 4096)  # page-aligned, for O_DIRECT
        try:
            while not self.stop.is_set():
                offset = self.rng.randrange(0, DISK // 4096) * 4096
                buf[:] = self.rng.randbytes(4096)
                os.pwrite(fd, buf, offset)
                self.writes += 1
                if self.writes % self.fsync_every == 0:
                    os.fsync(fd)
        except OSError:
            pass
        finally:
            try:
                os.close(fd)
            except OSError:  # a close on the dead mount: ENOTCONN
                pass


def make_disk(ds: MountedDatastore) -> tuple[Path, bytes]:
    home = ds.mnt / "vm1"
    home.mkdir()
    data = random.Random(1).randbytes(DISK)
    (home / "disk.img").write_bytes(data)
    return home / "disk.img", data


def snapshot(ds: MountedDatastore, name: str) -> dict[str, object]:
    result = fusedisk("snapshot", "create", str(ds.mnt), "vm1", "--name", name, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out, dict)
    return out


async def read_back(tmp_path: Path, ds: MountedDatastore, refs: dict[str, bytes]
                    ) -> dict[str, str]:
    """What the next start finds: each snapshot's state; an "ok" one must equal its
    reference byte for byte, a lost one must refuse to be read."""
    force_unmount(ds.mnt)  # the dead daemon's mount
    states = {}
    async with rig(tmp_path, ds.stores["a"], block_size=DAEMON_BLOCK) as r:
        for s in r.snapshots.list("vm1"):
            states[s.name] = s.state
            if s.state == "ok":
                with open_file(r.datastore, "vm1", s.name, "disk.img") as f:
                    assert f.pread(DISK, 0) == refs[s.name], f"snapshot {s.name} reads wrong"
            else:
                assert s.state == "lost" and s.lost, s
                with pytest.raises(SnapshotError, match="is lost"):
                    open_file(r.datastore, "vm1", s.name, "disk.img")
    return states


@pytest.fixture
def ds(tmp_path: Path) -> MountedDatastore:
    return MountedDatastore(tmp_path, stores=("a",))


async def test_kill_9_at_random_moments_never_leaves_a_wrong_snapshot(
    tmp_path: Path, ds: MountedDatastore
) -> None:
    try:
        ds.start()
        disk, data = make_disk(ds)
        refs = {"s0": data}
        snapshot(ds, "s0")
        seen = []
        for round_no in range(3):
            guest = Guest(disk, round_no, direct=round_no > 0)
            guest.start()
            target = 50 + 150 * round_no
            wait_for(lambda: guest.writes >= target, 120, "the guest's writes")  # noqa: B023
            if round_no == 1:  # a second snapshot while the guest writes on
                guest.stop.set()
                guest.join(60)
                refs["s1"] = disk.read_bytes()
                snapshot(ds, "s1")
                guest = Guest(disk, 100 + round_no, direct=True)
                guest.start()
                wait_for(lambda: guest.writes >= 40, 120, "the guest's writes")  # noqa: B023
            ds.kill()
            guest.join(60)
            states = await read_back(tmp_path, ds, refs)
            assert set(states) == set(refs), states
            seen.append(states)
            ds.start()
            listed = json.loads(fusedisk("snapshot", "list", str(ds.mnt), "vm1",
                                         "--json").stdout)
            assert {s["name"]: s["state"] for s in listed} == states
            for name, state in states.items():
                if state == "lost":  # lost stays lost; a fresh one replaces it
                    assert fusedisk("snapshot", "delete", str(ds.mnt), "vm1",
                                    name).returncode == 0
                    refs[name] = disk.read_bytes()
                    snapshot(ds, name)
        ds.stop()
    finally:
        ds.teardown()
    assert seen, "no round ran"


async def test_kill_9_after_an_fsync_keeps_the_snapshot_and_at_the_save_loses_it(
    tmp_path: Path, ds: MountedDatastore
) -> None:
    try:
        ds.start()
        disk, data = make_disk(ds)
        snapshot(ds, "s")
        fd = os.open(disk, os.O_RDWR)
        try:
            for block in (0, 5, 40):
                os.pwrite(fd, b"x" * 4096, block * DAEMON_BLOCK + 100)
            os.fsync(fd)  # the saved blocks are durable, the map clean
            os.pwrite(fd, b"y" * 4096, 5 * DAEMON_BLOCK)  # already saved: no new save
        finally:
            os.close(fd)
        ds.kill()
        assert await read_back(tmp_path, ds, {"s": data}) == {"s": "ok"}

        ds.start(env={"FUSEDISK_FAILPOINT": "cbw-saved"})
        fd = os.open(disk, os.O_RDWR)
        try:
            with pytest.raises(OSError):  # the daemon dies inside this write
                os.pwrite(fd, b"z" * 4096, 20 * DAEMON_BLOCK)
        finally:
            try:
                os.close(fd)
            except OSError:  # the mount is dead
                pass
        assert ds.wait_exit(timeout_s=60) != 0
        assert "failpoint cbw-saved reached" in ds.log()
        assert await read_back(tmp_path, ds, {"s": data}) == {"s": "lost"}
        ds.start()
        listed = json.loads(fusedisk("snapshot", "list", str(ds.mnt), "--json").stdout)
        assert [(s["name"], s["state"]) for s in listed] == [("s", "lost")]
        assert "crash" in listed[0]["lost"], listed
        status = ds.status()
        assert status["snapshots"]["lost"] == [f"vm1@s: {listed[0]['lost']}"], status
        assert status["health"] == "degraded" and "vm1@s" in status["degraded"][0], status
        shown = fusedisk("snapshot", "list", str(ds.mnt))
        assert "lost: a crash" in shown.stdout, shown.stdout
        ds.stop()
    finally:
        ds.teardown()


async def test_a_disk_removed_or_replaced_after_the_snapshot_stays_in_it(
    tmp_path: Path, ds: MountedDatastore
) -> None:
    """Before the last name of a guarded file goes (rm, or a rename over it), the
    snapshot takes the rest of the file; it then needs it no more, across a
    kill -9 too."""
    try:
        ds.start()
        disk, data = make_disk(ds)
        other = ds.mnt / "vm1" / "other.img"
        other_data = random.Random(2).randbytes(DISK // 2)
        other.write_bytes(other_data)
        snapshot(ds, "s")
        fd = os.open(disk, os.O_WRONLY)  # some blocks saved the usual way first
        try:
            os.pwrite(fd, b"q" * 5000, 0)
        finally:
            os.close(fd)
        os.rename(disk, ds.mnt / "vm1" / "renamed.img")  # still guarded, found by its key
        os.unlink(ds.mnt / "vm1" / "renamed.img")
        (ds.mnt / "vm1" / "new.img").write_bytes(b"new")
        os.rename(ds.mnt / "vm1" / "new.img", other)
        assert other.read_bytes() == b"new"
        listed = json.loads(fusedisk("snapshot", "list", str(ds.mnt), "--json").stdout)
        assert listed[0]["state"] == "ok"
        # all of both files is saved now (and nothing is guarded any more)
        assert listed[0]["saved_bytes"] >= DISK + DISK // 2, listed
        assert ds.status()["snapshots"]["guarded_files"] == 0
        assert "holds all of 'disk.img' now" in ds.log()
        ds.kill()
        force_unmount(ds.mnt)
        async with rig(tmp_path, ds.stores["a"], block_size=DAEMON_BLOCK) as r:
            assert [(s.name, s.state) for s in r.snapshots.list("vm1")] == [("s", "ok")]
            with open_file(r.datastore, "vm1", "s", "disk.img") as f:
                assert f.pread(DISK, 0) == data
                assert f.extents() == [(0, DISK)]
            with open_file(r.datastore, "vm1", "s", "other.img") as f:
                assert f.pread(DISK, 0) == other_data
    finally:
        ds.teardown()
