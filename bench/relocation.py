"""Relocation scenarios (issues 4 and 6): ``fusedisk migrate`` of entry ``vm1`` from store a to b.

Every scenario mounts fresh stores a (default) and b, builds ``vm1`` (a
config file, an nvram file, ``disk.img``) on the mount, and runs ``fusedisk
migrate MNT vm1 --to b`` (waiting mode) while ``bench.statuspoll`` samples
``fusedisk status --json`` every 0.5 s. The relocation time is the wall time
of the migrate command; passes and bytes come from the job in the status
after it exits (or the last one polled before, if done jobs are not listed).

- ``relocate-idle``: idle 2 GiB disk of random data; relocation time vs
  ``cp --sparse=always`` + ``sync FILE`` and vs ``dd bs=1M oflag=direct`` of a
  same-size file between the same store directories, order rotating per
  repetition (targets: ≤ 1.25× cp + sync; copy rate ≥ 0.9× dd's).
- ``relocate-busy``: fio 4 KiB random writes QD1 on the disk; IOPS during the
  relocation vs an idle run before (target ≥ 0.5); dirty bytes per pass.
- ``switchover-pause``: ``bench.probe`` writes 4 KiB O_DIRECT every 1 ms to
  a second file of vm1; longest stall around the switchover (target ≤ 100 ms,
  median of 5) and the daemon's own pause_ms.
- ``relocate-sparse``: 8 GiB sparse disk with 64 MiB of data; allocated
  bytes on b after vs on a before.
- ``relocate-outrun``: fio 64 KiB random writes QD4 against ``--rate 20M``;
  the relocation must still finish (mirror fallback): time and passes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fusedisk_cli, probe
from bench.context import (
    Mounted,
    Outcome,
    ScenarioContext,
    allocated_bytes,
    evict,
    median,
    mib,
    number,
    say,
    sha256_of,
    target_check,
)
from bench.errors import BenchError
from bench.fio import BackgroundFio, read_iops_log
from bench.fusedisk_cli import Migration, Poll, StatusPoller, job_of
from fusedisk import api

ENTRY = "vm1"
DISK = "disk.img"
DEST = "b"
POLL_S = 0.5
#: The switchover-pause scenario polls faster, to narrow the window it searches.
PAUSE_POLL_S = 0.1
LOAD_DIR = Path(__file__).resolve().parent / "load"
BUSY_JOB = LOAD_DIR / "randwrite-4k-qd1.fio"
OUTRUN_JOB = LOAD_DIR / "randwrite-64k-qd4.fio"
OUTRUN_RATE = "20M"
GIB, MIB = 1 << 30, 1 << 20
#: Disk sizes per scenario: (full run, quick run).
SIZES = {
    "relocate-idle": (2 * GIB, 64 * MIB),
    "relocate-busy": (2 * GIB, 128 * MIB),
    "switchover-pause": (1 * GIB, 64 * MIB),
    "relocate-sparse": (8 * GIB, 2 * GIB),
    "relocate-outrun": (1 * GIB, 64 * MIB),
}
SPARSE_DATA = (64 * MIB, 16 * MIB)
#: A relocation may take this long plus size / _MIN_RATE before it counts as hung.
_TIMEOUT_BASE_S = 120.0
_MIN_RATE = 10e6
#: Pause after laying out relocate-idle's files, before the timed copies.
SETTLE_S = 3.0


def _size(context: ScenarioContext, scenario: str) -> int:
    full, quick = SIZES[scenario]
    return quick if context.quick else full


def _out(context: ScenarioContext, name: str) -> Path:
    path = context.out / "relocation" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------- building blocks

def make_entry(context: ScenarioContext, mount: Mounted, size: int, tag: str,
               fill: bool = True) -> tuple[Path, str]:
    """(Re)create ``vm1`` on the mount (store a): small files and ``disk.img`` of ``size``
    bytes, written with random data by fio unless ``fill`` is False (then sparse).
    Returns (the disk's path on the mount, the lay-out command)."""
    entry = mount.mountpoint / ENTRY
    if entry.exists():
        shutil.rmtree(entry)
    entry.mkdir()
    (entry / f"{ENTRY}.conf").write_text("# a VM home directory made by python -m bench\n"
                                          "memory = 4096\ndisk0 = disk.img\n")
    (entry / "nvram.bin").write_bytes(os.urandom(128 * 1024))
    disk = entry / DISK
    if fill:
        command = context.runner.lay_out(disk, f"{tag}-disk", size)
    else:
        with open(disk, "wb") as f:
            f.truncate(size)
        command = f"truncate -s {size} {disk}"
    placement = fusedisk_cli.status(mount.mountpoint).get("placement") or {}
    if placement.get(ENTRY) != "a":
        raise BenchError(f"new entry {ENTRY} is on store {placement.get(ENTRY)!r}, not 'a'")
    return disk, command


@dataclass(slots=True)
class Relocation:
    """One finished ``fusedisk migrate``: timing, the status series, the final job."""

    command: str
    wall_s: float
    started: float
    ended: float
    started_unix: float
    ended_unix: float
    observed: list[tuple[float, dict[str, Any] | None, str | None]]
    final_job: dict[str, Any] | None
    series: list[dict[str, Any]] = field(default_factory=list)
    source_removed: bool = False

    @property
    def states(self) -> list[str]:
        """Job states seen, in order of first appearance."""
        seen: list[str] = []
        for point in self.series:
            if point.get("state") and point["state"] not in seen:
                seen.append(point["state"])
        final = (self.final_job or {}).get("state")
        if isinstance(final, str) and final not in seen:
            seen.append(final)
        return seen

    def figure(self, key: str) -> Any:
        """A field of the final job (None when absent)."""
        return (self.final_job or {}).get(key)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of this relocation."""
        return {"relocation_s": self.wall_s, "job_elapsed_s": self.figure("elapsed_s"),
                "passes": self.figure("pass"),
                "bytes_copied": self.figure("bytes_copied"),
                "bytes_total": self.figure("bytes_total"), "pause_ms": self.figure("pause_ms"),
                "final_state": self.figure("state"), "states_seen": self.states,
                "source_removed": self.source_removed}


def _observe(polls: list[Poll], job_id: str, started: float, ended: float
             ) -> list[tuple[float, dict[str, Any] | None, str | None]]:
    """(t, this relocation's job or None, poll error) for the polls from the migrate start
    to 1 s after its exit; ours is the job with the id the migrate command reported."""
    observed: list[tuple[float, dict[str, Any] | None, str | None]] = []
    for poll in polls:
        if poll.t < started or poll.t > ended + 1.0:
            continue
        jobs = (poll.status or {}).get("jobs") or []
        job = next((j for j in jobs if isinstance(j, dict) and j.get("id") == job_id), None)
        observed.append((poll.t, job, poll.error))
    return observed


def _series(observed: list[tuple[float, dict[str, Any] | None, str | None]],
            started: float) -> list[dict[str, Any]]:
    points = []
    for t, job, error in observed:
        point: dict[str, Any] = {"t": round(t - started, 3)}
        if error:
            point["error"] = error
        if job is not None:
            for key in ("state", "pass", "bytes_total", "bytes_copied", "dirty_bytes",
                        "copy_rate", "eta_s", "pause_ms"):
                if key in job:
                    point[key] = job[key]
        points.append(point)
    return points


def relocate(context: ScenarioContext, mount: Mounted, tag: str, size: int,
             *options: str, timeout_s: float | None = None,
             poll_s: float = POLL_S) -> Relocation:
    """Run ``fusedisk migrate MNT vm1 --to b OPTIONS`` to completion while polling status.

    Raises BenchError if it fails, times out (the job is then cancelled), or
    vm1 does not end up on store b.
    """
    if timeout_s is None:
        timeout_s = _TIMEOUT_BASE_S + size / _MIN_RATE
    poller = StatusPoller(mount.mountpoint, _out(context, f"{tag}-status.jsonl"),
                          poll_s).start()
    migration = None
    try:
        poller.wait_first_sample()  # the state before the start, to tell old jobs apart
        migration = Migration.start(mount.mountpoint, ENTRY, DEST,
                                    _out(context, f"{tag}-migrate.log"), *options)
        say(f"{tag}: {migration.command}")
        try:
            migration.wait(timeout_s)
        except BenchError:
            mount.daemon.check_alive()
            try:
                fusedisk_cli.fusedisk("cancel", str(mount.mountpoint), ENTRY, timeout_s=30)
            except BenchError:
                pass
            raise
        time.sleep(0.1)
    finally:
        polls = poller.stop()
        if migration is not None:
            migration.kill()
    assert migration.ended is not None and migration.ended_unix is not None
    final_status = fusedisk_cli.status(mount.mountpoint)
    assert migration.final is not None
    observed = _observe(polls, migration.final.id, migration.started, migration.ended)
    series = _series(observed, migration.started)
    last_seen = next((job for _, job, _ in reversed(observed) if job is not None), None)
    final_job = job_of(final_status, ENTRY)
    if final_job is None or final_job.get("state") != api.State.DONE:
        final_job = {**(last_seen or {}), **(final_job or {})} or None
    placement = (final_status.get("placement") or {}).get(ENTRY)
    if placement != DEST:
        raise BenchError(f"{migration.command} exited 0 but {ENTRY} is on store {placement!r}")
    if not (mount.stores[DEST] / ENTRY / DISK).exists():
        raise BenchError(f"after {migration.command}: no {ENTRY}/{DISK} in store {DEST}")
    return Relocation(command=migration.command, wall_s=migration.wall_s,
                      started=migration.started, ended=migration.ended,
                      started_unix=migration.started_unix, ended_unix=migration.ended_unix,
                      observed=observed, final_job=final_job, series=series,
                      source_removed=not (mount.stores["a"] / ENTRY).exists())




def _load_env(file: Path, size: int, runtime_s: float, log: Path, log_ms: int) -> dict[str, str]:
    return {"FILE": str(file), "SIZE": str(size), "RUNTIME": str(int(runtime_s)),
            "LOG": str(log), "LOG_MSEC": str(log_ms)}


def _window_mean(samples: list[tuple[float, float]], start: float, end: float,
                 interval_s: float) -> float | None:
    """Mean of per-interval values whose interval lies at least half inside [start, end]."""
    chosen = []
    for t, value in samples:
        overlap = min(t, end) - max(t - interval_s, start)
        if overlap >= interval_s / 2:
            chosen.append(value)
    return sum(chosen) / len(chosen) if chosen else None


def _stop_quietly(fio: BackgroundFio | None) -> None:
    if fio is not None and fio.running():
        fio.kill()


# --------------------------------------------------------------------- relocate-idle

def _timed_cp(source: Path, dest: Path) -> tuple[float, float]:
    """(cp seconds, cp + sync FILE seconds); the copy is deleted afterwards."""
    started = time.monotonic()
    subprocess.run(["cp", "--sparse=always", str(source), str(dest)], check=True,
                   capture_output=True)
    copied = time.monotonic()
    subprocess.run(["sync", str(dest)], check=True, capture_output=True)
    synced = time.monotonic()
    dest.unlink()
    return copied - started, synced - started


def _timed_dd(source: Path, dest: Path) -> float:
    """Seconds of ``dd if=SOURCE of=DEST bs=1M oflag=direct``; the copy is deleted after."""
    started = time.monotonic()
    subprocess.run(["dd", f"if={source}", f"of={dest}", "bs=1M", "oflag=direct"],
                   check=True, capture_output=True)
    took = time.monotonic() - started
    dest.unlink()
    return took


#: the order of the timed copies, rotating per repetition
_IDLE_ORDERS = (("cp", "dd", "migrate"), ("migrate", "cp", "dd"), ("dd", "migrate", "cp"))


def relocate_idle(context: ScenarioContext) -> Outcome:
    """Relocation of an idle disk vs ``cp --sparse=always`` and ``dd oflag=direct``
    between the same stores."""
    name = "relocate-idle"
    size = _size(context, name)
    reps = context.repetitions(3)  # as many runs of each order
    runs = []
    commands = []
    with context.mount(name) as mount:
        cp_source = mount.stores["a"] / ".bench-cp-source.img"
        cp_dest = mount.stores[DEST] / ".bench-cp-copy.img"
        for rep in range(reps):
            tag = f"{name}-r{rep}"
            say(f"{tag}: building {ENTRY} with a {size >> 20} MiB disk, and the cp source")
            # Both sources are written afresh every repetition, so that neither is "older"
            # in any cache below us (a VM's virtual disk has the host's page cache too).
            cp_layout = context.runner.lay_out(cp_source, f"{tag}-cp-source", size)
            _, layout = make_entry(context, mount, size, tag)
            source_disk = mount.stores["a"] / ENTRY / DISK
            digest = sha256_of(source_disk)
            # Let the write-back of the lay-out settle, or the first timed copy pays for it.
            os.sync()
            time.sleep(0.5 if context.quick else SETTLE_S)
            order = _IDLE_ORDERS[rep % len(_IDLE_ORDERS)]
            result: dict[str, Any] = {"rep": rep, "order": ", ".join(order)}
            for step in order:
                evict(source_disk if step == "migrate" else cp_source)
                if step == "dd":
                    result["dd_s"] = _timed_dd(cp_source, cp_dest)
                    say(f"{tag}: dd bs=1M oflag=direct {result['dd_s']:.2f} s")
                elif step == "cp":
                    result["cp_s"], result["cp_sync_s"] = _timed_cp(cp_source, cp_dest)
                    say(f"{tag}: cp --sparse=always {result['cp_s']:.2f} s, "
                        f"+ sync {result['cp_sync_s']:.2f} s")
                else:
                    moved = relocate(context, mount, tag, size)
                    result.update(moved.summary())
                    say(f"{tag}: relocation {moved.wall_s:.2f} s, passes {moved.figure('pass')}")
                    commands.append(moved.command)
            result["data_intact"] = sha256_of(mount.stores[DEST] / ENTRY / DISK) == digest
            if not result["data_intact"]:
                raise BenchError(f"{tag}: {ENTRY}/{DISK} on store {DEST} differs from the source")
            result["ratio_cp"] = result["relocation_s"] / result["cp_s"]
            result["ratio_cp_sync"] = result["relocation_s"] / result["cp_sync_s"]
            # copy rates (MB/s of the disk): the daemon's job time, dd's and cp's wall time
            job_s = result["job_elapsed_s"] or result["relocation_s"]
            result["copy_mbps"] = size / job_s / 1e6
            result["dd_mbps"] = size / result["dd_s"] / 1e6
            result["cp_sync_mbps"] = size / result["cp_sync_s"] / 1e6
            result["rate_vs_dd"] = result["copy_mbps"] / result["dd_mbps"]
            result["rate_vs_cp_sync"] = result["copy_mbps"] / result["cp_sync_mbps"]
            runs.append(result)
            cp_source.unlink()
    commands = [cp_layout, layout, f"cp --sparse=always {cp_source} {cp_dest} && sync {cp_dest}",
                f"dd if={cp_source} of={cp_dest} bs=1M oflag=direct", *commands]
    reloc = median([r["relocation_s"] for r in runs])
    cp_s = median([r["cp_s"] for r in runs])
    cp_sync = median([r["cp_sync_s"] for r in runs])
    ratio = reloc / cp_sync if reloc and cp_sync else None
    ratio_cp = reloc / cp_s if reloc and cp_s else None
    job_s = median([r["job_elapsed_s"] for r in runs if r["job_elapsed_s"] is not None])
    summary = {"reps": reps, "disk_bytes": size, "relocation_s": reloc, "cp_s": cp_s,
               "cp_sync_s": cp_sync, "ratio": ratio, "ratio_plain_cp": ratio_cp,
               "job_elapsed_s": job_s,
               "ratio_job_elapsed": job_s / cp_sync if job_s and cp_sync else None,
               "passes": median([r["passes"] for r in runs if r["passes"] is not None]),
               "dd_s": median([r["dd_s"] for r in runs]),
               "copy_mbps": median([r["copy_mbps"] for r in runs]),
               "dd_mbps": median([r["dd_mbps"] for r in runs]),
               "cp_sync_mbps": median([r["cp_sync_mbps"] for r in runs]),
               "rate_vs_dd": median([r["rate_vs_dd"] for r in runs]),
               "rate_vs_cp_sync": median([r["rate_vs_cp_sync"] for r in runs]),
               "mirrored": any("mirroring" in r["states_seen"] for r in runs)}
    rate_vs_dd = summary["rate_vs_dd"]
    table = [["rep", "order", "relocation s", "daemon job s", "cp s", "cp+sync s", "dd s",
              "reloc/(cp+sync)", "reloc/cp", "copy MB/s", "dd MB/s", "cp+sync MB/s",
              "rate/dd", "rate/(cp+sync)", "passes", "copied"]]
    for r in runs:
        table.append([str(r["rep"] + 1), r["order"], number(r["relocation_s"], 2),
                      number(r["job_elapsed_s"], 2),
                      number(r["cp_s"], 2), number(r["cp_sync_s"], 2), number(r["dd_s"], 2),
                      number(r["ratio_cp_sync"], 2), number(r["ratio_cp"], 2),
                      number(r["copy_mbps"]), number(r["dd_mbps"]), number(r["cp_sync_mbps"]),
                      number(r["rate_vs_dd"], 2), number(r["rate_vs_cp_sync"], 2),
                      number(r["passes"]), mib(r["bytes_copied"])])
    table.append(["median", "", number(reloc, 2), number(job_s, 2), number(cp_s, 2),
                  number(cp_sync, 2), number(summary["dd_s"], 2),
                  number(ratio, 2), number(ratio_cp, 2), number(summary["copy_mbps"]),
                  number(summary["dd_mbps"]), number(summary["cp_sync_mbps"]),
                  number(summary["rate_vs_dd"], 2), number(summary["rate_vs_cp_sync"], 2),
                  number(summary["passes"]), ""])
    return Outcome(
        caption=(f"{name}: idle {size >> 20} MiB disk of random data relocated a→b vs "
                 f"cp --sparse=always and dd bs=1M oflag=direct of a same-size file a→b; "
                 f"{reps} rep(s), order rotating"),
        summary=summary, table=table, runs=runs, commands=commands,
        targets=[target_check("relocation / (cp --sparse=always + sync)", ratio, "≤ 1.25",
                              None if ratio is None else ratio <= 1.25, 4),
                 target_check("copy rate / dd oflag=direct rate", rate_vs_dd, "≥ 0.9",
                              None if rate_vs_dd is None else rate_vs_dd >= 0.9, 12)],
        notes=["relocation s = wall time of the `fusedisk migrate` command (Python start-up "
               "and its 0.2 s progress polling included, so a little pessimistic); daemon "
               "job s = the job's own elapsed_s from status --json (not part of the SPEC's "
               "contract; shown for reference)",
               "cp is timed with and without `sync FILE` (fsync of the copy): a relocation "
               "must make the destination durable before its switchover, a bare cp leaves "
               "the data in the page cache, so the target is judged against cp + sync; the "
               "bare-cp ratio is shown too.",
               "Both sources are written afresh every repetition (the cp source with fio "
               "on store a directly, the disk with fio through the mount) and dropped from "
               "the page cache (fdatasync + POSIX_FADV_DONTNEED) before each timed copy. "
               "On a virtual machine the host may still cache them: expect noise.",
               "The data on store b is checked against the source (SHA-256) every rep.",
               "copy MB/s = disk size / the daemon job's elapsed_s (staging, passes, "
               "flush and switchover included); dd MB/s = size / dd's wall time (dd "
               "`oflag=direct` ends without an fsync); rate/dd is judged at ≥ 0.9."],
    )


# --------------------------------------------------------------------- relocate-busy

def relocate_busy(context: ScenarioContext) -> Outcome:
    """fio 4 KiB random writes QD1 on the disk: IOPS during the relocation vs idle."""
    name = "relocate-busy"
    size = _size(context, name)
    log_ms = 100 if context.quick else 1000
    warmup_s = 2.0 if context.quick else 3.0
    with context.mount(name) as mount:
        say(f"{name}: building {ENTRY} with a {size >> 20} MiB disk")
        disk, layout = make_entry(context, mount, size, name)
        # The idle baseline runs with the same status poller as the relocation, so the
        # poller's own CPU use weighs on both figures alike.
        say(f"{name}: idle baseline, {context.runtime_s} s of {BUSY_JOB.stem}")
        base_log = _out(context, f"{name}-idle")
        poller = StatusPoller(mount.mountpoint, _out(context, f"{name}-idle-status.jsonl"),
                              POLL_S).start()
        try:
            base_json, base_command, _ = context.runner.run_with(
                BUSY_JOB, _load_env(disk, size, context.runtime_s, base_log, log_ms),
                f"{name}-idle", context.runtime_s)
        finally:
            poller.stop()
        base_samples = read_iops_log(Path(f"{base_log}_iops.1.log"))
        base_iops = float(base_json["jobs"][0]["write"]["iops"])
        run_log = _out(context, f"{name}-during")
        fio = context.runner.spawn(BUSY_JOB, _load_env(disk, size, 3600, run_log, log_ms),
                                   f"{name}-during")
        try:
            time.sleep(warmup_s)
            if not fio.running():
                fio.stop()  # raises with fio's reason
                raise BenchError(f"{name}: fio ended before the relocation started")
            # a quick run checks the harness, not the pause target: under a loaded CI
            # machine, fsyncs behind fio's writes may take longer than 100 ms
            options = ("--max-pause", "2000") if context.quick else ()
            moved = relocate(context, mount, name, size, *options)
            time.sleep(max(1.0, 2 * log_ms / 1000))
            during_json = fio.stop()
        finally:
            _stop_quietly(fio)
    samples = read_iops_log(Path(f"{run_log}_iops.1.log"))
    during = _window_mean(samples, moved.started_unix, moved.ended_unix, log_ms / 1000)
    same_run_before = _window_mean(samples, moved.started_unix - warmup_s + 1,
                                   moved.started_unix, log_ms / 1000)
    base_log_mean = sum(v for _, v in base_samples) / len(base_samples) if base_samples else None
    ratio = during / base_iops if during is not None and base_iops > 0 else None
    passes = _passes(moved.series)
    summary = {"disk_bytes": size, "idle_iops": base_iops, "idle_iops_log_mean": base_log_mean,
               "during_iops": during, "ratio": ratio, "log_interval_ms": log_ms,
               "same_run_before_iops": same_run_before,
               "fio_iops_whole_run": float(during_json["jobs"][0]["write"]["iops"]),
               **moved.summary()}
    table = [["idle IOPS", "same run, before", "IOPS during", "during/idle", "relocation s",
              "passes", "copied", "total", "pause ms"],
             [number(base_iops), number(same_run_before), number(during), number(ratio, 2),
              number(moved.wall_s, 2),
              number(moved.figure("pass")), mib(moved.figure("bytes_copied")),
              mib(moved.figure("bytes_total")), number(moved.figure("pause_ms"), 1)]]
    pass_rows = [["pass", "first seen at s", "dirty when first seen", "max dirty", "copied by end"]]
    for p in passes:
        pass_rows.append([str(p["pass"]), number(p["t"], 1), mib(p["dirty_first"]),
                          mib(p["dirty_max"]), mib(p["copied_last"])])
    t0 = moved.started_unix
    return Outcome(
        caption=(f"{name}: {BUSY_JOB.stem} (fio, QD1, O_DIRECT) on a {size >> 20} MiB disk "
                 f"while it relocates a→b at the default rate; IOPS from fio's "
                 f"{log_ms} ms log over the relocation vs a {context.runtime_s} s idle run"),
        summary=summary, table=table,
        extra_tables={"passes (from status --json every 0.5 s)": pass_rows},
        targets=[target_check("IOPS during relocation / idle", ratio, "≥ 0.50",
                              None if ratio is None else ratio >= 0.5, 4)],
        series={"status": moved.series, "passes": passes,
                "iops": [[round(t - t0, 3), v] for t, v in samples],
                "idle_iops": base_iops, "relocation_s": moved.wall_s,
                "log_interval_s": log_ms / 1000},
        commands=[layout, base_command, fio.command + "   # stopped with SIGINT", moved.command],
        notes=[f"the relocation started after fio had run {warmup_s:g} s",
               "IOPS during = mean of fio's per-interval IOPS samples lying at least half "
               "inside the relocation (migrate start to exit); 'same run, before' = the "
               "same fio run between its first second and the migrate start (information "
               "only: the target compares with the separate idle run)"]
              + ([] if during is not None else
                 ["no fio interval fell inside the relocation: it was too short to measure"]),
    )


def _passes(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pass number: when first seen, dirty bytes then, the most seen, bytes copied."""
    passes: dict[int, dict[str, Any]] = {}
    for point in series:
        number_ = point.get("pass")
        if not isinstance(number_, int):
            continue
        dirty = point.get("dirty_bytes")
        entry = passes.setdefault(number_, {"pass": number_, "t": point["t"],
                                            "dirty_first": dirty, "dirty_max": dirty,
                                            "copied_last": None, "states": []})
        if dirty is not None:
            entry["dirty_max"] = max(entry["dirty_max"] or 0, dirty)
        entry["copied_last"] = point.get("bytes_copied")
        if point.get("state") and point["state"] not in entry["states"]:
            entry["states"].append(point["state"])
    return [passes[k] for k in sorted(passes)]


# --------------------------------------------------------------------- switchover-pause

def _start_probe(file: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.probe", str(file), "--interval-ms", "1", "--out", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _stop_probe(process: subprocess.Popen[str], out: Path) -> dict[str, Any]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise BenchError("the probe did not stop within 30 s of SIGTERM") from None
    if process.returncode != 0:
        raise BenchError(f"the probe failed: {stderr.strip().splitlines()[-1:] or '?'}")
    return probe.load(out)


def switch_window(moved: Relocation) -> tuple[float, float]:
    """(start, end) CLOCK_MONOTONIC of the switchover as seen from outside: from the last
    status poll that still showed the job copying/mirroring to the first poll that showed
    it done (or the migrate command's exit, if no poll did)."""
    start, end = moved.started, moved.ended
    for t, job, _ in moved.observed:
        if t > moved.ended or job is None:
            continue
        if job.get("state") in api.PRE_SWITCH_STATES:
            start = max(start, t)
    for t, job, _ in moved.observed:
        if start < t <= moved.ended and job is not None and job.get("state") == api.State.DONE:
            end = min(end, t)
    return start, end


def _bucket_max(samples: list[list[float]], t0: float, bucket_s: float = 0.01
                ) -> list[list[float]]:
    """[t relative to t0, max latency ms, errors] per bucket: a chart-sized series."""
    buckets: dict[int, list[float]] = {}
    for start, latency, code in samples:
        key = int((start - t0) // bucket_s)
        entry = buckets.setdefault(key, [round(key * bucket_s, 3), 0.0, 0])
        entry[1] = max(entry[1], round(latency * 1000, 3))
        entry[2] += 1 if code else 0
    return [buckets[k] for k in sorted(buckets)]


def switchover_pause(context: ScenarioContext) -> Outcome:
    """The longest probe stall around the switchover, median over repetitions."""
    name = "switchover-pause"
    size = _size(context, name)
    reps = context.repetitions(5)
    runs: list[dict[str, Any]] = []
    charts: dict[int, dict[str, Any]] = {}
    layout = ""
    with context.mount(name) as mount:
        for rep in range(reps):
            tag = f"{name}-r{rep}"
            say(f"{tag}: building {ENTRY} with a {size >> 20} MiB disk")
            _, layout = make_entry(context, mount, size, tag)
            probe_file = mount.mountpoint / ENTRY / "probe.img"
            probe_file.write_bytes(b"\0" * MIB)
            probe_out = _out(context, f"{tag}-probe.json")
            process = _start_probe(probe_file, probe_out)
            try:
                time.sleep(1.0)
                if process.poll() is not None:
                    _stop_probe(process, probe_out)
                    raise BenchError("the probe ended before the relocation started")
                moved = relocate(context, mount, tag, size, poll_s=PAUSE_POLL_S)
                time.sleep(0.5)
            except BaseException:
                if process.poll() is None:
                    process.kill()
                process.communicate()
                raise
            data = _stop_probe(process, probe_out)
            start, end = switch_window(moved)
            samples = data["samples"]
            in_window = [s for s in samples if s[0] <= end and s[0] + s[1] >= start]
            window = probe.summarise(in_window)
            during = probe.summarise(samples, moved.started, moved.ended)
            before = probe.summarise(samples, None, moved.started)
            result = {"rep": rep, "window_start_s": round(start - moved.started, 3),
                      "window_end_s": round(end - moved.started, 3),
                      "window_max_ms": _ms(window["max_latency_s"]),
                      "window_max_at_s": _rel(window["max_latency_at_s"], moved.started),
                      "window_errors": window["errors"],
                      "relocation_max_ms": _ms(during["max_latency_s"]),
                      "before_max_ms": _ms(before["max_latency_s"]),
                      "probe_writes": data["writes"], "probe_errors": data["errors"],
                      "probe_error_codes": data["error_codes"], "probe_file": str(probe_out),
                      **moved.summary()}
            runs.append(result)
            charts[rep] = {"latency": _bucket_max(samples, moved.started),
                           "window": [result["window_start_s"], result["window_end_s"]],
                           "relocation_s": moved.wall_s, "pause_ms": moved.figure("pause_ms"),
                           "max_ms": result["window_max_ms"],
                           "max_at_s": result["window_max_at_s"], "rep": rep}
            say(f"{tag}: longest stall around the switchover {result['window_max_ms']} ms "
                f"(daemon pause_ms {moved.figure('pause_ms')}), probe errors {data['errors']}")
    pause = median([r["window_max_ms"] for r in runs if r["window_max_ms"] is not None])
    daemon_pause = median([r["pause_ms"] for r in runs if r["pause_ms"] is not None])
    # Chart the repetition whose figure is the median (the upper one for an even count).
    ordered = sorted(runs, key=lambda r: r["window_max_ms"] or 0)
    shown = ordered[len(ordered) // 2]["rep"]
    table = [["rep", "max stall in window ms", "at s", "window s", "daemon pause_ms",
              "max during relocation ms", "max before ms", "probe errors", "relocation s"]]
    for r in runs:
        table.append([str(r["rep"] + 1), number(r["window_max_ms"], 1),
                      number(r["window_max_at_s"], 3),
                      f"{r['window_start_s']:.2f}–{r['window_end_s']:.2f}",
                      number(r["pause_ms"], 1), number(r["relocation_max_ms"], 1),
                      number(r["before_max_ms"], 1), str(r["probe_errors"]),
                      number(r["relocation_s"], 2)])
    table.append(["median", number(pause, 1), "", "", number(daemon_pause, 1), "", "", "", ""])
    return Outcome(
        caption=(f"{name}: bench.probe writes 4 KiB O_DIRECT every 1 ms to {ENTRY}/probe.img "
                 f"while {ENTRY} ({size >> 20} MiB disk) relocates a→b; {reps} rep(s)"),
        summary={"reps": reps, "disk_bytes": size, "max_stall_ms": pause,
                 "daemon_pause_ms": daemon_pause, "chart_rep": shown},
        table=table, runs=runs, series=charts[shown],
        targets=[target_check("longest probe stall around the switchover (median)", pause,
                              "≤ 100 ms", None if pause is None else pause <= 100, 4)],
        commands=[layout, f"python -m bench.probe {ENTRY}/probe.img --interval-ms 1 --out "
                  "PROBE.json", "fusedisk migrate MNT vm1 --to b"],
        notes=[f"window = from the last status poll (every {PAUSE_POLL_S:g} s) that still "
               "showed the job copying/mirroring to the first that showed it done (or the "
               "exit of fusedisk migrate); a sample counts if its "
               "write overlaps the window. Times are seconds after the migrate command "
               "started. The probe's full samples are in relocation/*-probe.json."],
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


# --------------------------------------------------------------------- relocate-sparse

def relocate_sparse(context: ScenarioContext) -> Outcome:
    """A sparse disk keeps its holes: allocated bytes on b after vs on a before."""
    name = "relocate-sparse"
    size = _size(context, name)
    data_bytes = SPARSE_DATA[1] if context.quick else SPARSE_DATA[0]
    chunk = MIB
    with context.mount(name) as mount:
        say(f"{name}: {size >> 20} MiB sparse disk with {data_bytes >> 20} MiB of data")
        disk, layout = make_entry(context, mount, size, name, fill=False)
        offsets = sorted(i * chunk for i in random.Random(8).sample(range(size // chunk),
                                                                     data_bytes // chunk))
        digests = _write_chunks(disk, offsets, chunk)
        source = mount.stores["a"] / ENTRY / DISK
        evict(source)
        source_alloc = allocated_bytes(source)
        moved = relocate(context, mount, name, size)
        dest = mount.stores[DEST] / ENTRY / DISK
        evict(dest)
        dest_alloc = allocated_bytes(dest)
        dest_size = dest.stat().st_size
        bad = [o for o, d in zip(offsets, digests, strict=True)
               if _read_digest(disk, o, chunk) != d]
        if bad:
            raise BenchError(f"{name}: {len(bad)} data chunk(s) differ after the relocation "
                             f"(first at offset {bad[0]})")
        if dest_size != size:
            raise BenchError(f"{name}: the disk on store {DEST} has {dest_size} bytes, not {size}")
    ratio = dest_alloc / source_alloc if source_alloc else None
    summary = {"disk_bytes": size, "data_bytes": data_bytes, "source_allocated_bytes":
               source_alloc, "dest_allocated_bytes": dest_alloc, "ratio": ratio,
               "data_intact": True, **moved.summary()}
    return Outcome(
        caption=(f"{name}: {size >> 20} MiB sparse disk with {data_bytes >> 20} MiB written in "
                 f"{len(offsets)} scattered 1 MiB chunks, relocated a→b"),
        summary=summary,
        table=[["apparent size", "data written", "allocated on a before", "allocated on b after",
                "b/a", "relocation s", "passes", "copied"],
               [mib(size), mib(data_bytes), mib(source_alloc), mib(dest_alloc), number(ratio, 3),
                number(moved.wall_s, 2), number(moved.figure("pass")),
                mib(moved.figure("bytes_copied"))]],
        targets=[target_check("allocated on b / allocated on a (holes stay holes)", ratio,
                              "≤ 1.10", None if ratio is None else ratio <= 1.10, 4)],
        commands=[layout, f"{len(offsets)} × pwrite(O_DIRECT, 1 MiB) at random MiB offsets",
                  moved.command, f"stat -c %b {dest}   # × 512"],
        notes=["allocated = st_blocks × 512 of the file in the store directory (what du "
               "reports); every data chunk is read back through the mount and compared"],
    )


def _write_chunks(disk: Path, offsets: list[int], chunk: int) -> list[str]:
    buffer = mmap.mmap(-1, chunk)
    digests = []
    fd = os.open(disk, os.O_WRONLY | os.O_DIRECT)
    try:
        for offset in offsets:
            buffer.seek(0)
            buffer.write(os.urandom(chunk))
            if os.pwrite(fd, buffer, offset) != chunk:
                raise BenchError(f"short write at {offset} of {disk}")
            digests.append(hashlib.sha256(buffer).hexdigest())
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    return digests


def _read_digest(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


# --------------------------------------------------------------------- relocate-outrun

def relocate_outrun(context: ScenarioContext) -> Outcome:
    """A writer faster than ``--rate 20M``: the relocation must still converge."""
    name = "relocate-outrun"
    size = _size(context, name)
    log_ms = 100 if context.quick else 1000
    timeout_s = _TIMEOUT_BASE_S + 3 * size / 20e6
    with context.mount(name) as mount:
        say(f"{name}: building {ENTRY} with a {size >> 20} MiB disk")
        disk, layout = make_entry(context, mount, size, name)
        run_log = _out(context, f"{name}-writer")
        fio = context.runner.spawn(OUTRUN_JOB, _load_env(disk, size, 3600, run_log, log_ms),
                                   f"{name}-writer")
        try:
            time.sleep(2.0)
            if not fio.running():
                fio.stop()
                raise BenchError(f"{name}: fio ended before the relocation started")
            moved = relocate(context, mount, name, size, "--rate", OUTRUN_RATE,
                             timeout_s=timeout_s)
            time.sleep(1.0)
            writer_json = fio.stop()
        finally:
            _stop_quietly(fio)
    samples = read_iops_log(Path(f"{run_log}_iops.1.log"))
    during_iops = _window_mean(samples, moved.started_unix, moved.ended_unix, log_ms / 1000)
    write_mbps = during_iops * 65536 / 1e6 if during_iops is not None else None
    mirrored = api.State.MIRRORING in moved.states
    summary = {"disk_bytes": size, "rate": OUTRUN_RATE, "writer_mbps_during": write_mbps,
               "writer_mbps_whole_run": writer_json["jobs"][0]["write"]["bw_bytes"] / 1e6,
               "mirroring_seen": mirrored, "timeout_s": timeout_s, **moved.summary()}
    return Outcome(
        caption=(f"{name}: {OUTRUN_JOB.stem} (fio) on a {size >> 20} MiB disk while it "
                 f"relocates a→b with --rate {OUTRUN_RATE}"),
        summary=summary,
        table=[["writer MB/s during", "copy rate limit", "time to converge s", "passes",
                "states seen", "final state", "copied", "pause ms"],
               [number(write_mbps, 1), OUTRUN_RATE + "/s", number(moved.wall_s, 2),
                number(moved.figure("pass")), " → ".join(moved.states) or "—",
                str(moved.figure("state")), mib(moved.figure("bytes_copied")),
                number(moved.figure("pause_ms"), 1)]],
        targets=[target_check("relocation finishes under an outrunning writer (s)",
                              moved.wall_s, f"finishes (bound {timeout_s:.0f} s)", True, 4)],
        series={"status": moved.series, "passes": _passes(moved.series),
                "iops": [[round(t - moved.started_unix, 3), v] for t, v in samples],
                "relocation_s": moved.wall_s, "log_interval_s": log_ms / 1000},
        commands=[layout, fio.command + "   # stopped with SIGINT", moved.command],
        notes=["states seen come from status --json every 0.5 s; a short mirroring phase "
               "can fall between two polls"],
    )
