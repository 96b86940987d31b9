"""Guest writes racing copy steps held between their read and their write.

The copier reads and writes each step on a worker thread while the guest's
writes land on the request loop (mirror.py, "No write lost to a racing
copy"). Here every step of the copy is held for a while between its read of
the source and its write of the pool file (the ``copy-io`` stall point),
so that O_DIRECT guest writes (tests/journal_writer.py: random blocks at
random offsets, each journaled as acknowledged) land on the very run a
step has read and is about to write: the stale run then reaches the pool
file after the guest's write. After the switchover every acknowledged write
must read back, through the mount and on the destination store, and the
daemon must have seen such races (else the test proved nothing).
"""

from __future__ import annotations

import random
import re
import subprocess

import pytest

from . import journal_writer
from .mounting import MountedDatastore, wait_for
from .test_relocation import job, make_vm, migrate, start_writer, writer_procs

pytestmark = pytest.mark.mount

__all__ = ["writer_procs"]  # the fixture, used below by name

DISK_MIB = 64


@pytest.mark.parametrize(("mode", "seed"), [("mirror", 1), ("mirror", 2), ("auto", 3)])
def test_acknowledged_writes_survive_steps_held_mid_copy(
    datastore: MountedDatastore, writer_procs: list[subprocess.Popen[bytes]], mode: str,
    seed: int,
) -> None:
    """The writer's area is large enough that a block is rarely written twice in
    the test, so a stale run written over a guest's block is not masked by a
    later write of the same block (a loss shows)."""
    rng = random.Random(seed)
    hold_ms = rng.choice([150, 200, 250])
    steps = rng.randrange(25, 40)
    disk = make_vm(datastore, disk_mib=DISK_MIB)
    datastore.stop()
    datastore.start(env={"FUSEDISK_STALL": f"copy-io:{hold_ms}:{steps}"})
    journal = datastore.root / "journal"
    start_writer(writer_procs, disk, journal, nblocks=(DISK_MIB << 20) // 4096, pause_s=0.001)
    result = migrate(datastore, "vm1", "--to", "b", "--mode", mode, "--json")
    assert result.returncode == 0, result.stderr
    assert writer_procs[0].poll() is None, "the guest stopped before the switchover"
    assert job(datastore, "vm1")["state"] == "done"
    acked_before = sum(1 for line in journal.read_text().splitlines() if line[0] == "D")
    # the guest goes on writing on the destination a little
    wait_for(lambda: sum(1 for line in journal.read_text().splitlines() if line[0] == "D")
             > acked_before + 100, 60, "writes after the switchover")
    writer_procs[0].terminate()
    writer_procs[0].wait(timeout=10)
    acked, wrong = journal_writer.check(disk, journal)
    assert acked > 500 and not wrong, (mode, hold_ms, steps, acked, wrong[:10])
    on_b = datastore.stores["b"] / "vm1" / "disk0.img"
    assert journal_writer.check(on_b, journal)[1] == []
    held = datastore.log().count("stall point copy-io reached")
    raced = [int(n) for n in re.findall(r"copy steps raced by guest writes: (\d+)",
                                          datastore.log())]
    assert held >= 1 and raced and sum(raced) >= 1, (held, raced, datastore.log()[-3000:])
