"""Scenario ``switchover-scale`` (issue 12): the pause, fds and memory as the entry grows.

For each entry size N (1, 3k, 30k and 100k files in a full run, 1 and 300
with ``--quick``, or just ``--files N``), a fresh mount with the default fd
limit (inherited from the bench, which the daemon raises to its hard limit)
gets ``vm1``: N small files of 4 KiB in directories of 100, written through
the mount by a tight loop of ``openat``/``write``/``close`` (timed), and one
disk kept busy during every relocation by ``bench.probe`` (a 4 KiB O_DIRECT
write every 1 ms, each timed: what a guest would see). Then ``vm1``
relocates a→b and b→a, ``reps`` times (``fusedisk migrate --json
--max-pause 100``; once for sizes from :data:`BIG` files on, unless
``--reps``). Per relocation:

- the daemon's pause (the job's ``pause_ms``), its attempts and the reason
  the last aborted one gave, the steps of every attempt (its log line
  ``switchover of 'vm1': {...} ms``), the wall time of the migrate command
  and the probe's longest write during it;
- the daemon's open fds (``/proc/PID/fd``) before, at the peak during (sampled
  every 0.1 s) and after, and its VmRSS before/after and VmHWM after;
- the verdict on the budget: ``held`` (committed within it, first attempt),
  ``held after K aborted`` (attempts that would have overrun were abandoned
  before their commit, then one fitted), ``OVERRAN`` (committed, and the
  pause still exceeded the budget: the re-point after the commit is not
  checked against it) or ``FAILED`` (the relocation failed, e.g. every
  attempt aborted, EMFILE, timeout; the error line is kept).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import probe
from bench.context import Mounted, Outcome, ScenarioContext, median, number, say, target_check
from bench.errors import BenchError
from bench.fusedisk_cli import Migration
from bench.relocation import _start_probe, _stop_probe
from fusedisk import api

ENTRY = "vm1"
DISK = "disk.img"
#: file counts: (full run, quick run); ``--files N`` replaces them
COUNTS = ((1, 3000, 30000, 100000), (1, 300))
DISK_MIB = (64, 8)
BUDGET_MS = 100
#: from this many files on, one round trip a→b→a per size unless ``--reps``
BIG = 30000
FILE_BYTES = 4096
PER_DIRECTORY = 100
#: a relocation counts as hung after this long
MIGRATE_TIMEOUT_S = 3600.0
_LOG_LINE = re.compile(r"switchover of '([^']*)': (\{.*\}) ms\s*$")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon's open fds and memory (KiB) at one instant."""

    fds: int
    rss_kib: int
    hwm_kib: int


def snapshot(pid: int) -> Snapshot:
    """Count ``/proc/PID/fd``, read VmRSS and VmHWM; BenchError if the daemon is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}: {exc.strerror}") from None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def kib(name: str) -> int:
        return int(fields.get(name, "0 kB").split()[0])

    return Snapshot(fds=fds, rss_kib=kib("VmRSS"), hwm_kib=kib("VmHWM"))


def fd_limit(pid: int) -> int | None:
    """The daemon's soft RLIMIT_NOFILE (``Max open files`` of /proc/PID/limits)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return int(value) if value.isdigit() else None
    except OSError:
        pass
    return None


class _Sampler:
    """The daemon's open descriptors and RSS, sampled every 0.1 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.max_fds, self.max_rss_kib = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            now = snapshot(self.pid)
        except BenchError:
            return
        self.max_fds = max(self.max_fds, now.fds)
        self.max_rss_kib = max(self.max_rss_kib, now.rss_kib)

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def populate(entry: Path, files: int) -> float:
    """Write ``files`` files of 4 KiB under ``entry`` (directories of 100) with one
    ``openat``/``write``/``close`` each, relative to its directory; returns seconds."""
    block = os.urandom(FILE_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    started = time.monotonic()
    os.mkdir(entry)
    entry_fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    dir_fd = -1
    try:
        for i in range(files):
            if i % PER_DIRECTORY == 0:
                if dir_fd >= 0:
                    os.close(dir_fd)
                    dir_fd = -1
                name = f"d{i // PER_DIRECTORY}"
                os.mkdir(name, dir_fd=entry_fd)
                dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=entry_fd)
            fd = os.open(f"f{i}", flags, 0o644, dir_fd=dir_fd)
            try:
                os.write(fd, block)
            finally:
                os.close(fd)
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
        os.close(entry_fd)
    return time.monotonic() - started


def _make_disk(path: Path, disk_mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(disk_mib):
            f.write(os.urandom(1 << 20))


def switchover_lines(log: Path, offset: int) -> list[dict[str, float]]:
    """The steps of every switchover attempt of ``vm1`` logged after byte ``offset``."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    attempts = []
    for line in text.splitlines():
        match = _LOG_LINE.search(line)
        if match and match.group(1) == ENTRY:
            try:
                steps = json.loads(match.group(2).replace("'", '"'))
            except ValueError:
                continue
            if isinstance(steps, dict):
                attempts.append({str(k): float(v) for k, v in steps.items()})
    return attempts


def _final_job(log: Path) -> dict[str, Any] | None:
    """The job ``fusedisk migrate --json`` printed (also when it then failed)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                job = json.loads(line)
            except ValueError:
                continue
            if isinstance(job, dict):
                return job
    return None


def _daemon_error(log: Path, offset: int) -> str | None:
    """The last error the daemon logged after byte ``offset`` (an exception's last line, an
    ERROR/CRITICAL record, a 'Too many open files')."""
    with open(log, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if (" ERROR " in line or " CRITICAL " in line or "Too many open files" in line
                or re.match(r"^[A-Za-z_.]+(Error|Exception): ", line)):
            return line.strip()
    return None


def verdict(state: str | None, pause_ms: float | None, attempts: int) -> str:
    """What happened to the budget in one relocation (see the module docstring)."""
    if state != api.State.DONE or pause_ms is None:
        return "FAILED"
    if pause_ms > BUDGET_MS:
        return "OVERRAN"
    return "held" if attempts <= 1 else f"held after {attempts - 1} aborted"


@dataclass(slots=True)
class SizeResult:
    """Everything measured for one entry size."""

    files: int
    create_s: float | None = None
    fd_limit: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _relocate(mount: Mounted, files: int, rep: int, dest: str, out: Path) -> dict[str, Any]:
    """One relocation with the probe busy on the disk; the run's record."""
    pid, log = mount.daemon.pid, mount.daemon.log_path
    offset = log.stat().st_size
    before = snapshot(pid)
    tag = f"scale-{files}-r{rep}-{dest}"
    probe_out = out / f"{tag}-probe.json"
    process = _start_probe(mount.mountpoint / ENTRY / DISK, probe_out)
    error: str | None = None
    try:
        time.sleep(0.3)  # the probe is writing before the relocation starts
        with _Sampler(pid) as sampler:
            moved = Migration.start(mount.mountpoint, ENTRY, dest, out / f"{tag}-migrate.log",
                                    "--max-pause", str(BUDGET_MS))
            try:
                moved.wait(MIGRATE_TIMEOUT_S)
            except BenchError as exc:
                error = str(exc)
                logged = _daemon_error(log, offset)
                if logged and logged not in error:
                    error += f" [daemon log: {logged}]"
    except BaseException:
        if process.poll() is None:
            process.kill()
        process.communicate()
        raise
    data = _stop_probe(process, probe_out)
    if mount.daemon.process.poll() is not None:
        raise BenchError(f"the daemon died during the relocation to {dest} "
                         f"(exit status {mount.daemon.process.returncode}): "
                         f"{_daemon_error(log, offset) or error or 'no error logged'}")
    after = snapshot(pid)
    wire = moved.final.to_wire() if moved.final is not None else _final_job(moved.log_path)
    job: dict[str, Any] = dict(wire) if wire else {}
    if error is None and job.get("state") != api.State.DONE:
        error = f"the job ended {job.get('state')}: {job.get('error')}"
    attempts = int(job.get("attempts") or 0)
    during = probe.summarise(data["samples"], moved.started, moved.ended)
    steps = switchover_lines(log, offset)
    pause = job.get("pause_ms")
    record = {
        "files": files, "rep": rep, "to": dest, "state": job.get("state"),
        "pause_ms": pause, "attempts": attempts,
        "aborted": max(attempts - 1, 0) if job.get("state") == api.State.DONE else attempts,
        "last_estimate_ms": job.get("last_estimate_ms"),
        "last_abandoned": job.get("last_abandoned"), "error": error,
        "verdict": verdict(job.get("state"), pause, attempts),
        "wall_s": round(moved.wall_s, 3), "passes": job.get("pass"),
        "mirrored": job.get("mirrored"),
        "steps": steps[-1] if steps else {}, "attempt_steps": steps,
        "fds_before": before.fds, "fds_peak": max(sampler.max_fds, before.fds, after.fds),
        "fds_after": after.fds, "rss_before_kib": before.rss_kib,
        "rss_peak_kib": max(sampler.max_rss_kib, after.rss_kib),
        "rss_after_kib": after.rss_kib, "hwm_after_kib": after.hwm_kib,
        "probe_max_ms": None if during["max_latency_s"] is None
        else round(during["max_latency_s"] * 1000, 3),
        "probe_writes": data["writes"], "probe_errors": data["errors"],
    }
    say(f"switchover-scale: {files} files → {dest}: {record['verdict']}, pause {pause} ms, "
        f"attempts {attempts}, wall {moved.wall_s:.1f} s, fds {before.fds}/"
        f"{record['fds_peak']}/{after.fds}, RSS {after.rss_kib >> 10} MiB (HWM "
        f"{after.hwm_kib >> 10}), probe max {record['probe_max_ms']} ms, steps "
        f"{record['steps']}" + (f"; error: {error}" if error else ""))
    return record


def _measure_size(context: ScenarioContext, files: int, disk_mib: int, reps: int,
                  out: Path) -> SizeResult:
    result = SizeResult(files)
    with context.mount(f"scale-{files}") as mount:
        result.fd_limit = fd_limit(mount.daemon.pid)
        entry = mount.mountpoint / ENTRY
        say(f"switchover-scale: writing {files} files of {FILE_BYTES} B into {ENTRY}")
        result.create_s = populate(entry, files)
        _make_disk(entry / DISK, disk_mib)
        say(f"switchover-scale: {files} files written in {result.create_s:.1f} s "
            f"({files / max(result.create_s, 1e-9):,.0f} files/s); daemon fd limit "
            f"{result.fd_limit}")
        for rep in range(reps):
            for dest in ("b", "a"):
                run = _relocate(mount, files, rep, dest, out)
                result.runs.append(run)
                if run["error"]:
                    result.error = run["error"]
                    return result  # the entry is not where the next one expects it
    return result


def _row(size: SizeResult) -> list[str]:
    runs = size.runs
    pauses = [float(r["pause_ms"]) for r in runs if r["pause_ms"] is not None]
    verdicts = [r["verdict"] for r in runs]
    summary = ", ".join(f"{verdicts.count(v)}× {v}" for v in dict.fromkeys(verdicts))
    if size.error:
        summary += f" ({size.error})"
    elif not runs:
        summary = "not run"

    def most(key: str) -> int | None:
        values = [int(r[key]) for r in runs]
        return max(values) if values else None

    def first(key: str) -> int | None:
        return int(runs[0][key]) if runs else None

    def mib(kib: int | None) -> str:
        return number(None if kib is None else kib / 1024, 1)

    return [f"{size.files:,}", number(size.create_s, 1),
            number(median([float(r["wall_s"]) for r in runs]), 1), str(len(runs)),
            number(median(pauses), 1), number(max(pauses) if pauses else None, 1),
            f"{sum(r['attempts'] for r in runs)} / {sum(r['aborted'] for r in runs)}",
            f"{first('fds_before')} / {most('fds_peak')} / "
            f"{int(runs[-1]['fds_after']) if runs else None}",
            str(size.fd_limit), f"{mib(first('rss_before_kib'))} / {mib(most('rss_peak_kib'))}",
            mib(most("hwm_after_kib")),
            number(max((float(r["probe_max_ms"]) for r in runs if r["probe_max_ms"] is not None),
                       default=None), 1),
            summary]


def switchover_scale(context: ScenarioContext) -> Outcome:
    counts = ((context.files,) if context.files else
              COUNTS[1] if context.quick else COUNTS[0])
    disk_mib = DISK_MIB[1] if context.quick else DISK_MIB[0]
    out = context.out / "scale"
    out.mkdir(parents=True, exist_ok=True)
    sizes: list[SizeResult] = []
    for files in counts:
        reps = context.reps if context.reps is not None else (
            1 if context.quick or files >= BIG else 3)
        try:
            sizes.append(_measure_size(context, files, disk_mib, reps, out))
        except BenchError as exc:  # the mount or the daemon failed: a finding, not the end
            say(f"switchover-scale: {files} files: {exc}")
            sizes.append(SizeResult(files, error=str(exc)))
    table = [["files", "create s", "relocation s (median)", "relocations", "pause p50 ms",
              "pause max ms", "attempts / aborted", "fds before / peak / after", "fd limit",
              "RSS before / peak MiB", "VmHWM MiB", "probe max ms", "budget"]]
    table += [_row(size) for size in sizes]
    steps_table = [["files", "to", "rep", "verdict", "pause ms", *_STEP_NAMES, "wall s"]]
    for size in sizes:
        for r in size.runs:
            steps_table.append([f"{r['files']:,}", r["to"], str(r["rep"] + 1), r["verdict"],
                                number(r["pause_ms"], 1),
                                *(number(r["steps"].get(name), 1) for name in _STEP_NAMES),
                                number(r["wall_s"], 1)])
    runs = [run for size in sizes for run in size.runs]
    held = bool(runs) and all(size.error is None for size in sizes) and all(
        r["verdict"].startswith("held") for r in runs)
    overran = sum(r["verdict"] == "OVERRAN" for r in runs)
    return Outcome(
        caption=(f"switchover-scale: vm1 of N 4 KiB files and a {disk_mib} MiB disk busy with "
                 f"a 4 KiB O_DIRECT write every 1 ms, relocated a→b→a (3 times below {BIG:,} "
                 f"files, once from there) with --max-pause {BUDGET_MS}"),
        summary={"counts": list(counts), "budget_ms": BUDGET_MS, "disk_mib": disk_mib,
                 "sizes": [{"files": s.files, "create_s": s.create_s, "fd_limit": s.fd_limit,
                            "error": s.error, "relocations": len(s.runs)} for s in sizes],
                 "overran": overran,
                 "aborted_attempts": sum(r["aborted"] for r in runs)},
        table=table, extra_tables={"switchover steps of the last attempt of each relocation (ms)":
                                   steps_table},
        runs=runs,
        targets=[target_check("every relocation committed within the budget (aborted "
                              "attempts allowed), at every size",
                              1.0 if held else 0.0, f"≤ {BUDGET_MS} ms", held, 12)],
        commands=["python -m bench --scenarios switchover-scale [--files N] [--reps N]",
                  f"python -m bench.probe {ENTRY}/{DISK} --interval-ms 1 --out PROBE.json",
                  f"fusedisk migrate MNT {ENTRY} --to b|a --max-pause {BUDGET_MS} --json"],
        notes=["fds and RSS are the daemon's, from /proc/PID/fd and /proc/PID/status: before "
               "the first relocation, the peak over every relocation of the size (sampled "
               "every 0.1 s, so a short peak can be missed), after the last; VmHWM is the "
               "process's peak RSS since it started (writing the tree included).",
               "The pause is the daemon's pause_ms, from the gate's close to its open: "
               "it includes the re-point after the commit, which the budget checks (made "
               "before the commit) cannot cover; an attempt aborted before its commit "
               "reopens the gate and counts in 'aborted'.",
               "probe max = the longest 4 KiB O_DIRECT write of the busy disk during the "
               "whole relocation (bench.probe, every 1 ms)."],
    )


_STEP_NAMES = ("drain", "names", "copy", "attributes", "flush", "commit", "rename", "repoint")
