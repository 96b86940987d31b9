"""The fusedisk command line as the benchmark uses it: status, cbt, migrate, status polling.

Everything goes through ``python -m fusedisk ...`` (the SPEC's command-line
surface), never through fusedisk's internals, with one exception made for
cost: the status poller (``bench/statuspoll.py``) calls ``fusedisk.cli.main``
in one long-lived process instead of starting Python twice a second, which
would eat a large share of a small machine's CPU during the very relocation
being measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from fusedisk import api
from fusedisk.errors import ControlError

FUSEDISK = [sys.executable, "-m", "fusedisk"]
_CLI_TIMEOUT_S = 60.0
#: Job states after which a relocation no longer changes (SPEC "status --json").


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def fusedisk(*args: str, timeout_s: float = _CLI_TIMEOUT_S) -> str:
    """Run ``python -m fusedisk ARGS``; its stdout, or BenchError with its last stderr line."""
    argv = [*FUSEDISK, *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fusedisk {args[0]} did not answer within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        reason = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise BenchError(f"fusedisk {' '.join(args[:2])} failed: {reason}")
    return done.stdout


def has_migrate() -> bool:
    """Whether this fusedisk has the ``migrate`` command (``migrate --help`` succeeds)."""
    done = subprocess.run([*FUSEDISK, "migrate", "--help"], capture_output=True, check=False,
                          stdin=subprocess.DEVNULL, timeout=_CLI_TIMEOUT_S)
    return done.returncode == 0


def status(mountpoint: Path) -> dict[str, Any]:
    """``fusedisk status MNT --json`` as a dict."""
    text = fusedisk("status", str(mountpoint), "--json")
    try:
        data = json.loads(text)
    except ValueError:
        raise BenchError("fusedisk status --json did not print JSON") from None
    if not isinstance(data, dict):
        raise BenchError("fusedisk status --json did not print one JSON object")
    return data


def checkpoint(mountpoint: Path, file: Path) -> str:
    """``fusedisk cbt checkpoint MNT FILE``: a new change id."""
    change_id = fusedisk("cbt", "checkpoint", str(mountpoint), str(file)).strip()
    if not change_id or len(change_id.split()) != 1:
        raise BenchError(f"fusedisk cbt checkpoint printed {change_id!r}, not one change id")
    return change_id


def changes(mountpoint: Path, file: Path, since: str) -> dict[str, Any]:
    """``fusedisk cbt changes MNT FILE --since ID --json`` as a dict."""
    text = fusedisk("cbt", "changes", str(mountpoint), str(file), "--since", since, "--json")
    try:
        data = json.loads(text)
        extents = data["extents"]
    except (ValueError, KeyError, TypeError):
        raise BenchError("fusedisk cbt changes --json did not print {extents: [...]}") from None
    if not all(isinstance(e, list) and len(e) == 2 for e in extents):
        raise BenchError("fusedisk cbt changes --json: extents are not [offset, length] pairs")
    return dict(data)


def job_of(status_doc: dict[str, Any] | None, entry: str) -> dict[str, Any] | None:
    """The relocation job of ``entry`` in a status document: the running one if any,
    else the last one listed; None when there is none."""
    if not status_doc:
        return None
    jobs = [job for job in status_doc.get("jobs") or [] if isinstance(job, dict)
            and job.get("entry") == entry]
    running = [job for job in jobs if job.get("state") not in api.FINAL_STATES]
    if running:
        return running[-1]
    return jobs[-1] if jobs else None


@dataclass(slots=True)
class Poll:
    """One status sample: CLOCK_MONOTONIC time, the document (None on error), the error."""

    t: float
    status: dict[str, Any] | None
    error: str | None


@dataclass(slots=True)
class StatusPoller:
    """``python -m bench.statuspoll`` in the background: a status document every interval."""

    mountpoint: Path
    out: Path
    interval_s: float = 0.5
    process: subprocess.Popen[bytes] | None = None
    polls: list[Poll] = field(default_factory=list)

    def start(self) -> StatusPoller:
        """Start polling; returns self."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.statuspoll", str(self.mountpoint),
             "--interval", str(self.interval_s), "--out", str(self.out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
        )
        return self

    def wait_first_sample(self, timeout_s: float = 20.0) -> None:
        """Wait until the poller has written its first sample (BenchError if it cannot)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.out.stat().st_size > 0:
                    return
            except FileNotFoundError:
                pass
            if self.process is not None and self.process.poll() is not None:
                raise BenchError("the status poller (python -m bench.statuspoll) exited "
                                 f"with status {self.process.returncode}")
            time.sleep(0.02)
        raise BenchError(f"the status poller took no sample within {timeout_s:.0f} s")

    def stop(self) -> list[Poll]:
        """Stop polling and return every sample taken (never raises on a dead poller)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.polls = []
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                record = json.loads(line)
                self.polls.append(Poll(t=float(record["t"]), status=record.get("status"),
                                       error=record.get("error")))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the stop
        return self.polls


@dataclass(slots=True)
class Migration:
    """A running ``fusedisk migrate`` (waiting mode), timed from start to exit."""

    argv: list[str]
    process: subprocess.Popen[str]
    log_path: Path
    started: float
    started_unix: float
    ended: float | None = None
    ended_unix: float | None = None
    #: the job as it ended (``--json``'s line), once :meth:`wait` returned
    final: api.Job | None = None

    @classmethod
    def start(cls, mountpoint: Path, entry: str, to: str, log_path: Path,
              *options: str) -> Migration:
        """Start ``fusedisk migrate MNT ENTRY --to STORE OPTIONS``; its output goes to log_path."""
        argv = [*FUSEDISK, "migrate", str(mountpoint), entry, "--to", to, "--json", *options]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            started_unix, started = time.time(), time.monotonic()
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "COLUMNS": "120"})
        return cls(argv=argv, process=process, log_path=log_path, started=started,
                   started_unix=started_unix)

    @property
    def command(self) -> str:
        """The command line, for the report."""
        return " ".join(["fusedisk", *self.argv[len(FUSEDISK):]])

    @property
    def wall_s(self) -> float:
        """Seconds from start to exit (so far, if still running)."""
        return (self.ended or time.monotonic()) - self.started

    def wait(self, timeout_s: float) -> None:
        """Wait for a successful exit; BenchError (after killing it) on failure or timeout."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.command} did not finish within {timeout_s:.0f} s") from None
        finally:
            self.ended, self.ended_unix = time.monotonic(), time.time()
        if self.process.returncode != 0:
            try:
                reason = _last_line(self.log_path.read_text(errors="replace"))
            except OSError:
                reason = ""
            raise BenchError(f"{self.command} failed (exit status {self.process.returncode})"
                             + (f": {reason}" if reason else ""))
        try:
            self.final = api.Job.from_wire(json.loads(_last_line(self.log_path.read_text())))
        except (OSError, ValueError, ControlError) as e:
            raise BenchError(f"{self.command} printed no final job: {e}") from None

    def kill(self) -> None:
        """Stop the migrate client (cleanup path; the daemon keeps the job); never raises."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
