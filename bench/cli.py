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
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench.errors import BenchError
from bench.fio import FioRunner, find_fio
from bench.jobs import Job, all_jobs, parse_size, select_jobs
from bench.machine import machine_info
from bench.mount import REPO_ROOT, is_mounted, mounted
from bench.report import build_results, draw_charts, markdown, text_table
from bench.scenarios import MOUNT, RAW, SCENARIOS, RunRecord, ScenarioContext, Target

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DEFAULT_STORE_PARENT = Path("/var/tmp")
TEST_FILE_NAME = "bench.dat"
QUICK = {"size": 64 << 20, "runtime_s": 2, "reps": 1}
FULL = {"size": 1 << 30, "runtime_s": 10, "reps": 3}


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
    reps: int
    size: int
    runtime_s: int
    jobs: list[Job]
    scenarios: list[str]
    store_parent: Path
    keep_scratch: bool

    @property
    def complete(self) -> bool:
        """A full run of every job against both targets: the one that updates ``latest.*``."""
        return not self.quick and not self.raw_only and len(self.jobs) == len(all_jobs())


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
            "A full run (no --quick, no --raw-only, all jobs) also writes latest.md, "
            "latest.json and latest-*.png, the files meant to be committed."
        ),
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"small and short: {QUICK['size'] >> 20} MiB file, "
                             f"{QUICK['runtime_s']} s per job, {QUICK['reps']} repetition "
                             "(explicit --size/--runtime/--reps still win)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="where results go (default: bench/results/)")
    parser.add_argument("--reps", type=_positive, metavar="N",
                        help=f"repetitions per job and target; medians are reported "
                             f"(default {FULL['reps']})")
    parser.add_argument("--size", type=_size, metavar="SIZE",
                        help="test file size, e.g. 256M, 1G (default 1G)")
    parser.add_argument("--runtime", type=_positive, metavar="SECONDS",
                        help=f"seconds per job after a 1 s ramp (default {FULL['runtime_s']})")
    parser.add_argument("--jobs", type=_names, metavar="NAME,...",
                        help="run only these jobs (see the list below)")
    parser.add_argument("--scenarios", type=_names, default=["idle"], metavar="NAME,...",
                        help="scenarios to run (default: idle)")
    parser.add_argument("--store-dir", type=Path, default=DEFAULT_STORE_PARENT, metavar="DIR",
                        help="a fresh scratch directory for the stores, state and mountpoint "
                             "is made in here (default /var/tmp)")
    parser.add_argument("--raw-only", action="store_true",
                        help="measure only the raw store; do not mount fusedisk")
    parser.add_argument("--keep-scratch", action="store_true",
                        help="keep the scratch directory (test files, daemon log) afterwards")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    defaults = QUICK if args.quick else FULL
    try:
        jobs = select_jobs(args.jobs)
    except BenchError as exc:
        parser.error(str(exc))
    return Options(
        quick=args.quick, raw_only=args.raw_only, out=args.out.resolve(),
        reps=args.reps or defaults["reps"], size=args.size or defaults["size"],
        runtime_s=args.runtime or defaults["runtime_s"], jobs=jobs, scenarios=args.scenarios,
        store_parent=args.store_dir.resolve(), keep_scratch=args.keep_scratch,
    )


def _measure(options: Options, fio: str, scratch: Path
             ) -> tuple[dict[str, list[RunRecord]], dict[str, str], dict[str, Any]]:
    """Run the scenarios; returns (records per scenario, lay-out commands, machine info).

    The mount, if any, is gone when this returns or raises.
    """
    dirs = {name: scratch / name for name in ("raw", "storeA", "storeB", "state", "mnt")}
    for path in dirs.values():
        path.mkdir()
    runner = FioRunner(fio, size=options.size, runtime_s=options.runtime_s,
                       output_dir=options.out / "fio")
    machine = machine_info(fio, {"raw store": dirs["raw"], "store a": dirs["storeA"]})
    with ExitStack() as stack:
        targets = [Target(RAW, dirs["raw"] / TEST_FILE_NAME, None)]
        daemon = None
        if not options.raw_only:
            daemon = stack.enter_context(mounted(
                dirs["mnt"], {"a": dirs["storeA"], "b": dirs["storeB"]}, "a", dirs["state"],
                scratch / "daemon.log",
            ))
            print(f"bench: mounted {dirs['mnt']} (daemon pid {daemon.pid})", file=sys.stderr)
            targets.append(Target(MOUNT, dirs["mnt"] / TEST_FILE_NAME, daemon))
        layout = {}
        for target in targets:
            print(f"bench: laying out {options.size >> 20} MiB at {target.file}", file=sys.stderr)
            layout[target.name] = runner.lay_out(target.file, target.name)
        context = ScenarioContext(runner=runner, jobs=options.jobs, reps=options.reps,
                                  targets=targets, daemon=daemon)
        records = {name: SCENARIOS[name](context) for name in options.scenarios}
    return records, layout, machine


def _write_outputs(options: Options, records: dict[str, list[RunRecord]],
                   layout: dict[str, str], machine: dict[str, Any], created: str) -> None:
    results = build_results(
        mode="quick" if options.quick else "full", raw_only=options.raw_only,
        parameters={"size_bytes": options.size, "runtime_s": options.runtime_s,
                    "ramp_s": 1, "reps": options.reps,
                    "jobs": [job.name for job in options.jobs], "scenarios": options.scenarios},
        machine=machine, jobs=options.jobs, layout_commands=layout, records=records,
        created=created, repo_root=REPO_ROOT,
    )
    out = options.out
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    charts = {name: draw_charts(results, name, options.jobs, out) for name in records}
    (out / "report.md").write_text(markdown(results, options.jobs, charts))
    written = ["results.json", "report.md", *(n for c in charts.values() for n in c.values())]
    if options.complete:
        latest_charts = {scenario: {title: f"latest-{name}" for title, name in c.items()}
                         for scenario, c in charts.items()}
        for scenario, chart_names in charts.items():
            for title, name in chart_names.items():
                shutil.copyfile(out / name, out / latest_charts[scenario][title])
        (out / "latest.md").write_text(markdown(results, options.jobs, latest_charts))
        shutil.copyfile(out / "results.json", out / "latest.json")
        written += ["latest.md", "latest.json",
                    *(n for c in latest_charts.values() for n in c.values())]
    for scenario in records:
        print(text_table(results, scenario, options.jobs))
        print()
    print(f"wrote {', '.join(written)} to {out}")


def run(options: Options) -> None:
    """Measure and write every output file; raises BenchError on failure."""
    fio = find_fio()
    if not options.store_parent.is_dir():
        raise BenchError(f"--store-dir {options.store_parent} is not a directory")
    try:
        options.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create --out {options.out}: {exc.strerror}") from None
    created = datetime.now(UTC).isoformat(timespec="seconds")
    scratch = Path(tempfile.mkdtemp(prefix="fusedisk-bench-", dir=options.store_parent))
    try:
        records, layout, machine = _measure(options, fio, scratch)
    finally:
        log = scratch / "daemon.log"
        if log.exists():
            shutil.copyfile(log, options.out / "daemon.log")
        if is_mounted(scratch / "mnt"):
            print(f"bench: warning: {scratch / 'mnt'} is still mounted; keeping {scratch}",
                  file=sys.stderr)
        elif not options.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    _write_outputs(options, records, layout, machine, created)


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
