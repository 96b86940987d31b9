"""A guest that writes 4 KiB blocks with O_DIRECT and journals what was acknowledged.

Usage: python journal_writer.py FILE JOURNAL SEED NBLOCKS [PAUSE_S]

Each write puts a random block at a random block-aligned offset below
NBLOCKS * 4 KiB. Before the write the journal gets ``I offset sha``
(intent), after it ``D offset sha`` (done, i.e. acknowledged). It stops at
the first error (the daemon died) or on SIGTERM. :func:`check` reads the
file and the journal and returns the offsets whose content is wrong.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import sys
import time
from pathlib import Path

BLOCK = 4096


def main() -> None:
    path, journal_path, seed, nblocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pause_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    rng = random.Random(seed)
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    with open(journal_path, "a", buffering=1) as journal:
        while True:
            offset = rng.randrange(nblocks) * BLOCK
            data = rng.randbytes(BLOCK)
            digest = hashlib.sha1(data).hexdigest()
            buf[:] = data
            journal.write(f"I {offset} {digest}\n")
            try:
                os.pwritev(fd, [buf], offset)
            except OSError:
                return
            journal.write(f"D {offset} {digest}\n")
            if pause_s:
                time.sleep(pause_s)


def check(path: Path, journal_path: Path) -> tuple[int, list[int]]:
    """(acknowledged writes, offsets whose content is neither acked nor in flight)."""
    last_done: dict[int, str] = {}
    in_flight: dict[int, str] = {}
    acked = 0
    for line in journal_path.read_text().splitlines():
        kind, offset_text, digest = line.split()
        offset = int(offset_text)
        if kind == "I":
            in_flight[offset] = digest
        else:
            acked += 1
            last_done[offset] = digest
            in_flight.pop(offset, None)
    wrong = []
    with open(path, "rb") as f:
        for offset, digest in last_done.items():
            f.seek(offset)
            got = hashlib.sha1(f.read(BLOCK)).hexdigest()
            if got != digest and got != in_flight.get(offset):
                wrong.append(offset)
    return acked, wrong


if __name__ == "__main__":
    main()
