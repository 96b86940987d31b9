"""Scenario ``cbt``: what changed block tracking costs (issue 3).

Two mounts side by side, each on its own fresh stores: one with CBT (the
default) and one started with ``fusedisk mount --no-cbt``. The same fio jobs
(4 KiB random write QD1 psync and 1 MiB sequential write QD1, both
O_DIRECT) run against a test file on each, alternating which goes first
every repetition; medians and the ratio on/off (target: CBT costs at most
10 %, i.e. on/off ≥ 0.90).

Memory: right after each mount, the daemon's VmRSS; then a 100 GiB sparse
file is created on the mount, a checkpoint taken (``fusedisk cbt
checkpoint``), 4 KiB written with O_DIRECT at 100 scattered offsets, and
``fusedisk cbt changes --since ID --json`` asked (checked to cover every
write); VmRSS again. The ``--no-cbt`` mount does the same minus the CBT
commands, for reference.
"""

from __future__ import annotations

import mmap
import os
import random
import time
from typing import Any

from bench import fusedisk_cli
from bench.context import (
    Mounted,
    Outcome,
    RunRecord,
    ScenarioContext,
    Target,
    measure,
    median,
    mib,
    number,
    say,
    target_check,
)
from bench.errors import BenchError
from bench.jobs import select_jobs

JOBS = ["randwrite-4k-qd1", "seqwrite-1m-qd1"]
ON, OFF = "cbt-on", "cbt-off"
SPARSE_SIZE = 100 << 30
SPARSE_WRITES = 100
WRITE_BYTES = 4096
MAX_COST = 0.10


def _scattered_offsets(count: int, size: int, seed: int = 3) -> list[int]:
    """``count`` distinct MiB-aligned offsets spread over ``size`` bytes, sorted."""
    return sorted(mib_index << 20 for mib_index in random.Random(seed).sample(
        range(size >> 20), count))


def _covered(extents: list[list[int]], offset: int, length: int) -> bool:
    return any(start <= offset and offset + length <= start + extent_length
               for start, extent_length in extents)


def _memory(mount: Mounted, cbt_on: bool) -> dict[str, Any]:
    """RSS after mount, then after a 100 GiB sparse file with 100 scattered 4 KiB writes."""
    daemon = mount.daemon
    rss_mount = daemon.rss_bytes()
    path = mount.mountpoint / "sparse-100g.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    os.truncate(path, SPARSE_SIZE)
    change_id = fusedisk_cli.checkpoint(mount.mountpoint, path) if cbt_on else None
    offsets = _scattered_offsets(SPARSE_WRITES, SPARSE_SIZE)
    buffer = mmap.mmap(-1, WRITE_BYTES)
    buffer.write(os.urandom(WRITE_BYTES))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for offset in offsets:
            if os.pwrite(fd, buffer, offset) != WRITE_BYTES:
                raise BenchError(f"short O_DIRECT write at {offset} of {path}")
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    rss_writes = daemon.rss_bytes()
    result: dict[str, Any] = {
        "cbt": cbt_on, "file_bytes": SPARSE_SIZE, "writes": len(offsets),
        "write_bytes": WRITE_BYTES, "rss_after_mount_bytes": rss_mount,
        "rss_after_writes_bytes": rss_writes,
    }
    if change_id is not None:
        started = time.monotonic()
        answer = fusedisk_cli.changes(mount.mountpoint, path, change_id)
        result["changes_s"] = time.monotonic() - started
        extents = answer["extents"]
        missing = [o for o in offsets if not _covered(extents, o, WRITE_BYTES)]
        if missing:
            raise BenchError(f"cbt changes --since {change_id} misses {len(missing)} of the "
                             f"{len(offsets)} writes (first at offset {missing[0]})")
        result.update(change_id=change_id, extents=len(extents),
                      changed_bytes=sum(length for _, length in extents))
    result["rss_after_changes_bytes"] = daemon.rss_bytes()
    result["rss_growth_bytes"] = result["rss_after_changes_bytes"] - rss_mount
    os.unlink(path)
    return result


def _side(runs: list[RunRecord]) -> dict[str, Any] | None:
    if not runs:
        return None
    return {
        "mbps": median([r.figures.mbps for r in runs]),
        "iops": median([r.figures.iops for r in runs]),
        "p99_us": median([r.figures.p99_us for r in runs]),
        "daemon_cpu_s": median([r.daemon_cpu_s for r in runs if r.daemon_cpu_s is not None]),
        "runs": len(runs),
    }


def cbt(context: ScenarioContext) -> Outcome:
    """CBT on vs off: fio medians and ratios, and the daemon's memory."""
    reps = context.repetitions(5)
    jobs = select_jobs(JOBS)
    records: list[RunRecord] = []
    memory: dict[str, dict[str, Any]] = {}
    commands = []
    with context.mount(ON) as on, context.mount(OFF, "--no-cbt") as off:
        for label, mount in ((ON, on), (OFF, off)):
            say(f"{label}: daemon memory with a 100 GiB sparse file")
            memory[label] = _memory(mount, label == ON)
        targets = [Target(ON, on.mountpoint / "bench.dat", on.daemon),
                   Target(OFF, off.mountpoint / "bench.dat", off.daemon)]
        for target in targets:
            say(f"laying out {context.size >> 20} MiB at {target.file}")
            commands.append(context.runner.lay_out(target.file, f"cbt-{target.name}"))
        for rep in range(reps):
            order = targets if rep % 2 == 0 else targets[::-1]
            for job in jobs:
                for target in order:
                    records.append(measure("cbt", job, target, rep, context.runner))
    summary: dict[str, Any] = {"reps": reps, "jobs": {}, "memory": memory}
    header = ["job", "metric", "CBT on", "CBT off", "on/off", "p99 on µs", "p99 off µs",
              "daemon CPU on s", "daemon CPU off s"]
    rows = [header]
    targets_met = []
    for job in jobs:
        side_on = _side([r for r in records if r.job == job.name and r.target == ON])
        side_off = _side([r for r in records if r.job == job.name and r.target == OFF])
        if side_on is None or side_off is None:
            raise BenchError(f"cbt: no runs of {job.name}")
        ratio = side_on[job.metric] / side_off[job.metric] if side_off[job.metric] else None
        summary["jobs"][job.name] = {"metric": job.metric, ON: side_on, OFF: side_off,
                                     "ratio_on_off": ratio}
        digits = 1 if job.metric == "mbps" else 0
        rows.append([job.name, "MB/s" if job.metric == "mbps" else "IOPS",
                     number(side_on[job.metric], digits), number(side_off[job.metric], digits),
                     number(ratio, 3), number(side_on["p99_us"]), number(side_off["p99_us"]),
                     number(side_on["daemon_cpu_s"], 2), number(side_off["daemon_cpu_s"], 2)])
        targets_met.append(target_check(
            f"{job.name} CBT on/off", ratio, f"≥ {1 - MAX_COST:.2f}",
            None if ratio is None else ratio >= 1 - MAX_COST, 3))
        commands += sorted({r.command for r in records if r.job == job.name})
    memory_rows = [["mount", "RSS after mount", "after 100 writes", "after cbt changes",
                    "growth", "changed extents", "cbt changes s"]]
    for label, m in memory.items():
        memory_rows.append([label, mib(m["rss_after_mount_bytes"]),
                            mib(m["rss_after_writes_bytes"]), mib(m["rss_after_changes_bytes"]),
                            mib(m["rss_growth_bytes"]), number(m.get("extents")),
                            number(m.get("changes_s"), 3)])
    sparse = on.mountpoint / "sparse-100g.img"
    commands += [f"truncate -s 100G {sparse}", f"fusedisk cbt checkpoint {on.mountpoint} {sparse}",
                 f"{SPARSE_WRITES} × pwrite(O_DIRECT, 4 KiB) at scattered MiB offsets",
                 f"fusedisk cbt changes {on.mountpoint} {sparse} --since ID --json"]
    return Outcome(
        caption=(f"cbt: medians of {reps} rep(s), alternating; {context.size >> 20} MiB file, "
                 f"{context.runtime_s} s per job; CBT on = default mount, off = --no-cbt"),
        summary=summary, table=rows,
        extra_tables={"daemon memory (VmRSS), 100 GiB sparse file, 100 × 4 KiB writes":
                      memory_rows},
        targets=targets_met, records=records, commands=commands,
        notes=["on/off above 1 means the CBT mount was faster (noise)."],
    )
