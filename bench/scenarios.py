"""Benchmark scenarios: what runs against which target, in which order.

A scenario is a function ``(ScenarioContext) -> list[RunRecord]`` registered
under a name with ``@scenario``. Only ``idle`` exists today; relocation
scenarios (fio while ``fusedisk migrate`` runs, switchover pause, relocation
time) are meant to be added here, using ``ScenarioContext.daemon`` to reach
the mount.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.fio import Figures, FioRunner
from bench.jobs import Job
from bench.mount import Daemon

RAW = "raw"
MOUNT = "mount"


@dataclass(frozen=True, slots=True)
class Target:
    """A file fio runs against: in the raw store (``daemon`` None) or on the mount."""

    name: str
    file: Path
    daemon: Daemon | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One fio run of one job against one target; ``daemon_cpu_s`` is None for raw runs."""

    scenario: str
    job: str
    target: str
    rep: int
    figures: Figures
    daemon_cpu_s: float | None
    wall_s: float
    command: str


@dataclass(frozen=True, slots=True)
class ScenarioContext:
    """Everything a scenario may use; ``targets`` holds raw first, then the mount if any."""

    runner: FioRunner
    jobs: list[Job]
    reps: int
    targets: list[Target]
    daemon: Daemon | None


Scenario = Callable[[ScenarioContext], list[RunRecord]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    """Register the decorated function as the scenario ``name``."""

    def register(function: Scenario) -> Scenario:
        SCENARIOS[name] = function
        return function

    return register


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
    cpu_s = None
    if daemon is not None:
        cpu_s = daemon.cpu_time_s() - cpu_before_s
    record = RunRecord(scenario=scenario_name, job=job.name, target=target.name, rep=rep,
                       figures=run.figures, daemon_cpu_s=cpu_s, wall_s=run.wall_s,
                       command=run.command)
    cpu_note = f"  daemon CPU {cpu_s:.2f} s" if cpu_s is not None else ""
    print(f"  {scenario_name} rep {rep + 1} {job.name:<26} {target.name:<5} "
          f"{run.figures.mbps:10.1f} MB/s {run.figures.iops:10.0f} IOPS "
          f"p99 {run.figures.p99_us:9.0f} µs{cpu_note}", file=sys.stderr, flush=True)
    return record


@scenario("idle")
def idle(context: ScenarioContext) -> list[RunRecord]:
    """Every job against every target, nothing else running.

    The target order flips each repetition (raw first, then mount first, ...)
    so slow drifts of the machine hit both sides alike.
    """
    records = []
    for rep in range(context.reps):
        order = context.targets if rep % 2 == 0 else context.targets[::-1]
        for job in context.jobs:
            for target in order:
                records.append(measure("idle", job, target, rep, context.runner))
    return records
