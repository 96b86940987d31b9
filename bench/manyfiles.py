"""Scenario ``manyfiles`` (issue 12, bounded resources): fds and RSS for N files.

A fresh mount builds an entry of N small files (4 KiB, directories of 100)
through the mount, then every name is looked up and stat'ed (``os.walk`` +
``lstat``, what a guest's ``find`` does), then the entry is relocated a→b.
For each phase: the most file descriptors the daemon held and its peak RSS
(sampled every 0.1 s from /proc, see scale.py, and once at each end), and
how long it took. The daemon runs with an fd limit of :data:`FD_LIMIT`
(soft and hard: the usual ``ulimit -n``), so an N far above it shows the
fds stay flat (the O_PATH LRU, the relocation's parked copies).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import fusedisk_cli
from bench.context import Outcome, ScenarioContext, number, say
from bench.scale import _Sampler

ENTRY = "many"
#: file counts: (full run, quick run); ``--files N`` replaces them
COUNTS = ((10_000,), (300,))
#: the daemon's RLIMIT_NOFILE
FD_LIMIT = 1024


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _build(entry: Path, files: int) -> None:
    entry.mkdir()
    block = os.urandom(4096)
    for i in range(files):
        directory = entry / f"d{i // 100}"
        if i % 100 == 0:
            directory.mkdir()
        (directory / f"f{i}").write_bytes(block)


def _lookup_all(entry: Path) -> int:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(entry):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            seen += 1
    return seen


def manyfiles(context: ScenarioContext) -> Outcome:
    counts = ((context.files,) if context.files else
              COUNTS[1] if context.quick else COUNTS[0])
    table = [["files", "phase", "seconds", "max fds", "peak RSS MiB"]]
    runs: list[dict[str, Any]] = []
    for files in counts:
        with context.mount(f"manyfiles-{files}", nofile=FD_LIMIT) as mount:
            entry = mount.mountpoint / ENTRY
            phases: list[tuple[str, Callable[[], object]]] = [
                ("create", functools.partial(_build, entry, files)),
                ("lookup-all", functools.partial(_lookup_all, entry)),
                ("relocate", functools.partial(
                    fusedisk_cli.fusedisk, "migrate", str(mount.mountpoint), ENTRY, "--to", "b",
                    timeout_s=3600.0)),
            ]
            for phase, action in phases:
                say(f"manyfiles: {files} files: {phase}")
                started = time.monotonic()
                first = _fds(mount.daemon.pid)
                with _Sampler(mount.daemon.pid) as sampler:
                    action()
                sampler.max_fds = max(sampler.max_fds, first, _fds(mount.daemon.pid))
                elapsed_s = time.monotonic() - started
                runs.append({"files": files, "phase": phase, "seconds": elapsed_s,
                             "max_fds": sampler.max_fds,
                             "peak_rss_kib": sampler.max_rss_kib})
                table.append([str(files), phase, number(elapsed_s, 1), str(sampler.max_fds),
                              number(sampler.max_rss_kib / 1024, 1)])
    return Outcome(
        caption=(f"manyfiles: an entry of N 4 KiB files built, looked up and relocated a→b "
                 f"through the mount (daemon fd limit {FD_LIMIT})"),
        summary={"counts": list(counts), "fd_limit": FD_LIMIT},
        table=table, runs=runs,
        commands=["python -m bench --scenarios manyfiles [--files N]",
                  f"fusedisk migrate MNT {ENTRY} --to b"],
        notes=["max fds counts every descriptor of the daemon (stores, state, control "
               "socket, FUSE device), sampled every 0.1 s: a short peak can be missed."],
    )
