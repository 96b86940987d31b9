"""Scenarios with a real QEMU guest (issues 12 and 16): ``guest-switchover`` and ``guest-rounds``.

The guest is ``bench/guest.py``'s: Debian's cloud kernel under TCG, a
busybox initramfs and the static probe ``bench/guest_probe.c`` doing
O_DIRECT I/O on its virtio disk, QEMU with ``cache=none,aio=io_uring``.

- ``guest-switchover``: the gap probe (a 4 KiB write + read back every
  ~1 ms) runs in the guest while its disk relocates. fusedisk side: the disk
  is ``vm1/disk.img`` on the mount (with the entry's small files) and ``fusedisk
  migrate MNT vm1 --to b`` relocates it. Reference, same run: the same guest on
  a plain directory, relocated by QEMU itself (``blockdev-add`` of the target,
  ``blockdev-mirror sync=full``, ``BLOCK_JOB_READY``, 1 s later
  ``block-job-complete``).
  The switchover is [gate closed, gate open] from the daemon's log line
  ``switchover of 'vm1': {steps} ms`` (its time stamp is the gate opening; the
  steps add up to the pause), and [block-job-complete sent,
  ``BLOCK_JOB_COMPLETED`` received] for QEMU. The guest-visible gap *around*
  it is the longest probe iteration in the probe's intervals (50 ms each)
  that overlap the switchover widened by :data:`BEFORE_S` before and
  :data:`AFTER_S` after (clean-up after a commit stalls guests too); the gap
  *outside* is the longest in every other interval of the run. Sides
  alternate, medians of the repetitions (5 in a full run).
- ``guest-rounds``: the rounds probe (rounds of 64 random I/Os, 70/30
  read/write, 4-64 KiB, a flush every 32 writes) for a fixed time on the
  mount vs on a plain directory of the same filesystem as the stores,
  alternating; rounds/s and the ratio mount/plain of the medians.
"""

from __future__ import annotations

import ast
import datetime
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench import guest, relocation
from bench.context import (
    Mounted,
    Outcome,
    ScenarioContext,
    evict,
    median,
    number,
    say,
    target_check,
)
from bench.errors import BenchError
from bench.relocation import ENTRY, Relocation

FUSEDISK, QEMU_MIRROR = "fusedisk", "qemu-mirror"
MOUNT, PLAIN = "mount", "plain"
GIB, MIB = 1 << 30, 1 << 20
#: guest disk sizes (full run, quick run)
SWITCH_SIZE = (512 * MIB, 64 * MIB)
ROUNDS_SIZE = (1 * GIB, 128 * MIB)
ROUNDS_SECONDS = (20, 4)
#: probe time before the relocation starts and after it ended
WARMUP_S, COOLDOWN_S = 1.5, 1.5
#: the window "around" the switchover: this much before its start and after its end
BEFORE_S, AFTER_S = 0.05, 0.5
REPORT_MS = 50
GAP_TARGET_MEDIAN_MS, GAP_TARGET_MAX_MS = 5.0, 10.0
ROUNDS_TARGET = 0.9
MIRROR_TIMEOUT_S = 600.0
#: time between QEMU's BLOCK_JOB_READY and the block-job-complete
MIRROR_SETTLE_S = 1.0
#: the probe prints each iteration of SLOW_US or more (the one that spans the switchover
#: among them); FUSEDISK_BENCH_SLOW_US changes it
SLOW_US = 1000
SLOW_US_ENV = "FUSEDISK_BENCH_SLOW_US"


def _pick(context: ScenarioContext, sizes: tuple[int, int]) -> int:
    return sizes[1] if context.quick else sizes[0]


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


# --------------------------------------------------------------------- guest-switchover

def daemon_switchover(log: Path, entry: str, after_unix: float, before_unix: float
                      ) -> tuple[float, float, dict[str, float]] | None:
    """(start, end) on the unix clock and the steps of the last ``switchover of 'ENTRY'``
    line the daemon logged between the two times (its stamp is when the gate opened)."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        marker = f"switchover of {entry!r}: "
        if marker not in line:
            continue
        try:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            steps = ast.literal_eval(line.split(marker, 1)[1].removesuffix(" ms"))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(steps, dict) or not after_unix - 1 <= stamp <= before_unix + 1:
            continue
        total_s = sum(float(v) for v in steps.values()) / 1000
        found = (stamp - total_s, stamp, {str(k): float(v) for k, v in steps.items()})
    return found


def _gap_figures(gap: guest.GapResult, start: float, end: float, t0: float) -> dict[str, Any]:
    around_ms, around_at = gap.longest(start - BEFORE_S, end + AFTER_S)
    outside_ms, outside_at = gap.longest(start - BEFORE_S, end + AFTER_S, inside=False)
    if gap.errors or gap.bad:
        raise BenchError(f"the guest saw {gap.errors} I/O errors and {gap.bad} bad reads")
    series = [[round(i.start - t0, 3), i.max_us / 1000] for i in gap.intervals if i.iterations]
    return {"latency": series, "around_ms": around_ms, "around_at_s": _rel(around_at, t0),
            "spanning_ms": gap.spanning_ms(start, end),
            "floor_ms": gap.floor_ms(start - BEFORE_S, end + AFTER_S),
            "outside_ms": outside_ms, "outside_at_s": _rel(outside_at, t0),
            "window_s": [_rel(start, t0), _rel(end, t0)],
            "p50_ms": gap.p50_us / 1000, "p99_ms": gap.p99_us / 1000,
            "max_ms": gap.max_us / 1000, "iterations": gap.iterations}


def _gap_params() -> dict[str, str | int]:
    return {"mode": "gap", "seconds": 3600, "interval_us": 1000, "report_ms": REPORT_MS,
            "slow_us": int(os.environ.get(SLOW_US_ENV) or SLOW_US)}


def _keep_lines(work: Path, lines: list[tuple[float, str]]) -> None:
    """With FUSEDISK_TRACE set (a diagnosis run): keep the console lines with their host
    arrival times (time.monotonic), to be read beside the daemon's trace."""
    if os.environ.get("FUSEDISK_TRACE"):
        (work / "lines.json").write_text(json.dumps(
            {"offset_s": guest.clock_offset_s(lines), "lines": lines}))


def _fusedisk_run(context: ScenarioContext, mount: Mounted, files: guest.GuestFiles,
                  size: int, rep: int) -> dict[str, Any]:
    tag = f"guest-switchover-fusedisk-r{rep}"
    say(f"{tag}: building {ENTRY} with a {size >> 20} MiB disk on the mount")
    disk, layout = relocation.make_entry(context, mount, size, tag)
    evict(mount.stores["a"] / ENTRY / relocation.DISK)  # no write-back left to compete with
    with guest.Guest(files, disk, context.work(f"{tag}-guest"), _gap_params()) as vm:
        boot_s = vm.wait_probe_started()
        time.sleep(WARMUP_S)
        # a quick run checks the harness: on a loaded CI machine a flush behind the
        # guest's writes may not fit the default budget
        options = ("--max-pause", "2000") if context.quick else ()
        moved: Relocation = relocation.relocate(context, mount, tag, size, *options,
                                                poll_s=relocation.PAUSE_POLL_S)
        time.sleep(COOLDOWN_S)
        lines = vm.stop()
        command = vm.command
    _keep_lines(context.scratch / f"{tag}-guest", lines)
    logged = daemon_switchover(mount.daemon.log_path, ENTRY, moved.started_unix,
                               moved.ended_unix)
    if logged is not None:
        offset = time.time() - time.monotonic()
        start, end = logged[0] - offset, logged[1] - offset
        source = "daemon log"
    else:
        start, end = relocation.switch_window(moved)
        source = "status polls"
    marker = guest.read_marker(mount.stores["b"] / ENTRY / relocation.DISK)
    if not marker.startswith("FDPROBE-DONE mode=gap"):
        raise BenchError(f"{tag}: the guest's last write is not on store b ({marker!r})")
    result = {"side": FUSEDISK, "rep": rep, "boot_s": boot_s, "window_from": source,
              "switch_ms": (end - start) * 1000, "pause_ms": moved.figure("pause_ms"),
              "steps_ms": logged[2] if logged else None, "relocation_s": moved.wall_s,
              **_gap_figures(guest.parse_gap(lines), start, end, moved.started)}
    result["commands"] = [layout, command, moved.command]
    return result


def _qemu_run(context: ScenarioContext, plain: Path, files: guest.GuestFiles, size: int,
              rep: int) -> dict[str, Any]:
    tag = f"guest-switchover-qemu-r{rep}"
    source_dir, dest_dir = plain / f"r{rep}-a", plain / f"r{rep}-b"
    source_dir.mkdir()
    dest_dir.mkdir()
    disk, target = source_dir / "disk.img", dest_dir / "disk.img"
    say(f"{tag}: a {size >> 20} MiB disk in a plain directory")
    layout = context.runner.lay_out(disk, f"{tag}-disk", size)
    evict(disk)  # as on the fusedisk side: no write-back of the lay-out left
    with open(target, "wb") as f:
        f.truncate(size)
    with guest.Guest(files, disk, context.work(f"{tag}-guest"), _gap_params()) as vm:
        boot_s = vm.wait_probe_started()
        time.sleep(WARMUP_S)
        qmp = vm.qmp
        assert qmp is not None
        qmp.command("blockdev-add", driver="raw", **{"node-name": "target"},
                    file={"driver": "file", "filename": str(target), "aio": "io_uring"},
                    cache={"direct": True})
        started = time.monotonic()
        qmp.command("blockdev-mirror", **{"job-id": "mirror0"}, device="d0", target="target",
                    sync="full")
        qmp.wait_event("BLOCK_JOB_READY", MIRROR_TIMEOUT_S, device="mirror0")
        # ready = in sync, the guest's writes mirrored: as converged as fusedisk is when it
        # closes its gate; the settling keeps the bulk copy's tail out of the window
        time.sleep(MIRROR_SETTLE_S)
        start = time.monotonic()
        qmp.command("block-job-complete", device="mirror0")
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", 60, device="mirror0")
        end = done.t
        if done.data.get("error"):
            raise BenchError(f"{tag}: QEMU's mirror failed: {done.data['error']}")
        now_on = qmp.command("query-block")[0]["inserted"]["file"]
        if now_on != str(target):
            raise BenchError(f"{tag}: after the mirror the guest's disk is {now_on}")
        time.sleep(COOLDOWN_S)
        lines = vm.stop()
        command = vm.command
    _keep_lines(context.scratch / f"{tag}-guest", lines)
    marker = guest.read_marker(target)
    if not marker.startswith("FDPROBE-DONE mode=gap"):
        raise BenchError(f"{tag}: the guest's last write is not on the mirror's target")
    result = {"side": QEMU_MIRROR, "rep": rep, "boot_s": boot_s, "window_from": "QMP",
              "switch_ms": (end - start) * 1000, "pause_ms": None, "steps_ms": None,
              "relocation_s": end - started,
              **_gap_figures(guest.parse_gap(lines), start, end, started)}
    shutil.rmtree(source_dir)
    shutil.rmtree(dest_dir)
    result["commands"] = [layout, command, "QMP: blockdev-add {driver: raw, node-name: target, "
                          "file: {driver: file, filename: B/disk.img, aio: io_uring}, cache: "
                          "{direct: true}}; blockdev-mirror {job-id: mirror0, device: d0, "
                          "target: target, sync: full}; (BLOCK_JOB_READY) block-job-complete "
                          "{device: mirror0}; (BLOCK_JOB_COMPLETED)"]
    return result


def guest_switchover(context: ScenarioContext) -> Outcome:
    """The guest-visible I/O gap around fusedisk's switchover vs QEMU's own mirror."""
    name = "guest-switchover"
    size = _pick(context, SWITCH_SIZE)
    reps = context.repetitions(5)
    files = guest.prepare(context.work("guest-switchover-build"))
    plain = context.work("guest-switchover-plain")
    runs: list[dict[str, Any]] = []
    with context.mount(name) as mount:
        for rep in range(reps):
            order = (FUSEDISK, QEMU_MIRROR) if rep % 2 == 0 else (QEMU_MIRROR, FUSEDISK)
            for side in order:
                run = (_fusedisk_run(context, mount, files, size, rep) if side == FUSEDISK
                       else _qemu_run(context, plain, files, size, rep))
                say(f"{name} rep {rep + 1} {side}: gap around the switchover "
                    f"{run['around_ms']} ms (spanning it {run['spanning_ms']} ms), outside "
                    f"{run['outside_ms']} ms, switch "
                    f"{run['switch_ms']:.1f} ms")
                runs.append(run)
    summary: dict[str, Any] = {"reps": reps, "disk_bytes": size}
    table = [["side", "rep", "gap around ms", "at s", "spanning ms", "floor ms",
              "gap outside ms", "switch ms",
              "daemon pause_ms", "relocation s", "p50 ms", "p99 ms", "iterations", "boot s"]]
    for side in (FUSEDISK, QEMU_MIRROR):
        mine = [r for r in runs if r["side"] == side]
        around = [r["around_ms"] for r in mine if r["around_ms"] is not None]
        outside = [r["outside_ms"] for r in mine if r["outside_ms"] is not None]
        spanning = [r["spanning_ms"] for r in mine if r["spanning_ms"] is not None]
        summary[side] = {"around_median_ms": median(around),
                         "around_max_ms": max(around, default=None),
                         "spanning_median_ms": median(spanning),
                         "spanning_max_ms": max(spanning, default=None),
                         "floor_median_ms": median([r["floor_ms"] for r in mine
                                                    if r["floor_ms"] is not None]),
                         "outside_median_ms": median(outside),
                         "outside_max_ms": max(outside, default=None),
                         "switch_median_ms": median([r["switch_ms"] for r in mine]),
                         "pause_median_ms": median([r["pause_ms"] for r in mine
                                                    if r["pause_ms"] is not None]),
                         "relocation_median_s": median([r["relocation_s"] for r in mine]),
                         "p99_median_ms": median([r["p99_ms"] for r in mine])}
        for r in mine:
            table.append([side, str(r["rep"] + 1), number(r["around_ms"], 1),
                          number(r["around_at_s"], 3), number(r["spanning_ms"], 1),
                          number(r["floor_ms"], 1),
                          number(r["outside_ms"], 1),
                          number(r["switch_ms"], 1), number(r["pause_ms"], 1),
                          number(r["relocation_s"], 2), number(r["p50_ms"], 2),
                          number(r["p99_ms"], 2), str(r["iterations"]), number(r["boot_s"], 1)])
        s = summary[side]
        table.append([side, "median", number(s["around_median_ms"], 1), "",
                      number(s["spanning_median_ms"], 1), number(s["floor_median_ms"], 1),
                      number(s["outside_median_ms"], 1),
                      number(s["switch_median_ms"], 1),
                      number(s["pause_median_ms"], 1), number(s["relocation_median_s"], 2),
                      "", number(s["p99_median_ms"], 2), "", ""])
    ours = summary[FUSEDISK]
    qemu = summary[QEMU_MIRROR]
    med, top = ours["around_median_ms"], ours["around_max_ms"]
    targets = [
        target_check("guest-visible gap around the switchover, median (ms)", med,
                     f"≤ {GAP_TARGET_MEDIAN_MS:g} ms (QEMU mirror, same run: "
                     f"{number(qemu['around_median_ms'], 1)} ms)",
                     None if med is None else med <= GAP_TARGET_MEDIAN_MS, 12),
        target_check("guest-visible gap around the switchover, max (ms)", top,
                     f"≤ {GAP_TARGET_MAX_MS:g} ms (QEMU mirror, same run: "
                     f"{number(qemu['around_max_ms'], 1)} ms)",
                     None if top is None else top <= GAP_TARGET_MAX_MS, 12)]
    commands: list[str] = []
    for r in runs[:2]:
        commands += r.pop("commands")
    for r in runs:
        r.pop("commands", None)
    # chart the repetition whose gap is each side's median (the upper one for an even count)
    charts: dict[str, Any] = {"before_s": BEFORE_S, "after_s": AFTER_S}
    for side in (FUSEDISK, QEMU_MIRROR):
        mine = sorted((r for r in runs if r["side"] == side), key=lambda r: r["around_ms"] or 0)
        if mine:
            shown = mine[len(mine) // 2]
            charts[side] = {key: shown[key] for key in ("rep", "latency", "window_s",
                                                        "around_ms", "around_at_s",
                                                        "relocation_s", "switch_ms")}
    for r in runs:
        r.pop("latency", None)
    return Outcome(
        caption=(f"{name}: a QEMU guest (TCG, cache=none, aio=io_uring) writes + reads back "
                 f"4 KiB O_DIRECT every ~1 ms while its {size >> 20} MiB disk relocates: "
                 f"fusedisk migrate on the mount vs QEMU's blockdev-mirror on plain "
                 f"directories; {reps} rep(s), sides alternating"),
        summary=summary, table=table, runs=runs, targets=targets, commands=commands,
        series=charts,
        notes=[f"gap = the longest probe iteration (4 KiB pwrite + pread, O_DIRECT, "
               f"CLOCK_MONOTONIC in the guest) in the probe's {REPORT_MS} ms intervals; "
               f"around = intervals overlapping the switchover widened by {BEFORE_S:g} s "
               f"before and {AFTER_S:g} s after; outside = every other interval of the "
               "run (boot excluded, copy included); floor = the median, over stretches "
               "of the window's length outside it, of each stretch's longest iteration "
               "(the noise of the measurement). spanning = the longest iteration that "
               "overlaps the switch window itself (the I/O that waited for it; the probe "
               f"lists every iteration of {SLOW_US / 1000:g} ms or more, and a switch no "
               f"listed one overlaps counts as {SLOW_US / 1000:g} ms): the switchover's "
               "own cost, apart from the noise of the 0.55 s around it. Guest times are "
               "mapped to the host clock by the smallest arrival − print time of the "
               "console lines.",
               "switch ms: fusedisk = the daemon's logged switchover (gate closed → open); "
               f"QEMU = block-job-complete (sent {MIRROR_SETTLE_S:g} s after BLOCK_JOB_READY, "
               "so that the unthrottled bulk copy's tail is not in the window) → "
               "BLOCK_JOB_COMPLETED received. 'at s' and "
               "the windows are seconds after the relocation started.",
               "TCG on a shared 2-core machine: the guest's vCPU thread competes with "
               "the daemon and the copy, so the gap outside the switchover shows the "
               "noise floor of the measurement; compare with QEMU's line."],
    )


# --------------------------------------------------------------------- guest-rounds

def guest_rounds(context: ScenarioContext) -> Outcome:
    """Mixed random rounds in the guest: disk on the mount vs on a plain directory."""
    name = "guest-rounds"
    size = _pick(context, ROUNDS_SIZE)
    seconds = _pick(context, ROUNDS_SECONDS)
    reps = context.repetitions(3)
    files = guest.prepare(context.work("guest-rounds-build"))
    plain_disk = context.work("guest-rounds-plain") / "disk.img"
    runs: list[dict[str, Any]] = []
    commands: list[str] = []
    params: dict[str, str | int] = {"mode": "rounds", "seconds": seconds, "ops": 64,
                                    "flush_every": 32, "report_ms": 500}
    with context.mount(name) as mount:
        (mount.mountpoint / ENTRY).mkdir()
        mount_disk = mount.mountpoint / ENTRY / "disk.img"
        say(f"{name}: {size >> 20} MiB disks on the mount and in a plain directory")
        commands += [context.runner.lay_out(mount_disk, f"{name}-mount", size),
                     context.runner.lay_out(plain_disk, f"{name}-plain", size)]
        evict(mount.stores["a"] / ENTRY / "disk.img")
        evict(plain_disk)
        for rep in range(reps):
            for side in ((MOUNT, PLAIN) if rep % 2 == 0 else (PLAIN, MOUNT)):
                disk = mount_disk if side == MOUNT else plain_disk
                params["seed"] = rep + 1
                cpu_before = mount.daemon.cpu_time_s()
                with guest.Guest(files, disk, context.work(f"{name}-{side}-r{rep}"),
                                 params) as vm:
                    boot_s = vm.wait_probe_started()
                    lines = vm.wait_end(seconds + 120)
                    if rep == 0:
                        commands.append(vm.command)
                result = guest.parse_rounds(lines)
                if result.errors:
                    raise BenchError(f"{name}: the guest saw {result.errors} I/O errors")
                cpu_s = mount.daemon.cpu_time_s() - cpu_before if side == MOUNT else None
                runs.append({"side": side, "rep": rep, "rounds_per_s": result.rounds_per_s,
                             "rounds": result.rounds, "flushes": result.flushes,
                             "bytes": result.bytes, "seconds": result.seconds,
                             "boot_s": boot_s, "daemon_cpu_s": cpu_s})
                say(f"{name} rep {rep + 1} {side}: {result.rounds_per_s:.2f} rounds/s")
        store_disk = mount.stores["a"] / ENTRY / "disk.img"
        marker = guest.read_marker(store_disk)
        if not marker.startswith("FDPROBE-DONE mode=rounds"):
            raise BenchError(f"{name}: the guest's last write is not in {store_disk}")
    rates = {side: median([r["rounds_per_s"] for r in runs if r["side"] == side])
             for side in (MOUNT, PLAIN)}
    mount_rate, plain_rate = rates[MOUNT], rates[PLAIN]
    ratio = mount_rate / plain_rate if mount_rate is not None and plain_rate else None
    table = [["side", "rep", "rounds/s", "rounds", "flushes", "MB moved", "daemon CPU s",
              "boot s"]]
    for r in runs:
        table.append([r["side"], str(r["rep"] + 1), number(r["rounds_per_s"], 2),
                      str(r["rounds"]), str(r["flushes"]), number(r["bytes"] / 1e6, 1),
                      number(r["daemon_cpu_s"], 2), number(r["boot_s"], 1)])
    table.append(["mount/plain", "median", number(ratio, 3), "", "", "", "", ""])
    return Outcome(
        caption=(f"{name}: a QEMU guest (TCG, cache=none, aio=io_uring) runs rounds of 64 "
                 f"random O_DIRECT I/Os (70/30 read/write, 4-64 KiB, a flush every 32 "
                 f"writes) for {seconds} s on a {size >> 20} MiB disk: on the mount vs in a "
                 f"plain directory of the stores' filesystem; {reps} rep(s), alternating"),
        summary={"reps": reps, "disk_bytes": size, "seconds": seconds,
                 "mount_rounds_per_s": rates[MOUNT], "plain_rounds_per_s": rates[PLAIN],
                 "ratio": ratio},
        table=table, runs=runs, commands=commands,
        targets=[target_check("guest rounds/s mount / plain", ratio, f"≥ {ROUNDS_TARGET:g}",
                              None if ratio is None else ratio >= ROUNDS_TARGET, 16)],
        notes=["a flush in the guest is a virtio-blk flush: QEMU fdatasyncs the disk "
               "file (on the mount: a FUSE fsync)",
               "the guest's vCPU is emulated (TCG): rounds/s is bounded by the emulation as "
               "well as by the disk; both sides pay the same emulation"],
    )
