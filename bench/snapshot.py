"""Scenario ``snapshot``: what one live snapshot costs the guest, and how fast a
snapshot reads over NBD (issue 15).

Two mounts, each with one entry ``vm1`` holding the fio test file: one whose
store is a loop-mounted XFS (snapshots are reflink clones), one whose store
is the scratch directory's filesystem (ext4 on the test machines: snapshots
are copy-before-write). On each, the 4 KiB random-write QD1 O_DIRECT job
runs with no snapshot and with one snapshot made just before the run (a
fresh one each repetition, so copy-before-write meets unsaved blocks as a
guest after a backup's snapshot does), alternating which goes first; medians
and the ratio snapshot/none per path.

NBD: on the XFS mount, ``fusedisk export MNT vm1/bench.dat@SNAP`` served to
``nbdcopy URI null:`` vs ``dd`` of the store file, both after
``POSIX_FADV_DONTNEED`` of the files read (cold, without dropping every
cache of the machine), alternating; medians of MB/s. A copy-before-write
snapshot is not exportable yet (the export reads store files; see README).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.context import (
    Outcome,
    RunRecord,
    ScenarioContext,
    Target,
    measure,
    median,
    number,
    say,
)
from bench.errors import BenchError
from bench.jobs import select_jobs
from bench.mount import mounted

JOB = "randwrite-4k-qd1"
NONE, SNAP = "no-snapshot", "one-snapshot"
XFS_IMAGE_SLACK = 256 << 20
TIMEOUT_S = 600


def _run(argv: list[str], timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                            check=False)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def _fusedisk(*args: str) -> dict[str, Any]:
    out = json.loads(_run([sys.executable, "-m", "fusedisk", *args, "--json"]).stdout)
    assert isinstance(out, dict)
    return out


@contextmanager
def _xfs(root: Path, size: int) -> Iterator[Path]:
    """A loop-mounted XFS with reflinks at ``root/xfs``."""
    for tool in ("mkfs.xfs", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH (the reflink path needs an XFS store)")
    image, path = root / "xfs.img", root / "xfs"
    path.mkdir()
    with open(image, "wb") as f:
        f.truncate(size + XFS_IMAGE_SLACK)
    _run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)])
    loop = _run(["losetup", "-f", "--show", str(image)]).stdout.strip()
    try:
        _run(["mount", loop, str(path)])
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        image.unlink(missing_ok=True)


@contextmanager
def _mount(context: ScenarioContext, label: str, xfs: bool) -> Iterator[tuple[Path, Path, Any]]:
    """(mountpoint, store, daemon) of a fresh mount on an XFS or a scratch store."""
    root = context.work(f"snapshot-{label}")
    for name in ("state", "mnt"):
        (root / name).mkdir()
    with (_xfs(root, context.size) if xfs else _scratch_store(root)) as store:
        with mounted(root / "mnt", {"a": store}, "a", root / "state",
                     root / "daemon.log") as daemon:
            (root / "mnt" / "vm1").mkdir()
            yield root / "mnt", store, daemon


@contextmanager
def _scratch_store(root: Path) -> Iterator[Path]:
    path = root / "store"
    path.mkdir()
    yield path


def _fstype(path: Path) -> str:
    return _run(["stat", "-f", "-c", "%T", str(path)]).stdout.strip()


def _cold(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _nbd_vs_dd(mnt: Path, store: Path, snap: dict[str, Any], scratch: Path,
               reps: int) -> dict[str, Any]:
    """MB/s of nbdcopy from the snapshot's export and of dd of the store file, alternating."""
    for tool in ("nbdcopy", "dd"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH")
    store_file = store / "vm1" / "bench.dat"
    snap_file = Path(snap["path"]) / "tree" / "bench.dat"
    size = store_file.stat().st_size
    sock = scratch / "snapshot-export.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fusedisk", "export", str(mnt),
                             f"vm1/bench.dat@{snap['name']}", "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rates: dict[str, list[float]] = {"nbd": [], "dd": []}
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri:
            raise BenchError(f"fusedisk export did not start: {proc.communicate()[1]}")
        for rep in range(reps):
            for kind in (("nbd", "dd") if rep % 2 == 0 else ("dd", "nbd")):
                _cold(snap_file)
                _cold(store_file)
                argv = (["nbdcopy", uri, "null:"] if kind == "nbd" else
                        ["dd", f"if={store_file}", "of=/dev/null", "bs=1M", "status=none"])
                started = time.monotonic()
                _run(argv)
                rates[kind].append(size / (time.monotonic() - started) / 1e6)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    nbd_mbps, dd_mbps = median(rates["nbd"]), median(rates["dd"])
    return {"bytes": size, "nbd_mbps": nbd_mbps, "dd_mbps": dd_mbps,
            "nbd_runs": rates["nbd"], "dd_runs": rates["dd"],
            "nbd_over_dd": nbd_mbps / dd_mbps if nbd_mbps and dd_mbps else None,
            "commands": [f"fusedisk export {mnt} vm1/bench.dat@{snap['name']} --socket {sock}",
                         "nbdcopy URI null:", f"dd if={store_file} of=/dev/null bs=1M"]}


def snapshot(context: ScenarioContext) -> Outcome:
    """Random-write IOPS with one live snapshot vs none, both paths; NBD vs dd."""
    reps = context.repetitions(3)
    job = select_jobs([JOB])[0]
    records: list[RunRecord] = []
    summary: dict[str, Any] = {"reps": reps, "paths": {}}
    rows = [["path", "store fs", "IOPS none", "IOPS one snapshot", "snapshot/none",
             "p99 none µs", "p99 snapshot µs", "saved by CBW MiB (median)"]]
    commands: list[str] = []
    nbd: dict[str, Any] | None = None
    for label, xfs in (("reflink", True), ("cbw", False)):
        with _mount(context, label, xfs) as (mnt, store, daemon):
            fs = _fstype(store)
            file = mnt / "vm1" / "bench.dat"
            say(f"snapshot/{label}: laying out {context.size >> 20} MiB at {file} ({fs})")
            commands.append(context.runner.lay_out(file, f"snapshot-{label}"))
            targets = {NONE: Target(f"{label}-{NONE}", file, daemon),
                       SNAP: Target(f"{label}-{SNAP}", file, daemon)}
            saved: list[float] = []
            for rep in range(reps):
                for side in ((NONE, SNAP) if rep % 2 == 0 else (SNAP, NONE)):
                    name = f"r{rep}"
                    if side == SNAP:
                        snap = _fusedisk("snapshot", "create", str(mnt), "vm1", "--name", name)
                        method = snap["files"]["bench.dat"]["method"]
                        if method != label:
                            raise BenchError(f"snapshot on {fs} is {method}, not {label}")
                    records.append(measure("snapshot", job, targets[side], rep,
                                           context.runner))
                    if side == SNAP:
                        listed = {s["name"]: s for s in json.loads(_run(
                            [sys.executable, "-m", "fusedisk", "snapshot", "list", str(mnt),
                             "vm1", "--json"]).stdout)}
                        saved.append(listed[name]["saved_bytes"] / (1 << 20))
                        if xfs and nbd is None:
                            say("snapshot/reflink: NBD export of the snapshot vs dd")
                            nbd = _nbd_vs_dd(mnt, store, snap, context.scratch, max(reps, 3))
                        _run([sys.executable, "-m", "fusedisk", "snapshot", "delete",
                              str(mnt), "vm1", name])
        iops: dict[str, float | None] = {}
        p99: dict[str, float | None] = {}
        for side in (NONE, SNAP):
            runs = [r for r in records if r.target == f"{label}-{side}"]
            iops[side] = median([r.figures.iops for r in runs])
            p99[side] = median([r.figures.p99_us for r in runs])
            summary["paths"].setdefault(label, {})[side] = {
                "iops": iops[side], "p99_us": p99[side], "runs": [r.figures.iops for r in runs]}
        none_iops, snap_iops = iops[NONE], iops[SNAP]
        ratio = snap_iops / none_iops if snap_iops is not None and none_iops else None
        summary["paths"][label].update(store_fs=fs, ratio_snapshot_none=ratio,
                                       cbw_saved_mib=median(saved))
        rows.append([label, fs, number(none_iops), number(snap_iops), number(ratio, 3),
                     number(p99[NONE]), number(p99[SNAP]), number(median(saved), 1)])
    commands += sorted({r.command for r in records})
    extra: dict[str, list[list[str]]] = {}
    if nbd is not None:
        summary["nbd"] = nbd
        commands += nbd["commands"]
        extra["NBD read of a reflink snapshot vs dd of the store file (cold, MB/s)"] = [
            ["bytes", "nbdcopy MB/s", "dd MB/s", "nbd/dd"],
            [str(nbd["bytes"]), number(nbd["nbd_mbps"], 1), number(nbd["dd_mbps"], 1),
             number(nbd["nbd_over_dd"], 3)]]
    return Outcome(
        caption=(f"snapshot: medians of {reps} rep(s), alternating; {context.size >> 20} MiB "
                 f"file, {context.runtime_s} s per job; a fresh snapshot before each "
                 "snapshot run"),
        summary=summary, table=rows, extra_tables=extra, targets=[], records=records,
        commands=commands,
        notes=["copy-before-write saves each 64 KiB block once, on its first change after "
               "the snapshot; the ratio depends on how many of the run's writes are firsts "
               "(the file size over the block size bounds them)."],
    )
