"""A backup loop as backup software runs it, while a journaling guest writes.

The guest (tests/journal_writer.py) writes random 4 KiB blocks with
O_DIRECT into a VM disk and journals each write before (``I``) and after
(``D``, acknowledged) it. While it runs, four snapshots are taken; after the
first, a full backup is pulled over NBD with ``nbdcopy``; after each of the
others, an incremental: ``nbdinfo --map=qemu:dirty-bitmap:ID`` names the
extents changed since the previous snapshot's change id, and a libnbd
client (Debian's python3-libnbd, outside the venv: a client fusedisk does
not ship) copies only those into the previous backup. Each restored point in
time must equal the snapshot byte for byte, and the journal must show that
it holds exactly the writes acknowledged before the snapshot began, plus at
most the one write in flight while it was taken — nothing later, nothing
lost; the dirty extents must cover no block the guest did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import journal_writer
from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk
from .test_snapshots import CLIENT_TIMEOUT_S, exporting

BLOCK = journal_writer.BLOCK
NBLOCKS = 16384  # a 64 MiB disk: most of it stays clean between two snapshots
WRITES_BETWEEN = 100
POINTS = 4
SYSTEM_PYTHON = "/usr/bin/python3"  # where Debian's python3-libnbd lives

#: The libnbd client: copy the given extents of an export into a file.
APPLY_EXTENTS = """
import json, os, sys
import nbd
uri, extents, target = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
fd = os.open(target, os.O_WRONLY)
for offset, length in extents:
    while length:
        n = min(length, 1 << 20)
        os.pwrite(fd, h.pread(n, offset), offset)
        offset, length = offset + n, length - n
os.fsync(fd)
os.close(fd)
h.shutdown()
"""


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    result = fusedisk(*args, timeout=120)
    assert result.returncode == 0, (args, result.stderr)
    return result


def journal_lines(path: Path) -> list[tuple[str, int, str]]:
    """The complete lines of the journal (the writer may be in the middle of one)."""
    text = path.read_text()
    lines = text.split("\n")[:-1]  # what follows the last newline is not finished
    return [(k, int(o), d) for k, o, d in (line.split() for line in lines)]


def wait_for_writes(proc: subprocess.Popen[bytes], journal: Path, done: int) -> int:
    """Wait until the guest acknowledged *done* writes in all; the journal's length."""
    deadline = time.monotonic() + 300
    while True:
        lines = journal_lines(journal)
        if sum(1 for k, _, _ in lines if k == "D") >= done:
            return len(lines)
        assert proc.poll() is None, "the guest stopped writing"
        assert time.monotonic() < deadline, f"the guest made {len(lines)} journal lines"
        time.sleep(0.05)


def allowed_contents(lines: list[tuple[str, int, str]], start: int, end: int,
                     initial: dict[int, str]) -> dict[int, set[str]]:
    """For each block: what a snapshot taken between journal lines *start* and *end*
    may hold — the last write acknowledged before *start* (or the initial content),
    or a write begun after that and before *end*."""
    allowed = {offset: {digest} for offset, digest in initial.items()}
    for kind, offset, digest in lines[:start]:
        if kind == "D":
            allowed[offset] = {digest}
    last_done = {o: i for i, (k, o, _) in enumerate(lines[:start]) if k == "D"}
    for index, (kind, offset, digest) in enumerate(lines[:end]):
        if kind == "I" and index > last_done.get(offset, -1):
            allowed[offset].add(digest)
    return allowed


def block_digests(path: Path) -> dict[int, str]:
    data = path.read_bytes()
    assert len(data) == NBLOCKS * BLOCK
    return {k * BLOCK: hashlib.sha1(data[k * BLOCK:(k + 1) * BLOCK]).hexdigest()
            for k in range(NBLOCKS)}


@pytest.mark.parametrize("xds", ["x", "a"], indirect=True, ids=["reflink", "cbw"])
def test_full_and_three_incremental_backups_while_a_guest_writes(
    xds: MountedDatastore, tmp_path: Path
) -> None:
    require_tools("nbdcopy", "nbdinfo", SYSTEM_PYTHON)
    assert subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"]).returncode == 0, \
        "python3-libnbd is missing (scripts/setup installs it)"
    home = xds.mnt / "vm1"
    home.mkdir()
    disk = home / "disk0.img"
    with open(disk, "wb") as f:
        f.write(os.urandom(NBLOCKS * BLOCK))
    initial = block_digests(disk)
    cbt_block = int(json.loads(ok("cbt", "info", str(xds.mnt), "vm1/disk0.img",
                                  "--json").stdout)["block_size"])
    journal = tmp_path / "journal"
    journal.touch()
    backup = tmp_path / "backup.img"
    guest = subprocess.Popen([sys.executable, journal_writer.__file__, str(disk), str(journal),
                              "2026", str(NBLOCKS), "0.01"])
    previous: tuple[str, int] | None = None  # (change id, journal start) of the last point
    try:
        for point in range(POINTS):
            wait_for_writes(guest, journal, (point + 1) * WRITES_BETWEEN)
            start = len(journal_lines(journal))
            name = f"p{point}"
            snap = json.loads(ok("snapshot", "create", str(xds.mnt), "vm1", "--name", name,
                                 "--json").stdout)
            end = len(journal_lines(journal))
            change_id = str(snap["files"]["disk0.img"]["change_id"])
            if previous is None:
                with exporting(xds, tmp_path, f"vm1/disk0.img@{name}") as uri:
                    subprocess.run(["nbdcopy", uri, str(backup)], check=True,
                                   timeout=CLIENT_TIMEOUT_S)
            else:
                since, since_start = previous
                with exporting(xds, tmp_path, f"vm1/disk0.img@{name}", "--since",
                               since) as uri:
                    mapped = subprocess.run(
                        ["nbdinfo", f"--map=qemu:dirty-bitmap:{since}", uri],
                        capture_output=True, text=True, check=True,
                        timeout=CLIENT_TIMEOUT_S).stdout
                    dirty = [[int(o), int(n)] for o, n, flag, *_ in
                             (line.split() for line in mapped.splitlines()) if flag == "1"]
                    subprocess.run([SYSTEM_PYTHON, "-c", APPLY_EXTENTS, uri,
                                    json.dumps(dirty), str(backup)], check=True,
                                   timeout=CLIENT_TIMEOUT_S)
                # only what changed: every dirty block was written since the last point
                written = {o // cbt_block for _, o, _ in journal_lines(journal)[since_start:end]}
                dirty_blocks = {b for o, n in dirty for b in range(o // cbt_block,
                                                                   (o + n) // cbt_block)}
                assert dirty_blocks and dirty_blocks <= written, (len(dirty_blocks),
                                                                  len(written))
                assert len(dirty_blocks) < NBLOCKS * BLOCK // cbt_block  # not a full copy
            # the restored point in time is the snapshot, byte for byte ...
            view = xds.mnt / ".snapshots" / f"vm1@{name}" / "disk0.img"
            assert backup.read_bytes() == view.read_bytes(), name
            # ... and holds exactly the writes acknowledged before it
            allowed = allowed_contents(journal_lines(journal), start, end, initial)
            got = block_digests(backup)
            wrong = [o for o, d in got.items() if d not in allowed[o]]
            assert not wrong, f"{name}: {len(wrong)} blocks hold no write of that instant"
            previous = (change_id, start)
    finally:
        guest.send_signal(signal.SIGTERM)
        guest.wait(60)
    # the guest's own acknowledged writes are all in the live disk
    acked, bad = journal_writer.check(disk, journal)
    assert acked >= POINTS * WRITES_BETWEEN and not bad, (acked, bad[:5])
