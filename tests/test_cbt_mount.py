"""Changed block tracking through a real mount and the real command line."""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .mounting import MountedDatastore, fusedisk, wait_for

pytestmark = pytest.mark.mount

BLOCK = 64 << 10


def changes(ds: MountedDatastore, file: str, since: str) -> list[tuple[int, int]]:
    result = fusedisk("cbt", "changes", str(ds.mnt), file, "--since", since, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["change_id"] == since
    return [(o, n) for o, n in body["extents"]]


def checkpoint(ds: MountedDatastore, file: str) -> str:
    result = fusedisk("cbt", "checkpoint", str(ds.mnt), file)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def blocks_of(writes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The merged, block-aligned byte extents that *writes* touch."""
    touched = sorted({b for o, n in writes for b in range(o // BLOCK, (o + n - 1) // BLOCK + 1)})
    out: list[tuple[int, int]] = []
    for b in touched:
        if out and out[-1][0] + out[-1][1] == b * BLOCK:
            out[-1] = (out[-1][0], out[-1][1] + BLOCK)
        else:
            out.append((b * BLOCK, BLOCK))
    return out


def direct_write(path: Path, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def test_changes_are_exact_for_known_writes(datastore: MountedDatastore) -> None:
    disk = datastore.mnt / "vm" / "disk.img"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    file = "vm/disk.img"
    assert changes(datastore, file, "*") == []  # all holes
    first = checkpoint(datastore, file)
    writes = [(0, 4096), (5 * BLOCK + 100, 10), (3 << 20, 2 * BLOCK + 1), (200 << 20, 512)]
    for offset, length in writes[:2]:  # buffered, unaligned
        with open(disk, "r+b") as f:
            f.seek(offset)
            f.write(os.urandom(length))
    direct_write(disk, 3 << 20, os.urandom(2 * BLOCK + 4096))  # O_DIRECT, aligned
    writes[2] = (3 << 20, 2 * BLOCK + 4096)
    direct_write(disk, 200 << 20, os.urandom(4096))
    writes[3] = (200 << 20, 4096)
    assert changes(datastore, file, first) == blocks_of(writes)
    second = checkpoint(datastore, file)
    assert changes(datastore, file, second) == []
    with open(disk, "r+b") as f:
        f.seek(BLOCK * 1000)
        f.write(b"late")
    assert changes(datastore, file, second) == [(1000 * BLOCK, BLOCK)]
    assert changes(datastore, file, first) == blocks_of([*writes, (BLOCK * 1000, 4)])
    allocated = changes(datastore, file, "*")
    assert sum(n for _, n in allocated) < 2 << 20  # still sparse
    for offset, _ in writes:
        assert any(o <= offset < o + n for o, n in allocated)


def test_truncate_marks_what_it_changes(datastore: MountedDatastore) -> None:
    disk = datastore.mnt / "vm" / "t.img"
    disk.parent.mkdir()
    disk.write_bytes(os.urandom(10 * BLOCK))
    change_id = checkpoint(datastore, "vm/t.img")
    os.truncate(disk, 4 * BLOCK + 10)  # shrink: the tail changed (and is now gone)
    # extents stop at the end of the file
    assert changes(datastore, "vm/t.img", change_id) == [(4 * BLOCK, 10)]
    os.truncate(disk, 12 * BLOCK)  # grow: the new area reads as zeros
    assert changes(datastore, "vm/t.img", change_id) == [(4 * BLOCK, 8 * BLOCK)]


def test_incremental_backup_reproduces_the_file(
    datastore: MountedDatastore, tmp_path: Path
) -> None:
    """A backup tool's loop: full copy at id 1, then only the changed extents."""
    disk = datastore.mnt / "vm" / "disk.img"
    disk.parent.mkdir()
    rng = random.Random(3)
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
        for _ in range(50):
            f.seek(rng.randrange(64 << 20))
            f.write(rng.randbytes(rng.randrange(1, 200_000)))
    backup = tmp_path / "backup.img"
    change_id = checkpoint(datastore, "vm/disk.img")
    subprocess.run(["cp", "--sparse=always", str(disk), str(backup)], check=True)
    for _round in range(3):
        with open(disk, "r+b") as f:
            for _ in range(40):
                f.seek(rng.randrange(70 << 20))  # some past the end: the file grows
                f.write(rng.randbytes(rng.randrange(1, 300_000)))
        next_id = checkpoint(datastore, "vm/disk.img")
        extents = changes(datastore, "vm/disk.img", change_id)
        with open(disk, "rb") as src, open(backup, "r+b") as dst:
            for offset, length in extents:
                src.seek(offset)
                dst.seek(offset)
                dst.write(src.read(length))
            dst.truncate(os.fstat(src.fileno()).st_size)
        subprocess.run(["cmp", str(disk), str(backup)], check=True)
        change_id = next_id


def test_bad_change_ids_ask_for_a_full_backup(datastore: MountedDatastore) -> None:
    (datastore.mnt / "vm").mkdir()
    for name in ("a.img", "b.img"):
        (datastore.mnt / "vm" / name).write_bytes(b"x" * 100)
    id_a = checkpoint(datastore, "vm/a.img")
    for since in (id_a.split("/")[0] + "/77", "nonsense"):
        result = fusedisk("cbt", "changes", str(datastore.mnt), "vm/a.img", "--since", since)
        assert result.returncode == 1
        assert "full backup" in result.stderr and "Traceback" not in result.stderr
    result = fusedisk("cbt", "changes", str(datastore.mnt), "vm/b.img", "--since", id_a)
    assert result.returncode == 1 and "full backup" in result.stderr
    for path in ("vm/missing.img", "vm", "../etc/passwd", "/etc/passwd"):
        result = fusedisk("cbt", "checkpoint", str(datastore.mnt), path)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, path
    # the private xattr that carries the file id is invisible through the mount
    assert not [n for n in os.listxattr(datastore.mnt / "vm" / "a.img") if "fusedisk" in n]


def test_change_ids_survive_a_clean_remount_exactly(datastore: MountedDatastore) -> None:
    disk = datastore.mnt / "vm" / "disk.img"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.truncate(1 << 30)
    change_id = checkpoint(datastore, "vm/disk.img")
    for offset in (0, 300 << 20, 900 << 20):
        direct_write(disk, offset, os.urandom(4096))
    datastore.stop()
    datastore.start()
    assert changes(datastore, "vm/disk.img", change_id) == blocks_of(
        [(0, 1), (300 << 20, 1), (900 << 20, 1)]
    )


_WRITER = r"""
import mmap, os, random, sys
path, journal_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
buf = mmap.mmap(-1, 4096)
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
with open(journal_path, "a", buffering=1) as journal:
    while True:
        # three hot areas, far apart: most of the file is never written
        base = rng.choice((0, 100 << 20, 250 << 20))
        offset = base + rng.randrange(0, 8 << 20, 4096)
        buf[:8] = os.urandom(8)
        try:
            os.pwritev(fd, [buf], offset)
        except OSError:
            break
        journal.write(f"{offset}\n")  # only acknowledged writes reach the journal
"""


@pytest.mark.daemon_errors
def test_kill_9_never_loses_a_change(datastore: MountedDatastore, tmp_path: Path) -> None:
    """Random O_DIRECT writes, kill -9 of the daemon mid-run, remount: every
    acknowledged write is covered, and the over-report is bounded."""
    disk = datastore.mnt / "vm" / "disk.img"
    disk.parent.mkdir()
    with open(disk, "wb") as f:
        f.truncate(512 << 20)
    change_id = checkpoint(datastore, "vm/disk.img")
    journal = tmp_path / "journal"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(disk), str(journal), "1"])
    try:
        wait_for(lambda: journal.exists() and journal.stat().st_size > 20_000, 30, "writes")
        time.sleep(0.5)
        datastore.kill()
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    datastore.start()  # detaches the dead mount and recovers
    written = [int(line) for line in journal.read_text().split()]
    assert len(written) > 500
    changed = changes(datastore, "vm/disk.img", change_id)
    missing = [o for o in written if not any(s <= o < s + n for s, n in changed)]
    assert not missing, f"{len(missing)} acknowledged writes not reported"
    exact = blocks_of([(o, 4096) for o in written])
    marked = sum(n for _, n in changed)
    extra = marked - sum(n for _, n in exact)
    print(f"kill -9: {len(written)} writes, {marked >> 20} MiB marked, {extra >> 20} MiB extra")
    assert extra <= 3 * (16 << 20)  # at most the three hot 16 MiB regions (8 MiB areas may span 2)
    assert "was not closed cleanly" in datastore.log()


# -- what a history costs -----------------------------------------------------------------


def test_a_file_without_a_change_id_costs_the_state_directory_nothing(
        datastore: MountedDatastore) -> None:
    """Short-lived files (a journal, a log rotated away, a tar unpacked and removed)
    and files nobody took a change id of leave no record, no log save, no fsync in
    the state directory (issue 16); the first change id makes the history durable,
    and a kill -9 after it still reports every acknowledged write."""
    vm = datastore.mnt / "vm1"
    vm.mkdir()
    cbt_dir = datastore.state_dir / "cbt"
    before = set(os.listdir(cbt_dir))
    for i in range(50):
        path = vm / f"journal-{i}"
        with open(path, "wb") as f:
            f.write(os.urandom(BLOCK))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    kept = vm / "kept.img"
    kept.write_bytes(os.urandom(4 * BLOCK))
    with open(kept, "r+b") as f:  # reopened and written: still no record
        f.write(b"again")
    assert set(os.listdir(cbt_dir)) == before
    stats = datastore.status()["cbt_state"]
    assert stats["save_error"] is None, stats

    change_id = checkpoint(datastore, "vm1/kept.img")
    assert set(os.listdir(cbt_dir)) > before  # the first change id is durable
    fd = os.open(kept, os.O_RDWR)
    try:
        os.pwrite(fd, b"after the id", 2 * BLOCK + 7)
        os.fsync(fd)
        datastore.kill()
    finally:
        with contextlib.suppress(OSError):  # the mount died under it
            os.close(fd)
    datastore.start()
    assert covered(changes(datastore, "vm1/kept.img", change_id), 2 * BLOCK + 7, 12)


# -- histories of removed files ---------------------------------------------------------


def history_files(ds: MountedDatastore, backing_file: Path) -> list[Path]:
    """The CBT state files of the file at *backing_file* (on its store)."""
    file_id = os.getxattr(backing_file, "trusted.fusedisk.id").decode()
    return [ds.state_dir / "cbt" / f"{file_id}.{kind}" for kind in ("al", "bitmap")]


def written(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(BLOCK))


def test_the_history_of_a_removed_file_goes_with_it(datastore: MountedDatastore) -> None:
    """unlink, rename over, the last of two hard links, a file removed while open:
    the history goes once the file is gone, and not a moment before."""
    vm = datastore.mnt / "vm1"
    vm.mkdir()
    store = datastore.stores["a"] / "vm1"
    for name in ("plain", "victim", "linked", "open", "renamed"):
        written(vm / name)
        checkpoint(datastore, f"vm1/{name}")  # a change id: a history worth keeping
    histories = {name: history_files(datastore, store / name)
                 for name in ("plain", "victim", "linked", "open", "renamed")}
    wait_for(lambda: all(p.exists() for h in histories.values() for p in h), 10,
             "histories saved at close")

    (vm / "plain").unlink()
    assert not any(p.exists() for p in histories["plain"])

    (vm / "renamed").rename(vm / "victim")  # the old 'victim' is gone, 'renamed' lives on
    assert not any(p.exists() for p in histories["victim"])
    assert all(p.exists() for p in histories["renamed"])

    os.link(vm / "linked", vm / "second")
    (vm / "linked").unlink()
    assert all(p.exists() for p in histories["linked"])  # one link is left
    (vm / "second").unlink()
    assert not any(p.exists() for p in histories["linked"])

    with open(vm / "open", "r+b") as f:
        (vm / "open").unlink()
        f.write(b"still written")
        f.flush()
        assert all(p.exists() for p in histories["open"])  # in use: kept
    wait_for(lambda: not any(p.exists() for p in histories["open"]), 10,
             "the history of the closed, unlinked file to go")
    # the file that survived keeps a usable history
    change_id = checkpoint(datastore, "vm1/victim")
    written(vm / "victim")
    assert changes(datastore, "vm1/victim", change_id) == [(0, BLOCK)]


def test_a_copy_carrying_another_files_id_does_not_erase_its_history(
        datastore: MountedDatastore) -> None:
    vm = datastore.mnt / "vm1"
    vm.mkdir()
    written(vm / "disk")
    checkpoint(datastore, "vm1/disk")
    store = datastore.stores["a"] / "vm1"
    history = history_files(datastore, store / "disk")
    wait_for(lambda: all(p.exists() for p in history), 10, "the history saved at close")
    subprocess.run(["cp", "-a", str(store / "disk"), str(store / "copy")], check=True)
    assert history_files(datastore, store / "copy") == history  # the same id came along
    (vm / "copy").unlink()
    assert all(p.exists() for p in history)


def test_a_history_that_cannot_be_dropped_does_not_fail_the_unlink(
        datastore: MountedDatastore) -> None:
    vm = datastore.mnt / "vm1"
    vm.mkdir()
    written(vm / "disk")
    checkpoint(datastore, "vm1/disk")
    history = history_files(datastore, datastore.stores["a"] / "vm1" / "disk")
    wait_for(lambda: all(p.exists() for p in history), 10, "the history saved at close")
    cbt_dir = datastore.state_dir / "cbt"
    subprocess.run(["chattr", "+i", str(cbt_dir)], check=True)  # unlink there: EPERM
    try:
        (vm / "disk").unlink()
    finally:
        subprocess.run(["chattr", "-i", str(cbt_dir)], check=True)
    assert not (vm / "disk").exists()
    assert all(p.exists() for p in history)
    assert "is left in the state directory" in datastore.log()


# -- relocation, crashes and huge truncates ----------------------------------------------


def covered(extents: list[tuple[int, int]], offset: int, length: int) -> bool:
    return all(any(o <= b < o + n for o, n in extents) for b in (offset, offset + length - 1))


def test_change_ids_survive_a_relocation_and_a_crash(datastore: MountedDatastore) -> None:
    """Checkpoint, relocate, write, kill -9: the file's history is still its own
    (issue 11, item 6). The disk stays open throughout, as a running VM's does, so
    no clean close saves the history under its new inode in between."""
    disk = datastore.mnt / "vm" / "disk.img"
    disk.parent.mkdir()
    disk.write_bytes(os.urandom(8 << 20))
    change_id = checkpoint(datastore, "vm/disk.img")
    writes = [(1 << 20, 4096), (5 << 20, 100), (20 << 20, 4096)]
    fd = os.open(disk, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(writes[0][1]), writes[0][0])
        result = fusedisk("migrate", str(datastore.mnt), "vm", "--to", "b", timeout=300)
        assert result.returncode == 0, result.stderr
        assert datastore.status()["placement"]["vm"] == "b"
        for offset, length in writes[1:]:  # on the new store; the last one grows the file
            os.pwrite(fd, os.urandom(length), offset)
        datastore.kill()
    finally:
        with contextlib.suppress(OSError):  # the mount died under it
            os.close(fd)
    datastore.start()
    changed = changes(datastore, "vm/disk.img", change_id)
    assert all(covered(changed, o, n) for o, n in writes), changed
    assert sum(n for _, n in changed) <= 2 * (16 << 20)  # the two logged regions, at most

    # a copy made on its new store carries the id xattr, not the history
    store = datastore.stores["b"] / "vm"
    subprocess.run(["cp", "-a", str(store / "disk.img"), str(store / "copy.img")], check=True)
    refused = fusedisk("cbt", "changes", str(datastore.mnt), "vm/copy.img", "--since", change_id)
    assert refused.returncode == 1 and "full backup" in refused.stderr
    assert changes(datastore, "vm/disk.img", change_id) == changed


def daemon_peak_rss(ds: MountedDatastore) -> int:
    assert ds.proc is not None
    with open(f"/proc/{ds.proc.pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def test_a_huge_truncate_stalls_nothing(datastore: MountedDatastore) -> None:
    """truncate to 10^15 bytes (issue 11, item 10): answered at once, in little memory,
    while other requests go on, and the change ids still answer exactly."""
    vm = datastore.mnt / "vm"
    vm.mkdir()
    disk, other = vm / "disk.img", vm / "other.img"
    disk.write_bytes(os.urandom(1 << 20))
    other.write_bytes(os.urandom(BLOCK))
    change_id = checkpoint(datastore, "vm/disk.img")
    with open(disk, "r+b") as f:
        f.seek(8 * BLOCK)
        f.write(b"x")
    outcome: dict[str, object] = {}

    def huge_truncate() -> None:
        try:
            os.truncate(disk, 10**15)
            outcome["errno"] = 0
        except OSError as e:
            outcome["errno"] = e.errno

    truncating = threading.Thread(target=huge_truncate)
    truncating.start()
    slowest = 0.0
    for _ in range(20):  # other requests, while it runs and after
        started = time.monotonic()
        assert other.read_bytes()[:1]
        slowest = max(slowest, time.monotonic() - started)
    truncating.join(timeout=20)
    assert not truncating.is_alive(), "the truncate took longer than 20 s"
    assert slowest < 10, f"a read waited {slowest:.1f} s"
    assert outcome["errno"] in (0, errno.EFBIG), outcome  # whatever the store's fs says
    assert daemon_peak_rss(datastore) < 200 << 20

    if outcome["errno"]:  # refused: nothing changed but the byte written
        assert disk.stat().st_size == 1 << 20
        assert changes(datastore, "vm/disk.img", change_id) == [(8 * BLOCK, BLOCK)]
    else:
        assert changes(datastore, "vm/disk.img", change_id) == [
            (8 * BLOCK, BLOCK), (1 << 20, 10**15 - (1 << 20))]
    # a truncate the store can do, far past the end, and back
    os.truncate(disk, 10 << 40)
    assert changes(datastore, "vm/disk.img", change_id) == [
        (8 * BLOCK, BLOCK), (1 << 20, (10 << 40) - (1 << 20))]
    os.truncate(disk, 2 << 20)
    expected = [(8 * BLOCK, BLOCK), (1 << 20, 1 << 20)]  # zeros where the end was
    assert changes(datastore, "vm/disk.img", change_id) == expected
    assert daemon_peak_rss(datastore) < 200 << 20
    datastore.stop()  # a clean close saves it all, and the next mount reads it back
    datastore.start()
    assert changes(datastore, "vm/disk.img", change_id) == expected


def test_changes_page_by_page_add_up_to_the_whole_answer(datastore: MountedDatastore) -> None:
    """VDDK-style paging: pages of any size, asked one after the other from offset 0,
    give exactly the extents of one whole answer (split at page edges, nothing more)."""
    (datastore.mnt / "vm1").mkdir()
    disk = datastore.mnt / "vm1" / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 16 << 20)
    since = checkpoint(datastore, "vm1/disk.img")
    rng = random.Random(3)
    with open(disk, "r+b") as f:
        for _ in range(12):
            f.seek(rng.randrange(16 << 20))
            f.write(os.urandom(rng.randrange(1, 300000)))
    whole = changes(datastore, "vm1/disk.img", since)
    assert whole
    for page in (1 << 20, 3 << 20, 7777777):
        got: list[tuple[int, int]] = []
        for start in range(0, 16 << 20, page):
            result = fusedisk("cbt", "changes", str(datastore.mnt), "vm1/disk.img", "--since",
                              since, "--json", "--start", str(start), "--length", str(page))
            assert result.returncode == 0, result.stderr
            for o, n in json.loads(result.stdout)["extents"]:
                assert start <= o and o + n <= start + page  # clipped to the page
                if got and got[-1][0] + got[-1][1] == o:
                    got[-1] = (got[-1][0], got[-1][1] + n)  # one extent split at the edge
                else:
                    got.append((o, n))
        assert got == whole, page
    bad = fusedisk("cbt", "changes", str(datastore.mnt), "vm1/disk.img", "--since", since,
                   "--length", "0")
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1


def _daemon_holds(ds: MountedDatastore, path: Path) -> bool:
    """Whether the daemon still has a descriptor of the removed file *path* (quick:
    a status call would take long enough for other processes to take the inode)."""
    assert ds.proc is not None
    removed = f"{path} (deleted)"
    for fd in Path(f"/proc/{ds.proc.pid}/fd").iterdir():
        try:
            if os.readlink(fd) == removed:
                return True
        except FileNotFoundError:  # closed meanwhile
            continue
    return False


def test_a_new_file_on_a_reused_inode_number_gets_a_history_of_its_own(tmp_path: Path) -> None:
    """ext4 gives a new file the inode number of one just removed. While the old
    file's history is still being saved after its close (held here by the
    ``close-released`` stall point), the daemon still knows a file under that
    (st_dev, st_ino): the new file must not inherit it (its changes would be
    answered from the old file's bitmaps, and the old file's removal would
    then drop the new file's history). Randomized: files of random sizes,
    created, given a change id, written, closed, removed and replaced in a
    loop; each new file's changes must be exactly its own writes."""
    rng = random.Random(16)
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": "close-released:150:1000"})
        vm = ds.mnt / "vm1"
        vm.mkdir()
        store = ds.stores["a"] / "vm1"
        reused = 0
        previous: tuple[int, str] | None = None  # (backing inode, file id) of the last one

        for round_no in range(12):
            name = f"f{round_no}"
            blocks = rng.randrange(1, 9)
            with open(vm / name, "wb") as f:
                f.write(os.urandom(blocks * BLOCK))
            ino = os.stat(store / name).st_ino
            if previous is not None and ino == previous[0]:
                reused += 1
            change_id = checkpoint(ds, f"vm1/{name}")
            file_id = os.getxattr(store / name, "trusted.fusedisk.id").decode()
            assert previous is None or file_id != previous[1], (round_no, "history inherited")
            writes = [(rng.randrange(0, blocks * BLOCK - 4096), rng.randrange(1, 4096))
                      for _ in range(rng.randrange(1, 4))]  # inside the file
            with open(vm / name, "r+b") as f:
                for offset, length in writes:
                    f.seek(offset)
                    f.write(os.urandom(length))
            assert changes(ds, f"vm1/{name}", change_id) == blocks_of(writes), round_no
            (vm / name).unlink()  # its close's save is still held by the stall
            # the store frees the inode (and may give its number again) once the daemon
            # closed its last descriptor, which the closer thread does
            wait_for(lambda: not _daemon_holds(ds, store / name), 30,  # noqa: B023
                     "the removed file's last descriptor to be closed")
            previous = (ino, file_id)
        # the loop proves something only if ext4 did reuse inode numbers meanwhile
        assert reused >= 3, f"only {reused} of 11 new files got a removed file's inode number"
        wait_for(lambda: not any((ds.state_dir / "cbt").iterdir()), 30,
                 "every removed file's history to go: left "
                 + str(sorted(p.name for p in (ds.state_dir / "cbt").iterdir())))
    finally:
        ds.teardown()
