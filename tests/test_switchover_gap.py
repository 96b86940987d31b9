"""Issue 12: what a guest's I/O pays at a switchover is the pause, and nothing after it.

A guest's write that arrives while the entry's gate is closed waits for the
pause; these tests check, on a real mount with an ``O_DIRECT`` writer and
the daemon's own timeline (``FUSEDISK_TRACE``, fusedisk/trace.py), that it is
answered as soon as the gate opens, before the switchover and the clean-up go
on, and that no fsync after the commit is inside the pause.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .mounting import MountedDatastore, fusedisk, wait_for

pytestmark = pytest.mark.mount

BLOCK = 4096


@contextmanager
def direct_writer(disk: Path) -> Iterator[list[int]]:
    """Writes 4 KiB O_DIRECT blocks to *disk* in a loop, as a guest does, until the
    block ends; yields the list of what it wrote (one count per write)."""
    written: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(disk, os.O_WRONLY | os.O_DIRECT)
        try:
            n = 0
            while not stop.is_set():
                buf[:8] = n.to_bytes(8, "little")
                os.pwrite(fd, buf, (n % 64) * BLOCK)
                written.append(n)
                n += 1
        except BaseException as e:  # reported by the test
            errors.append(e)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield written
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert written, "the writer wrote nothing"


def read_trace(path: Path) -> list[tuple[int, str, str]]:
    events = []
    for line in path.read_text().splitlines():
        stamp, event, *detail = line.split(" ", 2)
        events.append((int(stamp), event, detail[0] if detail else ""))
    return events


def took_ns(detail: str) -> int:
    return int(float(detail.split("took=")[1].removesuffix("ms")) * 1e6)


def test_a_write_held_by_the_pause_is_answered_before_the_switchover_goes_on(
    tmp_path: Path,
) -> None:
    """The pause stalls 200 ms in its flush, so the writer's next write waits at the
    gate. Once the gate opens, that write is answered before anything else of the
    switchover runs (its directory fsync, its sweep) and before the relocation's
    clean-up starts (source removal): before, it waited behind them, 1-6 ms in a
    real guest (bench guest-switchover)."""
    trace = tmp_path / "trace.txt"
    ds = MountedDatastore(tmp_path / "ds")
    try:
        ds.start(env={"FUSEDISK_TRACE": str(trace),
                      "FUSEDISK_STALL": "switchover-flush:200:1"})
        home = ds.mnt / "vm1"
        home.mkdir()
        disk = home / "disk.img"
        with open(disk, "wb") as f:
            f.write(os.urandom(1 << 20))
        with direct_writer(disk):
            result = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--max-pause",
                              "2000", "--json", timeout=300)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["state"] == "done"
        assert ds.stop() == 0
    finally:
        ds.teardown()
    events = read_trace(trace)
    marks = {detail: stamp for stamp, event, detail in events
             if event in ("switchover", "cleanup")}
    opened = marks["gate open"]
    held = [(stamp, stamp + took_ns(detail)) for stamp, event, detail in events
            if event == "write" and stamp < opened < stamp + took_ns(detail)]
    assert held, "no write waited at the gate"
    (_, answered), = held
    assert opened - marks["closing the gate"] >= 200e6  # it did wait for the pause
    assert answered < marks["after the pause"], (answered - opened) / 1e6
    assert answered < marks["start"]  # the relocation's clean-up


def test_the_renames_directory_fsync_is_not_inside_the_pause(tmp_path: Path) -> None:
    """The commit record is durable before the tree is renamed into place, and the
    next mount finishes a rename that a crash lost: so the fsync that makes the
    rename durable runs after the gate opened. Here it stalls 300 ms; the pause
    does not."""
    ds = MountedDatastore(tmp_path)
    try:
        ds.start(env={"FUSEDISK_STALL": "switchover-rename-sync:300:1"})
        home = ds.mnt / "vm1"
        home.mkdir()
        data = os.urandom(1 << 20)
        (home / "disk.img").write_bytes(data)
        result = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--json", timeout=300)
        assert result.returncode == 0, result.stderr
        final = json.loads(result.stdout)
        assert final["state"] == "done" and final["pause_ms"] < 300, final
        assert "stall point switchover-rename-sync reached" in ds.log()
        assert ds.status()["placement"]["vm1"] == "b"
        assert (home / "disk.img").read_bytes() == data
        assert (ds.stores["b"] / "vm1" / "disk.img").read_bytes() == data
    finally:
        ds.teardown()


def test_a_guest_that_writes_while_the_tree_flushes_is_mirrored_before_the_pause(
    tmp_path: Path,
) -> None:
    """A pass leaves nothing dirty (the writer is idle: the job pauses after each
    pass and the test writes nothing then), so the relocation goes for the pause;
    while it syncs and flushes the tree before it (held there) the guest writes. The
    relocation then mirrors and copies that in a pass instead of in the pause,
    where one block cost a copy step on a worker thread (1-2 ms of the pause on
    this machine)."""
    held = tmp_path / "hold"
    held.touch()
    ds = MountedDatastore(tmp_path / "ds")
    try:
        ds.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1",
                      "FUSEDISK_HOLD": f"before-pause-flush:{held}"})
        home = ds.mnt / "vm1"
        home.mkdir()
        disk = home / "disk.img"
        data = bytearray(os.urandom(1 << 20))
        disk.write_bytes(data)
        started = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--no-wait")
        assert started.returncode == 0, started.stderr

        def job() -> dict[str, object]:
            return dict(next(j for j in ds.status()["jobs"] if j["entry"] == "vm1"))

        def paused_or_held() -> bool:
            return bool(job()["paused"]) or "hold point before-pause-flush reached" in ds.log()

        wait_for(paused_or_held, 60, "the end of pass 1")
        assert job()["paused"] and "hold point" not in ds.log()
        assert fusedisk("resume", str(ds.mnt), "vm1").returncode == 0
        wait_for(lambda: "hold point before-pause-flush reached" in ds.log(), 60, "the hold")
        block = os.urandom(BLOCK)
        with open(disk, "r+b") as f:  # the guest writes while the tree flushes
            f.seek(8 * BLOCK)
            f.write(block)
        data[8 * BLOCK:9 * BLOCK] = block
        held.unlink()

        def done() -> bool:
            state = job()
            if state["paused"]:  # after the pass that copies what the guest wrote
                assert fusedisk("resume", str(ds.mnt), "vm1").returncode == 0
            return state["state"] in ("done", "failed")

        wait_for(done, 60, "the relocation's end")
        state = job()
        assert state["state"] == "done", state
        assert disk.read_bytes() == data
        assert (ds.stores["b"] / "vm1" / "disk.img").read_bytes() == data
        assert state["mirrored"], state
    finally:
        held.unlink(missing_ok=True)
        ds.teardown()
