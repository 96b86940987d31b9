"""Live relocation on a real mount, with real writers, crashes and failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusedisk import api, control

from . import journal_writer
from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk, is_mounted, store_names, wait_for

pytestmark = pytest.mark.mount

WRITER = Path(journal_writer.__file__)


def migrate(ds: MountedDatastore, entry: str, *args: str) -> subprocess.CompletedProcess[str]:
    return fusedisk("migrate", str(ds.mnt), entry, *args, timeout=300)


def job(ds: MountedDatastore, entry: str) -> dict[str, Any]:
    jobs = [j for j in ds.status()["jobs"] if j["entry"] == entry]
    assert jobs, f"no job for {entry}"
    return dict(jobs[0])


def wait_state(ds: MountedDatastore, entry: str, states: set[str], timeout_s: float = 60) -> None:
    wait_for(lambda: job(ds, entry)["state"] in states, timeout_s, f"{entry} in {states}")


def make_vm(ds: MountedDatastore, name: str = "vm1", disk_mib: int = 64) -> Path:
    """A VM home: config, nvram, logs, a symlink, and a disk with random data."""
    home = ds.mnt / name
    home.mkdir()
    (home / f"{name}.vmx").write_text(f'displayName = "{name}"\n')
    (home / "nvram").write_bytes(os.urandom(8192))
    (home / "logs").mkdir()
    (home / "logs" / "vmware.log").write_text("boot\n" * 100)
    (home / "current.log").symlink_to("logs/vmware.log")
    disk = home / "disk0.img"
    with open(disk, "wb") as f:
        f.truncate(disk_mib << 20)
        for i in range(0, disk_mib, 4):
            f.seek(i << 20)
            f.write(os.urandom(1 << 20))
    return disk


def tree_view(root: Path) -> dict[str, Any]:
    """Everything a client can see of a tree: names, types, modes, owners, sizes,
    link counts, contents, symlink targets and user xattrs."""
    view: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            item: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                                    "nlink": st.st_nlink, "mtime": st.st_mtime_ns}
            if path.is_symlink():
                item["target"] = os.readlink(path)
            elif path.is_file():
                item["size"] = st.st_size
                item["sha"] = hashlib.sha1(path.read_bytes()).hexdigest()
            if not path.is_symlink():  # fusedisk's own (the CBT id) shows on a store only
                item["xattrs"] = {n: os.getxattr(path, n) for n in os.listxattr(path)
                                  if not n.startswith("trusted.fusedisk.")}
            view[rel] = item
    return view


@pytest.fixture
def writer_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_writer(
    procs: list[subprocess.Popen[bytes]], disk: Path, journal: Path, nblocks: int,
    pause_s: float = 0.0,
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(disk), str(journal), "7", str(nblocks), str(pause_s)]
    )
    procs.append(proc)
    wait_for(lambda: journal.exists() and journal.stat().st_size > 2000, 30, "the writer")
    return proc


# -- the main path -------------------------------------------------------------------------


def test_relocation_under_fio_verify(datastore: MountedDatastore) -> None:
    """fio writes with crc32c verification while the VM home moves; then a verify pass."""
    require_tools("fio")
    disk = make_vm(datastore, disk_mib=16)
    ino_before = disk.stat().st_ino
    # every block written exactly once (no time_based), so a verify-only replay matches;
    # the write rate keeps fio writing for ~11 s however fast the mount is
    fio = ["fio", "--name=guest", f"--filename={datastore.mnt / 'vm1' / 'fio.img'}",
           "--size=64M", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio",
           "--iodepth=4", "--rate_iops=,1500", "--verify=crc32c", "--verify_state_save=0",
           "--verify_fatal=1"]
    with open(datastore.root / "fio.out", "w") as out:
        guest = subprocess.Popen([*fio, "--do_verify=1"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (datastore.mnt / "vm1" / "fio.img").exists(), 30, "fio")
        time.sleep(1.0)
        result = migrate(datastore, "vm1", "--to", "b")
        assert guest.poll() is None, "fio ended before the switchover: the test proved nothing"
        assert result.returncode == 0, result.stderr
        assert "relocated vm1 from a to b" in result.stdout
        assert guest.wait(timeout=120) == 0, (datastore.root / "fio.out").read_text()
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
    verify = subprocess.run([*fio, "--verify_only"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert datastore.status()["placement"]["vm1"] == "b"
    assert (datastore.stores["b"] / "vm1" / "fio.img").stat().st_size == 64 << 20
    assert not (datastore.stores["a"] / "vm1").exists()
    assert not [n for n in store_names(datastore.stores["b"]) if n.startswith(".fusedisk")]
    assert disk.stat().st_ino == ino_before  # the inode number did not change
    done = job(datastore, "vm1")
    assert done["state"] == "done" and done["pause_ms"] > 0 and done["progress"] == 1.0


def test_namespace_changes_during_the_copy_end_up_exact(datastore: MountedDatastore) -> None:
    make_vm(datastore, disk_mib=48)
    home = datastore.mnt / "vm1"
    result = migrate(datastore, "vm1", "--to", "b", "--rate", "2M", "--no-wait")
    assert result.returncode == 0, result.stderr
    wait_state(datastore, "vm1", {"copying"})
    # what a hypervisor does while the copy runs
    (home / "vm1.vmx").write_text('displayName = "vm1"\nmemsize = "4096"\n')  # O_TRUNC rewrite
    (home / "logs" / "vmware.log").rename(home / "logs" / "vmware-1.log")
    (home / "logs" / "vmware.log").write_text("second boot\n")
    (home / "nvram").unlink()
    (home / "snapshot.vmsn").write_bytes(os.urandom(300_000))
    os.link(home / "snapshot.vmsn", home / "snapshot-hardlink.vmsn")
    (home / "newdir" / "deeper").mkdir(parents=True)
    (home / "newdir" / "deeper" / "f").write_text("x")
    os.chmod(home / "vm1.vmx", 0o600)
    os.setxattr(home / "vm1.vmx", "user.owner", b"ops")
    os.truncate(home / "disk0.img", 40 << 20)
    os.mkfifo(home / "fifo")
    with open(home / "disk0.img", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"written during the copy")
    before = tree_view(home)
    assert job(datastore, "vm1")["state"] in ("copying", "mirroring")  # the test raced nothing
    fusedisk("rate", str(datastore.mnt), "vm1", "0", check=True)  # unlimited: finish now
    wait_state(datastore, "vm1", {"done", "failed"}, timeout_s=120)
    assert job(datastore, "vm1")["state"] == "done", job(datastore, "vm1")
    after = tree_view(home)
    assert after == before
    assert tree_view(datastore.stores["b"] / "vm1") == before
    assert not (datastore.stores["a"] / "vm1").exists()


def test_open_files_follow_the_switchover(datastore: MountedDatastore) -> None:
    """A descriptor opened before the move reads and writes the new copy after it."""
    disk = make_vm(datastore, disk_mib=8)
    with open(disk, "r+b", buffering=0) as f:
        assert migrate(datastore, "vm1", "--to", "b").returncode == 0
        f.seek(1 << 20)
        f.write(b"after the move")
        os.fsync(f.fileno())
        f.seek(1 << 20)
        assert f.read(14) == b"after the move"
    with open(datastore.stores["b"] / "vm1" / "disk0.img", "rb") as raw:
        raw.seek(1 << 20)
        assert raw.read(14) == b"after the move"


def test_a_writer_that_outruns_the_copy_still_converges(
    datastore: MountedDatastore, writer_procs: list[subprocess.Popen[bytes]]
) -> None:
    disk = make_vm(datastore, disk_mib=32)
    journal = datastore.root / "journal"
    start_writer(writer_procs, disk, journal, nblocks=(32 << 20) // 4096)
    start = time.monotonic()
    result = migrate(datastore, "vm1", "--to", "b", "--rate", "8M", "--json")
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout)
    assert final["mirrored"] and final["state"] == "done", final
    assert time.monotonic() - start < 120
    writer_procs[0].terminate()
    writer_procs[0].wait(timeout=10)
    acked, wrong = journal_writer.check(disk, journal)
    assert acked > 100 and not wrong


def test_precopy_refuses_to_loop_forever(
    datastore: MountedDatastore, writer_procs: list[subprocess.Popen[bytes]]
) -> None:
    disk = make_vm(datastore, disk_mib=16)
    start_writer(writer_procs, disk, datastore.root / "journal", nblocks=2048)
    result = migrate(datastore, "vm1", "--to", "b", "--rate", "8M", "--mode", "precopy",
                     "--max-pause", "1")
    assert result.returncode == 1
    assert "did not converge" in result.stderr and "Traceback" not in result.stderr
    assert datastore.status()["placement"]["vm1"] == "a"
    # a failed job removes its partial copy after it reports the state
    wait_for(lambda: not store_names(datastore.stores["b"]), 60, "the partial copy to go")


@pytest.mark.parametrize("mode", ["precopy", "mirror"])
def test_cancel_leaves_the_source_authoritative(
    datastore: MountedDatastore, writer_procs: list[subprocess.Popen[bytes]], mode: str
) -> None:
    disk = make_vm(datastore, disk_mib=32)
    datastore.stop()  # the job holds after each pass: the cancel races nothing
    datastore.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    journal = datastore.root / "journal"
    start_writer(writer_procs, disk, journal, nblocks=2048, pause_s=0.001)
    assert migrate(datastore, "vm1", "--to", "b", "--rate", "4M", "--mode", mode,
                   "--no-wait").returncode == 0
    wait_state(datastore, "vm1", {"mirroring" if mode == "mirror" else "copying"})
    assert fusedisk("pause", str(datastore.mnt), "vm1").returncode == 0
    assert job(datastore, "vm1")["paused"]
    assert fusedisk("resume", str(datastore.mnt), "vm1").returncode == 0
    wait_for(lambda: job(datastore, "vm1")["paused"], 120, "the hold after pass 1")
    result = fusedisk("cancel", str(datastore.mnt), "vm1")
    assert result.returncode == 0, result.stderr
    wait_state(datastore, "vm1", {"cancelled"})
    assert datastore.status()["placement"]["vm1"] == "a"
    wait_for(lambda: not store_names(datastore.stores["b"]), 60, "the partial copy to go")
    time.sleep(0.5)  # the guest keeps writing to the source
    writer_procs[0].terminate()
    writer_procs[0].wait(timeout=10)
    acked, wrong = journal_writer.check(disk, journal)
    assert acked > 50 and not wrong
    again = fusedisk("cancel", str(datastore.mnt), "vm1")
    assert again.returncode == 1 and "not being relocated" in again.stderr


# -- crashes -----------------------------------------------------------------------------


@pytest.mark.daemon_errors
@pytest.mark.parametrize(
    ("failpoint", "resumes"),
    [("copying", True), ("mirroring", True), ("before-commit", True), ("after-commit", False)],
)
def test_kill_9_at_each_phase(
    datastore: MountedDatastore, writer_procs: list[subprocess.Popen[bytes]],
    failpoint: str, resumes: bool,
) -> None:
    """SIGKILL at an exact phase (a failpoint), remount: before the commit the
    source serves exactly the acknowledged data and the relocation resumes
    from its partial copy; after it the destination does. Either way it ends
    on the destination with every acknowledged write, and no leftovers."""
    disk = make_vm(datastore, disk_mib=16)
    datastore.stop()
    datastore.start(env={"FUSEDISK_FAILPOINT": failpoint})
    journal = datastore.root / "journal"
    writer = start_writer(writer_procs, disk, journal, nblocks=(16 << 20) // 4096,
                          pause_s=0.0005)
    mode = "mirror" if failpoint == "mirroring" else "auto"
    fusedisk("migrate", str(datastore.mnt), "vm1", "--to", "b", "--mode", mode, "--no-wait")
    assert datastore.wait_exit(timeout_s=60) == -signal.SIGKILL
    writer.wait(timeout=30)  # it stops at its first error
    assert f"failpoint {failpoint} reached" in datastore.log()
    # the resumed job holds after each pass: the source is seen before the commit
    datastore.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    if resumes:
        resumed = job(datastore, "vm1")
        assert resumed["resumed"] and resumed["mode"] == mode, resumed
        wait_for(lambda: job(datastore, "vm1")["paused"], 60, "the hold after pass 1")
        assert datastore.status()["placement"]["vm1"] == "a"  # the truth until the commit
        acked, wrong = journal_writer.check(disk, journal)
        assert acked > 20 and not wrong, f"{len(wrong)} acknowledged writes lost on the source"
        _resume_through_holds(datastore, "vm1")
        assert job(datastore, "vm1")["state"] == "done", job(datastore, "vm1")
    else:
        assert not datastore.status()["jobs"]
    assert datastore.status()["placement"]["vm1"] == "b"
    assert (datastore.stores["b"] / "vm1" / "disk0.img").exists()
    assert not (datastore.stores["a"] / "vm1").exists()
    leftovers = [n for s in datastore.stores.values() for n in store_names(s)
                 if n.startswith(".fusedisk")]
    assert not leftovers
    acked, wrong = journal_writer.check(disk, journal)
    assert acked > 20 and not wrong, f"{len(wrong)} acknowledged writes lost"
    assert (datastore.mnt / "vm1" / "logs" / "vmware.log").read_text() == "boot\n" * 100


# -- failures ----------------------------------------------------------------------------


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs to relocate onto."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        assert not is_mounted(path)


@pytest.mark.daemon_errors
def test_destination_full(tmp_path: Path, small_store: Path) -> None:
    ds = MountedDatastore(tmp_path, stores=("a",))
    ds.stores["small"] = small_store
    ds.start()
    try:
        (ds.mnt / "big").mkdir()
        (ds.mnt / "big" / "disk.img").write_bytes(os.urandom(40 << 20))
        refused = migrate(ds, "big", "--to", "small")
        assert refused.returncode == 1 and "needs" in refused.stderr
        assert "MiB free" in refused.stderr
        disk = make_vm(ds, "vm1", disk_mib=32)
        assert migrate(ds, "vm1", "--to", "small", "--rate", "2M", "--no-wait").returncode == 0
        wait_state(ds, "vm1", {"copying"})
        with open(small_store / "filler", "wb") as filler:  # someone else fills the store
            try:
                while True:
                    filler.write(b"\1" * (1 << 20))
                    filler.flush()
            except OSError:
                pass
        wait_state(ds, "vm1", {"failed"}, timeout_s=60)
        failed = job(ds, "vm1")
        assert "No space left on device" in failed["error"]
        assert ds.status()["placement"]["vm1"] == "a"
        with open(disk, "r+b") as f:  # the VM's I/O keeps working on the source
            f.write(b"still writable")
        assert disk.read_bytes()[:14] == b"still writable"
        (small_store / "filler").unlink()
        assert store_names(small_store) == []
    finally:
        ds.teardown()



@pytest.fixture
def failing_store(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 store on a loop device, mounted ``errors=remount-ro``: writing
    ``1`` to the yielded sysfs file makes ext4 report an error and abort its
    journal, as on a failing disk; every later write gets EROFS."""
    require_tools("mkfs.ext4", "e2fsck", "losetup")
    image, path = tmp_path / "failing.img", tmp_path / "failing"
    path.mkdir()
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(path)], check=True)
        try:
            yield path, Path("/sys/fs/ext4") / Path(loop).name / "trigger_fs_error"
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert not is_mounted(path)


def remount_repaired(image: Path, path: Path) -> None:
    """Repair the failed ext4 as an operator would (e2fsck -y) and mount it again."""
    subprocess.run(["umount", str(path)], check=True)
    subprocess.run(["e2fsck", "-fy", str(image)], check=False, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)


@pytest.mark.daemon_errors
@pytest.mark.parametrize("mode", ["precopy", "mirror"])
def test_destination_failing_mid_relocation_loses_nothing(
    tmp_path: Path, failing_store: tuple[Path, Path],
    writer_procs: list[subprocess.Popen[bytes]], mode: str,
) -> None:
    """The destination's filesystem fails while the copy runs (pre-copy) or while
    every guest write is mirrored to it: the relocation fails with the cause, the
    guest never sees an error, every acknowledged write is on the source, and
    the partial copy is gone once the store is repaired and fusedisk remounts."""
    store, trigger = failing_store
    ds = MountedDatastore(tmp_path, stores=("a",))
    ds.stores["b"] = store
    ds.start()
    try:
        disk = make_vm(ds, disk_mib=32)
        journal = ds.root / "journal"
        writer = start_writer(writer_procs, disk, journal, nblocks=(32 << 20) // 4096,
                              pause_s=0.0005)
        assert migrate(ds, "vm1", "--to", "b", "--rate", "4M", "--mode", mode,
                       "--no-wait").returncode == 0
        wait_state(ds, "vm1", {"mirroring" if mode == "mirror" else "copying"})
        trigger.write_text("1")
        wait_state(ds, "vm1", {"failed"}, timeout_s=60)
        assert "Read-only file system" in job(ds, "vm1")["error"]
        assert ds.status()["placement"]["vm1"] == "a"
        time.sleep(0.5)
        assert writer.poll() is None, "the guest saw an error"
        writer.terminate()
        writer.wait(timeout=10)
        acked, wrong = journal_writer.check(disk, journal)
        assert acked > 50 and not wrong, f"{len(wrong)} acknowledged writes lost"
        ds.stop()
        remount_repaired(tmp_path / "failing.img", store)
        ds.start()
        assert ds.status()["placement"]["vm1"] == "a"
        assert store_names(store) == ["lost+found"]  # e2fsck's, not ours
        acked_again, wrong = journal_writer.check(disk, journal)
        assert acked_again == acked and not wrong
    finally:
        ds.teardown()
        if is_mounted(store):
            subprocess.run(["umount", "-l", str(store)], check=False)


def test_sparse_disk_stays_sparse(datastore: MountedDatastore) -> None:
    home = datastore.mnt / "vm1"
    home.mkdir()
    disk = home / "disk.img"
    chunks = {}
    with open(disk, "wb") as f:
        f.truncate(8 << 30)
        for i in range(64):
            offset = i * (128 << 20) + (i % 5) * 4096
            data = os.urandom(1 << 20)
            f.seek(offset)
            f.write(data)
            chunks[offset] = hashlib.sha1(data).hexdigest()
    source_blocks = (datastore.stores["a"] / "vm1" / "disk.img").stat().st_blocks
    result = migrate(datastore, "vm1", "--to", "b", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes_copied"] <= 70 << 20
    dest = datastore.stores["b"] / "vm1" / "disk.img"
    assert dest.stat().st_size == 8 << 30
    assert dest.stat().st_blocks <= source_blocks + 256  # holes stayed holes
    with open(disk, "rb") as f:
        for offset, digest in chunks.items():
            f.seek(offset)
            assert hashlib.sha1(f.read(1 << 20)).hexdigest() == digest


def test_bad_relocation_requests(datastore: MountedDatastore) -> None:
    make_vm(datastore, disk_mib=4)
    datastore.stop()  # the job holds after pass 1: what races it below stays valid
    datastore.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    cases = [
        (("nosuch", "--to", "b"), "not an entry"),
        (("vm1", "--to", "nosuch"), "not a store"),
        (("vm1", "--to", "a"), "already on store"),
        (("../etc", "--to", "b"), "entry"),
        (("vm1", "--to", "b", "--rate", "fast"), "not a size"),
    ]
    for args, message in cases:
        result = migrate(datastore, *args)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (
            args, result.stderr)
    assert migrate(datastore, "vm1", "--to", "b", "--rate", "1M", "--no-wait").returncode == 0
    second = migrate(datastore, "vm1", "--to", "b")
    assert second.returncode == 1 and "already being relocated" in second.stderr
    busy = subprocess.run(["mv", str(datastore.mnt / "vm1"), str(datastore.mnt / "vm2")],
                          capture_output=True, text=True)
    assert busy.returncode != 0 and "busy" in busy.stderr.lower()
    assert fusedisk("cancel", str(datastore.mnt), "vm1").returncode == 0
    wait_state(datastore, "vm1", {"cancelled"})


def test_two_entries_relocate_at_once(datastore: MountedDatastore) -> None:
    disks = {name: make_vm(datastore, name, disk_mib=16) for name in ("vm1", "vm2")}
    digests = {name: hashlib.sha1(d.read_bytes()).hexdigest() for name, d in disks.items()}
    for name in disks:
        result = migrate(datastore, name, "--to", "b", "--rate", "8M", "--no-wait")
        assert result.returncode == 0, result.stderr
    states = {j["entry"]: j["state"] for j in datastore.status()["jobs"]}
    assert set(states) == {"vm1", "vm2"}  # both run side by side
    for name in disks:
        wait_state(datastore, name, {"done", "failed"}, timeout_s=60)
        assert job(datastore, name)["state"] == "done"
    assert datastore.status()["placement"] == {"vm1": "b", "vm2": "b"}
    for name, disk in disks.items():
        assert hashlib.sha1(disk.read_bytes()).hexdigest() == digests[name]
        assert not (datastore.stores["a"] / name).exists()


# -- what the guest deleted stays deleted ----------------------------------------------------


def _resume_through_holds(ds: MountedDatastore, entry: str) -> None:
    """Resume a job held after each pass (FUSEDISK_PAUSE_AFTER_PASS) until it ends."""
    while job(ds, entry)["state"] not in api.FINAL_STATES:
        fusedisk("resume", str(ds.mnt), entry)
        wait_for(lambda: job(ds, entry)["paused"]
                 or job(ds, entry)["state"] in api.FINAL_STATES, 60, "the next hold")


@pytest.mark.parametrize("how", ["truncate-0", "o-trunc", "truncate-partial"])
def test_data_deleted_during_the_copy_does_not_come_back(tmp_path: Path, how: str) -> None:
    """A file shrunk after pass 1, copied while short in pass 2 and grown again
    afterwards reads zeros in the gap after the switchover: the pool must
    forget what the source deleted. The daemon holds the job after each pass
    (FUSEDISK_PAUSE_AFTER_PASS), so nothing races the copy."""
    ds = MountedDatastore(tmp_path)
    ds.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    try:
        home = ds.mnt / "vm1"
        home.mkdir()
        disk = home / "disk.img"
        size = 8 << 20
        disk.write_bytes(b"A" * size)
        mnt = str(ds.mnt)

        def held_after(pass_no: int) -> None:
            wait_for(lambda: (j := job(ds, "vm1"))["paused"] and j["pass"] == pass_no,
                     60, f"the hold after pass {pass_no}")

        result = migrate(ds, "vm1", "--to", "b", "--mode", "precopy", "--no-wait")
        assert result.returncode == 0, result.stderr
        held_after(1)  # disk.img is in the pool, all of it
        keep = 0
        if how == "truncate-0":
            os.truncate(disk, 0)
        elif how == "o-trunc":
            os.close(os.open(disk, os.O_WRONLY | os.O_TRUNC))
        else:
            keep = 100_000  # inside a block the pool holds
            os.truncate(disk, keep)
        assert fusedisk("resume", mnt, "vm1").returncode == 0
        held_after(2)  # pass 2 copied the short file
        with open(disk, "r+b") as f:  # the guest writes the last 4 KiB again
            f.seek(size - 4096)
            f.write(b"B" * 4096)
        expected = b"A" * keep + bytes(size - 4096 - keep) + b"B" * 4096
        assert disk.read_bytes() == expected
        _resume_through_holds(ds, "vm1")
        ended = job(ds, "vm1")
        assert ended["state"] == "done", (ended.get("error"), ds.log()[-3000:])
        assert (ds.stores["b"] / "vm1" / "disk.img").read_bytes() == expected
        assert disk.read_bytes() == expected
    finally:
        ds.teardown()


def test_hard_links_of_every_file_type_stay_one_object(datastore: MountedDatastore) -> None:
    """Symlinks, FIFOs, sockets and device nodes with two names keep one inode,
    nlink 2 and their owner across a relocation (issue 11, item 4)."""
    import socket

    home = datastore.mnt / "vm1"
    home.mkdir()
    (home / "sub").mkdir()
    os.mkfifo(home / "fifo")
    os.mknod(home / "chr", 0o620 | 0o020000, os.makedev(1, 3))
    os.mknod(home / "blk", 0o640 | 0o060000, os.makedev(7, 200))
    (home / "link").symlink_to("somewhere/else")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(home / "sock"))
    sock.close()
    for i, name in enumerate(("fifo", "chr", "blk", "link", "sock")):
        os.chown(home / name, 1000 + i, 2000 + i, follow_symlinks=False)
        os.link(home / name, home / "sub" / f"{name}-2", follow_symlinks=False)
    before = tree_view(home)
    inodes = {name: (home / name).lstat().st_ino for name in ("fifo", "chr", "blk", "link", "sock")}
    result = migrate(datastore, "vm1", "--to", "b")
    assert result.returncode == 0, result.stderr
    for name, ino in inodes.items():
        first, second = (home / name).lstat(), (home / "sub" / f"{name}-2").lstat()
        assert first.st_nlink == second.st_nlink == 2, name
        assert first.st_ino == second.st_ino == ino, name
        raw = (datastore.stores["b"] / "vm1" / name).lstat()
        assert raw.st_nlink == 2 and raw.st_ino == (
            datastore.stores["b"] / "vm1" / "sub" / f"{name}-2").lstat().st_ino, name
    assert tree_view(home) == before


# -- preflight: what would stop a relocation is found before any work -------------------------


def test_an_entry_with_a_255_byte_name_relocates_both_ways(datastore: MountedDatastore) -> None:
    name = "v" * 255
    home = datastore.mnt / name
    home.mkdir()
    (home / "disk.img").write_bytes(os.urandom(1 << 20))
    before = tree_view(home)
    for store in ("b", "a"):
        result = migrate(datastore, name, "--to", store)
        assert result.returncode == 0, result.stderr
        assert datastore.status()["placement"][name] == store
        assert tree_view(home) == before


def _bind_read_only(path: Path) -> None:
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)


def _unbind(path: Path) -> None:
    """Undo :func:`_bind_read_only`; never leaves the bind mount behind."""
    if subprocess.run(["umount", str(path)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False)
        raise AssertionError(f"{path} was busy; detached lazily")


@pytest.mark.daemon_errors  # the ignored copy is reported at mount
def test_blockers_are_reported_at_once_before_any_work(tmp_path: Path) -> None:
    """A destination holding an ignored same-name copy and a read-only source:
    both named in one line, nothing started, nothing changed."""
    ds = MountedDatastore(tmp_path)
    (ds.stores["a"] / "vm1").mkdir()
    (ds.stores["a"] / "vm1" / "disk.img").write_bytes(b"on a")
    ds.start()
    try:
        assert ds.status()["placement"] == {"vm1": "a"}
        ds.stop()
        (ds.stores["b"] / "vm1").mkdir()  # a stale copy, as an operator may leave one
        (ds.stores["b"] / "vm1" / "stale").write_bytes(b"old")
        _bind_read_only(ds.stores["a"])
        try:
            ds.start()
            result = migrate(ds, "vm1", "--to", "b")
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 1 and len(lines) == 1, result.stderr
            assert "already holds an object named 'vm1'" in lines[0]
            assert "store 'a' is read-only" in lines[0]
            assert ds.status()["jobs"] == []
            assert store_names(ds.stores["b"]) == ["vm1"]
            assert (ds.mnt / "vm1" / "disk.img").read_bytes() == b"on a"
            ds.stop()
        finally:
            ds.teardown()
            _unbind(ds.stores["a"])
    finally:
        ds.teardown()


@pytest.mark.daemon_errors
def test_a_source_read_only_after_the_commit_does_not_stop_the_mount(tmp_path: Path) -> None:
    """Killed right after the commit; the source store is read-only at the next
    mount: every entry is still served (the moved one from its destination),
    and a mount after the store is repaired finishes the clean-up."""
    ds = MountedDatastore(tmp_path)
    ds.start()
    try:
        make_vm(ds, "vm1", disk_mib=4)
        make_vm(ds, "vm2", disk_mib=4)
        views = {n: tree_view(ds.mnt / n) for n in ("vm1", "vm2")}
        ds.stop()
        ds.start(env={"FUSEDISK_FAILPOINT": "after-commit"})
        fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--no-wait")
        assert ds.wait_exit(timeout_s=60) == -signal.SIGKILL
        _bind_read_only(ds.stores["a"])
        try:
            ds.start()
            status = ds.status()
            assert status["placement"] == {"vm1": "b", "vm2": "a"}
            for name, view in views.items():
                assert tree_view(ds.mnt / name) == view
            assert "removing the old copy failed" in ds.log()
            refused = migrate(ds, "vm1", "--to", "a")
            assert refused.returncode == 1 and "clean-up" in refused.stderr, refused.stderr
            ds.stop()
        finally:
            ds.teardown()  # never leave a daemon holding the bind mount
            _unbind(ds.stores["a"])
        ds.start()
        assert not (ds.stores["a"] / "vm1").exists()
        assert tree_view(ds.mnt / "vm1") == views["vm1"]
        assert migrate(ds, "vm1", "--to", "a").returncode == 0
        assert tree_view(ds.mnt / "vm1") == views["vm1"]
    finally:
        ds.teardown()


def _forget_everything() -> None:
    """Make the kernel drop its dentries and inodes (FORGET reaches the daemon)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def test_inode_numbers_and_ctime_survive_relocation_forget_and_remount(
    datastore: MountedDatastore,
) -> None:
    """st_ino and ctime of every object (and which names share an inode) stay
    what they were after a relocation, once the kernel forgot the inodes, after
    a remount, and after relocating back; a change through the mount moves
    ctime on for good (issue 11, item 7)."""
    home = datastore.mnt / "vm1"
    make_vm(datastore, "vm1", disk_mib=4)
    os.link(home / "nvram", home / "logs" / "nvram-link")
    os.mkfifo(home / "fifo")
    os.link(home / "fifo", home / "logs" / "fifo-link")

    def numbers() -> dict[str, tuple[int, int]]:
        """st_ino and ctime of every object."""
        out = {".": (home.lstat().st_ino, home.lstat().st_ctime_ns)}
        for dirpath, dirnames, filenames in os.walk(home):
            for name in dirnames + filenames:
                st = (Path(dirpath) / name).lstat()
                out[str((Path(dirpath) / name).relative_to(home))] = (st.st_ino, st.st_ctime_ns)
        return out

    before = numbers()
    assert before["nvram"] == before["logs/nvram-link"]
    assert len({ino for ino, _ in before.values()}) == len(before) - 2
    for store in ("b", "a", "b"):
        result = migrate(datastore, "vm1", "--to", store)
        assert result.returncode == 0, result.stderr
        _forget_everything()
        assert numbers() == before, f"after moving to {store}"
    datastore.stop()
    datastore.start()
    assert numbers() == before
    # an operation that fails changes nothing, ctime included
    with pytest.raises(OSError):
        os.removexattr(home / "vm1.vmx", "user.missing")
    with pytest.raises(OSError):
        os.rmdir(home / "logs")  # not empty
    with pytest.raises(OSError):
        os.mkdir(home / "logs")  # exists
    assert numbers() == before
    _forget_everything()
    assert numbers() == before
    # a change through the mount moves ctime on, and it stays moved
    os.chmod(home / "vm1.vmx", 0o600)
    with open(home / "disk0.img", "r+b") as f:
        f.write(b"changed")
    os.unlink(home / "logs" / "nvram-link")  # nvram's nlink changes
    (home / "new").write_bytes(b"made on b")  # a new object gets a number of its own
    changed = {"vm1.vmx", "disk0.img", "nvram", "logs", ".", "new"}
    for moment in ("now", "after forget", "after remount"):
        if moment == "after forget":
            _forget_everything()
        elif moment == "after remount":
            datastore.stop()
            datastore.start()
        now = numbers()
        assert now["new"][0] not in {ino for ino, _ in before.values()}
        for name, (ino, ctime_ns) in before.items():
            if name == "logs/nvram-link":
                continue
            assert now[name][0] == ino, (moment, name)
            if name in changed:
                assert now[name][1] > ctime_ns, (moment, name)
            else:
                assert now[name][1] == ctime_ns, (moment, name)


def test_a_disk_grown_by_a_tib_during_the_copy_relocates_at_once(tmp_path: Path) -> None:
    """A guest resize (``truncate -s 1T``) between two passes marks a TiB
    dirty; the copy settles the holes without reading them."""
    ds = MountedDatastore(tmp_path)
    ds.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    try:
        home = ds.mnt / "vm1"
        home.mkdir()
        disk = home / "disk.img"
        head = os.urandom(4 << 20)
        disk.write_bytes(head)
        result = migrate(ds, "vm1", "--to", "b", "--mode", "precopy", "--no-wait")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: (j := job(ds, "vm1"))["paused"] and j["pass"] == 1, 60, "pass 1")
        os.truncate(disk, 1 << 40)
        with open(disk, "r+b") as f:
            f.seek(1 << 39)
            f.write(b"half way")
        _resume_through_holds(ds, "vm1")
        final = job(ds, "vm1")
        assert final["state"] == "done", final
        assert final["bytes_copied"] < 16 << 20, final  # the holes were not read
        raw = ds.stores["b"] / "vm1" / "disk.img"
        assert raw.stat().st_size == 1 << 40
        assert raw.stat().st_blocks * 512 < 16 << 20
        with open(disk, "rb") as f:
            assert f.read(4 << 20) == head
            f.seek(1 << 39)
            assert f.read(8) == b"half way"
            f.seek((1 << 40) - 4096)
            assert f.read() == bytes(4096)
    finally:
        ds.teardown()


def test_a_store_number_taken_by_a_kept_one_gets_a_number_that_stays(
    datastore: MountedDatastore,
) -> None:
    """An object whose store number another object kept through a relocation
    (the source store reused a relocated file's backing inode) gets a private
    number, kept on it as well (found by the differential engine). The
    collision is made by hand: ``g`` keeps the number that is ``h``'s."""
    home = datastore.mnt / "vm1"
    home.mkdir()
    for name in ("g", "h"):
        (home / name).write_bytes(name.encode())
    taken = (home / "h").stat().st_ino  # h's store number
    ctime_ns = (home / "g").stat().st_ctime_ns
    datastore.stop()
    os.setxattr(datastore.stores["a"] / "vm1" / "g", "trusted.fusedisk.ino",
                f"{taken} {ctime_ns}".encode())
    datastore.start()
    assert (home / "g").stat().st_ino == taken  # looked up first: it keeps its number
    second = (home / "h").stat().st_ino
    assert second != taken
    for _ in range(2):
        _forget_everything()
        assert ((home / "h").stat().st_ino, (home / "g").stat().st_ino) == (second, taken)
        datastore.stop()
        datastore.start()
        assert ((home / "h").stat().st_ino, (home / "g").stat().st_ino) == (second, taken)
    assert (home / "g").stat().st_ctime_ns == ctime_ns


def test_a_pause_that_would_overrun_its_budget_is_abandoned_then_retried(
    tmp_path: Path,
) -> None:
    """Issue 12: the budget holds. The first two switchovers stall 300 ms in
    their flush (a slow disk, on demand): each is abandoned before the commit,
    the gate reopens, the guest keeps working, and the third commits; status
    tells the attempts and why."""
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": "switchover-flush:300:2"})
        disk = make_vm(ds, disk_mib=4)
        data = disk.read_bytes()
        result = migrate(ds, "vm1", "--to", "b", "--max-pause", "100", "--json")
        assert result.returncode == 0, result.stderr
        final = json.loads(result.stdout)
        assert final["state"] == "done" and final["attempts"] >= 3, final
        assert "would overrun the 100 ms pause budget" in final["last_abandoned"], final
        assert final["pause_ms"] < 300, final  # the committed attempt did not stall
        assert ds.status()["placement"]["vm1"] == "b"
        assert disk.read_bytes() == data
        assert ds.log().count("switchover attempt") >= 2
    finally:
        ds.teardown()


def test_one_slow_record_save_does_not_refuse_every_switchover(tmp_path: Path) -> None:
    """The commit's cost is learned from record saves; the relocation's first save
    stalls 400 ms (one slow fsync on a loaded store), so the first attempt is
    abandoned for "the commit". The cost is measured again after it, and the next
    attempt commits instead of all ten being refused on a stale estimate."""
    ds = MountedDatastore(tmp_path)
    try:
        ds.start()
        disk = make_vm(ds, disk_mib=4)
        data = disk.read_bytes()
        ds.stop()
        ds.start(env={"FUSEDISK_STALL": "record-save:400:1"})
        result = migrate(ds, "vm1", "--to", "b", "--max-pause", "100", "--json")
        assert result.returncode == 0, result.stderr
        final = json.loads(result.stdout)
        assert final["state"] == "done" and final["attempts"] == 2, final
        assert "the commit" in final["last_abandoned"], final
        assert disk.read_bytes() == data
        assert "stall point record-save reached" in ds.log()
    finally:
        ds.teardown()


def test_a_budget_that_can_never_be_met_fails_clearly_and_keeps_the_source(
    tmp_path: Path,
) -> None:
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": "switchover-flush:150:1000"})
        disk = make_vm(ds, disk_mib=4)
        data = disk.read_bytes()
        result = migrate(ds, "vm1", "--to", "b", "--max-pause", "100")
        assert result.returncode == 1, result
        assert "did not fit the 100 ms pause budget in 10 attempts" in result.stderr, result
        assert "raise --max-pause" in result.stderr and "Traceback" not in result.stderr
        assert ds.status()["placement"]["vm1"] == "a"
        assert not store_names(ds.stores["b"])
        assert disk.read_bytes() == data
        human = ds.cli("status", str(ds.mnt))
        assert "switchover attempts: 10" in human.stdout, human
    finally:
        ds.teardown()


# -- following a job -------------------------------------------------------------------------


def test_watch_streams_a_job_to_its_end_and_job_ids_name_it(datastore: MountedDatastore) -> None:
    """``watch`` (what ``migrate`` shows its progress from) reports the job as it
    changes, ends with the final job, and every command that names a job id
    refuses another job's id. The job holds after each pass, so the stream's
    early events are seen while it is still copying."""
    make_vm(datastore, disk_mib=8)
    datastore.stop()
    datastore.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    started = migrate(datastore, "vm1", "--to", "b", "--no-wait", "--json")
    assert started.returncode == 0, started.stderr
    first = api.Job.from_wire(json.loads(started.stdout))
    wait_for(lambda: job(datastore, "vm1")["paused"], 60, "the hold after pass 1")
    for wrong in (api.Resume(entry="vm1", job="0" * 16), api.Cancel(entry="vm1", job="0" * 16),
                  api.Watch(entry="vm1", job="0" * 16)):
        with pytest.raises(control.RequestRefused) as refused:
            list(control.watch(datastore.mnt, wrong)) if isinstance(wrong, api.Watch) \
                else control.call(datastore.mnt, wrong)
        assert refused.value.code == "no-job"
    assert job(datastore, "vm1")["paused"]  # the refused cancel did nothing

    seen: list[api.Job] = []
    failed: list[BaseException] = []

    def follow() -> None:
        try:
            for event in control.watch(datastore.mnt, api.Watch(entry="vm1", job=first.id)):
                seen.append(api.Job.from_wire(event))
        except BaseException as e:
            failed.append(e)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    wait_for(lambda: bool(seen), 60, "the first event")
    assert seen[0].paused and not seen[0].final
    held = control.call(datastore.mnt, api.Resume(entry="vm1", job=first.id))
    assert held.id == first.id
    _resume_through_holds(datastore, "vm1")
    watcher.join(60)
    assert not watcher.is_alive() and not failed, failed
    assert {j.id for j in seen} == {first.id}
    assert [j.final for j in seen] == [False] * (len(seen) - 1) + [True]
    assert seen[-1].state == api.State.DONE and seen[-1].progress == 1.0
    progress = [j.progress for j in seen]
    assert progress == sorted(progress)
    # a job that ended: one event, the final job
    again = [api.Job.from_wire(e) for e in control.watch(
        datastore.mnt, api.Watch(entry="vm1"))]
    assert [(j.id, j.state) for j in again] == [(first.id, api.State.DONE)]
