"""Snapshots (fusedisk/snapshots.py) on a loop-mounted XFS store, read by real NBD clients.

The store ``x`` is XFS (reflinks); ``a`` is a plain directory on the test
machine's ext4, where snapshots are copy-before-write (test_snapshot_cbw.py
tests that path against a reference). A writer stamps a generation
into a block of disk0, then into the same block of disk1, then of disk2, so
a snapshot taken at one instant for all three disks can only show an
earlier disk at most one generation ahead of a later one, never behind:
per-disk snapshots at different
moments would break that. Backups are taken the way a backup tool does it:
a full copy of a snapshot with nbdcopy, then an incremental from the dirty
bitmap between two snapshots, and the result compared byte for byte.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk

BLOCK = 64 << 10
DISKS = 3
NBLOCKS = 64
CLIENT_TIMEOUT_S = 60


@pytest.fixture
def ds(xds: MountedDatastore) -> MountedDatastore:
    """The entry's store is the XFS one (reflink snapshots)."""
    return xds


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    result = fusedisk(*args)
    assert result.returncode == 0, (args, result.stderr)
    return result


def snapshot(ds: MountedDatastore, name: str) -> dict[str, object]:
    out = json.loads(ok("snapshot", "create", str(ds.mnt), "vm1", "--name", name,
                        "--json").stdout)
    assert isinstance(out, dict)
    return out


class Writer:
    """Stamps generation g into block k of disk0, disk1, disk2 in turn, for ever-growing g."""

    def __init__(self, home: Path) -> None:
        self.fds = [os.open(home / f"disk{i}.img", os.O_RDWR) for i in range(DISKS)]
        self.stop = threading.Event()
        self.generations = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        gen = 0
        while not self.stop.is_set():
            gen += 1
            block = gen % NBLOCKS
            stamp = struct.pack("<Q", gen) * (4096 // 8)
            for fd in self.fds:
                os.pwrite(fd, stamp, block * BLOCK)
            self.generations = gen

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        for fd in self.fds:
            os.close(fd)


def generations(path: Path) -> list[int]:
    data = path.read_bytes()
    return [struct.unpack_from("<Q", data, k * BLOCK)[0] for k in range(NBLOCKS)]


def make_vm(ds: MountedDatastore) -> Path:
    home = ds.mnt / "vm1"
    home.mkdir()
    (home / "vm1.vmx").write_text('displayName = "vm1"\n')
    os.symlink("disk0.img", home / "current.img")
    for i in range(DISKS):
        with open(home / f"disk{i}.img", "wb") as f:
            f.truncate(NBLOCKS * BLOCK)
    return home


def test_one_snapshot_holds_every_disk_at_one_instant(ds: MountedDatastore) -> None:
    home = make_vm(ds)
    snaps = []
    with Writer(home) as writer:
        for i in range(5):
            before = writer.generations
            snaps.append(snapshot(ds, f"s{i}"))
            assert writer.generations > before or i == 0  # the guest went on
    for snap in snaps:
        tree = Path(str(snap["path"])) / "tree"
        g = [generations(tree / f"disk{i}.img") for i in range(DISKS)]
        for k in range(NBLOCKS):
            for earlier, later in ((0, 1), (1, 2), (0, 2)):
                assert g[earlier][k] - g[later][k] in (0, NBLOCKS), (snap["name"], k,
                                                                      [d[k] for d in g])
        assert (tree / "vm1.vmx").read_text() == 'displayName = "vm1"\n'
        assert os.readlink(tree / "current.img") == "disk0.img"
        files = snap["files"]
        assert isinstance(files, dict) and set(files) == {
            "disk0.img", "disk1.img", "disk2.img", "vm1.vmx"}
        assert float(str(snap["pause_ms"])) < 5000
    listed = json.loads(ok("snapshot", "list", str(ds.mnt), "vm1", "--json").stdout)
    assert [s["name"] for s in listed] == [f"s{i}" for i in range(5)]
    assert all(s["state"] == "ok" for s in listed)
    # the view never moves: the guest wrote on after the last snapshot
    last = Path(str(snaps[-1]["path"])) / "tree" / "disk0.img"
    assert last.read_bytes() != (home / "disk0.img").read_bytes()


def test_full_and_incremental_backup_over_nbd_equal_each_snapshot(
    ds: MountedDatastore, tmp_path: Path
) -> None:
    require_tools("nbdinfo", "nbdcopy")
    home = make_vm(ds)
    disk = home / "disk0.img"
    with open(disk, "r+b") as f:
        f.write(os.urandom(NBLOCKS * BLOCK))
    s1 = snapshot(ds, "s1")
    with open(disk, "r+b") as f:
        for block in (3, 17, 40):
            f.seek(block * BLOCK + 100)
            f.write(os.urandom(5000))
    expected_s2 = disk.read_bytes()
    snapshot(ds, "s2")
    with open(disk, "r+b") as f:  # after s2: must not show in the s2 backup
        f.seek(50 * BLOCK)
        f.write(os.urandom(BLOCK))
    files = s1["files"]
    assert isinstance(files, dict)
    cid1 = files["disk0.img"]["change_id"]
    # cbt changes between a change id and a snapshot: exactly the three writes
    exact = json.loads(ok("cbt", "changes", str(ds.mnt), "vm1/disk0.img", "--since", cid1,
                          "--snapshot", "s2", "--json").stdout)["extents"]
    assert exact == [[3 * BLOCK, BLOCK], [17 * BLOCK, BLOCK], [40 * BLOCK, BLOCK]]

    full = tmp_path / "full.img"
    with exporting(ds, tmp_path, "vm1/disk0.img@s1") as uri:
        subprocess.run(["nbdcopy", uri, str(full)], check=True, timeout=CLIENT_TIMEOUT_S)
    s1_tree = Path(str(s1["path"])) / "tree" / "disk0.img"
    assert full.read_bytes() == s1_tree.read_bytes()
    with exporting(ds, tmp_path, "vm1/disk0.img@s2", "--since", cid1) as uri:
        dirty = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{cid1}", uri],
                               capture_output=True, text=True, check=True,
                               timeout=CLIENT_TIMEOUT_S).stdout
        changed = [(int(o), int(n)) for o, n, flag, *_ in
                   (line.split() for line in dirty.splitlines()) if flag == "1"]
        assert changed == [(3 * BLOCK, BLOCK), (17 * BLOCK, BLOCK), (40 * BLOCK, BLOCK)]
        s2_bytes = read_all(uri)
        with open(full, "r+b") as f:
            for offset, length in changed:  # the incremental: only what changed
                f.seek(offset)
                f.write(s2_bytes[offset: offset + length])
    assert full.read_bytes() == expected_s2


def read_all(uri: str) -> bytes:
    """An NBD export's bytes, as nbdcopy reads them (to stdout)."""
    return subprocess.run(["nbdcopy", "--", uri, "-"], capture_output=True, check=True,
                          timeout=CLIENT_TIMEOUT_S).stdout


class exporting:
    """``fusedisk export MNT FILE --socket S`` for the duration of a with block."""

    def __init__(self, ds: MountedDatastore, tmp_path: Path, file: str, *args: str) -> None:
        self.sock = tmp_path / f"export-{abs(hash(file))}.sock"
        self.argv = [sys.executable, "-m", "fusedisk", "export", str(ds.mnt), file, *args,
                     "--socket", str(self.sock)]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        uri = self.proc.stdout.readline().strip()
        if not uri:
            _, err = self.proc.communicate(timeout=CLIENT_TIMEOUT_S)
            raise AssertionError(f"export did not start: {err}")
        return uri

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=CLIENT_TIMEOUT_S)
        assert self.proc.returncode == 0, err


def test_snapshots_survive_a_relocation_and_a_remount(ds: MountedDatastore,
                                                      tmp_path: Path) -> None:
    home = make_vm(ds)
    with open(home / "disk0.img", "r+b") as f:
        f.write(os.urandom(BLOCK))
    kept = (home / "disk0.img").read_bytes()
    snap = snapshot(ds, "before-move")
    result = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "a", timeout=300)
    assert result.returncode == 0, result.stderr
    with open(home / "disk0.img", "r+b") as f:
        f.write(b"after the move")
    ds.stop()
    ds.start()
    listed = json.loads(ok("snapshot", "list", str(ds.mnt), "--json").stdout)
    assert [(s["name"], s["store"], s["state"]) for s in listed] == [("before-move", "x", "ok")]
    assert (Path(str(snap["path"])) / "tree" / "disk0.img").read_bytes() == kept
    # on the ext4 store the entry's snapshot is copy-before-write; its space is shown
    cbw = snapshot(ds, "n")
    files = cbw["files"]
    assert isinstance(files, dict) and files["disk0.img"]["method"] == "cbw"
    assert cbw["store"] == "a" and cbw["saved_bytes"] == 0
    with open(home / "disk0.img", "r+b") as f:
        f.write(b"overwrites the first block")
        os.fsync(f.fileno())
    listed = {s["name"]: s for s in json.loads(ok("snapshot", "list", str(ds.mnt),
                                                    "--json").stdout)}
    assert listed["n"]["state"] == "ok" and listed["n"]["saved_bytes"] == BLOCK
    assert listed["before-move"]["files"]["disk0.img"]["method"] == "reflink"
    status = ds.status()["snapshots"]
    assert status["count"] == 2 and status["saved_bytes"] == BLOCK and not status["lost"]
    assert status["space_bytes"] >= BLOCK and status["guarded_files"] == 4  # 3 disks, vm1.vmx
    # the export reads through the mount's view: the copy-before-write snapshot too
    require_tools("nbdcopy")
    with exporting(ds, tmp_path, "vm1/disk0.img@n") as uri:
        exported = read_all(uri)
    assert exported.startswith(b"after the move") and exported != (home / "disk0.img").read_bytes()
    assert exported == (ds.mnt / ".snapshots" / "vm1@n" / "disk0.img").read_bytes()
    ok("snapshot", "delete", str(ds.mnt), "vm1", "before-move")
    ok("snapshot", "delete", str(ds.mnt), "vm1", "n")
    assert json.loads(ok("snapshot", "list", str(ds.mnt), "--json").stdout) == []
    assert os.listdir(ds.stores["a"] / ".fusedisk-snapshots") == []


def test_snapshot_bad_input_and_a_crash_leftover(ds: MountedDatastore) -> None:
    make_vm(ds)
    for args, message in (
        (["create", str(ds.mnt), "vm1", "--name", "../x"], "must be 1-64 letters"),
        (["create", str(ds.mnt), "nope", "--name", "s"], "not an entry"),
        (["delete", str(ds.mnt), "vm1", "none"], "no snapshot named"),
    ):
        result = fusedisk("snapshot", *args)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    snapshot(ds, "s")
    again = fusedisk("snapshot", "create", str(ds.mnt), "vm1", "--name", "s")
    assert again.returncode == 1 and "already has a snapshot named 's'" in again.stderr
    # what a crash in the middle of a create leaves: listed as incomplete, deletable
    leftover = ds.stores["x"] / ".fusedisk-snapshots" / ".tmp-vm1@late-4242"
    (leftover / "tree").mkdir(parents=True)
    listed = json.loads(ok("snapshot", "list", str(ds.mnt), "vm1", "--json").stdout)
    assert [(s["name"], s["state"]) for s in listed] == [("late", "incomplete"), ("s", "ok")]
    ok("snapshot", "delete", str(ds.mnt), "vm1", "late")
    assert not leftover.exists()
    assert "vm1" in os.listdir(ds.mnt) and ".fusedisk-snapshots" not in os.listdir(ds.mnt)
