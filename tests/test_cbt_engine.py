"""The CBT engine on its own: bitmap, tracker, activity log, and the ordering rule."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from fusedisk import cbt
from fusedisk.bitmap import CHUNK_BITS, Bitmap
from fusedisk.cbt import AL_CAPACITY, REGION_SIZE, CbtStore, ChangeIdError, Tracker
from fusedisk.gate import Gate
from fusedisk.vdisk import OpenFiles, VFile

from .test_bitmap import address_space_limit

BLOCK = 64 << 10


# -- bitmap --------------------------------------------------------------------------


def test_bitmap_matches_a_set_model() -> None:
    rng = random.Random(7)
    bits, model = Bitmap(), set[int]()
    for _ in range(3000):
        start, n = rng.randrange(0, 3 * CHUNK_BITS), rng.randrange(1, CHUNK_BITS // 2)
        if rng.random() < 0.6:
            bits.mark(start, n)
            model.update(range(start, start + n))
        else:
            bits.clear(start, n)
            model.difference_update(range(start, start + n))
        assert bits.count == len(model)
    seen: set[int] = set()
    previous_end = -1
    for blockno, nblocks in bits.extents():
        assert blockno > previous_end  # sorted and merged: never adjacent
        previous_end = blockno + nblocks
        seen.update(range(blockno, blockno + nblocks))
    assert seen == model
    restored = Bitmap.from_record(bits.to_record())
    assert list(restored.extents()) == list(bits.extents())
    first = min(model)
    assert bits.next_dirty(0) == first and bits.test(first) and not bits.test(first - 1)


def test_bitmap_holes_cost_nothing() -> None:
    bits = Bitmap()
    # a 100 GiB sparse disk at 64 KiB blocks with 3 small writes far apart
    for offset in (0, 50 << 30, (100 << 30) - BLOCK):
        bits.mark(offset // BLOCK)
    assert bits.count == 3
    assert bits.memory_bytes <= 3 * (CHUNK_BITS // 8)
    bits.truncate((50 << 30) // BLOCK)
    assert list(bits.extents()) == [(0, 1)]


# -- tracker -------------------------------------------------------------------------


def make_tracker(tmp_path: Path, key: tuple[int, int] = (1, 2)) -> Tracker:
    home = tmp_path / "cbt"
    home.mkdir(exist_ok=True)
    return Tracker(home, "00000000000000aa", BLOCK, key)


async def write(tracker: Tracker, offset: int, length: int) -> None:
    """What the data path does, minus the pwrite."""
    while not tracker.logged(offset, length):
        await tracker.log(offset, length)
    tracker.mark_bytes(offset, length)


async def test_changes_since_checkpoints(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path)
    await write(tracker, 0, 10)
    first = await tracker.checkpoint()
    await write(tracker, 5 * BLOCK + 1, 2 * BLOCK)  # unaligned: touches blocks 5..7
    second = await tracker.checkpoint()
    await write(tracker, 100 * BLOCK, 1)
    size = 1 << 30
    assert tracker.changes(first, size) == [(5 * BLOCK, 3 * BLOCK), (100 * BLOCK, BLOCK)]
    assert tracker.changes(second, size) == [(100 * BLOCK, BLOCK)]
    # clipped to the file size
    assert tracker.changes(first, 6 * BLOCK) == [(5 * BLOCK, BLOCK)]
    for bad in ("00000000000000bb/1", f"{tracker.file_id}/0", f"{tracker.file_id}/99", "x"):
        with pytest.raises(ChangeIdError, match="full backup"):
            tracker.changes(bad, size)


async def test_old_change_ids_expire(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path)
    ids = []
    for i in range(cbt.MAX_CHECKPOINTS + 3):
        ids.append(await tracker.checkpoint())
        await write(tracker, i * BLOCK, 1)
    with pytest.raises(ChangeIdError, match="expired"):
        tracker.changes(ids[0], 1 << 30)
    oldest_live = ids[3]
    assert tracker.changes(oldest_live, 1 << 30) == [(3 * BLOCK, (len(ids) - 3) * BLOCK)]


async def test_clean_close_is_exact_and_crash_is_a_bounded_superset(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    change_id = await tracker.checkpoint()
    await write(tracker, 3 * BLOCK, BLOCK)
    await tracker.close()
    again = store._load_tracker("00000000000000aa", (1, 2))
    assert again is not None
    assert again.changes(change_id, 1 << 40) == [(3 * BLOCK, BLOCK)]

    # now write without closing: the process "dies" with the log on disk
    await write(again, 3 * REGION_SIZE + 7 * BLOCK, 10)
    await write(again, 9 * REGION_SIZE, 10)
    recovered = store._load_tracker("00000000000000aa", (1, 2))
    assert recovered is not None
    changed = recovered.changes(change_id, 1 << 40)
    covered = {(o, n) for o, n in changed}
    assert (3 * REGION_SIZE, REGION_SIZE) in covered and (9 * REGION_SIZE, REGION_SIZE) in covered
    assert any(o <= 3 * BLOCK < o + n for o, n in changed)
    # bounded: the log's regions only (the two written now, and region 0 from before)
    assert sum(n for _, n in changed) == 3 * REGION_SIZE


async def test_activity_log_eviction_keeps_every_write_covered(tmp_path: Path) -> None:
    """More hot regions than the log holds: evicted regions are in the saved bitmaps."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    change_id = await tracker.checkpoint()
    written = []
    for region in range(AL_CAPACITY * 2 + 5):
        offset = region * REGION_SIZE + (region % 7) * BLOCK
        await write(tracker, offset, 1)
        written.append(offset)
    # crash now: what the disk says must cover every write
    recovered = store._load_tracker("00000000000000aa", (1, 2))
    assert recovered is not None
    changed = recovered.changes(change_id, 1 << 50)
    for offset in written:
        assert any(o <= offset < o + n for o, n in changed), offset
    extra = sum(n for _, n in changed) - len(written) * BLOCK
    assert extra <= AL_CAPACITY * REGION_SIZE


async def test_corrupt_state_gets_a_new_history(tmp_path: Path) -> None:
    backing_file = tmp_path / "disk"
    backing_file.write_bytes(b"x")
    path_fd = os.open(backing_file, os.O_PATH)
    try:
        store = CbtStore(tmp_path, BLOCK)
        st = os.fstat(path_fd)
        tracker = store.open_tracker(path_fd, (st.st_dev, st.st_ino))
        change_id = await tracker.checkpoint()
        await tracker.close()
        bitmap_file = store.home / f"{tracker.file_id}.bitmap"
        data = bytearray(bitmap_file.read_bytes())
        data[-3] ^= 0xFF
        bitmap_file.write_bytes(bytes(data))
        fresh = store.open_tracker(path_fd, (st.st_dev, st.st_ino))
        assert fresh.file_id != tracker.file_id
        with pytest.raises(ChangeIdError):
            fresh.changes(change_id, 1)
    finally:
        os.close(path_fd)


# -- the ordering rule, raced ------------------------------------------------------------


async def copy_pass(vfile_fd: int, replica_fd: int, dirty: Bitmap, clear_first: bool) -> None:
    """A consumer: copy dirty blocks to a replica, yielding between steps."""
    blockno = dirty.next_dirty(0)
    while blockno is not None:
        if clear_first:
            dirty.clear(blockno)  # the rule: clear before reading
        data = os.pread(vfile_fd, BLOCK, blockno * BLOCK)
        await trio.lowlevel.checkpoint()  # a guest write may land right here
        if not clear_first:
            dirty.clear(blockno)
        os.pwrite(replica_fd, data, blockno * BLOCK)
        await trio.lowlevel.checkpoint()
        blockno = dirty.next_dirty(blockno + 1)


async def race(tmp_path: Path, clear_first: bool, seed: int) -> bool:
    """Writers vs. a copying consumer; True if the replica ends equal to the source."""
    nblocks = 64
    source = tmp_path / f"source{seed}"
    source.write_bytes(os.urandom(nblocks * BLOCK))
    replica = tmp_path / f"replica{seed}"
    replica.write_bytes(source.read_bytes())
    files = OpenFiles(CbtStore(tmp_path, BLOCK), BLOCK)
    path_fd = os.open(source, os.O_PATH)
    st = os.fstat(path_fd)
    vfile = files.open(path_fd, (st.st_dev, st.st_ino), Gate())
    assert vfile.tracker is not None
    dirty = Bitmap()
    vfile.consumers.append(dirty)
    replica_fd = os.open(replica, os.O_RDWR)
    rng = random.Random(seed)
    running = 2
    try:
        async def writer() -> None:
            nonlocal running
            for _ in range(300):
                offset = rng.randrange(nblocks) * BLOCK + rng.randrange(BLOCK - 512)
                await vfile.write(offset, rng.randbytes(512))
                await trio.lowlevel.checkpoint()
            running -= 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(writer)
            while running:  # copy passes while the writers run
                await copy_pass(vfile.fd, replica_fd, dirty, clear_first)
                await trio.lowlevel.checkpoint()
        await copy_pass(vfile.fd, replica_fd, dirty, clear_first)  # writers done: last pass
        return source.read_bytes() == replica.read_bytes()
    finally:
        os.close(replica_fd)
        files.close_all()
        os.close(path_fd)


async def test_writes_racing_a_consumer_never_lose_a_block(tmp_path: Path) -> None:
    for seed in range(5):
        assert await race(tmp_path, clear_first=True, seed=seed)


async def test_the_race_test_catches_a_consumer_that_clears_too_late(tmp_path: Path) -> None:
    """The same race with the rule broken must lose an update for some seed:
    proof that the test above can fail."""
    results = [await race(tmp_path, clear_first=False, seed=seed) for seed in range(20)]
    assert not all(results)


async def test_a_reopened_file_rearms_its_log_with_one_save(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    change_id = await tracker.checkpoint()
    written = [region * REGION_SIZE for region in range(10)]
    for offset in written:
        await write(tracker, offset, 1)
    await tracker.close()
    again = store._load_tracker("00000000000000aa", (1, 2))
    assert again is not None and again.clean
    assert again.changes(change_id, 1 << 40) == [(o, BLOCK) for o in written]  # exact
    for offset in list(written):
        await write(again, offset + BLOCK, 1)
        written.append(offset + BLOCK)
    assert again.al_saves == 1  # ten hot regions, one save
    crashed = store._load_tracker("00000000000000aa", (1, 2))
    assert crashed is not None
    changed = crashed.changes(change_id, 1 << 40)
    assert all(any(o <= w < o + n for o, n in changed) for w in written)


# -- whose history it is: relocation aliases ------------------------------------------------


async def test_a_relocation_alias_finds_the_history_under_the_new_key(tmp_path: Path) -> None:
    """The pool file a relocation made becomes the file at the commit; a crash after it
    opens the file under the pool file's key, and must find its history there."""
    store = CbtStore(tmp_path, BLOCK)
    src, pool, copy = (1, 2), (3, 4), (3, 5)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, src)
    change_id = await tracker.checkpoint()
    await write(tracker, 7 * BLOCK, 1)
    tracker.add_alias(pool, lambda: True)
    await tracker.close()  # (a clean save: each load below leaves the record as it is)
    # crash after the commit: the file is now the pool file
    after = store._load_tracker("00000000000000aa", pool)
    assert after is not None and after.key == pool
    assert after.changes(change_id, 1 << 30) == [(7 * BLOCK, BLOCK)]
    # crash before it: the source is still the truth, and keeps its history too
    assert store._load_tracker("00000000000000aa", src) is not None
    # a copy carrying the id xattr (cp -a) on either store never adopts it
    assert store._load_tracker("00000000000000aa", copy) is None
    # once the history is saved under its new key, the old one no longer answers
    await after.save()
    assert store._load_tracker("00000000000000aa", src) is None
    assert store._load_tracker("00000000000000aa", pool) is not None


async def test_the_alias_of_a_relocation_that_ended_without_commit_goes(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    await tracker.checkpoint()
    copying = True
    tracker.add_alias((3, 4), lambda: copying)
    await tracker.save()
    assert store._load_tracker("00000000000000aa", (3, 4)) is not None
    copying = False  # cancelled: the pool file is deleted, its inode may be reused
    await tracker.checkpoint()  # any save
    assert store._load_tracker("00000000000000aa", (3, 4)) is None
    assert store._load_tracker("00000000000000aa", (1, 2)) is not None


async def test_histories_saved_before_aliases_are_still_read(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    change_id = await tracker.checkpoint()
    await write(tracker, 3 * BLOCK, 1)
    record = tracker._bitmap_record()
    del record["keys"]  # as fusedisk wrote it before aliases
    await tracker.close()
    cbt._save(store.home, "00000000000000aa.bitmap", "cbt-bitmap", record)
    again = store._load_tracker("00000000000000aa", (1, 2))
    assert again is not None and again.changes(change_id, 1 << 30) == [(3 * BLOCK, BLOCK)]
    assert store._load_tracker("00000000000000aa", (1, 3)) is None
    assert store.forget("00000000000000aa", (1, 2))


async def test_a_removed_file_forgets_a_history_saved_with_its_alias(tmp_path: Path) -> None:
    """Removed right after the switchover (its key is the pool file's now), before any
    save under that key: the history still goes with it."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    await tracker.checkpoint()
    tracker.add_alias((3, 4), lambda: True)
    await tracker.save()
    assert not store.forget("00000000000000aa", (9, 9))
    assert store.forget("00000000000000aa", (3, 4))
    assert not (store.home / "00000000000000aa.bitmap").exists()


# -- truncates: any length, and never racing a checkpoint ----------------------------------


async def test_a_huge_truncate_is_marked_durably_in_a_small_record(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    change_id = await tracker.checkpoint()
    start, length = 5 * BLOCK + 100, 10**15
    with address_space_limit():  # a bit per block would be GBs: fail fast, not swap
        await tracker.mark_bytes_durably(start, length)
    assert (store.home / "00000000000000aa.bitmap").stat().st_size < 16384
    assert tracker.statistics()["memory_bytes"] < 1 << 20
    crashed = store._load_tracker("00000000000000aa", (1, 2))
    assert crashed is not None
    end = -(-(start + length) // BLOCK) * BLOCK
    assert crashed.changes(change_id, 1 << 60) == [(5 * BLOCK, end - 5 * BLOCK)]
    assert crashed.changes(change_id, 8 * BLOCK) == [(5 * BLOCK, 3 * BLOCK)]  # within the size


async def test_a_truncate_never_lands_outside_the_segment_it_was_saved_in(
    tmp_path: Path,
) -> None:
    """A checkpoint queued on the tracker's lock before a truncate's durable mark:
    the saved segment of the new change id must hold the truncate."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    ids: list[str] = []

    async def checkpoint() -> None:
        ids.append(await tracker.checkpoint())

    async with trio.open_nursery() as nursery:
        async with tracker._lock:  # a save in progress (an eviction, a close)
            nursery.start_soon(checkpoint)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(tracker.mark_bytes_durably, 9 * BLOCK, BLOCK)
            await trio.testing.wait_all_tasks_blocked()
    # the truncate happens now; the daemon dies before any other save
    crashed = store._load_tracker("00000000000000aa", (1, 2))
    assert crashed is not None
    assert crashed.changes(ids[0], 1 << 30) == [(9 * BLOCK, BLOCK)]


# -- the data path: truncates and relocation aliases ----------------------------------------


def open_vfile(tmp_path: Path, files: OpenFiles, gate: Gate, size: int) -> tuple[int, VFile]:
    backing_file = tmp_path / "disk"
    with open(backing_file, "wb") as f:
        f.truncate(size)
    path_fd = os.open(backing_file, os.O_PATH)
    st = os.fstat(path_fd)
    return path_fd, files.open(path_fd, (st.st_dev, st.st_ino), gate)


def saved_last_segment(store: CbtStore, file_id: str) -> Bitmap:
    """The newest segment as saved, without the activity log's regions (cbt._load)."""
    record = cbt._load(store.home / f"{file_id}.bitmap", "cbt-bitmap")
    assert record is not None
    return Bitmap.from_record(record["segments"][-1]["bits"])


async def test_a_truncate_is_durable_for_the_size_it_really_changes(tmp_path: Path) -> None:
    """A write that moves the end of the file while the truncate's mark is being saved:
    the saved marks still cover what the ftruncate then changes."""
    store = CbtStore(tmp_path, BLOCK)
    files = OpenFiles(store, BLOCK)
    path_fd, vfile = open_vfile(tmp_path, files, Gate(), 10 * BLOCK)
    tracker = vfile.tracker
    assert tracker is not None
    try:
        await tracker.checkpoint()  # a change id: from here on every mark is durable
        await vfile.write(0, b"x")  # its region is logged: the next write needs no save
        async with trio.open_nursery() as nursery:
            async with tracker._lock:  # the truncate's first save has to wait...
                nursery.start_soon(vfile.truncate, 20 * BLOCK)
                await trio.testing.wait_all_tasks_blocked()
                await vfile.write(30 * BLOCK, b"y")  # ...while a write extends the file
        assert vfile.size() == 20 * BLOCK
        saved = saved_last_segment(store, tracker.file_id)
        # the first write, and the truncate: 10 → 31 blocks (the second write), then 20
        assert list(saved.extents()) == [(0, 1), (10, 21)]
    finally:
        files.close_all()
        os.close(path_fd)


async def test_a_truncate_the_store_refuses_leaves_a_superset(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    files = OpenFiles(store, BLOCK)
    path_fd, vfile = open_vfile(tmp_path, files, Gate(), 4 * BLOCK)
    assert vfile.tracker is not None
    consumer = Bitmap()
    vfile.consumers.append(consumer)
    try:
        change_id = await vfile.tracker.checkpoint()
        with pytest.raises(OSError) as refused, address_space_limit():
            await vfile.truncate(1 << 62)  # past what any filesystem takes
        assert refused.value.errno == errno.EFBIG
        assert vfile.size() == 4 * BLOCK
        assert vfile.tracker.changes(change_id, vfile.size()) == []  # marks past the end only
        assert consumer.count == 0  # nothing to copy: nothing changed
        await vfile.truncate(2 * BLOCK)  # and the file goes on
        assert vfile.tracker.changes(change_id, 4 * BLOCK) == [(2 * BLOCK, 2 * BLOCK)]
    finally:
        files.close_all()
        os.close(path_fd)


async def test_a_relocation_alias_is_saved_before_the_switchover_drains(tmp_path: Path) -> None:
    store = CbtStore(tmp_path, BLOCK)
    files = OpenFiles(store, BLOCK)
    gate = Gate()
    path_fd, vfile = open_vfile(tmp_path, files, gate, BLOCK)
    tracker = vfile.tracker
    assert tracker is not None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(files.run)
            files.keep_history(vfile, (7, 7), lambda: True)
            assert gate.inside == 0  # no change id yet: nothing to lose, nothing saved
            await tracker.checkpoint()
            assert store._load_tracker(tracker.file_id, (7, 7)) is not None  # saved with it

            files.keep_history(vfile, (8, 8), lambda: True)
            assert gate.inside == 1  # the save is under way...
            await gate.close_and_drain()  # ...and the switchover waits for it
            assert store._load_tracker(tracker.file_id, (8, 8)) is not None
            files.keep_history(vfile, (9, 9), lambda: True)  # found inside the pause
            assert gate.inside == 0  # not saved there: with the next save
            gate.open()
            nursery.cancel_scope.cancel()
    finally:
        files.close_all()
        os.close(path_fd)


def refuse_saves(monkeypatch: pytest.MonkeyPatch, err: int = errno.ENOSPC) -> None:
    """The state directory refuses every CBT save from now on (as a full one does)."""

    def refused(*_args: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(cbt, "_write_al", refused)
    monkeypatch.setattr(cbt, "_save", refused)


async def test_a_log_the_state_directory_refuses_withdraws_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 8 of issue 11: the write goes on; the file gets a new id on its
    store before it does, so the old change id is refused, by this tracker
    and by the next one loaded from the store (after a crash)."""
    store = CbtStore(tmp_path, BLOCK)
    files = OpenFiles(store, BLOCK)
    path_fd, vfile = open_vfile(tmp_path, files, Gate(), 4 * BLOCK)
    tracker = vfile.tracker
    assert tracker is not None
    try:
        change_id = await tracker.checkpoint()
        old_id = tracker.file_id
        refuse_saves(monkeypatch)
        async with trio.open_nursery() as nursery:  # several writers fail at once
            for i in range(4):
                nursery.start_soon(vfile.write, i * REGION_SIZE, b"w")
        assert backing_bytes(vfile, 0, 1) == b"w"
        assert tracker.withdrawn and store.health.error and store.health.withdrawn == 1
        assert tracker.file_id != old_id
        assert store.file_id(path_fd) == tracker.file_id  # on the store: a crash sees it
        with pytest.raises(ChangeIdError):
            tracker.changes(change_id, vfile.size())
        await vfile.truncate(BLOCK)  # a truncate goes on as well
        assert vfile.size() == BLOCK
        with pytest.raises(OSError):  # a checkpoint that cannot be durable is refused
            await tracker.checkpoint()
        assert tracker.statistics()["change_ids"] == []
        monkeypatch.undo()
        fresh = await tracker.checkpoint()  # saves again: whole again
        assert tracker.withdrawn is None
        await vfile.write(0, b"v")
        assert tracker.changes(fresh, vfile.size()) == [(0, BLOCK)]
        assert not (tmp_path / "cbt" / f"{old_id}.bitmap").exists()  # nothing refers to it
        loaded = store.open_tracker(path_fd, vfile.key)  # as after a crash
        assert loaded.file_id == tracker.file_id
        with pytest.raises(ChangeIdError):
            loaded.changes(change_id, vfile.size())
        assert loaded.changes(fresh, vfile.size()) == [(0, BLOCK)]  # from the log
    finally:
        files.close_all()
        os.close(path_fd)


async def test_a_history_that_cannot_be_withdrawn_refuses_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """State directory and store xattrs both refuse: the write cannot be tracked
    or told apart after a crash, so it fails and the file is unchanged."""
    store = CbtStore(tmp_path, BLOCK)
    files = OpenFiles(store, BLOCK)
    path_fd, vfile = open_vfile(tmp_path, files, Gate(), 4 * BLOCK)
    tracker = vfile.tracker
    assert tracker is not None
    try:
        change_id = await tracker.checkpoint()
        refuse_saves(monkeypatch, errno.EROFS)

        def no_xattrs(*_args: object) -> None:
            raise OSError(errno.EIO, "xattr refused")

        monkeypatch.setattr(cbt, "_replace_file_id", no_xattrs)
        before = backing_bytes(vfile, 0, 4 * BLOCK)
        with pytest.raises(OSError) as refused:
            await vfile.write(0, b"w")
        assert refused.value.errno == errno.EROFS  # the state directory's error
        assert backing_bytes(vfile, 0, 4 * BLOCK) == before
        assert tracker.withdrawn is None
        assert tracker.changes(change_id, vfile.size()) == []
    finally:
        files.close_all()
        os.close(path_fd)


def backing_bytes(vfile: VFile, offset: int, length: int) -> bytes:
    return os.pread(vfile.fd, length, offset)


# -- a relocation's internal marks -----------------------------------------------------


async def test_a_relocation_mark_survives_a_crash_as_a_superset_and_is_no_change_id(
    tmp_path: Path,
) -> None:
    """Every write acknowledged after a relocation mark's generation started is
    in that generation after a crash (the activity log folds in); the mark is
    no change id, counts against no checkpoint limit, and goes when dropped."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000aa", BLOCK, (1, 2))
    user_id = await tracker.checkpoint()
    await write(tracker, 0, BLOCK)  # before the mark: not in it
    tracker.start_relocation_mark(1)
    await tracker.save()
    rng = random.Random(3)
    written: set[int] = set()
    for _ in range(300):  # more regions than the log holds: evictions happen
        blockno = rng.randrange(1, (2 * AL_CAPACITY * REGION_SIZE) // BLOCK)
        await write(tracker, blockno * BLOCK, 100)
        written.add(blockno)
    assert tracker.statistics()["change_ids"] == [user_id]
    # the process "dies": nothing is closed
    recovered = store._load_tracker("00000000000000aa", (1, 2))
    assert recovered is not None
    mark = recovered.relocation_marks[1]
    assert all(mark.test(b) for b in written), "a write after the mark is missing from it"
    assert not mark.test(0) or any(0 <= b < REGION_SIZE // BLOCK for b in written)
    assert recovered.statistics()["change_ids"] == [user_id]
    # a new generation, then the old one dropped: only the new one is saved
    recovered.start_relocation_mark(2)
    recovered.drop_relocation_marks(below=2)
    await write(recovered, 5 * BLOCK, 1)
    await recovered.close()
    again = store._load_tracker("00000000000000aa", (1, 2))
    assert again is not None and list(again.relocation_marks) == [2]
    assert list(again.relocation_marks[2].extents()) == [(5, 1)]
    again.drop_relocation_marks()
    await again.close()
    last = store._load_tracker("00000000000000aa", (1, 2))
    assert last is not None and last.relocation_marks == {}


# -- nothing durable until it is worth it ------------------------------------------------


async def test_a_history_without_change_ids_or_marks_saves_nothing(tmp_path: Path) -> None:
    """No change id, no relocation mark: writes log nothing and a close saves
    nothing (issue 16); the first checkpoint saves, and every write after it is
    in its changes after a crash."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000ab", BLOCK, (1, 2))
    assert not tracker.durable
    for i in range(3 * AL_CAPACITY):  # more regions than the log holds, too
        await write(tracker, i * REGION_SIZE, BLOCK)
    await tracker.close()
    assert os.listdir(store.home) == [] and tracker.al_saves == 0
    change_id = await tracker.checkpoint()
    assert tracker.durable
    await write(tracker, 5 * REGION_SIZE + 3 * BLOCK, 1)  # the process "dies" after it
    recovered = store._load_tracker("00000000000000ab", (1, 2))
    assert recovered is not None
    assert any(o <= 5 * REGION_SIZE + 3 * BLOCK < o + n
               for o, n in recovered.changes(change_id, 1 << 40))


async def test_a_dropped_relocation_mark_keeps_the_log_until_the_close(tmp_path: Path) -> None:
    """A cancelled relocation drops its marks before its clean-up removes the
    progress a resume would trust; a crash in between must still find every
    write since the saved mark in it: the log goes on until the close."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000ac", BLOCK, (1, 2))
    tracker.start_relocation_mark(1)
    await tracker.save()
    tracker.drop_relocation_marks()
    assert tracker.durable
    await write(tracker, 7 * REGION_SIZE, BLOCK)  # the process "dies" here
    recovered = store._load_tracker("00000000000000ac", (1, 2))
    assert recovered is not None and recovered.durable
    assert recovered.relocation_marks[1].test(7 * REGION_SIZE // BLOCK)
    # closed cleanly with no mark and no id: the next life logs nothing
    recovered.drop_relocation_marks()
    await recovered.close()
    again = store._load_tracker("00000000000000ac", (1, 2))
    assert again is not None and not again.durable


async def test_a_reload_of_an_unclean_log_settles_it_even_without_change_ids(
    tmp_path: Path,
) -> None:
    """A log left "unclean" by a durable past is settled (saved clean) when the
    history is loaded, so its regions are not reported again and again."""
    store = CbtStore(tmp_path, BLOCK)
    tracker = Tracker(store.home, "00000000000000ad", BLOCK, (1, 2))
    tracker.start_relocation_mark(1)
    await write(tracker, 0, BLOCK)  # the log says unclean
    tracker.drop_relocation_marks()
    await tracker.save()  # bitmaps with no mark and no id; the process "dies"
    first = store._load_tracker("00000000000000ad", (1, 2))
    assert first is not None and not first.durable
    al = cbt._read_al(store.home / "00000000000000ad.al")
    assert al is not None and al[2], "the log still says unclean after the reload"
