"""The bench's real QEMU guest (bench/guest.py) on a real fusedisk mount.

QEMU (TCG, cache=none, aio=io_uring) boots Debian's cloud kernel with the
initramfs the bench builds (busybox + the static C probe); the probe's
O_DIRECT I/O on /dev/vda goes through the mount to the store. The tests parse
what the probe printed on the serial console, check the figures are sane, and
read the guest's writes back from the store file itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import guest
from bench.errors import BenchError

from .mounting import MountedDatastore, wait_for

DISK_BYTES = 16 << 20
GAP_ITERATIONS = 300
#: boot (TCG on a loaded 2-core machine) plus the probe's run
GUEST_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def guest_files(tmp_path_factory: pytest.TempPathFactory) -> guest.GuestFiles:
    """The kernel and the initramfs (probe compiled with gcc -static), built once."""
    return guest.prepare(tmp_path_factory.mktemp("guest-build"))


def _disk_on_mount(datastore: MountedDatastore) -> tuple[Path, Path]:
    """(vm1/disk.img on the mount, the same file in store a), DISK_BYTES, sparse."""
    (datastore.mnt / "vm1").mkdir()
    disk = datastore.mnt / "vm1" / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    return disk, datastore.stores["a"] / "vm1" / "disk.img"


def _block(path: Path, offset: int, length: int = 64) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.timeout(GUEST_TIMEOUT_S + 60)
def test_gap_probe_runs_in_the_guest_and_its_writes_reach_the_store(
        datastore: MountedDatastore, guest_files: guest.GuestFiles, tmp_path: Path) -> None:
    disk, on_store = _disk_on_mount(datastore)
    params: dict[str, str | int] = {"mode": "gap", "iterations": GAP_ITERATIONS,
                                    "seconds": 120, "report_ms": 50, "slow_us": 1}
    with guest.Guest(guest_files, disk, tmp_path / "vm", params) as vm:
        boot_s = vm.wait_probe_started(GUEST_TIMEOUT_S)
        lines = vm.wait_end(GUEST_TIMEOUT_S)
        started = vm.started
        process = vm.process
    assert process is not None and process.poll() is not None, "QEMU outlived the guest"
    assert 0 < boot_s < GUEST_TIMEOUT_S
    gap = guest.parse_gap(lines)
    assert (gap.iterations, gap.errors, gap.bad) == (GAP_ITERATIONS, 0, 0), gap
    assert gap.last_seq == GAP_ITERATIONS
    assert 0 < gap.p50_us <= gap.p99_us <= gap.max_us < 30_000_000, gap
    # the intervals are on the host's clock: after QEMU started, before it ended
    assert gap.intervals, "no interval lines"
    last_arrival = lines[-1][0]
    for interval in gap.intervals:
        assert started < interval.start <= interval.end <= last_arrival + 0.5, interval
        assert interval.max_us <= gap.max_us
    assert sum(i.iterations for i in gap.intervals) <= GAP_ITERATIONS
    assert max(i.max_us for i in gap.intervals) <= gap.max_us
    assert [us for us, _ in gap.top] == sorted((us for us, _ in gap.top), reverse=True)
    assert gap.top[0][0] == gap.max_us
    # slow_us 1: every iteration is listed, on the host's clock, and the longest one
    # spanning the whole run is the longest of all
    assert gap.slow_us == 1 and len(gap.slow) == GAP_ITERATIONS
    assert max(us for _, us in gap.slow) == gap.max_us
    assert all(started < at <= last_arrival for at, _ in gap.slow)
    assert gap.spanning_ms(started, last_arrival) == gap.max_us / 1000
    # what the guest wrote is in the store's file: its last gap block and the end marker
    slot = guest_slot_offset(GAP_ITERATIONS)
    assert _block(on_store, slot).startswith(f"FDPROBE-GAP seq={GAP_ITERATIONS}\n".encode())
    assert guest.read_marker(on_store) == f"FDPROBE-DONE mode=gap count={GAP_ITERATIONS}"


def guest_slot_offset(seq: int) -> int:
    """Where the gap probe writes its block number ``seq`` (bench/guest_probe.c)."""
    return (1 << 20) + (seq % 256) * 4096


@pytest.mark.timeout(GUEST_TIMEOUT_S + 60)
def test_rounds_probe_stops_on_q_and_reports_rounds(
        datastore: MountedDatastore, guest_files: guest.GuestFiles, tmp_path: Path) -> None:
    disk, on_store = _disk_on_mount(datastore)
    params: dict[str, str | int] = {"mode": "rounds", "seconds": 600, "report_ms": 100,
                                    "flush_every": 4}
    with guest.Guest(guest_files, disk, tmp_path / "vm", params) as vm:
        vm.wait_probe_started(GUEST_TIMEOUT_S)

        def rounds_done() -> bool:
            return any(text.startswith("FDPROBE R ") and int(text.split()[3]) >= 2
                       for _, text in list(vm.lines))

        wait_for(rounds_done, GUEST_TIMEOUT_S, "two rounds in the guest")
        lines = vm.stop(GUEST_TIMEOUT_S)  # 'q' on the console, long before 600 s
        process = vm.process
    assert process is not None and process.returncode == 0
    rounds = guest.parse_rounds(lines)
    assert rounds.rounds >= 2 and rounds.errors == 0, rounds
    assert rounds.ops == 64 * rounds.rounds
    assert 0 < rounds.seconds < 600 and rounds.rounds_per_s > 0
    # 30 % of the I/Os are writes, a flush every 4 of them
    assert rounds.flushes > 0
    assert 4 * 1024 * rounds.ops <= rounds.bytes <= 64 * 1024 * rounds.ops
    assert guest.read_marker(on_store) == f"FDPROBE-DONE mode=rounds count={rounds.rounds}"
    assert any(text == "FDPROBE END rc=0" for _, text in lines)


def test_clock_offset_takes_the_line_that_waited_least() -> None:
    lines = [(10.0 + 0.003, "FDPROBE I 1000000000 0 5 100 0 0"),
             (10.1 + 0.001, "FDPROBE I 1100000000 1000000000 5 100 0 0"),
             (10.2 + 0.009, "FDPROBE R 1200000000 3"),
             (10.3, "noise FDPROBE I x")]
    assert guest.clock_offset_s(lines) == pytest.approx(9.001)


def test_probe_failure_on_the_console_is_one_clear_error() -> None:
    lines = [(1.0, "FDPROBE START mode=gap dev=/dev/vda bytes=0 t=1"),
             (1.1, "FDPROBE ERROR open /dev/vda: No such device or address"),
             (1.2, "FDPROBE END rc=1")]
    with pytest.raises(BenchError, match="open /dev/vda: No such device"):
        guest.parse_gap(lines)


def test_command_line_rejects_a_missing_disk(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.guest", str(tmp_path / "nope.img")],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 1
    assert done.stderr.strip() == f"bench.guest: {tmp_path / 'nope.img'} is not a file"
    assert "Traceback" not in done.stderr


_ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from bench import guest
files = guest.GuestFiles(Path(sys.argv[1]), Path(sys.argv[2]))
with guest.Guest(files, Path(sys.argv[3]), Path(sys.argv[4]), {"mode": "gap"}) as vm:
    vm.wait_probe_started()
    print(vm.process.pid, flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


@pytest.mark.timeout(GUEST_TIMEOUT_S + 60)
def test_qemu_dies_with_a_killed_bench(guest_files: guest.GuestFiles, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    bench = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(guest_files.kernel),
         str(guest_files.initramfs), str(disk), str(tmp_path / "vm")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    qemu_pid = None
    socket_dir = None
    try:
        assert bench.stdout is not None
        qemu_pid = int(bench.stdout.readline())
        assert not _gone(qemu_pid)
        # the killed bench cannot remove its QMP socket's directory: the test does
        argv = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().decode().split("\0")
        qmp = argv[argv.index("-qmp") + 1]
        socket_dir = Path(qmp.removeprefix("unix:").split(",")[0]).parent
        bench.kill()  # SIGKILL: no finally runs in the bench
        bench.wait(timeout=30)
        wait_for(lambda: _gone(qemu_pid), 30, "QEMU to die with its parent")
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        if qemu_pid is not None and not _gone(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
        if socket_dir is not None and socket_dir.name.startswith("fusedisk-qmp-"):
            shutil.rmtree(socket_dir, ignore_errors=True)
