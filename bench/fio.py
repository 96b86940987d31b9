"""Running fio job files against a target file and reading its JSON output."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.jobs import FILL_JOB

# Slack on top of ramp + runtime before a job counts as hung.
_JOB_TIMEOUT_SLACK_S = 120
# The lay-out pass must reach at least this rate (bytes/s) or it counts as hung.
_FILL_MIN_RATE = 5_000_000


@dataclass(frozen=True, slots=True)
class Figures:
    """What one fio run measured: MB/s (1e6 bytes/s), IOPS and p99 completion latency in µs."""

    mbps: float
    iops: float
    p99_us: float


@dataclass(frozen=True, slots=True)
class FioRun:
    """One finished fio run: its figures, the exact command line and its wall time."""

    figures: Figures
    command: str
    wall_s: float


def find_fio() -> str:
    """Path of the fio executable; BenchError when it is not installed."""
    path = shutil.which("fio")
    if path is None:
        raise BenchError("fio not found on PATH (install it, e.g. apt-get install fio)")
    return path


def fio_version(fio: str) -> str:
    """fio's own version string, e.g. ``fio-3.33``."""
    done = subprocess.run([fio, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def parse_figures(data: dict[str, Any]) -> Figures:
    """Figures from fio's ``--output-format=json`` document of a single group-reported job.

    Throughput and IOPS add up over the directions that did I/O; p99 is the
    worst of them. Raises BenchError if the job reported an error or no I/O.
    """
    try:
        job = data["jobs"][0]
        if job["error"]:
            raise BenchError(f"fio job {job['jobname']} reported error {job['error']}")
        active = [job[d] for d in ("read", "write") if job[d]["io_bytes"] > 0]
        if not active:
            raise BenchError(f"fio job {job['jobname']} did no I/O")
        return Figures(
            mbps=sum(d["bw_bytes"] for d in active) / 1e6,
            iops=sum(d["iops"] for d in active),
            p99_us=max(d["clat_ns"]["percentile"]["99.000000"] for d in active) / 1e3,
        )
    except (KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"unexpected fio JSON output (missing {exc})") from None


class FioRunner:
    """Runs job files with FILE, SIZE and RUNTIME set in the environment.

    Every run writes its JSON document to ``output_dir``; the command line
    recorded for it is exactly what was executed, environment included.
    """

    def __init__(self, fio: str, *, size: int, runtime_s: int, output_dir: Path) -> None:
        self.fio = fio
        self.size = size
        self.runtime_s = runtime_s
        self.output_dir = output_dir

    def _run(self, job_file: Path, env_vars: dict[str, str], output: Path,
             timeout_s: float, what: str) -> tuple[dict[str, Any], str, float]:
        argv = [self.fio, "--output-format=json", f"--output={output}", str(job_file)]
        command = " ".join(
            [*(f"{k}={shlex.quote(v)}" for k, v in env_vars.items()), shlex.join(argv)]
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv, env={**os.environ, **env_vars}, capture_output=True, text=True,
                timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"fio {what} did not finish within {timeout_s:.0f} s") from None
        wall_s = time.monotonic() - started
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {done.returncode}"
            raise BenchError(f"fio {what} failed: {reason}", detail="\n".join(lines[-10:]))
        try:
            data = json.loads(output.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"fio {what}: cannot read its JSON output {output}: {exc}") from None
        return data, command, wall_s

    def lay_out(self, file: Path, tag: str) -> str:
        """Write the whole test file once with ``bench/fill.fio``; returns the command line."""
        timeout_s = _JOB_TIMEOUT_SLACK_S + self.size / _FILL_MIN_RATE
        _, command, _ = self._run(
            FILL_JOB, {"FILE": str(file), "SIZE": str(self.size)},
            self.output_dir / f"fill-{tag}.json", timeout_s, f"lay-out of {file}",
        )
        if file.stat().st_size != self.size:
            raise BenchError(f"lay-out of {file} left {file.stat().st_size} bytes, not {self.size}")
        return command

    def run(self, job_file: Path, file: Path, tag: str) -> FioRun:
        """Run one job file against ``file``; ``tag`` names its JSON output."""
        env_vars = {"FILE": str(file), "SIZE": str(self.size), "RUNTIME": str(self.runtime_s)}
        data, command, wall_s = self._run(
            job_file, env_vars, self.output_dir / f"{tag}.json",
            _JOB_TIMEOUT_SLACK_S + 2 * self.runtime_s, f"job {job_file.stem} on {file}",
        )
        return FioRun(figures=parse_figures(data), command=command, wall_s=wall_s)
