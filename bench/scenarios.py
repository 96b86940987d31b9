"""Benchmark scenarios: the registry, and ``idle`` (raw store, mount and C peer, nothing else
running).

A scenario is a function ``(ScenarioContext) -> Outcome`` (see
``bench/context.py``) registered here under a name. ``python -m bench``
runs all of them by default, in registry order; ``--scenarios`` picks some.

- ``idle``: every fio job against the raw store, the mount and the C peer
  (libfuse's ``passthrough_ll`` over the same filesystem, ``bench/peer.py``),
  in rotating order.
- ``cbt``: the cost of changed block tracking (mount vs ``--no-cbt`` mount)
  and the daemon's memory for a 100 GiB sparse file (``bench/cbtcost.py``).
- ``snapshot``: guest random writes with one live snapshot vs none (reflink
  on XFS, copy-before-write on ext4), NBD read of a snapshot vs ``dd``
  (``bench/snapshot.py``).
- ``peer``: fio mixed jobs and metadata work (sqlite, small files, tar) on
  raw, fusedisk and libfuse's C ``passthrough_ll`` (``bench/peer.py``).
- ``relocate-idle``, ``relocate-busy``, ``switchover-pause``,
  ``relocate-sparse``, ``relocate-outrun``: live relocation with
  ``fusedisk migrate`` (``bench/relocation.py``).
- ``relocate-resume``: kill -9 of the daemon at 25/50/90% of a relocation, remount,
  resume: what the resumed copy kept and copied vs what was left, data verified
  (``bench/resume.py``).
- ``guest-switchover``, ``guest-rounds``: a real QEMU guest (TCG, cache=none,
  aio=io_uring) whose disk relocates, vs QEMU's own ``blockdev-mirror``; and its
  mixed random rounds on the mount vs a plain directory (``bench/vmguest.py``).
- ``copy-remote``: a file copied to a loopback remote store (nbdkit with
  TLS-PSK, libnbd) vs locally and vs nbdcopy, with and without a WAN delay
  (``bench/remotecopy.py``).
- ``relocate-remote``: an entry relocated from a local store to another local one, to a
  loopback remote store and to one behind a WAN delay, and back; guest 4k random writes
  on it on each store (``bench/relocremote.py``).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

from bench import (
    cbtcost,
    manyfiles,
    peer,
    relocation,
    relocremote,
    remotecopy,
    resume,
    scale,
    snapshot,
    vmguest,
)
from bench.context import (
    C_PEER,
    MOUNT,
    RAW,
    Outcome,
    RunRecord,
    Scenario,
    ScenarioContext,
    Target,
    measure,
    say,
    target_check,
)
from bench.report import METRIC_LABELS, summarise

__all__ = ["C_PEER", "MOUNT", "RAW", "SCENARIOS", "Outcome", "RunRecord", "ScenarioContext",
           "ScenarioSpec", "Target", "needing_migrate"]

TEST_FILE_NAME = "bench.dat"

#: What issue 2 asks of the mount in the idle scenario: mount/raw of the medians
#: (mount/peer is reported beside it as information, with no target).
IDLE_TARGETS = {
    "seqread-1m-qd1": 0.70, "seqwrite-1m-qd1": 0.50,
    "randread-4k-qd1": 0.45, "randwrite-4k-qd1": 0.45,
    "randread-4k-qd32": 0.15, "randwrite-4k-qd32": 0.15,
}


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """A registered scenario: its function and what it needs."""

    name: str
    run: Scenario
    needs_mount: bool
    needs_migrate: bool


SCENARIOS: dict[str, ScenarioSpec] = {}


def register(name: str, run: Scenario, *, needs_mount: bool = True,
             needs_migrate: bool = False) -> None:
    """Add a scenario to the registry (registry order is run order)."""
    SCENARIOS[name] = ScenarioSpec(name, run, needs_mount, needs_migrate)


def needing_migrate(names: list[str]) -> list[str]:
    """The scenarios among ``names`` that need ``fusedisk migrate``."""
    return [name for name in names if SCENARIOS[name].needs_migrate]


def idle(context: ScenarioContext) -> Outcome:
    """Every job against the raw store, the mount and the C peer, nothing else running.

    The C peer serves a directory of the same filesystem as the mount's store;
    all three get the same file size and job files. The target order rotates
    each repetition (raw, mount, peer; mount, peer, raw; ...) so slow drifts of
    the machine hit all three alike. ``--raw-only`` measures the raw store alone.
    """
    reps = context.repetitions(3)
    with ExitStack() as stack:
        raw = context.work("idle-raw")
        targets = [Target(RAW, raw / TEST_FILE_NAME, None)]
        if not context.raw_only:
            mount = stack.enter_context(context.mount("idle"))
            targets.append(Target(MOUNT, mount.mountpoint / TEST_FILE_NAME, mount.daemon))
            c = stack.enter_context(peer.c_peer(context, "idle-peer"))
            targets.append(Target(C_PEER, c.mountpoint / TEST_FILE_NAME, c.daemon))
        layout = []
        for target in targets:
            say(f"laying out {context.size >> 20} MiB at {target.file}")
            layout.append(context.runner.lay_out(target.file, target.name))
        records: list[RunRecord] = []
        for rep in range(reps):
            shift = rep % len(targets)
            order = targets[shift:] + targets[:shift]
            for job in context.jobs:
                for target in order:
                    records.append(measure("idle", job, target, rep, context.runner))
    checks = []
    summary = summarise(records, context.jobs)
    for job in context.jobs:
        wanted, ratio = IDLE_TARGETS.get(job.name), summary[job.name]["ratio"]
        if wanted is not None and ratio is not None:
            value = ratio[job.metric]
            checks.append(target_check(
                f"{job.name} mount/raw {METRIC_LABELS[job.metric]}", value, f"≥ {wanted:.2f}",
                None if value is None else value >= wanted, 2))
    return Outcome(caption="", records=records, commands=layout, targets=checks,
                   summary={"reps": reps, "layout": dict(zip((t.name for t in targets), layout,
                                                             strict=True))})


register("idle", idle, needs_mount=False)
register("cbt", cbtcost.cbt)
register("peer", peer.peer)
register("relocate-idle", relocation.relocate_idle, needs_migrate=True)
register("relocate-busy", relocation.relocate_busy, needs_migrate=True)
register("switchover-pause", relocation.switchover_pause, needs_migrate=True)
register("relocate-sparse", relocation.relocate_sparse, needs_migrate=True)
register("relocate-outrun", relocation.relocate_outrun, needs_migrate=True)
register("switchover-scale", scale.switchover_scale, needs_migrate=True)
register("relocate-resume", resume.relocate_resume, needs_migrate=True)
register("manyfiles", manyfiles.manyfiles, needs_migrate=True)
register("snapshot", snapshot.snapshot)
register("guest-switchover", vmguest.guest_switchover, needs_migrate=True)
register("guest-rounds", vmguest.guest_rounds)
register("copy-remote", remotecopy.copy_remote, needs_mount=False)
register("relocate-remote", relocremote.relocate_remote, needs_migrate=True)
