"""Snapshots against a reference copy, on both paths: copy-before-write (the
ext4 of the test machine's tmp) and reflinks (a loop-mounted XFS).

The rooms run as the daemon runs them (a real datastore, changed block
tracking on, the data path of vdisk.py, the snapshot service), unmounted, so
a randomized writer can compare the snapshot's view after every round with
a copy of the file taken at the snapshot's instant: overwrites of partial
and whole blocks, writes past the end, truncates down and up, punched holes,
zeroed ranges, allocations, copy_file_range from another file, fsyncs.
Then the daemon's two ends: a clean stop (the view is the same after the
next start) and a crash (kill -9 is a stop without any of the unmount's
saves: the snapshot is intact or reported lost, never read wrong).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fusedisk import backing
from fusedisk.cbt import CbtStore
from fusedisk.config import build_config
from fusedisk.datastore import Datastore, StoreClaims
from fusedisk.fs import Operations
from fusedisk.metadata import StateDir
from fusedisk.relocation import Options, Relocator
from fusedisk.snapshots import CBW, REFLINK, SnapshotError, Snapshots, open_file
from fusedisk.vdisk import OpenFiles, VFile

from .conftest import XfsStore

BLOCK = 16 << 10  #: the datastore's block size here: small, so that writes straddle blocks
SIZE = 40 * BLOCK + 1000  #: not a whole number of blocks
ROUNDS = 12
OPS_PER_ROUND = 8


@dataclass
class Rig:
    datastore: Datastore
    files: OpenFiles
    snapshots: Snapshots
    relocator: Relocator

    def vfile(self, path: str) -> VFile:
        entry = self.datastore.entries["vm1"]
        path_fd = backing.open_parts(entry.store.root_fd, ["vm1", path])
        try:
            st = backing.fstat(path_fd)
            return self.files.open(path_fd, (st.st_dev, st.st_ino), entry.gate)
        finally:
            backing.close(path_fd)

    def view(self, name: str, path: str = "disk.img") -> bytes:
        with open_file(self.datastore, "vm1", name, path) as f:
            data = f.pread(f.size + 10, 0)
            assert len(data) == f.size
            extents = f.extents()
        # outside the allocated ranges it reads as zeros (base:allocation's promise)
        pos = 0
        for offset, length in extents:
            assert offset >= pos and length > 0
            assert data[pos:offset].count(0) == offset - pos, (name, pos, offset)
            pos = offset + length
        assert data[pos:].count(0) == len(data) - pos
        return data


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, store: Path, crash: bool = False,
              other: Path | None = None, block_size: int = BLOCK,
              sync_interval_s: float | None = None) -> AsyncIterator[Rig]:
    """The rooms of a daemon on *store* (and store ``b`` = *other*); at the end a
    clean stop, or with *crash* one that saves nothing (as kill -9); with
    *sync_interval_s*, the snapshot service's periodic sync runs."""
    stores = [f"a={store}"] + ([f"b={other}"] if other is not None else [])
    config = build_config(config_file=None, mountpoint=str(tmp_path / "mnt"),
                          stores=stores, default_store="a",
                          state_dir=str(tmp_path / "state"), block_size=str(block_size),
                          allow_other=None, cbt=True)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    state = StateDir(config.state_dir)
    state.open()
    claims = StoreClaims(state, config.mountpoint)
    datastore = Datastore.open(config, state, claims)
    files = OpenFiles(CbtStore(config.state_dir, config.block_size), config.block_size)
    snapshots = Snapshots(datastore, files)
    snapshots.load()
    ops = Operations(datastore, files)
    relocator = Relocator(datastore, files, config.block_size, ops.repoint)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(files.run)
            await nursery.start(relocator.run)
            if sync_interval_s is not None:
                await nursery.start(functools.partial(snapshots.run,
                                                      sync_interval_s=sync_interval_s))
            yield Rig(datastore, files, snapshots, relocator)
            nursery.cancel_scope.cancel()
    finally:
        if crash:  # every descriptor closed, nothing saved
            for live in snapshots.live.values():
                for guard in live.guards.values():
                    guard.close()
                backing.close(live.dir_fd)
            for key in list(files.guards):
                files.guards.pop(key)
        else:
            ops.close()
            snapshots.close()
        datastore.close()
        claims.release()
        state.close()


def make_entry(store: Path, rng: random.Random) -> None:
    home = store / "vm1"
    home.mkdir()
    data = bytearray(rng.randbytes(SIZE))
    data[5 * BLOCK: 9 * BLOCK] = bytes(4 * BLOCK)  # zeros that are data
    (home / "disk.img").write_bytes(bytes(data))
    with open(home / "disk.img", "r+b") as f:  # and a hole
        os.posix_fallocate(f.fileno(), 0, 1)
        f.truncate(SIZE)
    fd = os.open(home / "disk.img", os.O_RDWR)
    try:
        backing.fallocate(fd, backing.FALLOC_FL_PUNCH_HOLE | backing.FALLOC_FL_KEEP_SIZE,
                          20 * BLOCK, 3 * BLOCK)
    finally:
        os.close(fd)
    (home / "other.img").write_bytes(rng.randbytes(8 * BLOCK))
    (home / "vm1.vmx").write_text("x\n")


def _set(ref: bytearray, offset: int, data: bytes) -> None:
    if offset > len(ref):
        ref.extend(bytes(offset - len(ref)))
    ref[offset: offset + len(data)] = data


async def random_op(rng: random.Random, vfile: VFile, other: VFile, ref: bytearray) -> str:
    """One random change of the live file, mirrored into *ref*; its name."""
    kind = rng.choice(["write", "write", "write", "block", "truncate", "punch", "zero",
                       "allocate", "copy", "fsync"])
    size = len(ref)
    offset = rng.randrange(0, max(size, 1) + BLOCK)
    length = rng.choice([1, 512, 4096, BLOCK, 3 * BLOCK + 7, rng.randrange(1, 2 * BLOCK)])
    if kind == "write":
        data = rng.randbytes(length)
        assert await vfile.write(offset, data) == length
        _set(ref, offset, data)
    elif kind == "block":  # an aligned whole block, as a guest's page cache writes
        offset -= offset % BLOCK
        data = rng.randbytes(BLOCK)
        await vfile.write(offset, data)
        _set(ref, offset, data)
    elif kind == "truncate":
        new = rng.choice([0, rng.randrange(0, SIZE), SIZE + rng.randrange(0, 4 * BLOCK)])
        new = new if rng.random() < 0.8 else max(new, size // 2)
        await vfile.truncate(new)
        del ref[new:]
        ref.extend(bytes(new - len(ref)))
    elif kind in ("punch", "zero"):
        mode = (backing.FALLOC_FL_PUNCH_HOLE | backing.FALLOC_FL_KEEP_SIZE if kind == "punch"
                else backing.FALLOC_FL_ZERO_RANGE)
        await vfile.fallocate(mode, offset, length)
        end = min(offset + length, size) if kind == "punch" else offset + length
        if end > offset:
            _set(ref, offset, bytes(end - offset))
    elif kind == "allocate":
        await vfile.fallocate(0, offset, length)
        if offset + length > size:
            ref.extend(bytes(offset + length - size))
    elif kind == "copy":
        src = rng.randrange(0, 8 * BLOCK)
        done = await vfile.copy_from(other, src, offset, length)
        source = other.read(src, done)
        assert len(source) == done
        _set(ref, offset, source)
    else:
        await vfile.fsync(rng.random() < 0.5)
    return kind


async def writer_rounds(r: Rig, rng: random.Random, refs: dict[str, bytes],
                        live: bytearray, rounds: int) -> None:
    """Random changes of disk.img; every snapshot in *refs* compared after each round;
    a new snapshot every few rounds (its reference taken at the same instant)."""
    vfile, other = r.vfile("disk.img"), r.vfile("other.img")
    try:
        for round_no in range(rounds):
            if round_no % 4 == 0:
                taken = {s.name for s in r.snapshots.list("vm1")}
                name = next(f"s{n}" for n in range(len(taken) + 1) if f"s{n}" not in taken)
                await r.snapshots.create(r.datastore.entries["vm1"], name)
                refs[name] = bytes(live)
            done = [await random_op(rng, vfile, other, live) for _ in range(OPS_PER_ROUND)]
            assert vfile.read(0, len(live) + 1) == live, done
            for name, ref in refs.items():
                assert r.view(name) == ref, (name, round_no, done)
    finally:
        r.files.release(vfile)
        r.files.release(other)


@pytest.fixture
def xfs_store(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "xfs"
    xfs = XfsStore(tmp_path / "xfs.img", path)
    try:
        xfs.set_up()
        yield path
    finally:
        xfs.tear_down()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["ext4", "xfs"])
async def test_a_randomized_writer_never_changes_the_snapshot(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str, seed: int
) -> None:
    store = request.getfixturevalue("xfs_store") if kind == "xfs" else tmp_path / "store"
    store.mkdir(exist_ok=True)
    rng = random.Random(seed)
    make_entry(store, rng)
    live = bytearray((store / "vm1" / "disk.img").read_bytes())
    refs: dict[str, bytes] = {}
    async with rig(tmp_path, store) as r:
        await writer_rounds(r, rng, refs, live, ROUNDS)
        listed = {s.name: s for s in r.snapshots.list("vm1")}
        assert set(listed) == set(refs) and all(s.state == "ok" for s in listed.values())
        method = CBW if kind == "ext4" else REFLINK
        assert {s.files["disk.img"]["method"] for s in listed.values()} == {method}
        assert all(s.space_bytes > 0 for s in listed.values())
        if kind == "ext4":  # what copy-before-write saved is counted
            assert listed["s0"].saved_bytes > 0
            assert listed["s0"].saved_bytes <= SIZE + BLOCK
        # a deleted snapshot stops costing: the others are still exact
        await r.snapshots.delete("vm1", "s1")
        del refs["s1"]
        with pytest.raises(SnapshotError, match="no snapshot named"):
            open_file(r.datastore, "vm1", "s1", "disk.img")
        await writer_rounds(r, rng, refs, live, 2)
    # a clean stop and a new start: the same views, still guarded
    async with rig(tmp_path, store) as r:
        assert {s.name: s.state for s in r.snapshots.list("vm1")} == dict.fromkeys(refs, "ok")
        for name, ref in refs.items():
            assert r.view(name) == ref
        await writer_rounds(r, rng, refs, live, 2)
        assert r.view("s0", "other.img") == (store / "vm1" / "other.img").read_bytes()


async def test_a_crash_leaves_each_snapshot_intact_or_reported_lost(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(7)
    make_entry(store, rng)
    live = bytearray((store / "vm1" / "disk.img").read_bytes())
    async with rig(tmp_path, store, crash=True) as r:
        entry = r.datastore.entries["vm1"]
        await r.snapshots.create(entry, "synced")
        synced = bytes(live)
        vfile = r.vfile("disk.img")
        try:
            await vfile.write(3 * BLOCK, b"a" * BLOCK)
            await vfile.fsync(True)  # the saved block is durable, the map clean
            await r.snapshots.create(entry, "torn")
            await vfile.write(3 * BLOCK + 5, b"b" * 100)  # "torn" saves it, never synced
        finally:
            r.files.release(vfile)
    # kill -9: the snapshot with an unsynced copy is lost, the other intact
    async with rig(tmp_path, store) as r:
        states = {s.name: (s.state, s.lost) for s in r.snapshots.list("vm1")}
        assert states["synced"] == ("ok", None)
        assert states["torn"][0] == "lost" and "crash" in str(states["torn"][1]), states
        assert r.view("synced") == synced
        with pytest.raises(SnapshotError, match="is lost"):
            open_file(r.datastore, "vm1", "torn", "disk.img")
        # a lost snapshot stays lost (and is not guarded); it can be deleted
        await r.snapshots.delete("vm1", "torn")
    async with rig(tmp_path, store) as r:
        assert [(s.name, s.state) for s in r.snapshots.list("vm1")] == [("synced", "ok")]
        assert r.view("synced") == synced


async def test_a_snapshot_stays_exact_across_a_relocation_of_its_entry(tmp_path: Path) -> None:
    """Copy-before-write follows the live file to its new store; the snapshot stays
    on the store it was made on. A writer runs during the whole relocation, with
    disk.img open across the switchover and other.img closed at it."""
    store, dest = tmp_path / "store", tmp_path / "dest"
    store.mkdir()
    dest.mkdir()
    rng = random.Random(11)
    make_entry(store, rng)
    live = bytearray((store / "vm1" / "disk.img").read_bytes())
    other_ref = (store / "vm1" / "other.img").read_bytes()
    refs: dict[str, bytes] = {}
    async with rig(tmp_path, store, other=dest) as r:
        await writer_rounds(r, rng, refs, live, 2)
        entry = r.datastore.entries["vm1"]
        made_on_a = set(refs)
        vfile, vmx = r.vfile("disk.img"), r.vfile("vm1.vmx")
        job = r.relocator.start(entry, r.datastore.stores["b"], Options())
        try:
            while not job.finished.is_set():
                # inside the entry's gate, as fs.py runs a guest's truncate or fallocate:
                # a switchover waits for it and holds it back, never runs beside it
                await entry.gate.enter()
                try:
                    await random_op(rng, vfile, vmx, live)
                finally:
                    entry.gate.leave()
                await trio.lowlevel.checkpoint()
        finally:
            r.files.release(vfile)
            r.files.release(vmx)
        assert job.state.value == "done", (job.state, job.error)
        assert r.datastore.entries["vm1"].store.name == "b"
        assert not (store / "vm1").exists()
        for name, ref in refs.items():
            assert r.view(name) == ref, name
        await writer_rounds(r, rng, refs, live, 3)
        other = r.vfile("other.img")  # first open since the move: still guarded
        try:
            await other.write(0, b"z" * (3 * BLOCK))
        finally:
            r.files.release(other)
        assert all(r.view(name, "other.img") == other_ref for name in made_on_a)
        # the ones made before the move stay on a, a later one is made on b
        assert {s.name: s.store for s in r.snapshots.list("vm1")} == {
            name: "a" if name in made_on_a else "b" for name in refs}
    async with rig(tmp_path, store, other=dest) as r:  # the new keys were saved
        assert {s.name: s.state for s in r.snapshots.list("vm1")} == dict.fromkeys(refs, "ok")
        for name, ref in refs.items():
            assert r.view(name) == ref, name
        await writer_rounds(r, rng, refs, live, 2)


async def test_deleting_snapshots_while_the_guest_writes_and_syncs(tmp_path: Path) -> None:
    """A delete waits for a save running on a worker thread (arm, sync) before it
    closes its descriptors; the snapshots left stay exact."""
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(5)
    make_entry(store, rng)
    live = bytearray((store / "vm1" / "disk.img").read_bytes())
    async with rig(tmp_path, store) as r:
        entry = r.datastore.entries["vm1"]
        await r.snapshots.create(entry, "keep")
        keep = bytes(live)
        vfile, vmx = r.vfile("disk.img"), r.vfile("vm1.vmx")
        try:
            for round_no in range(6):
                await r.snapshots.create(entry, f"d{round_no}")
                stop = trio.Event()

                async def guest() -> None:
                    while not stop.is_set():  # noqa: B023
                        await random_op(rng, vfile, vmx, live)
                        if rng.random() < 0.3:
                            await vfile.fsync(True)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(guest)
                    for _ in range(rng.randrange(1, 20)):
                        await trio.lowlevel.checkpoint()
                    await r.snapshots.delete("vm1", f"d{round_no}")
                    stop.set()
                assert [s.name for s in r.snapshots.list("vm1")] == ["keep"]
                assert r.view("keep") == keep
                assert vfile.read(0, len(live) + 1) == live
        finally:
            r.files.release(vfile)
            r.files.release(vmx)
        assert r.snapshots.statistics()["guarded_files"] == 3


async def test_a_guarded_file_renamed_inside_its_entry_is_found_by_its_key(
    tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(9)
    make_entry(store, rng)
    live = bytearray((store / "vm1" / "disk.img").read_bytes())
    refs = {"s0": bytes(live)}
    async with rig(tmp_path, store) as r:
        await r.snapshots.create(r.datastore.entries["vm1"], "s0")
        vfile = r.vfile("disk.img")
        try:
            await vfile.write(2 * BLOCK + 10, b"w" * 100)  # one block saved, the rest not
        finally:
            r.files.release(vfile)
        (store / "vm1" / "sub").mkdir()
        os.rename(store / "vm1" / "disk.img", store / "vm1" / "sub" / "moved.img")
        assert r.view("s0") == refs["s0"]  # unsaved blocks from the file where it is now
    async with rig(tmp_path, store) as r:  # and after a restart
        assert [(s.name, s.state) for s in r.snapshots.list("vm1")] == [("s0", "ok")]
        assert r.snapshots.list("vm1")[0].saved_bytes == BLOCK
        assert r.view("s0") == refs["s0"]
        vfile = r.vfile("sub/moved.img")
        try:
            await vfile.write(0, bytes(SIZE))  # still guarded under its new name
        finally:
            r.files.release(vfile)
        assert r.view("s0") == refs["s0"]


async def test_the_periodic_sync_keeps_a_snapshot_of_a_guest_that_never_fsyncs(
    tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(3)
    make_entry(store, rng)
    data = (store / "vm1" / "disk.img").read_bytes()
    async with rig(tmp_path, store, crash=True, sync_interval_s=0.05) as r:
        await r.snapshots.create(r.datastore.entries["vm1"], "s")
        vfile = r.vfile("disk.img")
        try:
            await vfile.write(7 * BLOCK, b"n" * 300)  # saved, and no fsync ever
        finally:
            r.files.release(vfile)
        guards = [g for live in r.snapshots.live.values() for g in live.guards.values()]
        assert any(g.armed for g in guards)
        with trio.fail_after(60):  # a pass that began before the write, then a whole one
            await r.snapshots.wait_synced()
            await r.snapshots.wait_synced()
        assert not any(g.armed for g in guards)
    async with rig(tmp_path, store) as r:  # after the crash: intact
        assert [(s.name, s.state) for s in r.snapshots.list("vm1")] == [("s", "ok")]
        assert r.view("s") == data
