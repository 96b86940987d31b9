"""Issue 12, resumable: an interrupted relocation resumes from what its
destination holds, on a real mount, after a real SIGKILL or a clean stop."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fusedisk import progress
from fusedisk.cbt import REGION_SIZE
from fusedisk.relocation import PROGRESS_INTERVAL_S

from . import journal_writer
from .mounting import MountedDatastore, fusedisk, store_names, wait_for
from .test_relocation import job, start_writer, wait_state, writer_procs  # noqa: F401

pytestmark = pytest.mark.mount

MiB = 1 << 20
DISK_MIB = 64
RATE = 8 * MiB
#: The writer stays in the first 4 MiB of the disk: one activity-log region.
WRITER_BLOCKS = (4 * MiB) // 4096


def make_full_vm(ds: MountedDatastore, disk_mib: int = DISK_MIB) -> tuple[Path, str]:
    """A VM home with small files and a disk of random data, made on store a
    before the mount adopts it (so the disk's activity log starts empty: the
    guest's writes alone are its window); (the disk on the mount, its sha)."""
    home = ds.stores["a"] / "vm1"
    home.mkdir()
    (home / "vm1.vmx").write_text('displayName = "vm1"\n')
    (home / "logs").mkdir()
    (home / "logs" / "vmware.log").write_text("boot\n" * 100)
    disk = home / "disk0.img"
    digest = hashlib.sha1()
    with open(disk, "wb") as f:
        for _ in range(disk_mib):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
    return ds.mnt / "vm1" / "disk0.img", digest.hexdigest()


def sha_of(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def wait_done(ds: MountedDatastore, timeout_s: float = 180) -> dict[str, Any]:
    wait_state(ds, "vm1", {"done", "failed", "cancelled"}, timeout_s)
    final = job(ds, "vm1")
    assert final["state"] == "done", final
    return final


def crash_part_way(ds: MountedDatastore, percent: int, rate: str) -> None:
    """Start relocating vm1 to b at *rate* and let the daemon die (kill -9, a
    failpoint) once *percent* of it is copied; the dead mount stays behind."""
    ds.start(env={"FUSEDISK_FAILPOINT": f"copied-{percent}"})
    assert fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--rate", rate,
                    "--no-wait").returncode == 0
    assert ds.wait_exit(timeout_s=60) == -signal.SIGKILL


def no_leftovers(ds: MountedDatastore) -> None:
    leftovers = [n for s in ds.stores.values() for n in store_names(s) if n.startswith(".fusedisk")]
    assert not leftovers, leftovers


@pytest.mark.daemon_errors
@pytest.mark.parametrize("percent", [25, 50, 90])
def test_kill_9_part_way_resumes_from_the_destination(
    tmp_path: Path, writer_procs: list[subprocess.Popen[bytes]], percent: int,  # noqa: F811
) -> None:
    """SIGKILL once *percent* of the disk is copied, while a guest writes;
    remount: the job resumes, copies at most what was left plus the activity
    log's window (and what one progress interval copies), and every
    acknowledged write is there after the switchover."""
    ds = MountedDatastore(tmp_path)
    try:
        disk, _ = make_full_vm(ds)
        ds.start(env={"FUSEDISK_FAILPOINT": f"copied-{percent}"})
        journal = ds.root / "journal"
        writer = start_writer(writer_procs, disk, journal, WRITER_BLOCKS, pause_s=0.001)
        started = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--rate", "8M",
                           "--no-wait", "--json")
        assert started.returncode == 0, started.stderr
        assert ds.wait_exit(timeout_s=120) == -signal.SIGKILL
        writer.wait(timeout=30)  # it stops at its first error
        assert f"failpoint copied-{percent} reached" in ds.log()
        total = DISK_MIB * MiB
        remaining = total * (100 - percent) // 100
        # what the last progress record the dead daemon saved left to copy: on a
        # loaded machine it can be older than one progress interval
        record = progress.load(ds.stores["b"] / ".fusedisk-reloc-vm1")
        pending = 0 if record is None else sum(
            f.pending.count for f in record.files.values()) * record.block_size

        ds.start()
        resumed = job(ds, "vm1")
        assert resumed["resumed"] and resumed["rate_limit"] == RATE, resumed
        assert ds.status()["placement"]["vm1"] == "a"  # the source is the truth until the commit
        final = wait_done(ds)
        # the window: the writer's one hot region, what was copied after the
        # last progress record, and the copy step that was under way
        window = REGION_SIZE + int(RATE * PROGRESS_INTERVAL_S) + MiB
        assert final["resumed"], final
        if total - pending > REGION_SIZE + MiB:
            assert final["resumed_bytes"] > 0, final
        print(f"killed at {percent}%: {remaining / MiB:.1f} MiB left, {pending / MiB:.1f} MiB "
              f"pending in the last progress record; the resumed job kept "
              f"{final['resumed_bytes'] / MiB:.1f} MiB and copied {final['bytes_copied'] / MiB:.1f}"
              f" MiB (bound {(remaining + window) / MiB:.1f} with a timely record)")
        # what the protocol promises (progress.py): pending ∪ what changed since the
        # record (the writer's one hot region), whatever the record's age
        assert final["bytes_copied"] <= pending + REGION_SIZE + MiB, (final, pending)
        assert final["resumed_bytes"] >= total - pending - REGION_SIZE, (final, pending)
        # and the record is never older than the copy itself (a record must exist
        # past the first interval's worth of copying)
        if total - remaining > window:
            assert record is not None and pending < total, pending
        assert ds.status()["placement"]["vm1"] == "b"
        acked, wrong = journal_writer.check(disk, journal)
        assert acked > 20 and not wrong, f"{len(wrong)} acknowledged writes lost"
        assert (ds.mnt / "vm1" / "logs" / "vmware.log").read_text() == "boot\n" * 100
        no_leftovers(ds)
        assert "resumed: " in ds.log()
    finally:
        ds.teardown()


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_a_clean_stop_suspends_and_the_next_mount_resumes(tmp_path: Path, how: str) -> None:
    """``fusedisk umount`` or SIGTERM (``systemctl stop``) during the copy keeps
    the partial copy; the next mount resumes it and keeps what was copied."""
    ds = MountedDatastore(tmp_path)
    try:
        disk, digest = make_full_vm(ds, disk_mib=32)
        ds.start()
        assert fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--rate", "8M",
                        "--no-wait").returncode == 0
        wait_for(lambda: job(ds, "vm1")["bytes_copied"] >= 12 * MiB, 60, "a third copied")
        # paused before the stop races it: else a loaded machine can finish the
        # copy first (then there is nothing to suspend)
        assert fusedisk("pause", str(ds.mnt), "vm1").returncode == 0
        assert job(ds, "vm1")["bytes_copied"] < 32 * MiB
        if how == "umount":
            ds.stop()
        else:
            assert ds.proc is not None
            ds.proc.send_signal(signal.SIGTERM)
            assert ds.wait_exit() == 0
        assert "suspended; the next mount resumes it" in ds.log()
        assert (ds.stores["b"] / ".fusedisk-reloc-vm1" / "progress").exists()
        assert sha_of(ds.stores["a"] / "vm1" / "disk0.img") == digest

        ds.start()
        final = wait_done(ds)
        assert final["resumed"] and final["resumed_bytes"] >= 12 * MiB, final
        assert final["bytes_copied"] <= 20 * MiB + REGION_SIZE, final
        assert ds.status()["placement"]["vm1"] == "b"
        assert sha_of(disk) == digest
        no_leftovers(ds)
    finally:
        ds.teardown()


@pytest.mark.daemon_errors
def test_restart_starts_over_from_zero(tmp_path: Path) -> None:
    """A resumed job that ``migrate --restart`` replaces copies everything again."""
    ds = MountedDatastore(tmp_path)
    try:
        disk, digest = make_full_vm(ds, disk_mib=16)
        crash_part_way(ds, 50, "2M")
        ds.start()
        assert job(ds, "vm1")["resumed"]  # 8 MiB left at 2 MiB/s: it runs for a while
        again = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b")
        assert again.returncode == 1 and "--restart" in again.stderr, again.stderr
        result = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--restart", "--json",
                          timeout=300)
        assert result.returncode == 0, result.stderr
        final = json.loads(result.stdout)
        assert final["state"] == "done" and not final["resumed"], final
        assert final["resumed_bytes"] == 0 and final["bytes_copied"] >= 16 * MiB, final
        assert ds.status()["placement"]["vm1"] == "b"
        assert sha_of(disk) == digest
        no_leftovers(ds)
    finally:
        ds.teardown()


@pytest.mark.daemon_errors
def test_stall_timeout_fails_a_stuck_job(tmp_path: Path) -> None:
    """The first copy step hangs (a stall point holding it for 10 minutes):
    ``--stall-timeout 2`` fails the job after 2 s without progress, not after
    a wall-clock limit; the source stays the truth and the copy goes."""
    ds = MountedDatastore(tmp_path)
    try:
        disk, digest = make_full_vm(ds, disk_mib=4)
        ds.start(env={"FUSEDISK_STALL": "copy-step:600000:1"})
        result = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--stall-timeout", "2",
                          timeout=120)
        assert result.returncode == 1, result
        assert "no progress for 2 s" in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(
            "fusedisk: error: relocation of vm1 failed: no progress for 2 s"), result.stderr
        final = job(ds, "vm1")
        assert final["state"] == "failed" and final["stall_timeout_s"] == 2, final
        assert ds.status()["placement"]["vm1"] == "a"
        wait_for(lambda: not store_names(ds.stores["b"]), 30, "the partial copy to go")
        assert sha_of(disk) == digest
        bad = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--stall-timeout", "-1")
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
    finally:
        ds.teardown()


@pytest.mark.daemon_errors
@pytest.mark.parametrize("tamper", ["removed", "truncated", "source-replaced"])
def test_a_tampered_destination_still_ends_with_the_right_data(
    tmp_path: Path, tamper: str
) -> None:
    """The staged disk is removed (or cut short) on the destination store while
    the daemon is down, or the source disk is replaced by another file: the
    resumed job copies what is missing, or the new file, again."""
    ds = MountedDatastore(tmp_path)
    try:
        disk, digest = make_full_vm(ds, disk_mib=16)
        crash_part_way(ds, 60, "8M")
        staged = ds.stores["b"] / ".fusedisk-reloc-vm1" / "tree" / "disk0.img"
        assert staged.exists()
        if tamper == "removed":
            staged.unlink()
        elif tamper == "truncated":
            os.truncate(staged, 2 * MiB)
        else:  # a new file takes the name (the old one stays until the rename)
            source = ds.stores["a"] / "vm1" / "disk0.img"
            new = source.with_name("new.img")
            new.write_bytes(os.urandom(16 * MiB))
            digest = sha_of(new)
            new.rename(source)
        ds.start()
        final = wait_done(ds)
        assert final["resumed"], final
        if tamper == "truncated":
            assert final["resumed_bytes"] <= 2 * MiB, final
        else:
            assert final["resumed_bytes"] == 0 and final["bytes_copied"] >= 16 * MiB, final
        assert sha_of(disk) == digest
        assert sha_of(ds.stores["b"] / "vm1" / "disk0.img") == digest
        no_leftovers(ds)
    finally:
        ds.teardown()
