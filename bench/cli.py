"""``python -m bench``: options, the scratch directory, the mount's lifetime, output files.

Exit status: 0 on success, 1 on a BenchError (one line on stderr, plus the
daemon's log tail when it matters), 2 on bad options, 128+N on signal N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import fusedisk_cli
from bench.context import Outcome, ScenarioContext
from bench.errors import BenchError
from bench.fio import FioRunner, find_fio
from bench.jobs import Job, all_jobs, parse_size, select_jobs
from bench.machine import machine_info
from bench.mount import REPO_ROOT
from bench.report import build_results, draw_charts, markdown, text_table
from bench.scenarios import SCENARIOS, needing_migrate
from fusedisk import mountinfo

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DEFAULT_STORE_PARENT = Path("/var/tmp")
QUICK = {"size": 64 << 20, "runtime_s": 2}
FULL = {"size": 1 << 30, "runtime_s": 10}


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP so that every ``finally`` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


@dataclass(frozen=True, slots=True)
class Options:
    """Resolved command-line options."""

    quick: bool
    raw_only: bool
    out: Path
    reps: int | None
    size: int
    runtime_s: int
    jobs: list[Job]
    scenarios: list[str]
    store_parent: Path
    keep_scratch: bool
    files: int | None = None
    peer_scale: float | None = None

    @property
    def complete(self) -> bool:
        """A full run of every job and scenario, default repetitions: the one that updates
        ``latest.*``."""
        return (not self.quick and not self.raw_only and len(self.jobs) == len(all_jobs())
                and sorted(self.scenarios) == sorted(SCENARIOS) and self.reps is None)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"not a fraction in (0, 1]: {text!r}")
    return value


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1 << 20 or size % (1 << 20):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive multiple of 1 MiB")
    return size


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return int(text)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def parse_args(argv: list[str] | None) -> Options:
    """Parse ``argv`` into Options; argparse exits with status 2 on bad options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Compare fio figures of the raw backing store with a fusedisk mount. Starts "
            "'python -m fusedisk mount --foreground' on scratch stores, lays out a test file "
            "on each side, runs every job against raw and mount alternately, and writes "
            "results.json, report.md and PNG charts. The mount is always unmounted on exit."
        ),
        epilog=(
            f"jobs: {', '.join(job.name for job in all_jobs())}. "
            f"scenarios: {', '.join(SCENARIOS)}. "
            "A full run (no --quick, --raw-only, --jobs, --scenarios or --reps) also writes "
            "latest.md, latest.json and latest-*.png, the files meant to be committed. "
            "Relocation scenarios need 'fusedisk migrate'. Exit status 1 if a scenario "
            "failed (the others' results are still written)."
        ),
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"small and short: {QUICK['size'] >> 20} MiB file, "
                             f"{QUICK['runtime_s']} s per job, 1 repetition, small relocation "
                             "disks (explicit --size/--runtime/--reps still win)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="where results go (default: bench/results/)")
    parser.add_argument("--reps", type=_positive, metavar="N",
                        help="repetitions of the repeated scenarios (idle, cbt, relocate-idle, "
                             "switchover-pause, guest-switchover, guest-rounds); medians are "
                             "reported (default 3 for idle, relocate-idle and guest-rounds, 5 "
                             "for cbt, switchover-pause and guest-switchover; 1 with --quick)")
    parser.add_argument("--size", type=_size, metavar="SIZE",
                        help="test file size of the idle and cbt scenarios, e.g. 256M, 1G "
                             "(default 1G); relocation scenarios use fixed disk sizes "
                             "(bench/relocation.py SIZES)")
    parser.add_argument("--runtime", type=_positive, metavar="SECONDS",
                        help=f"seconds per job after a 1 s ramp (default {FULL['runtime_s']})")
    parser.add_argument("--jobs", type=_names, metavar="NAME,...",
                        help="run only these jobs (see the list below)")
    parser.add_argument("--scenarios", type=_names, metavar="NAME,...",
                        help="scenarios to run, in registry order (default: all; with "
                             "--raw-only: idle)")
    parser.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_PARENT, metavar="DIR",
                        help="a fresh scratch directory for the stores, state and mountpoint "
                             "is made in here (default /var/tmp)")
    parser.add_argument("--raw-only", action="store_true",
                        help="measure only the raw store; do not mount fusedisk")
    parser.add_argument("--files", type=_positive, metavar="N",
                        help="entry size of the manyfiles and switchover-scale scenarios, "
                             "one size only (defaults: manyfiles 10000, switchover-scale 1, "
                             "3000, 30000 and 100000; with --quick 300, and 1 and 300)")
    parser.add_argument("--peer-scale", type=_fraction, metavar="F",
                        help="scale the peer scenario's metadata workloads by F (default 1: "
                             "3000 sqlite commits, 5000 small files, 20000 files to untar)")
    parser.add_argument("--keep-scratch", action="store_true",
                        help="keep the scratch directory (test files, daemon log) afterwards")
    args = parser.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = ["idle"] if args.raw_only else list(SCENARIOS)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    args.scenarios = [name for name in SCENARIOS if name in args.scenarios]
    if args.raw_only:
        mounting = [name for name in args.scenarios if SCENARIOS[name].needs_mount]
        if mounting:
            parser.error(f"--raw-only: scenario(s) {', '.join(mounting)} need a mount")
    defaults = QUICK if args.quick else FULL
    try:
        jobs = select_jobs(args.jobs)
    except BenchError as exc:
        parser.error(str(exc))
    return Options(
        quick=args.quick, raw_only=args.raw_only, out=args.out.resolve(),
        reps=args.reps, size=args.size or defaults["size"],
        runtime_s=args.runtime or defaults["runtime_s"], jobs=jobs, scenarios=args.scenarios,
        store_parent=args.store_dir.resolve(), keep_scratch=args.keep_scratch,
        files=args.files, peer_scale=args.peer_scale,
    )


def _measure(options: Options, fio: str, scratch: Path
             ) -> tuple[dict[str, Outcome], dict[str, Any], list[Path]]:
    """Run the scenarios; returns (outcome per scenario, machine info, daemon logs).

    A scenario that fails with a BenchError gets an Outcome with ``error`` set
    and the others still run. Every mount is gone when this returns or raises.
    """
    runner = FioRunner(fio, size=options.size, runtime_s=options.runtime_s,
                       output_dir=options.out / "fio")
    machine = machine_info(fio, {"stores (scratch)": scratch})
    context = ScenarioContext(runner=runner, jobs=options.jobs, reps=options.reps,
                              quick=options.quick, raw_only=options.raw_only, size=options.size,
                              runtime_s=options.runtime_s, scratch=scratch, out=options.out,
                              files=options.files, peer_scale=options.peer_scale)
    outcomes: dict[str, Outcome] = {}
    try:
        for name in options.scenarios:
            print(f"bench: scenario {name}", file=sys.stderr, flush=True)
            try:
                outcomes[name] = SCENARIOS[name].run(context)
            except BenchError as exc:
                print(f"bench: scenario {name} failed: {exc}", file=sys.stderr)
                for line in exc.detail.splitlines():
                    print(f"  | {line}", file=sys.stderr)
                outcomes[name] = Outcome(caption=name, error=str(exc))
    finally:
        logs = context.daemon_logs()
    return outcomes, machine, logs


def _write_outputs(options: Options, outcomes: dict[str, Outcome], machine: dict[str, Any],
                   created: str) -> None:
    results = build_results(
        mode="quick" if options.quick else "full", raw_only=options.raw_only,
        parameters={"size_bytes": options.size, "runtime_s": options.runtime_s,
                    "ramp_s": 1, "reps": options.reps,
                    "idle_reps": outcomes["idle"].summary.get("reps")
                    if "idle" in outcomes else None,
                    "jobs": [job.name for job in options.jobs], "scenarios": options.scenarios},
        machine=machine, jobs=options.jobs, outcomes=outcomes,
        created=created, repo_root=REPO_ROOT,
    )
    out = options.out
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    charts = {name: draw_charts(results, name, options.jobs, out) for name in outcomes}
    (out / "report.md").write_text(markdown(results, options.jobs, charts))
    written = ["results.json", "report.md", *(n for c in charts.values() for n in c.values())]
    if options.complete and not results["failed"]:
        latest_charts = {scenario: {title: f"latest-{name}" for title, name in c.items()}
                         for scenario, c in charts.items()}
        for stale in out.glob("latest-*.png"):  # charts of an older set of scenarios
            stale.unlink()
        for scenario, chart_names in charts.items():
            for title, name in chart_names.items():
                shutil.copyfile(out / name, out / latest_charts[scenario][title])
        (out / "latest.md").write_text(markdown(results, options.jobs, latest_charts))
        shutil.copyfile(out / "results.json", out / "latest.json")
        written += ["latest.md", "latest.json",
                    *(n for c in latest_charts.values() for n in c.values())]
    for scenario in outcomes:
        print(text_table(results, scenario, options.jobs))
        print()
    print(f"wrote {', '.join(written)} to {out}")
    if results["failed"]:
        raise BenchError("scenario(s) failed: " + "; ".join(
            f"{name}: {error}" for name, error in results["failed"].items()))


def _mounts_under(root: Path) -> list[str]:
    return [str(point) for point in mountinfo.mounts_under(root)]


def run(options: Options) -> None:
    """Measure and write every output file; raises BenchError on failure."""
    fio = find_fio()
    needs_migrate = needing_migrate(options.scenarios)
    if needs_migrate and not fusedisk_cli.has_migrate():
        raise BenchError(
            f"scenario(s) {', '.join(needs_migrate)} need 'fusedisk migrate', which this "
            "fusedisk does not have ('python -m fusedisk migrate --help' fails); leave them "
            "out with --scenarios "
            + ",".join(n for n in options.scenarios if n not in needs_migrate))
    if not options.store_parent.is_dir():
        raise BenchError(f"--store-dir {options.store_parent} is not a directory")
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create --out {options.out}: {exc.strerror}") from None
    created = datetime.now(UTC).isoformat(timespec="seconds")
    scratch = Path(tempfile.mkdtemp(prefix="fusedisk-bench-", dir=options.store_parent))
    logs: list[Path] = []
    try:
        outcomes, machine, logs = _measure(options, fio, scratch)
    finally:
        for log in logs or list(scratch.glob("*/daemon.log")):
            if log.exists():
                shutil.copyfile(log, options.out / f"daemon-{log.parent.name}.log")
        leftovers = _mounts_under(scratch)
        if leftovers:
            print(f"bench: warning: {', '.join(leftovers)} still mounted; keeping {scratch}",
                  file=sys.stderr)
        elif not options.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    _write_outputs(options, outcomes, machine, created)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    try:
        run(parse_args(argv))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        for line in exc.detail.splitlines():
            print(f"  | {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 128 + signal.SIGINT
    except Interrupted as exc:
        print(f"bench: stopped by {signal.Signals(exc.signum).name}; cleaned up",
              file=sys.stderr)
        return 128 + exc.signum
    return 0
