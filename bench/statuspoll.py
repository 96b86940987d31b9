"""Poll ``fusedisk status MNT --json`` every INTERVAL until SIGTERM/SIGINT.

    python -m bench.statuspoll MNT --interval 0.5 --out polls.jsonl

Writes one JSON line per sample: ``{"t": CLOCK_MONOTONIC seconds, "status":
{...}}`` or ``{"t": ..., "error": "..."}``. It runs the fusedisk command line
in this one process (``fusedisk.cli.main``) so that a poll costs milliseconds,
not a Python start-up; if that entry point is unusable it falls back to
``python -m fusedisk status``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

_stop = False


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    global _stop
    _stop = True


def _in_process(mountpoint: str) -> Callable[[], tuple[int, str, str]] | None:
    try:
        from fusedisk.cli import main as fusedisk_main
    except ImportError:
        return None

    def call() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = fusedisk_main(["status", mountpoint, "--json"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return code, out.getvalue(), err.getvalue()

    return call


def _subprocess(mountpoint: str) -> Callable[[], tuple[int, str, str]]:
    def call() -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "fusedisk", "status", mountpoint, "--json"],
                              capture_output=True, text=True, timeout=30, check=False)
        return done.returncode, done.stdout, done.stderr

    return call


def main(argv: list[str] | None = None) -> int:
    """Poll until signalled; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.statuspoll", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mountpoint")
    parser.add_argument("--interval", type=float, default=0.5, metavar="SECONDS")
    parser.add_argument("--out", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    call = _in_process(args.mountpoint) or _subprocess(args.mountpoint)
    next_due = time.monotonic()
    with open(args.out, "w") as out:
        while not _stop:
            t = time.monotonic()
            record: dict[str, Any] = {"t": t}
            try:
                code, stdout, stderr = call()
                if code == 0:
                    record["status"] = json.loads(stdout)
                else:
                    lines = [line for line in stderr.splitlines() if line.strip()]
                    record["error"] = lines[-1] if lines else f"exit status {code}"
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
            out.flush()
            next_due = max(next_due + args.interval, time.monotonic())
            while not _stop and time.monotonic() < next_due:
                time.sleep(min(0.05, max(0.0, next_due - time.monotonic())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
