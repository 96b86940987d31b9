"""What every scenario gets (ScenarioContext) and gives back (Outcome), and fio measuring.

A scenario is a function ``(ScenarioContext) -> Outcome`` registered in
``bench/scenarios.py``. It mounts what it needs with ``context.mount(...)``
(each mount gets fresh stores ``a`` (default) and ``b``, a state directory
and a log under the scratch directory, and is always unmounted when the
``with`` block ends), and returns its figures in an Outcome.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.fio import Figures, FioRunner
from bench.jobs import Job
from bench.mount import Daemon, mounted

RAW = "raw"
MOUNT = "mount"
#: the idle scenario's third target: libfuse's C passthrough_ll over the same store
C_PEER = "peer"


@dataclass(frozen=True, slots=True)
class Target:
    """A file fio runs against: in the raw store (``daemon`` None) or on a FUSE mount
    (fusedisk's or the C peer's), whose daemon's CPU time is read over each run."""

    name: str
    file: Path
    daemon: Daemon | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One fio run of one job against one target; ``daemon_cpu_s`` (the daemon's CPU
    seconds over the fio process, ramp included) and ``daemon_cpu_us_per_io`` (that over
    ``figures.ios_with_ramp``) are None for raw runs."""

    scenario: str
    job: str
    target: str
    rep: int
    figures: Figures
    daemon_cpu_s: float | None
    wall_s: float
    command: str
    daemon_cpu_us_per_io: float | None = None


@dataclass(frozen=True, slots=True)
class Mounted:
    """A mount a scenario started: the daemon, its mountpoint and its store directories."""

    daemon: Daemon
    mountpoint: Path
    stores: dict[str, Path]
    root: Path


@dataclass(slots=True)
class Outcome:
    """What a scenario measured.

    ``summary`` holds the headline figures (JSON-ready); ``table`` is the
    terminal/Markdown table (header row first), ``extra_tables`` more of them
    by title; ``targets`` compares figures
    with the issues' performance targets (informative, never enforced);
    ``runs`` has per-repetition details, ``series`` the data of the charts,
    ``commands`` the exact commands run; ``records`` are fio runs in the
    idle-scenario format (raw vs mount), used by ``idle`` only.
    """

    caption: str
    summary: dict[str, Any] = field(default_factory=dict)
    table: list[list[str]] = field(default_factory=list)
    extra_tables: dict[str, list[list[str]]] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[RunRecord] = field(default_factory=list)
    error: str | None = None


def target_check(figure: str, value: float | None, target: str, met: bool | None,
                 issue: int) -> dict[str, Any]:
    """One line of an Outcome's ``targets``."""
    return {"figure": figure, "value": value, "target": target, "met": met, "issue": issue}


@dataclass(slots=True)
class ScenarioContext:
    """Everything a scenario may use.

    ``reps`` is the ``--reps`` the user gave, or None (each scenario then
    uses its own default, 1 in quick mode); ``size``/``runtime_s`` are the
    test file size and fio runtime of the run's mode; ``work`` is where the
    scenario keeps its files (on the filesystem of the stores); ``out`` is
    the output directory.
    """

    runner: FioRunner
    jobs: list[Job]
    reps: int | None
    quick: bool
    raw_only: bool
    size: int
    runtime_s: int
    scratch: Path
    out: Path
    #: entry size of the manyfiles and switchover-scale scenarios (``--files``); None: their
    #: defaults
    files: int | None = None
    #: scale of the peer scenario's metadata workloads (``--peer-scale``); None: 1
    peer_scale: float | None = None
    _mounts: list[str] = field(default_factory=list)

    def repetitions(self, full_default: int) -> int:
        """``--reps`` if given, else 1 in quick mode and ``full_default`` otherwise."""
        if self.reps is not None:
            return self.reps
        return 1 if self.quick else full_default

    def work(self, name: str) -> Path:
        """A fresh directory ``name`` in the scratch directory."""
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    def mount(
        self, label: str, *extra_args: str, nofile: int | None = None
    ) -> AbstractContextManager[Mounted]:
        """A fresh mount with stores a (default) and b; ``extra_args`` go to ``fusedisk mount``;
        ``nofile``: the daemon's fd limit."""
        return self._mount(label, extra_args, nofile)

    @contextmanager
    def _mount(
        self, label: str, extra_args: tuple[str, ...], nofile: int | None = None
    ) -> Iterator[Mounted]:
        root = self.work(label)
        stores = {"a": root / "storeA", "b": root / "storeB"}
        for path in (*stores.values(), root / "state", root / "mnt"):
            path.mkdir()
        log = root / "daemon.log"
        self._mounts.append(label)
        with mounted(root / "mnt", stores, "a", root / "state", log,
                     extra_args=extra_args, nofile=nofile) as daemon:
            flags = f" {' '.join(extra_args)}" if extra_args else ""
            print(f"bench: mounted {root / 'mnt'}{flags} (daemon pid {daemon.pid})",
                  file=sys.stderr, flush=True)
            yield Mounted(daemon=daemon, mountpoint=root / "mnt", stores=stores, root=root)

    def daemon_log(self, label: str) -> Path:
        """Where a daemon the scenario starts itself in ``work(label)`` (the C peer) logs;
        it is copied to the output directory with the mounts' logs."""
        self._mounts.append(label)
        return self.scratch / label / "daemon.log"

    def daemon_logs(self) -> list[Path]:
        """The daemon logs of every mount made so far."""
        return [self.scratch / label / "daemon.log" for label in self._mounts]


Scenario = Callable[[ScenarioContext], Outcome]


def measure(scenario_name: str, job: Job, target: Target, rep: int,
            runner: FioRunner) -> RunRecord:
    """Run ``job`` once against ``target``, with the daemon's CPU time over the run."""
    daemon = target.daemon
    cpu_before_s = daemon.cpu_time_s() if daemon is not None else 0.0
    tag = f"{scenario_name}-{job.name}-{target.name}-r{rep}"
    try:
        run = runner.run(job.path, target.file, tag)
    except BenchError:
        if daemon is not None:
            daemon.check_alive()  # a dead daemon explains the failure better than fio does
        raise
    cpu_s: float | None = None
    cpu_per_io_us: float | None = None
    if daemon is not None:
        cpu_s = daemon.cpu_time_s() - cpu_before_s
        daemon.check_alive()
        if run.figures.ios_with_ramp > 0:
            cpu_per_io_us = cpu_s * 1e6 / run.figures.ios_with_ramp
    record = RunRecord(scenario=scenario_name, job=job.name, target=target.name, rep=rep,
                       figures=run.figures, daemon_cpu_s=cpu_s, wall_s=run.wall_s,
                       command=run.command, daemon_cpu_us_per_io=cpu_per_io_us)
    cpu_note = ""
    if cpu_s is not None:
        cpu_note = f"  daemon CPU {cpu_s:.2f} s"
        if cpu_per_io_us is not None:
            cpu_note += f" ({cpu_per_io_us:.1f} µs/IO)"
    print(f"  {scenario_name} rep {rep + 1} {job.name:<26} {target.name:<7} "
          f"{run.figures.mbps:10.1f} MB/s {run.figures.iops:10.0f} IOPS "
          f"p99 {run.figures.p99_us:9.0f} µs{cpu_note}", file=sys.stderr, flush=True)
    return record


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def number(value: float | None, digits: int = 0, suffix: str = "") -> str:
    """A table cell: ``—`` for None, else the value with thousands separators."""
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def mib(value: float | None) -> str:
    """Bytes as a MiB table cell."""
    return number(None if value is None else value / 2**20, 1, " MiB")


def allocated_bytes(path: Path) -> int:
    """Bytes the filesystem allocated for ``path`` (st_blocks × 512)."""
    return os.stat(path).st_blocks * 512


def evict(path: Path) -> None:
    """Flush ``path`` and drop it from the page cache, so a timed read of it hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read 4 MiB at a time (what a bench checks copies with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()
