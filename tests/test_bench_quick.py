"""End to end: ``python -m bench --quick`` against a real mount yields complete, sane results.

Checks completeness and sanity only, never speed: every job has raw and mount
figures, ratios are finite, charts are PNGs, the report names every job, and
no mount is left behind.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT_S = 240
CLEANUP_TIMEOUT_S = 60
CHARTS = ("idle-mbps.png", "idle-iops.png", "idle-ratio.png")


def _mounts_under(root: Path) -> list[str]:
    """Mountpoints at or below ``root``, read from the mount table without touching them."""
    prefix = os.path.realpath(root) + "/"
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4] for line in table]
    return [point for point in points if point.startswith(prefix)]


def _run_bench(out: Path, store_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the quick benchmark; on timeout, SIGTERM it so it cleans up, then fail."""
    argv = [sys.executable, "-m", "bench", "--quick", "--out", str(out),
            "--store-dir", str(store_dir)]
    with subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()
            _, stderr = process.communicate(timeout=CLEANUP_TIMEOUT_S)
            pytest.fail(f"bench --quick did not finish in {RUN_TIMEOUT_S} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _assert_positive_figures(side: dict[str, Any] | None, where: str) -> None:
    assert side is not None, f"{where}: missing"
    for name in ("mbps", "iops", "p99_us"):
        value = side[name]
        assert math.isfinite(value) and value > 0, f"{where}: {name} = {value}"


@pytest.mark.mount
@pytest.mark.timeout(RUN_TIMEOUT_S + CLEANUP_TIMEOUT_S + 60)
def test_quick_benchmark_results_are_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store_dir = tmp_path / "stores"
    store_dir.mkdir()
    try:
        done = _run_bench(out, store_dir)
    finally:
        leftovers = _mounts_under(store_dir)
        for mountpoint in leftovers:
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True, check=False)
    assert not leftovers, f"bench left mounts behind: {leftovers}"
    assert done.returncode == 0, f"bench failed:\n{done.stderr[-3000:]}"

    job_names = sorted(path.stem for path in (REPO_ROOT / "bench" / "jobs").glob("*.fio"))
    assert job_names
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "quick"
    assert results["raw_only"] is False
    assert results["backing_mode"]
    assert sorted(results["jobs"]) == job_names
    for key in ("cpu_model", "cpu_count", "kernel", "fio", "filesystems"):
        assert results["machine"][key], f"machine info lacks {key}"

    summary = results["scenarios"]["idle"]["summary"]
    assert sorted(summary) == job_names
    for job in job_names:
        entry = summary[job]
        _assert_positive_figures(entry["raw"], f"{job} raw")
        _assert_positive_figures(entry["mount"], f"{job} mount")
        cpu_s = entry["mount"]["daemon_cpu_s"]
        assert math.isfinite(cpu_s) and cpu_s >= 0, f"{job}: daemon CPU {cpu_s}"
        for name, ratio in entry["ratio"].items():
            assert ratio is not None and math.isfinite(ratio) and ratio > 0, f"{job} {name}"
        for target in ("raw", "mount"):
            command = results["fio_commands"][job][target]
            assert f"{job}.fio" in command and "--output-format=json" in command

    for chart in CHARTS:
        assert (out / chart).read_bytes().startswith(PNG_MAGIC), chart
    report = (out / "report.md").read_text()
    missing = [job for job in job_names if job not in report]
    assert not missing, f"report.md lacks {missing}"
    assert not (out / "latest.json").exists(), "a quick run must not replace latest.*"
