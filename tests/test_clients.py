"""Real clients on a real mount: fio, qemu-img/qemu-io, mkfs.ext4 + e2fsck, sqlite3."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import require_tools
from .mounting import MountedDatastore, is_mounted, wait_for

pytestmark = pytest.mark.mount


def run(*cmd: str | Path, timeout: float = 300) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_fio_direct_verify(datastore: MountedDatastore) -> None:
    """O_DIRECT random writes with crc32c verification, several jobs at once."""
    require_tools("fio")
    vm = datastore.mnt / "vm1"
    vm.mkdir()
    run(
        "fio", "--name=verify", f"--directory={vm}", "--size=32M", "--numjobs=2",
        "--rw=randwrite", "--bs=4k", "--bssplit=4k/50:64k/30:1m/20", "--direct=1",
        "--ioengine=libaio", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--verify_state_save=0", "--group_reporting",
    )
    # A second, verify-only pass proves the data is still there after the writers closed.
    run(
        "fio", "--name=verify", f"--directory={vm}", "--size=32M", "--numjobs=2",
        "--rw=randwrite", "--bs=4k", "--bssplit=4k/50:64k/30:1m/20", "--direct=1",
        "--ioengine=libaio", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
        "--verify_only", "--verify_state_save=0", "--group_reporting",
    )
    # the bytes live on store a, the default store
    assert any((datastore.stores["a"] / "vm1").iterdir())



def test_fio_queue_depth_32_is_served_without_a_scheduler_round_per_request(
        datastore: MountedDatastore) -> None:
    """libaio at QD32 with crc32c verification: nothing is lost, and queued
    requests reach the workers without a wait (fuseloop's reader is in use
    with the installed pyfuse3, not its fallback)."""
    require_tools("fio")
    run(
        "fio", "--name=qd32", f"--filename={datastore.mnt / 'disk0.img'}", "--size=64M",
        "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=32",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
    )
    loop = datastore.status()["fuse_loop"]
    assert loop["batching"] is True, loop
    assert loop["requests_without_wait"] > 0 and loop["requests_after_wait"] > 0, loop


def test_sigterm_under_queue_depth_unmounts_and_exits(datastore: MountedDatastore) -> None:
    """SIGTERM while fio keeps 32 requests queued: the daemon ends every worker
    (waiting or not), unmounts and exits 0; the file is intact on a remount."""
    require_tools("fio")
    image = datastore.mnt / "disk0.img"
    fio = subprocess.Popen(
        ["fio", "--name=busy", f"--filename={image}", "--size=64M", "--rw=randwrite",
         "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=32", "--time_based",
         "--runtime=120"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: datastore.status()["fuse_loop"]["requests_without_wait"] > 1000,
                 timeout_s=30, what="fio to keep requests queued")
        assert datastore.proc is not None
        datastore.proc.send_signal(signal.SIGTERM)
        assert datastore.wait_exit(timeout_s=30) == 0, datastore.log()
        assert not is_mounted(datastore.mnt)
        assert fio.wait(timeout=30) != 0  # its I/O failed once the mount was gone
    finally:
        fio.kill()
        fio.wait()
    datastore.start()
    assert image.stat().st_size == 64 << 20


def test_qemu_qcow2_cache_none(datastore: MountedDatastore, tmp_path: Path) -> None:
    """qemu-io with -t none (O_DIRECT) into a qcow2 on the mount, checked and compared."""
    require_tools("qemu-img", "qemu-io")
    image = datastore.mnt / "vm2" / "disk0.qcow2"
    image.parent.mkdir()
    reference = tmp_path / "reference.qcow2"
    pattern = ["-c", "write -P 0xa5 0 1M", "-c", "write -P 0x5a 7M 512k",
               "-c", "write -z 2M 1M", "-c", "write -P 0x11 100M 64k", "-c", "flush"]
    for path in (image, reference):
        run("qemu-img", "create", "-q", "-f", "qcow2", path, "256M")
        run("qemu-io", "-f", "qcow2", "-t", "none", *pattern, path)
    run("qemu-img", "check", image)
    run("qemu-img", "compare", image, reference)
    out = run("qemu-io", "-f", "qcow2", "-t", "none", "-r", "-c", "read -P 0x5a 7M 512k", image)
    assert "read 524288/524288 bytes" in out


def test_ext4_image_on_loop_device(datastore: MountedDatastore, tmp_path: Path) -> None:
    """mkfs.ext4 on a raw image on the mount, loop-mounted, filled, then e2fsck clean."""
    require_tools("mkfs.ext4", "e2fsck", "losetup")
    image = datastore.mnt / "vm3" / "disk.raw"
    image.parent.mkdir()
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    run("mkfs.ext4", "-q", "-F", image)
    loop = run("losetup", "--find", "--show", "--direct-io=on", image).strip()
    inner = tmp_path / "inner"
    inner.mkdir()
    try:
        run("mount", loop, inner)
        try:
            payload = os.urandom(1 << 20)
            for i in range(40):
                (inner / f"f{i}").write_bytes(payload)
            (inner / "d").mkdir()
            run("sync")
        finally:
            run("umount", inner)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert not is_mounted(inner)
    run("e2fsck", "-fn", image)


def test_sqlite_transactions(datastore: MountedDatastore) -> None:
    """Many small transactions (fsync-heavy, byte-range locks) and an integrity check."""
    db_path = datastore.mnt / "app" / "db.sqlite"
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    db = sqlite3.connect(db_path, isolation_level=None)
    expected: set[int] = set()
    try:
        for i in range(300):
            db.execute("BEGIN")
            cursor = db.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(200 + i),))
            assert cursor.lastrowid is not None
            expected.add(cursor.lastrowid)
            if i % 7 == 0:
                db.execute("DELETE FROM t WHERE id = ?", (i // 2,))
                expected.discard(i // 2)
            db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {row[0] for row in db.execute("SELECT id FROM t")}
    finally:
        db.close()
    assert ids == expected
