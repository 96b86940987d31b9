"""Switchover pause probe: a 4 KiB O_DIRECT write every INTERVAL, each one timed.

    python -m bench.probe FILE --interval-ms 1 --out probe.json

Opens FILE (created if missing) with O_DIRECT and writes one 4 KiB block
from a page-aligned (mmap) buffer at a fixed offset every interval until
SIGTERM or SIGINT (or ``--duration``). Every write becomes a sample: its
start time (CLOCK_MONOTONIC seconds, comparable with other processes'
``time.monotonic()``), its latency, and its errno (0 when it succeeded). An
error — EIO, ENOTCONN, anything — is recorded and the probe goes on: a
stall or a failure during a switchover is exactly what it is there to see.

The schedule is fixed-rate without catch-up: after a write that stalled, the
next one starts at once and the probe then returns to its interval, so a
stall shows as one long sample rather than a burst of short ones.

At the end it writes the JSON document (``--out``) and prints the number of
writes and errors and the longest latency with its time.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import signal
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

BLOCK = 4096
#: Sample layout in the JSON document: [start (monotonic s), latency (s), errno (0 = ok)].
SAMPLE_FIELDS = ["start_monotonic_s", "latency_s", "errno"]


def run_probe(path: Path, interval_s: float, should_stop: Callable[[], bool],
              offset: int = 0) -> dict[str, Any]:
    """Write until ``should_stop()`` is true; returns the JSON-ready result document.

    Raises OSError only if FILE cannot be opened (O_DIRECT refused, missing
    directory); errors of the writes themselves are samples.
    """
    if offset % BLOCK:
        raise ValueError(f"offset {offset} is not a multiple of {BLOCK}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o644)
    buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    # Compact columns (20 bytes a sample, ~1.2 MB a minute at 1 ms), lists only at the end.
    starts, latencies, codes = array("d"), array("d"), array("i")
    started_unix, started = time.time(), time.monotonic()
    try:
        buffer.write(b"fusedisk-bench-probe\n".ljust(BLOCK, b"."))
        next_due = started
        sequence = 0
        while not should_stop():
            sequence += 1
            buffer[:8] = sequence.to_bytes(8, "little")
            t0 = time.monotonic()
            try:
                written = os.pwrite(fd, buffer, offset)
                code = 0 if written == BLOCK else errno.EIO
            except OSError as exc:
                code = exc.errno or errno.EIO
            t1 = time.monotonic()
            starts.append(t0)
            latencies.append(t1 - t0)
            codes.append(code)
            next_due = max(next_due + interval_s, t1)
            delay = next_due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        os.close(fd)
        buffer.close()
    stopped = time.monotonic()
    samples = [[round(t, 6), round(latency, 7), code]
               for t, latency, code in zip(starts, latencies, codes, strict=True)]
    return {"file": str(path), "offset": offset, "block_bytes": BLOCK,
            "interval_ms": interval_s * 1000, "clock": "CLOCK_MONOTONIC",
            "started_unix": started_unix, "started_monotonic_s": started,
            "stopped_monotonic_s": stopped, **summarise(samples),
            "sample_fields": SAMPLE_FIELDS, "samples": samples}


def summarise(samples: list[list[float]], start: float | None = None,
              end: float | None = None) -> dict[str, Any]:
    """Writes, errors and the longest latency (with its start time) among the samples
    that start within [start, end] (all when None)."""
    chosen = [s for s in samples
              if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
    errors = [s for s in chosen if s[2]]
    worst = max(chosen, key=lambda s: s[1], default=None)
    return {
        "writes": len(chosen),
        "errors": len(errors),
        "error_codes": sorted({errno.errorcode.get(int(s[2]), str(s[2])) for s in errors}),
        "max_latency_s": worst[1] if worst else None,
        "max_latency_at_s": worst[0] if worst else None,
    }


def load(path: Path) -> dict[str, Any]:
    """Read a probe's JSON document."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _describe(result: dict[str, Any]) -> str:
    text = f"probe: {result['writes']} writes, {result['errors']} errors"
    if result["error_codes"]:
        text += f" ({', '.join(result['error_codes'])})"
    if result["max_latency_s"] is not None:
        at = result["max_latency_at_s"] - result["started_monotonic_s"]
        text += (f"; max latency {result['max_latency_s'] * 1000:.3f} ms at +{at:.3f} s "
                 f"(monotonic {result['max_latency_at_s']:.6f})")
    return text


_stop_requested = False


def _request_stop(_signum: int, _frame: FrameType | None) -> None:
    global _stop_requested
    _stop_requested = True


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 if FILE cannot be opened)."""
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument("--interval-ms", type=float, default=1.0, metavar="MS",
                        help="time between the starts of two writes (default 1)")
    parser.add_argument("--offset", type=int, default=0, metavar="BYTES",
                        help="where to write, a multiple of 4096 (default 0)")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="stop by itself after this long (default: only on a signal)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the JSON document here")
    args = parser.parse_args(argv)
    if args.interval_ms <= 0:
        parser.error("--interval-ms must be positive")
    if args.offset < 0 or args.offset % BLOCK:
        parser.error(f"--offset must be a non-negative multiple of {BLOCK}")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _request_stop)
    deadline = None if args.duration is None else time.monotonic() + args.duration

    def should_stop() -> bool:
        return _stop_requested or (deadline is not None and time.monotonic() >= deadline)

    try:
        result = run_probe(args.file, args.interval_ms / 1000, should_stop, args.offset)
    except OSError as exc:
        print(f"probe: cannot open {args.file} with O_DIRECT: {exc.strerror}", file=sys.stderr)
        return 1
    if args.out is not None:
        args.out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(_describe(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
