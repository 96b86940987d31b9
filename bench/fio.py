"""Running fio job files against a target file and reading its JSON output."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
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
    """What one fio run measured: MB/s (1e6 bytes/s), IOPS and p99 completion latency in µs.

    ``ios_with_ramp`` is the number of I/Os fio issued over its ramp and its measured
    runtime together, the ramp counted at the measured rate (fio's own counts leave the
    ramp out, but a daemon's CPU time read around the fio process includes it).
    """

    mbps: float
    iops: float
    p99_us: float
    ios_with_ramp: float = 0.0


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


def load_json_output(path: Path) -> dict[str, Any]:
    """fio's ``--output`` JSON document; lines before its first ``{`` line (fio writes
    "fio: terminating on signal 2" there when stopped with SIGINT) are skipped."""
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("{")), 0)
    data: dict[str, Any] = json.loads("".join(lines[start:]))
    return data


def fio_seconds(text: str) -> float:
    """A fio time option (``1``, ``2s``, ``500ms``, ``1m``; bare numbers are seconds) in
    seconds; BenchError on anything else."""
    value = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if value.endswith(suffix):
            value, multiplier = value[:-len(suffix)], scale
            break
    else:
        multiplier = 1.0
    try:
        return float(value) * multiplier
    except ValueError:
        raise BenchError(f"fio reported a time option {text!r} the bench cannot read") from None


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
        iops = sum(d["iops"] for d in active)
        ramp_s = fio_seconds(str(data.get("global options", {}).get("ramp_time", "0")))
        measured_s = job["job_runtime"] / 1e3
        return Figures(
            mbps=sum(d["bw_bytes"] for d in active) / 1e6,
            iops=iops,
            p99_us=max(d["clat_ns"]["percentile"]["99.000000"] for d in active) / 1e3,
            ios_with_ramp=iops * (measured_s + ramp_s),
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
            data = load_json_output(output)
        except (OSError, ValueError) as exc:
            raise BenchError(f"fio {what}: cannot read its JSON output {output}: {exc}") from None
        return data, command, wall_s

    def lay_out(self, file: Path, tag: str, size: int | None = None) -> str:
        """Write the whole test file once with ``bench/fill.fio``; returns the command line.

        ``size`` defaults to the runner's test file size.
        """
        size = self.size if size is None else size
        timeout_s = _JOB_TIMEOUT_SLACK_S + size / _FILL_MIN_RATE
        _, command, _ = self._run(
            FILL_JOB, {"FILE": str(file), "SIZE": str(size)},
            self.output_dir / f"fill-{tag}.json", timeout_s, f"lay-out of {file}",
        )
        if file.stat().st_size != size:
            raise BenchError(f"lay-out of {file} left {file.stat().st_size} bytes, not {size}")
        return command

    def run_with(self, job_file: Path, env_vars: dict[str, str], tag: str,
                 runtime_s: float) -> tuple[dict[str, Any], str, float]:
        """Run a job file with exactly ``env_vars``; returns (fio JSON, command line, wall s)."""
        return self._run(job_file, env_vars, self.output_dir / f"{tag}.json",
                         _JOB_TIMEOUT_SLACK_S + 2 * runtime_s, f"job {job_file.stem} ({tag})")

    def spawn(self, job_file: Path, env_vars: dict[str, str], tag: str) -> BackgroundFio:
        """Start a (time_based, long) job in the background; stop it with ``stop()``."""
        output = self.output_dir / f"{tag}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        argv = [self.fio, "--output-format=json", f"--output={output}", str(job_file)]
        command = " ".join(
            [*(f"{k}={shlex.quote(v)}" for k, v in env_vars.items()), shlex.join(argv)]
        )
        stderr = open(self.output_dir / f"{tag}.stderr", "w+")
        process = subprocess.Popen(argv, env={**os.environ, **env_vars}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        return BackgroundFio(process=process, command=command, output=output, stderr=stderr,
                             what=f"job {job_file.stem} ({tag})", started=time.monotonic())


    def run(self, job_file: Path, file: Path, tag: str) -> FioRun:
        """Run one job file against ``file``; ``tag`` names its JSON output."""
        env_vars = {"FILE": str(file), "SIZE": str(self.size), "RUNTIME": str(self.runtime_s)}
        data, command, wall_s = self._run(
            job_file, env_vars, self.output_dir / f"{tag}.json",
            _JOB_TIMEOUT_SLACK_S + 2 * self.runtime_s, f"job {job_file.stem} on {file}",
        )
        return FioRun(figures=parse_figures(data), command=command, wall_s=wall_s)


@dataclass(slots=True)
class BackgroundFio:
    """A fio process started by ``FioRunner.spawn``; ``stop()`` ends it and reads its JSON."""

    process: subprocess.Popen[bytes]
    command: str
    output: Path
    stderr: Any
    what: str
    started: float

    def running(self) -> bool:
        """Whether fio is still running."""
        return self.process.poll() is None

    def kill(self) -> None:
        """Stop fio without reading its results (cleanup path); never raises."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """SIGINT fio (it finishes the run and writes its JSON), wait, return the JSON."""
        early = self.process.poll() is not None
        if not early:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"fio {self.what} did not stop within {timeout_s:.0f} s") from None
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        self.stderr.close()
        if early and self.process.returncode != 0:
            reason = lines[-1] if lines else f"exit status {self.process.returncode}"
            raise BenchError(f"fio {self.what} failed: {reason}", detail="\n".join(lines[-10:]))
        try:
            return load_json_output(self.output)
        except (OSError, ValueError) as exc:
            raise BenchError(f"fio {self.what}: cannot read its JSON output {self.output}: "
                             f"{exc}") from None


def read_iops_log(path: Path) -> list[tuple[float, float]]:
    """(unix time s, IOPS) samples of a ``write_iops_log`` file written with
    ``log_unix_epoch=1``; directions are summed per timestamp."""
    samples: dict[int, float] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise BenchError(f"cannot read fio's IOPS log {path}: {exc.strerror}") from None
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) >= 2 and fields[0].isdigit():
            samples[int(fields[0])] = samples.get(int(fields[0]), 0.0) + float(fields[1])
    return [(ms / 1000, value) for ms, value in sorted(samples.items())]
