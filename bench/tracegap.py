"""The daemon's timeline beside the guest's around each switchover of a diagnosis run.

    FUSEDISK_TRACE=/tmp/t.txt python -m bench --scenarios guest-switchover --quick \\
        --keep-scratch --store-dir /tmp/x
    python -m bench.tracegap /tmp/x/fusedisk-bench-*/ /tmp/t.txt

With FUSEDISK_TRACE set, the daemon writes its timeline at exit
(fusedisk/trace.py) and the bench keeps each guest's console lines with their
arrival times (``lines.json`` in the guest's directory). Both are on the host's
CLOCK_MONOTONIC: this prints, for each fusedisk repetition, the daemon's
events from 0.1 s before the gate closed to 0.7 s after (switchover steps,
clean-up, task steps over 0.5 ms, collections, requests over 0.5 ms or near
the pause) and the guest's slow iterations, in ms from the gate's closing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: requests this close to the gate's closing are shown whatever they took
NEAR_MS = 15.0
BEFORE_S, AFTER_S = 0.1, 0.7


def read_trace(path: Path) -> list[tuple[float, str, str]]:
    events = []
    for line in path.read_text().splitlines():
        stamp, event, *detail = line.split(" ", 2)
        events.append((int(stamp) / 1e9, event, detail[0] if detail else ""))
    return events


def _slow_iterations(lines_json: Path) -> tuple[float, float, list[tuple[float, float]]]:
    """(first arrival, last arrival, [(start, ms)]) of a guest's kept console lines."""
    kept = json.loads(lines_json.read_text())
    offset, lines = float(kept["offset_s"]), kept["lines"]
    slow = []
    for _, text in lines:
        parts = text.split()
        if len(parts) == 4 and parts[:2] == ["FDPROBE", "S"]:
            slow.append((int(parts[2]) / 1e9 + offset, int(parts[3]) / 1000))
    return float(lines[0][0]), float(lines[-1][0]), slow


def timeline(scratch: Path, trace: Path) -> list[str]:
    events = read_trace(trace)
    closes = [t for t, e, d in events if e == "switchover" and d == "closing the gate"]
    out: list[str] = []
    for lines_json in sorted(scratch.glob("guest-switchover-fusedisk-r*-guest/lines.json")):
        first, last, slow = _slow_iterations(lines_json)
        out.append(f"== {lines_json.parent.name}: {len(slow)} slow iterations")
        mine = [t for t in closes if first <= t <= last]
        if not mine:
            out.append("   no switchover in the trace")
            continue
        t0 = mine[-1]
        rows = []
        for t, event, detail in events:
            if not t0 - BEFORE_S <= t <= t0 + AFTER_S:
                continue
            if event in ("read", "write", "fsync"):
                took_ms = float(detail.split("took=")[1].removesuffix("ms"))
                if took_ms < 0.5 and abs(t - t0) * 1000 > NEAR_MS:
                    continue
            rows.append((t, event, detail))
        for start, ms in slow:
            if t0 - BEFORE_S <= start <= t0 + AFTER_S:
                rows.append((start, "GUEST", f"iteration of {ms:.2f} ms, to "
                                             f"{(start + ms / 1000 - t0) * 1000:.2f}"))
        out += [f"{(t - t0) * 1000:9.2f} {event:10s} {detail}" for t, event, detail in sorted(rows)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracegap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scratch", type=Path, help="the bench's kept scratch directory")
    parser.add_argument("trace", type=Path, help="the daemon's FUSEDISK_TRACE file")
    args = parser.parse_args(argv)
    print("\n".join(timeline(args.scratch, args.trace)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
