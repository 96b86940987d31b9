"""Scenario ``peer`` (issue 16): real workloads on raw, fusedisk and a C FUSE peer.

Every workload runs on three targets, in rotating order per repetition:

- ``raw``: a directory of the store's filesystem;
- ``fusedisk``: a fresh fusedisk mount (store ``a`` on the same filesystem);
- ``C peer``: libfuse's low-level example ``passthrough_ll.c`` from Debian's
  ``libfuse3-dev`` documentation, compiled by the bench into a temporary
  directory at run time (never kept) and mounted with ``-o source=`` over a
  directory of the same filesystem. Like fusedisk it keeps the backing
  files buffered: ``O_DIRECT`` is taken off its backing opens (a forced
  include wraps ``open``/``openat``; the example's source is not changed), since its
  unaligned request buffers make ``O_DIRECT`` writes fail with EINVAL.

Workloads: fio's mixed job (``bench/mixed/mixed-fsync.fio``: 4 jobs, 70/30
read/write, 4–64 KiB random, QD4, fsync every 32 writes) and the same
without fsync (IOPS, higher is better); sqlite in journal mode (one insert
per transaction), create + 4 KiB write + fsync + close + unlink of many
files, ``tar x`` of many small files and ``rm -rf`` of them (seconds,
lower is better). The daemons' CPU seconds are read from /proc over each run.

:func:`c_peer` (compile, mount, always unmount and remove the binary) is
shared with the ``idle`` scenario, which runs every fio job on the peer too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.context import Outcome, ScenarioContext, median, number, say, target_check
from bench.errors import BenchError
from bench.mount import Daemon, serving

MIXED_DIR = Path(__file__).resolve().parent / "mixed"
PEER_SOURCE_DIR = Path("/usr/share/doc/libfuse3-dev/examples")
PEER_SOURCE = PEER_SOURCE_DIR / "passthrough_ll.c"
#: Forced include: take O_DIRECT off every open()/openat() of the example (the backing
#: stays buffered, like fusedisk's). fcntl.h comes first so its declarations stay as they are.
_PEER_SHIM = """\
#define _GNU_SOURCE
#include <fcntl.h>
#define open(path, flags, ...) open(path, (flags) & ~O_DIRECT, ##__VA_ARGS__)
#define openat(dirfd, path, flags, ...) openat(dirfd, path, (flags) & ~O_DIRECT, ##__VA_ARGS__)
"""

RAW, FUSEDISK, PEER = "raw", "fusedisk", "C peer"
TARGETS = (RAW, FUSEDISK, PEER)

#: (full, quick) sizes of the metadata workloads
SQLITE_TRANSACTIONS = (3000, 30)
SMALL_FILES = (5000, 50)
TAR_FILES = (20_000, 200)
TAR_FILE_BYTES = 2048
TAR_DIR_FILES = 500
#: what issue 16 asks: mixed with fsync ≥ 0.9× raw; metadata ≤ 1.5× the C peer's time
MIXED_FSYNC_TARGET = 0.9
METADATA_PEER_TARGET = 1.5


@dataclass(frozen=True, slots=True)
class Workload:
    """One workload: ``run(directory, tag)`` returns its figure (IOPS or seconds)."""

    name: str
    unit: str
    higher_is_better: bool
    run: Callable[[Path, str], float]
    command: str


def compile_peer(build_dir: Path) -> Path:
    """Compile ``passthrough_ll.c`` into ``build_dir``; returns the binary's path."""
    if not PEER_SOURCE.is_file():
        raise BenchError(f"{PEER_SOURCE} not found (install libfuse3-dev)")
    for tool in ("gcc", "pkg-config"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH (needed to build the C peer)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True, check=False)
    if flags.returncode != 0:
        raise BenchError(f"pkg-config fuse3 failed: {flags.stderr.strip()}")
    shim = build_dir / "peer_shim.h"
    shim.write_text(_PEER_SHIM)
    binary = build_dir / "passthrough_ll"
    argv = ["gcc", "-O2", "-include", str(shim), f"-I{PEER_SOURCE_DIR}", "-o", str(binary),
            str(PEER_SOURCE), *flags.stdout.split()]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise BenchError(f"cannot compile the C peer: {lines[-1] if lines else 'gcc failed'}",
                         detail=done.stderr)
    return binary


@contextmanager
def peer_mounted(binary: Path, source: Path, mountpoint: Path, log: Path) -> Iterator[Daemon]:
    """The C peer serving ``source`` at ``mountpoint`` until the block ends."""
    argv = [str(binary), "-f", "-o", f"source={source}", str(mountpoint)]
    with serving(argv, mountpoint, log, name="C peer (passthrough_ll)") as daemon:
        yield daemon


@dataclass(frozen=True, slots=True)
class CPeer:
    """A mounted C peer: its daemon (CPU time, liveness), its mountpoint and the directory
    of the store's filesystem it serves."""

    daemon: Daemon
    mountpoint: Path
    source: Path


@contextmanager
def c_peer(context: ScenarioContext, label: str) -> Iterator[CPeer]:
    """libfuse's ``passthrough_ll`` compiled into a temporary directory and mounted over
    ``label/src`` of the scratch directory (the stores' filesystem) at ``label/mnt`` until
    the block ends; on every exit path it is unmounted, stopped and its binary removed.

    BenchError (one line) when the example, gcc or fuse3's pkg-config is missing, or the
    mount does not come up.
    """
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as build_dir:
        say(f"{label}: compiling libfuse's passthrough_ll.c")
        binary = compile_peer(Path(build_dir))
        root = context.work(label)
        source, mountpoint = root / "src", root / "mnt"
        source.mkdir()
        mountpoint.mkdir()
        with peer_mounted(binary, source, mountpoint, context.daemon_log(label)) as daemon:
            say(f"{label}: C peer mounted at {mountpoint} (pid {daemon.pid})")
            yield CPeer(daemon=daemon, mountpoint=mountpoint, source=source)


def _fio_workload(context: ScenarioContext, job_name: str) -> Workload:
    job_file = MIXED_DIR / f"{job_name}.fio"

    def run(directory: Path, tag: str) -> float:
        file = directory / "mixed.dat"
        if not file.exists():
            context.runner.lay_out(file, f"peer-{tag}")
        return context.runner.run(job_file, file, f"peer-{job_name}-{tag}").figures.iops

    return Workload(job_name, "IOPS", True, run,
                    f"FILE=DIR/mixed.dat SIZE={context.size} RUNTIME={context.runtime_s} "
                    f"fio --output-format=json bench/mixed/{job_name}.fio")


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run_sqlite(directory: Path, transactions: int) -> float:
    """Seconds for ``transactions`` one-row inserts, each its own transaction, in journal
    (``DELETE``) mode with ``synchronous=FULL``."""
    path = directory / "bench.sqlite"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
        payload = os.urandom(200)

        def commits() -> None:
            for i in range(transactions):
                connection.execute("BEGIN")
                connection.execute("INSERT INTO t VALUES (?, ?)", (i, payload))
                connection.execute("COMMIT")

        seconds = _timed(commits)
        (count,) = connection.execute("SELECT count(*) FROM t").fetchone()
        if count != transactions:
            raise BenchError(f"sqlite on {directory}: {count} rows, not {transactions}")
    finally:
        connection.close()
    for leftover in directory.glob("bench.sqlite*"):
        leftover.unlink()
    return seconds


def run_small_files(directory: Path, files: int) -> float:
    """Seconds for ``files`` rounds of create + 4 KiB write + fsync + close + unlink."""
    block = os.urandom(4096)
    work = directory / "small"
    work.mkdir()

    def rounds() -> None:
        for i in range(files):
            path = work / f"f{i}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if os.write(fd, block) != len(block):
                    raise BenchError(f"short write to {path}")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(path)

    seconds = _timed(rounds)
    work.rmdir()
    return seconds


def build_tarball(path: Path, files: int) -> None:
    """A tar archive of ``files`` small files (``TAR_FILE_BYTES`` each, 500 per directory)."""
    source = path.parent / "tar-source"
    source.mkdir()
    block = os.urandom(TAR_FILE_BYTES)
    for i in range(files):
        directory = source / f"d{i // TAR_DIR_FILES}"
        if i % TAR_DIR_FILES == 0:
            directory.mkdir()
        (directory / f"f{i}").write_bytes(block)
    with tarfile.open(path, "w") as archive:
        archive.add(source, arcname="tree")
    shutil.rmtree(source)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-300:]}")


def _scaled(context: ScenarioContext, sizes: tuple[int, int]) -> int:
    """The quick or full size, times ``--peer-scale``."""
    size = sizes[1] if context.quick else sizes[0]
    return max(1, round(size * (context.peer_scale or 1.0)))


def _metadata_workloads(context: ScenarioContext, tarball: Path) -> list[Workload]:
    transactions, files, tar_files = (
        _scaled(context, sizes) for sizes in (SQLITE_TRANSACTIONS, SMALL_FILES, TAR_FILES))
    extracted: dict[str, Path] = {}

    def tar_x(directory: Path, tag: str) -> float:
        tree = directory / "untar"
        tree.mkdir()
        extracted[tag] = tree
        return _timed(lambda: _run(["tar", "xf", str(tarball), "-C", str(tree)]))

    def rm_rf(directory: Path, tag: str) -> float:
        return _timed(lambda: _run(["rm", "-rf", str(extracted.pop(tag))]))

    return [
        Workload(f"sqlite-{transactions}", "s", False,
                 lambda d, _: run_sqlite(d, transactions),
                 f"python sqlite3: journal_mode=DELETE, synchronous=FULL, {transactions} × "
                 "(BEGIN; INSERT 200 B; COMMIT)"),
        Workload(f"create-fsync-unlink-{files}", "s", False,
                 lambda d, _: run_small_files(d, files),
                 f"{files} × (open O_CREAT|O_EXCL, write 4 KiB, fsync, close, unlink)"),
        Workload(f"tar-x-{tar_files}", "s", False, tar_x,
                 f"tar xf TARBALL -C DIR/untar  ({tar_files} files of {TAR_FILE_BYTES} B, "
                 f"{TAR_DIR_FILES} per directory)"),
        Workload(f"rm-rf-{tar_files}", "s", False, rm_rf, "rm -rf DIR/untar"),
    ]


class _Refused(Exception):
    """A workload not run on a target (why: its message)."""


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def peer(context: ScenarioContext) -> Outcome:
    """Every workload on raw, fusedisk and the C peer; medians, ratios and daemon CPU."""
    reps = context.repetitions(3)
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tarball = context.work("peer-tarball") / "tree.tar"
        tar_files = _scaled(context, TAR_FILES)
        say(f"peer: building a tarball of {tar_files} files")
        build_tarball(tarball, tar_files)
        raw_dir = context.work("peer-raw")
        mount = stack.enter_context(context.mount("peer-fusedisk"))
        peer_stack = ExitStack()
        stack.callback(lambda: peer_stack.close())  # whichever peer runs at the end
        c = peer_stack.enter_context(c_peer(context, "peer-c"))
        restarts = 0
        places: dict[str, tuple[Path, Daemon | None]] = {
            RAW: (raw_dir, None), FUSEDISK: (mount.mountpoint, mount.daemon),
            PEER: (c.mountpoint, c.daemon)}
        workloads = [_fio_workload(context, "mixed-fsync"), _fio_workload(context, "mixed"),
                     *_metadata_workloads(context, tarball)]
        for rep in range(reps):
            order = TARGETS[rep % 3:] + TARGETS[:rep % 3]
            refused: set[str] = set()  # targets whose tar x ran out of descriptors
            for workload in workloads:
                for target in order:
                    directory, daemon = places[target]
                    cpu_before_s = daemon.cpu_time_s() if daemon is not None else 0.0
                    value: float | None = None
                    error = None
                    try:
                        if workload.name.startswith("rm-rf") and target in refused:
                            # it cannot even list the tree it could not finish, and
                            # the kernel keeps those inodes (and its descriptors):
                            # a fresh peer serves what follows
                            peer_stack.close()
                            shutil.rmtree(c.source, ignore_errors=True)
                            restarts += 1
                            peer_stack = ExitStack()
                            c = peer_stack.enter_context(c_peer(context, f"peer-c{restarts}"))
                            places[PEER] = (c.mountpoint, c.daemon)
                            raise _Refused("its tar x failed; the peer was restarted")
                        value = workload.run(directory, target.replace(" ", "-"))
                    except _Refused as e:
                        error, daemon = str(e), None
                    except BenchError as e:
                        # passthrough_ll holds an O_PATH fd for every inode the
                        # kernel knows and has no cap: a big tar x ends in EMFILE
                        # at the fd limit (fusedisk caps its own at a quarter)
                        if target != PEER or "Too many open files" not in str(e):
                            raise
                        error = "EMFILE: passthrough_ll holds an fd per known inode"
                        refused.add(target)
                    cpu_s = daemon.cpu_time_s() - cpu_before_s if daemon is not None else None
                    if daemon is not None:
                        daemon.check_alive()
                    runs.append({"workload": workload.name, "target": target, "rep": rep,
                                 "value": value, "unit": workload.unit, "daemon_cpu_s": cpu_s,
                                 "error": error})
                    cpu_note = "" if cpu_s is None else f"  daemon CPU {cpu_s:.2f} s"
                    shown = f"{value:12.2f} {workload.unit}" if value is not None else error
                    say(f"peer rep {rep + 1} {workload.name:<26} {target:<8} {shown}{cpu_note}")
    return _outcome(workloads, runs, reps)


def _outcome(workloads: list[Workload], runs: list[dict[str, Any]], reps: int) -> Outcome:
    table = [["workload", "unit", "raw", "fusedisk", "C peer", "fusedisk/raw",
              "fusedisk/C peer", "C peer/raw", "CPU fusedisk s", "CPU C peer s"]]
    summary: dict[str, Any] = {"reps": reps, "workloads": {}}
    targets = []
    for workload in workloads:
        medians: dict[str, float | None] = {}
        cpu: dict[str, float | None] = {}
        for target in TARGETS:
            mine = [r for r in runs if r["workload"] == workload.name and r["target"] == target]
            medians[target] = median([r["value"] for r in mine if r["value"] is not None])
            cpu[target] = median([r["daemon_cpu_s"] for r in mine
                                  if r["daemon_cpu_s"] is not None])
        ratios = {"fusedisk_raw": _ratio(medians[FUSEDISK], medians[RAW]),
                  "fusedisk_peer": _ratio(medians[FUSEDISK], medians[PEER]),
                  "peer_raw": _ratio(medians[PEER], medians[RAW])}
        entry: dict[str, Any] = {
            "unit": workload.unit, "higher_is_better": workload.higher_is_better,
            **{target: medians[target] for target in TARGETS},
            **ratios, "cpu_fusedisk_s": cpu[FUSEDISK], "cpu_peer_s": cpu[PEER],
            "command": workload.command,
        }
        summary["workloads"][workload.name] = entry
        digits = 0 if workload.higher_is_better else 2
        table.append([workload.name, workload.unit,
                      *(number(medians[t], digits) for t in TARGETS),
                      *(number(ratio, 2, "×") for ratio in ratios.values()),
                      number(cpu[FUSEDISK], 2), number(cpu[PEER], 2)])
        if workload.name == "mixed-fsync":
            value = ratios["fusedisk_raw"]
            targets.append(target_check("mixed-fsync fusedisk/raw IOPS", value,
                                        f"≥ {MIXED_FSYNC_TARGET}", None if value is None
                                        else value >= MIXED_FSYNC_TARGET, 16))
        elif not workload.higher_is_better:
            value = ratios["fusedisk_peer"]
            targets.append(target_check(f"{workload.name} fusedisk/C peer time", value,
                                        f"≤ {METADATA_PEER_TARGET}", None if value is None
                                        else value <= METADATA_PEER_TARGET, 16))
    return Outcome(
        caption=(f"peer: real workloads on the raw store, fusedisk and libfuse's C "
                 f"passthrough_ll (buffered backing), medians of {reps}; IOPS: higher is "
                 "better, s: lower is better"),
        summary=summary, table=table, runs=runs, targets=targets,
        commands=[w.command for w in workloads] + [
            "gcc -O2 -include peer_shim.h -I/usr/share/doc/libfuse3-dev/examples "
            "passthrough_ll.c $(pkg-config --cflags --libs fuse3)",
            "passthrough_ll -f -o source=SRC MNT"],
        notes=["C peer: passthrough_ll.c as Debian ships it, with O_DIRECT taken off its "
               "backing opens (the same buffered-backing model as fusedisk).",
               "A C peer cell '—' with an error in the runs: passthrough_ll keeps one fd per "
               "inode the kernel knows, so a tar x of more files than its fd limit fails "
               "(EMFILE) there; fusedisk caps its own at a quarter of its limit.",
               "Ratios are of the medians; for s rows a ratio above 1 means slower."],
    )
