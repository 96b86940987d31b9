"""Counting a daemon's system calls from outside, with strace (tests of the
durability and fsync paths: which syncs a request really made, on what)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import require_tools


@contextmanager
def calls_of(pid: int, calls: str) -> Iterator[Counter[tuple[str, str]]]:
    """Count the successful *calls* (strace's ``trace=`` list) of process *pid*, all
    threads, by the path of their first argument, while the block runs."""
    require_tools("strace")
    counts: Counter[tuple[str, str]] = Counter()
    out = Path(f"/tmp/fusedisk-strace-{pid}-{os.getpid()}-{calls.replace(',', '-')}")
    proc = subprocess.Popen(
        ["strace", "-f", "-y", "-e", f"trace={calls}", "-o", str(out), "-p", str(pid)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        while True:  # strace says when it holds the main thread
            ready, _, _ = select.select([proc.stderr], [], [], 30)
            assert ready, "strace did not attach"
            line = proc.stderr.readline()
            assert line, "strace ended before it attached"
            if f"Process {pid} attached" in line:
                break
        yield counts
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        if out.exists():
            for line in out.read_text().splitlines():
                m = re.search(r"\b(\w+)\(\d+<([^>]*)>.*\) = 0", line)
                if m:
                    counts[(m.group(1), m.group(2))] += 1
            out.unlink()
