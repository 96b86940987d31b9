"""End to end: ``python -m bench --quick`` against real mounts yields complete, sane results.

One quick run of every scenario (the relocation ones only when this fusedisk
has ``migrate``) is shared by the tests below. They check completeness and
sanity only, never speed: every figure is there and finite, charts are PNGs,
the report names every job and scenario, and no mount is left behind (nor a
QEMU of the guest scenarios). The switchover probe is also tested on its own
(CLI, signals, error samples).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import cli as bench_cli
from bench import fusedisk_cli, probe
from bench.scenarios import SCENARIOS
from fusedisk import mountinfo

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# every scenario in quick mode (idle on three targets, two QEMU guests, relocate-remote's
# 288 MiB through a 5 ms-per-request WAN stand-in and back: about 90 s of it)
RUN_TIMEOUT_S = 780
CLEANUP_TIMEOUT_S = 60
TEST_TIMEOUT_S = RUN_TIMEOUT_S + CLEANUP_TIMEOUT_S + 60
IDLE_CHARTS = ("idle-mbps.png", "idle-iops.png", "idle-ratio.png")
SCENARIO_CHARTS = {"cbt": "cbt.png", "relocate-busy": "relocate-busy.png",
                   "relocate-outrun": "relocate-outrun.png",
                   "switchover-pause": "switchover-pause.png",
                   "guest-switchover": "guest-switchover.png"}
DAEMON_LOG_BUGS = ("Traceback", " ERROR ", " CRITICAL ")
#: a comma-separated subset of the scenarios for a targeted run (default: all of them);
#: the tests of the others skip
ONLY_ENV = "FUSEDISK_BENCH_QUICK_SCENARIOS"


def _mounts_under(root: Path) -> list[str]:
    """Mountpoints at or below ``root``, read from the mount table without touching them."""
    return [str(point) for point in mountinfo.mounts_under(root)]


def _run_bench(args: list[str], store_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run the benchmark; on timeout, SIGTERM it so it cleans up, then fail."""
    argv = [sys.executable, "-m", "bench", *args, "--store-dir", str(store_dir)]
    try:
        with subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as process:
            try:
                stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                _, stderr = process.communicate(timeout=CLEANUP_TIMEOUT_S)
                pytest.fail(f"bench did not finish in {RUN_TIMEOUT_S} s:\n{stderr[-3000:]}")
    finally:
        leftovers = _mounts_under(store_dir)
        for mountpoint in leftovers:
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True, check=False)
    assert not leftovers, f"bench left mounts behind: {leftovers}"
    assert not list(store_dir.iterdir()), "bench left its scratch directory behind"
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@dataclass(frozen=True)
class QuickRun:
    out: Path
    scenarios: list[str]
    done: subprocess.CompletedProcess[str]
    elapsed_s: float

    @property
    def results(self) -> dict[str, Any]:
        return dict(json.loads((self.out / "results.json").read_text()))

    def scenario(self, name: str) -> dict[str, Any]:
        if name not in self.scenarios:
            pytest.skip(f"{name} not among {ONLY_ENV}")
        data: dict[str, Any] = self.results["scenarios"][name]
        assert "error" not in data, f"{name} failed: {data['error']}"
        return data


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickRun]:
    """One ``--quick`` run of every scenario this fusedisk supports."""
    root = tmp_path_factory.mktemp("bench")
    out, store_dir = root / "out", root / "stores"
    store_dir.mkdir()
    only = [name for name in os.environ.get(ONLY_ENV, "").split(",") if name]
    unknown = sorted(set(only) - set(SCENARIOS))
    assert not unknown, f"{ONLY_ENV} names unknown scenarios: {unknown}"
    scenarios = [name for name in SCENARIOS if not only or name in only]
    started = time.monotonic()
    done = _run_bench(["--quick", "--out", str(out), "--scenarios", ",".join(scenarios)],
                      store_dir)
    yield QuickRun(out, scenarios, done, time.monotonic() - started)


def _finite(value: Any, where: str, positive: bool = True) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{where} = {value!r}"
    assert value > 0 if positive else value >= 0, f"{where} = {value!r}"


def _assert_positive_figures(side: dict[str, Any] | None, where: str) -> None:
    assert side is not None, f"{where}: missing"
    for name in ("mbps", "iops", "p99_us"):
        _finite(side[name], f"{where}: {name}")


def _assert_relocation(summary: dict[str, Any], where: str) -> None:
    _finite(summary["relocation_s"], f"{where} relocation_s")
    assert summary["final_state"] == "done", f"{where}: final state {summary['final_state']}"
    assert isinstance(summary["passes"], int) and summary["passes"] >= 1, where
    _finite(summary["bytes_copied"], f"{where} bytes_copied")
    assert summary["source_removed"] is True, f"{where}: source left on store a"


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_quick_run_succeeds(quick_run: QuickRun) -> None:
    assert quick_run.done.returncode == 0, f"bench failed:\n{quick_run.done.stderr[-3000:]}"
    results = quick_run.results
    assert results["mode"] == "quick"
    assert results["raw_only"] is False
    assert results["backing_mode"]
    assert results["failed"] == {}
    assert list(results["scenarios"]) == quick_run.scenarios
    for key in ("cpu_model", "cpu_count", "kernel", "fio", "filesystems"):
        assert results["machine"][key], f"machine info lacks {key}"
    report = (quick_run.out / "report.md").read_text()
    for name in quick_run.scenarios:
        assert f"## Scenario `{name}`" in report, f"report.md lacks {name}"
        assert name in quick_run.done.stdout, f"terminal output lacks {name}"
    for target in results["targets"]:
        assert target["met"] in (True, False, None), target
    for log in quick_run.out.glob("daemon-*.log"):
        bad = [line for line in log.read_text().splitlines()
               if any(b in line for b in DAEMON_LOG_BUGS)]
        assert not bad, f"{log.name}:\n" + "\n".join(bad[:20])
    assert not (quick_run.out / "latest.json").exists(), "a quick run must not replace latest.*"


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_idle_results_are_complete(quick_run: QuickRun) -> None:
    job_names = sorted(path.stem for path in (REPO_ROOT / "bench" / "jobs").glob("*.fio"))
    assert job_names
    results = quick_run.results
    assert sorted(results["jobs"]) == job_names
    summary = quick_run.scenario("idle")["summary"]
    assert sorted(summary) == job_names
    for job in job_names:
        entry = summary[job]
        _assert_positive_figures(entry["raw"], f"{job} raw")
        for side in ("mount", "peer"):
            _assert_positive_figures(entry[side], f"{job} {side}")
            _finite(entry[side]["daemon_cpu_s"], f"{job}: {side} daemon CPU", positive=False)
            _finite(entry[side]["daemon_cpu_us_per_io"], f"{job}: {side} CPU per I/O",
                    positive=False)
        if results["jobs"][job]["direct"]:
            # every O_DIRECT request reaches the FUSE daemon: CPU > 0 shows it served them
            for side in ("mount", "peer"):
                _finite(entry[side]["daemon_cpu_us_per_io"], f"{job}: {side} CPU per I/O")
        for ratios in ("ratio", "ratio_peer"):
            for name, ratio in entry[ratios].items():
                _finite(ratio, f"{job} {ratios} {name}")
        for target in ("raw", "mount", "peer"):
            command = results["fio_commands"][job][target]
            assert f"{job}.fio" in command and "--output-format=json" in command
            assert f"{job}-{target}-r0.json" in command, command
    assert "/idle-peer/mnt/" in results["fio_commands"][job_names[0]]["peer"]
    for chart in IDLE_CHARTS:
        assert (quick_run.out / chart).read_bytes().startswith(PNG_MAGIC), chart
    report = (quick_run.out / "report.md").read_text()
    missing = [job for job in job_names if job not in report]
    assert not missing, f"report.md lacks {missing}"
    assert "| C peer | mount/raw | mount/peer |" in report
    assert (quick_run.out / "daemon-idle-peer.log").is_file(), "the C peer's log was not kept"
    assert "CPU/IO peer µs" in quick_run.done.stdout


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_cbt_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("cbt")
    jobs = data["summary"]["jobs"]
    assert sorted(jobs) == ["randwrite-4k-qd1", "seqwrite-1m-qd1"]
    for job, entry in jobs.items():
        _assert_positive_figures(entry["cbt-on"], f"{job} CBT on")
        _assert_positive_figures(entry["cbt-off"], f"{job} CBT off")
        _finite(entry["ratio_on_off"], f"{job} on/off")
    memory = data["summary"]["memory"]
    for label in ("cbt-on", "cbt-off"):
        for key in ("rss_after_mount_bytes", "rss_after_writes_bytes", "rss_after_changes_bytes"):
            _finite(memory[label][key], f"{label} {key}")
    on = memory["cbt-on"]
    assert on["extents"] >= 1 and on["changed_bytes"] >= on["writes"] * on["write_bytes"]
    assert len(data["targets"]) == 2
    assert (quick_run.out / SCENARIO_CHARTS["cbt"]).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_relocate_idle_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("relocate-idle")
    for run in data["runs"]:
        _assert_relocation(run, f"rep {run['rep']}")
        _finite(run["cp_s"], "cp_s")
        assert run["cp_sync_s"] >= run["cp_s"]
        assert run["data_intact"] is True
    _finite(data["summary"]["ratio"], "relocation/cp ratio")
    assert any("cp --sparse=always" in c for c in data["commands"])
    assert any(c.startswith("fusedisk migrate ") for c in data["commands"])


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_relocate_busy_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("relocate-busy")
    summary = data["summary"]
    _assert_relocation(summary, "relocate-busy")
    for key in ("idle_iops", "during_iops", "ratio"):
        _finite(summary[key], key)
    series = data["series"]
    assert series["status"], "no status samples during the relocation"
    assert all("t" in point for point in series["status"])
    assert series["iops"] and series["passes"]
    assert (quick_run.out / SCENARIO_CHARTS["relocate-busy"]).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_switchover_pause_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("switchover-pause")
    for run in data["runs"]:
        _assert_relocation(run, f"rep {run['rep']}")
        _finite(run["window_max_ms"], "window max")
        assert run["window_start_s"] <= run["window_end_s"] <= run["relocation_s"] + 1e-3
        assert run["probe_writes"] > 100, "the probe hardly wrote"
        samples = probe.load(Path(run["probe_file"]))["samples"]
        assert len(samples) == run["probe_writes"]
    _finite(data["summary"]["max_stall_ms"], "median max stall")
    assert data["series"]["latency"]
    chart = quick_run.out / SCENARIO_CHARTS["switchover-pause"]
    assert chart.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_relocate_sparse_results_are_complete(quick_run: QuickRun) -> None:
    summary = quick_run.scenario("relocate-sparse")["summary"]
    _assert_relocation(summary, "relocate-sparse")
    assert summary["data_intact"] is True
    _finite(summary["source_allocated_bytes"], "source allocated")
    _finite(summary["dest_allocated_bytes"], "destination allocated")
    assert summary["source_allocated_bytes"] < summary["disk_bytes"], "source is not sparse"


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_relocate_outrun_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("relocate-outrun")
    summary = data["summary"]
    _assert_relocation(summary, "relocate-outrun")
    _finite(summary["writer_mbps_whole_run"], "writer MB/s")
    assert data["series"]["status"]
    chart = quick_run.out / SCENARIO_CHARTS["relocate-outrun"]
    assert chart.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(60)
def test_relocation_without_migrate_fails_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before anything is mounted or measured, whether or not this fusedisk has migrate."""
    monkeypatch.setattr(fusedisk_cli, "has_migrate", lambda: False)
    store_dir = tmp_path / "stores"
    store_dir.mkdir()
    status = bench_cli.main(["--quick", "--out", str(tmp_path / "out"), "--store-dir",
                             str(store_dir), "--scenarios", "idle,relocate-idle"])
    assert status == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: error:"), lines
    assert "migrate" in lines[0] and "relocate-idle" in lines[0] and "--scenarios idle" in lines[0]
    assert not list(store_dir.iterdir())


# ------------------------------------------------------------------ the probe on its own

def _check_probe_document(data: dict[str, Any], path: Path) -> None:
    assert data["file"] == str(path)
    assert data["clock"] == "CLOCK_MONOTONIC"
    samples = data["samples"]
    assert samples and data["writes"] == len(samples)
    starts = [s[0] for s in samples]
    assert starts == sorted(starts)
    assert all(len(s) == 3 and s[1] >= 0 for s in samples)
    assert data["max_latency_s"] == max(s[1] for s in samples)
    assert data["started_monotonic_s"] <= starts[0] <= data["stopped_monotonic_s"]


@pytest.mark.timeout(60)
def test_probe_command_line_stops_on_sigterm(tmp_path: Path) -> None:
    target, out = tmp_path / "probe.img", tmp_path / "probe.json"
    with subprocess.Popen([sys.executable, "-m", "bench.probe", str(target), "--interval-ms", "1",
                           "--out", str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "max latency" in stdout
    data = probe.load(out)
    _check_probe_document(data, target)
    assert data["writes"] > 50 and data["errors"] == 0
    assert target.stat().st_size == probe.BLOCK


@pytest.mark.timeout(60)
def test_probe_records_errors_and_goes_on(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite
    calls = 0

    def flaky_pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls % 10 == 3:
            raise OSError(errno.EIO, "injected")
        if calls % 10 == 6:
            raise OSError(errno.ENOTCONN, "injected")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flaky_pwrite)
    target = tmp_path / "probe.img"
    data = probe.run_probe(target, 0.001, lambda: calls >= 50)
    _check_probe_document(data, target)
    codes = [s[2] for s in data["samples"]]
    assert len(codes) == 50
    assert codes.count(errno.EIO) == 5 and codes.count(errno.ENOTCONN) == 5
    assert codes[-1] == 0, "the probe stopped writing after an error"
    assert data["errors"] == 10 and data["error_codes"] == ["EIO", "ENOTCONN"]
    window = probe.summarise(data["samples"], data["samples"][10][0], data["samples"][19][0])
    assert window["writes"] == 10 and window["errors"] == 2


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_switchover_scale_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("switchover-scale")
    counts = data["summary"]["counts"]
    assert counts == [1, 300]
    assert len(data["table"]) == 1 + len(counts)
    # quick: one round trip a→b→a per size, each committed
    assert [(run["files"], run["to"]) for run in data["runs"]] == [
        (n, to) for n in counts for to in ("b", "a")]
    for size in data["summary"]["sizes"]:
        assert size["error"] is None, size
        _finite(size["create_s"], f"{size['files']} files: create_s")
        assert size["fd_limit"] and size["fd_limit"] > 0, size
    for run in data["runs"]:
        where = f"{run['files']} files → {run['to']}"
        assert run["state"] == "done" and run["error"] is None, run
        _finite(run["pause_ms"], f"{where}: pause")
        _finite(run["wall_s"], f"{where}: wall")
        assert run["attempts"] >= 1 and run["aborted"] == run["attempts"] - 1, run
        assert {"drain", "names", "flush", "commit", "repoint"} <= set(run["steps"]), run
        assert len(run["attempt_steps"]) == run["attempts"], run
        # the verdict says what the pause did to the budget
        budget = data["summary"]["budget_ms"]
        assert run["verdict"] == ("OVERRAN" if run["pause_ms"] > budget else
                                  "held" if run["attempts"] == 1 else
                                  f"held after {run['aborted']} aborted"), run
        # the daemon was sampled before, during and after; the peak bounds both ends
        assert 0 < run["fds_before"] <= run["fds_peak"] and run["fds_after"] <= run["fds_peak"]
        assert 0 < run["rss_before_kib"] <= run["hwm_after_kib"], run
        assert run["rss_after_kib"] <= run["hwm_after_kib"], run
        # the busy disk was written all through the relocation
        assert run["probe_writes"] > 0 and run["probe_max_ms"] is not None, run
    assert data["targets"][0]["met"] in (True, False)


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_relocate_resume_results_are_complete(quick_run: QuickRun) -> None:
    """Each kill -9 landed before the switchover near its share, the next mount
    resumed the job from what the destination kept, and every byte is intact."""
    data = quick_run.scenario("relocate-resume")
    runs = data["runs"]
    assert [run["percent"] for run in runs] == [25, 50, 90]
    for run in runs:
        assert "error" not in run, run
        size = run["disk_bytes"]
        assert run["copied_at_kill"] >= size * run["percent"] // 100, run
        assert run["source_was_truth"] is True, run  # killed before the commit
        assert run["resumed"] is True and run["data_intact"] is True, run
        assert run["files"] == 3, run  # the conf, nvram and the disk, all compared
        _finite(run["resume_wall_s"], "resume wall")
        assert run["within_bound"] == (run["bytes_copied"] <= run["bound"]), run
    # the later the kill, the more the destination kept
    kept = [run["resumed_bytes"] for run in runs]
    assert kept == sorted(kept) and kept[-1] > 0, kept
    assert data["targets"][0]["met"] in (True, False)
    assert data["targets"][1]["met"] is True


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_manyfiles_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("manyfiles")
    assert data["summary"]["fd_limit"] == 1024
    phases = [(run["files"], run["phase"]) for run in data["runs"]]
    assert phases == [(n, p) for n in data["summary"]["counts"]
                      for p in ("create", "lookup-all", "relocate")]
    for run in data["runs"]:
        _finite(run["seconds"], f"{run['phase']}: seconds")
        # the daemon was sampled (fds at both ends at least) and stayed under its limit
        assert 0 < run["max_fds"] < data["summary"]["fd_limit"], run


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_peer_results_are_complete(quick_run: QuickRun) -> None:
    """Every workload measured on raw, fusedisk and the compiled C peer, with ratios."""
    data = quick_run.scenario("peer")
    workloads = data["summary"]["workloads"]
    assert [name.split("-")[0] for name in workloads] == [
        "mixed", "mixed", "sqlite", "create", "tar", "rm"]
    for name, entry in workloads.items():
        for side in ("raw", "fusedisk", "C peer"):
            _finite(entry[side], f"{name} {side}")
        for ratio in ("fusedisk_raw", "fusedisk_peer", "peer_raw"):
            _finite(entry[ratio], f"{name} {ratio}")
        _finite(entry["cpu_fusedisk_s"], f"{name} fusedisk CPU", positive=False)
        _finite(entry["cpu_peer_s"], f"{name} C peer CPU", positive=False)
    assert len(data["table"]) == 1 + len(workloads)
    assert len(data["runs"]) == 3 * len(workloads) * data["summary"]["reps"]
    assert any("passthrough_ll" in command for command in data["commands"])
    assert any("mixed-fsync.fio" in command for command in data["commands"])
    assert len(data["targets"]) == 5
    # the compiled peer lives only in a temporary directory: nothing of it is kept
    assert not list(REPO_ROOT.glob("**/passthrough_ll*"))
    assert not list(quick_run.out.glob("**/passthrough_ll*"))


def _qemu_processes_under(root: Path) -> list[str]:
    """Command lines of running QEMUs whose disk lies under ``root``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv)
        if argv[0].endswith(b"qemu-system-x86_64") and str(root).encode() in line:
            found.append(line.decode(errors="replace"))
    return found


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_guest_switchover_results_are_complete(quick_run: QuickRun) -> None:
    """fusedisk's relocation and QEMU's mirror of the same guest, the gaps of both."""
    data = quick_run.scenario("guest-switchover")
    runs = data["runs"]
    assert sorted(run["side"] for run in runs) == sorted(
        ["fusedisk", "qemu-mirror"] * data["summary"]["reps"])
    for run in runs:
        where = f"{run['side']} rep {run['rep']}"
        for key in ("around_ms", "spanning_ms", "outside_ms", "switch_ms", "relocation_s",
                    "p50_ms", "p99_ms", "boot_s"):
            _finite(run[key], f"{where} {key}")
        assert run["p50_ms"] <= run["p99_ms"] <= run["max_ms"], where
        assert max(run["around_ms"], run["outside_ms"]) <= run["max_ms"], where
        assert run["spanning_ms"] <= run["around_ms"] or run["spanning_ms"] == 1.0, where
        assert run["iterations"] > 100, f"{where}: the guest hardly did I/O"
        start, end = run["window_s"]
        assert 0 <= start <= end <= run["relocation_s"] + 1, where
    ours = next(run for run in runs if run["side"] == "fusedisk")
    assert ours["window_from"] == "daemon log", "the daemon's switchover line was not found"
    _finite(ours["pause_ms"], "fusedisk pause_ms")
    assert set(ours["steps_ms"]) >= {"flush", "commit"}, ours["steps_ms"]
    for side in ("fusedisk", "qemu-mirror"):
        _finite(data["summary"][side]["around_median_ms"], f"{side} median gap")
    assert [t["met"] in (True, False) for t in data["targets"]] == [True, True]
    assert any("cache=none,aio=io_uring" in command for command in data["commands"])
    assert any("blockdev-mirror" in command for command in data["commands"])
    for side in ("fusedisk", "qemu-mirror"):
        assert data["series"][side]["latency"], f"no chart data for {side}"
    chart = quick_run.out / SCENARIO_CHARTS["guest-switchover"]
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert not _qemu_processes_under(quick_run.out.parent), "a guest outlived the bench"


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_guest_rounds_results_are_complete(quick_run: QuickRun) -> None:
    data = quick_run.scenario("guest-rounds")
    summary = data["summary"]
    for key in ("mount_rounds_per_s", "plain_rounds_per_s", "ratio"):
        _finite(summary[key], key)
    assert len(data["runs"]) == 2 * summary["reps"]
    for run in data["runs"]:
        assert run["rounds"] > 0 and run["flushes"] > 0, run
        if run["side"] == "mount":
            _finite(run["daemon_cpu_s"], "daemon CPU")
    assert data["targets"][0]["met"] in (True, False)
@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_copy_remote_results_are_complete(quick_run: QuickRun) -> None:
    """Every copy (local, remote, nbdcopy, remote through the WAN delay) measured and
    verified, and no nbdkit left behind."""
    data = quick_run.scenario("copy-remote")
    summary = data["summary"]
    for step in ("local", "remote", "nbdcopy", "remote-wan"):
        _finite(summary[f"{step}_mbps"], f"copy-remote {step}")
    _finite(summary["remote_vs_local"], "copy-remote ratio")
    assert len(data["runs"]) == summary["reps"] >= 1
    assert [row[0] for row in data["table"][1:]] == ["local", "remote", "nbdcopy", "remote-wan"]
    assert data["targets"][0]["issue"] == 17
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit()
                and b"copy-remote" in _cmdline(int(pid)) and b"nbdkit" in _cmdline(int(pid))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _processes_mentioning(marker: bytes) -> list[str]:
    """Command lines of running processes that contain ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and pid != str(os.getpid()) and marker in (line := _cmdline(int(pid))):
            found.append(line.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.mark.mount
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_relocate_remote_results_are_complete(quick_run: QuickRun) -> None:
    """Every relocation (near → near2, far, wan and back) ran, was verified and timed; guest
    I/O measured on near, far and wan; the daemon and both views sampled; nothing of the
    remote stores (views, agents, nbdkit) outlived the bench."""
    data = quick_run.scenario("relocate-remote")
    summary = data["summary"]
    moves = [run for run in data["runs"] if run["kind"] == "relocation"]
    ios = [run for run in data["runs"] if run["kind"] == "fio"]
    legs = [("near", d) for d in ("near2", "far", "wan")] + [
        (d, "near") for d in ("near2", "far", "wan")]
    assert sorted((m["from"], m["to"]) for m in moves) == sorted(legs * summary["reps"])
    for move in moves:
        where = f"{move['from']} → {move['to']} rep {move['rep']}"
        assert move["verified"] is True and move["state"] == "done", move
        _finite(move["mbps"], f"{where} MB/s")
        _finite(move["pause_ms"], f"{where} pause")
        # the whole entry moved: disk, guest file and the small files
        assert move["bytes"] > summary["disk_bytes"] + summary["guest_file_bytes"], move
        assert sorted(move["rss_kib_after"]) == ["daemon", "view far", "view wan"], move
    for src, dest in legs:
        _finite(summary[f"{src}_to_{dest}_mbps"], f"{src} → {dest} MB/s")
    for dest in ("far", "wan"):
        _finite(summary[f"{dest}_vs_local"], f"{dest}/local")
    assert sorted(run["store"] for run in ios) == sorted(["near", "far", "wan"] * summary["reps"])
    for store in ("near", "far", "wan"):
        _finite(summary[f"io_{store}_iops"], f"{store} IOPS")
        _finite(summary[f"io_{store}_p99_us"], f"{store} p99")
        _finite(summary[f"io_{store}_iops_vs_near"], f"{store} IOPS ratio")
    assert "--direct=1" in ios[0]["command"] and "--rw=randwrite" in ios[0]["command"]
    assert sorted(summary["after"]) == ["daemon", "view far", "view wan"]
    for who, figures in summary["after"].items():
        _finite(figures["fds"], f"{who} fds")
        _finite(figures["rss_kib"], f"{who} RSS")
    assert data["targets"][0]["issue"] == 17 and data["targets"][0]["met"] in (True, False)
    assert not _processes_mentioning(b"relocate-remote"), "a process of the scenario outlived it"
