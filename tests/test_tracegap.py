"""bench/tracegap.py lines the daemon's trace up with a guest's slow iterations."""

from __future__ import annotations

import json
from pathlib import Path

from bench import tracegap


def test_the_timeline_is_in_ms_from_the_gates_closing(tmp_path: Path) -> None:
    closed_ns = 100_000_000_000
    (tmp_path / "trace.txt").write_text(
        f"{closed_ns - 10**9} write fh=7 off=0 len=4096 took=9.000ms\n"  # long before: left out
        f"{closed_ns} switchover closing the gate\n"
        f"{closed_ns + 1_000_000} write fh=7 off=4096 len=4096 took=4.500ms\n"
        f"{closed_ns + 4_000_000} switchover gate open\n"
        f"{closed_ns + 50_000_000} read fh=7 off=0 len=4096 took=0.010ms\n")  # short, far
    guest = tmp_path / "scratch" / "guest-switchover-fusedisk-r0-guest"
    guest.mkdir(parents=True)
    offset_s = 7.0  # host = guest + 7 s
    start_ns = closed_ns - 7_000_000_000 + 500_000  # 0.5 ms after the gate closed
    lines = [[90.0, "FDPROBE I 1 2 3 4 5 0"],
             [100.003, f"FDPROBE S {start_ns} 5250"],
             [110.0, "FDPROBE SUMMARY mode=gap"]]
    (guest / "lines.json").write_text(json.dumps({"offset_s": offset_s, "lines": lines}))
    out = tracegap.timeline(tmp_path / "scratch", tmp_path / "trace.txt")
    assert out[0] == "== guest-switchover-fusedisk-r0-guest: 1 slow iterations"
    rows = [line.split(None, 2) for line in out[1:]]
    assert [(float(ms), event) for ms, event, _ in rows] == [
        (0.0, "switchover"), (0.5, "GUEST"), (1.0, "write"), (4.0, "switchover")]
    assert rows[1][2] == "iteration of 5.25 ms, to 5.75"
