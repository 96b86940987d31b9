"""Scenario ``relocate-resume`` (issue 12): kill -9 part way through a copy, remount, resume.

For each of 25, 50 and 90 % (one fresh mount each): ``vm1`` gets a disk of
random data (4 GiB in a full run, 256 MiB with ``--quick``) and small files,
written through the mount; ``fusedisk migrate --no-wait`` starts it towards
store b (the quick run limits the rate, so that the kill lands where it is
meant to on a fast disk). ``fusedisk status --json`` is polled every 0.05 s;
once the job's ``bytes_copied`` reaches the share, the bench sends the
daemon SIGKILL from outside, as a crash would. The dead mount is lifted and
the same stores and state directory are mounted again: the job resumes by
itself. Measured per kill: what was copied when it died, what the resumed
job kept (``resumed_bytes``) and copied (``bytes_copied``), the wall time to
``done``, and whether every byte is intact (SHA-256 of the disk and of the
small files through the mount, against the digests taken before the copy).

The bound the issue sets: the resumed copy is at most what was left at the
kill plus the activity log's window. Here the window is one activity-log
region (the small files and any write the mount logged), what one progress
interval copies at the job's rate (the progress record is saved once per
interval, so up to that much copying is not yet on record at the kill) and
one copy step. ``bytes_copied`` of the resumed job counts every byte it
wrote, re-copies of changed blocks too; nothing writes during this scenario,
so there are none.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from bench import fusedisk_cli
from bench.context import Mounted, Outcome, ScenarioContext, mib, number, say, target_check
from bench.errors import BenchError
from bench.mount import mounted, unmount
from bench.relocation import DEST, DISK, ENTRY, make_entry
from fusedisk import api
from fusedisk.cbt import REGION_SIZE
from fusedisk.relocation import PROGRESS_INTERVAL_S

GIB, MIB = 1 << 30, 1 << 20
PERCENTS = (25, 50, 90)
#: disk size: (full run, quick run)
SIZES = (4 * GIB, 256 * MIB)
#: the quick run's --rate; the full run copies at the disk's speed
QUICK_RATE = 32 * MIB
#: the fastest copy a full run assumes, for the window (one progress interval of it)
FULL_RATE_BOUND = 1 * GIB
COPY_STEP = 1 * MIB
POLL_S = 0.05
TIMEOUT_S = 1800.0


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under *root*, by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(4 * MIB):
                    digest.update(chunk)
            out[str(path.relative_to(root))] = digest.hexdigest()
    return out


def _wait_job(mountpoint: Path, until: Any, what: str, timeout_s: float = TIMEOUT_S
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Poll status until ``until(job, status)``; (that job, that status)."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = fusedisk_cli.status(mountpoint)
        job = fusedisk_cli.job_of(doc, ENTRY)
        if job is not None and until(job, doc):
            return job, doc
        if job is not None and job.get("state") in (api.State.FAILED, api.State.CANCELLED):
            raise BenchError(f"relocation of {ENTRY} {job['state']}: {job.get('error')}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what} (job: {job})")
        time.sleep(POLL_S)


def _one(context: ScenarioContext, percent: int, size: int) -> dict[str, Any]:
    root = context.work(f"resume-{percent}")
    stores = {"a": root / "storeA", "b": root / "storeB"}
    for path in (*stores.values(), root / "state", root / "mnt"):
        path.mkdir()
    mnt, state = root / "mnt", root / "state"
    rate = QUICK_RATE if context.quick else None
    options = ["--rate", str(rate)] if rate else []
    first_log, second_log = context.daemon_log(f"resume-{percent}"), root / "daemon-2.log"
    with mounted(mnt, stores, "a", state, first_log) as daemon:
        mount = Mounted(daemon=daemon, mountpoint=mnt, stores=stores, root=root)
        make_entry(context, mount, size, f"resume-{percent}")
        before = _digests(mnt / ENTRY)
        command = (f"fusedisk migrate {mnt} {ENTRY} --to {DEST} --no-wait"
                   + (f" --rate {rate}" if rate else ""))
        fusedisk_cli.fusedisk("migrate", str(mnt), ENTRY, "--to", DEST, "--no-wait", *options)
        share = size * percent // 100

        def reached(job: dict[str, Any], doc: dict[str, Any]) -> bool:
            # judged from one status document: the job still before its switchover
            return (job.get("state") in api.PRE_SWITCH_STATES
                    and int(job.get("bytes_copied") or 0) >= share)

        job, _ = _wait_job(mnt, reached, f"{percent}% of the copy")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.process.wait(timeout=60)
        copied_at_kill = int(job["bytes_copied"])
        say(f"relocate-resume: killed the daemon at {copied_at_kill / MIB:.1f} MiB "
            f"of {size / MIB:.0f} MiB ({percent}%)")
    unmount(mnt)
    # the kill came before the commit: the source still holds the whole entry
    source_was_truth = (stores["a"] / ENTRY / DISK).exists()
    started = time.monotonic()
    with mounted(mnt, stores, "a", state, second_log) as daemon:
        resumed, _ = _wait_job(mnt, lambda job, doc: job.get("state") == api.State.DONE
                               and (doc.get("placement") or {}).get(ENTRY) == DEST,
                               "the resumed relocation")
        wall_s = time.monotonic() - started
        after = _digests(mnt / ENTRY)
    remaining = max(0, size - copied_at_kill)
    window = REGION_SIZE + int((rate or FULL_RATE_BOUND) * PROGRESS_INTERVAL_S) + COPY_STEP
    copied = int(resumed.get("bytes_copied") or 0)
    return {"percent": percent, "disk_bytes": size, "copied_at_kill": copied_at_kill,
            "remaining": remaining, "resumed": bool(resumed.get("resumed")),
            "resumed_bytes": int(resumed.get("resumed_bytes") or 0), "bytes_copied": copied,
            "bound": remaining + window, "within_bound": copied <= remaining + window,
            "resume_wall_s": wall_s, "data_intact": after == before,
            "source_was_truth": source_was_truth, "files": len(before), "command": command,
            "logs": [str(first_log), str(second_log)]}


def relocate_resume(context: ScenarioContext) -> Outcome:
    size = SIZES[1] if context.quick else SIZES[0]
    runs = []
    for percent in PERCENTS:
        try:
            runs.append(_one(context, percent, size))
        except BenchError as exc:  # one kill that went wrong is a finding, not the end
            say(f"relocate-resume: {percent}%: {exc}")
            runs.append({"percent": percent, "error": str(exc)})
    table = [["killed at", "copied at kill", "left", "resumed kept", "resumed copied",
              "bound (left + window)", "within", "resume s", "data"]]
    for r in runs:
        if "error" in r:
            table.append([f"{r['percent']}%", "—", "—", "—", "—", "—", "FAILED", "—",
                          r["error"]])
            continue
        table.append([f"{r['percent']}%", mib(r["copied_at_kill"]), mib(r["remaining"]),
                      mib(r["resumed_bytes"]), mib(r["bytes_copied"]), mib(r["bound"]),
                      "yes" if r["within_bound"] else "NO", number(r["resume_wall_s"], 1),
                      "intact" if r["data_intact"] else "DIFFERS"])
    good = [r for r in runs if "error" not in r]
    all_within = len(good) == len(runs) and all(r["within_bound"] for r in good)
    all_intact = len(good) == len(runs) and all(r["data_intact"] for r in good)
    return Outcome(
        caption=(f"relocate-resume: kill -9 of the daemon at 25/50/90% of a {size / MIB:,.0f} "
                 "MiB relocation, remount, resume"),
        summary={"disk_bytes": size, "all_within_bound": all_within,
                 "all_data_intact": all_intact},
        table=table,
        targets=[
            target_check("resumed copy ≤ left at the kill + activity-log window, every kill",
                         float(all_within), "all", all_within, 12),
            target_check("every byte intact after the resumed switchover",
                         float(all_intact), "all", all_intact, 12),
        ],
        runs=runs,
        commands=[*sorted({r["command"] for r in good}),
                  "kill -9 <daemon pid> once status shows the share copied; fusedisk mount "
                  "(same stores and state directory)"],
        notes=[f"window = one activity-log region ({REGION_SIZE // MIB} MiB) + one progress "
               f"interval ({PROGRESS_INTERVAL_S:g} s) at "
               f"{'the --rate' if context.quick else 'a 1 GiB/s bound'} + one copy step"],
        error=None if good else "every kill failed",
    )
