"""Scenario ``copy-remote`` (issue 17): a disk file copied to a remote store vs locally.

The "remote host" is this one: ``nbd+local:///DIR`` starts the agent and,
through it, nbdkit's ``file`` plugin with TLS-PSK on 127.0.0.1; the copy is
``fusedisk.remote.copy_file_to`` (libnbd's asynchronous API under trio,
4 connections × 8 requests of 1 MiB, NBD flush at the end). In the same
run, in alternating order, the same file is copied:

- ``local``: 1 MiB ``pread``/``pwrite`` and an ``fsync`` into the same
  file system (the reference of issue 17's target: remote ≥ 0.8 × local);
- ``nbdcopy``: libnbd's own C copier (``--flush``, 4 connections) into the
  same export, a peer that shows what the TLS link itself allows here;
- ``remote-wan``: ``copy_file_to`` through nbdkit's ``delay`` filter
  (5 ms per write), a stand-in for a WAN.

Every source is evicted from the page cache before it is read, every copy
is checked against the source's SHA-256. Relocation onto a remote store is
not built yet (milestones 3-5), so this measures the data path only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import trio

from bench.context import (
    Outcome,
    ScenarioContext,
    evict,
    median,
    number,
    say,
    sha256_of,
    target_check,
)
from bench.errors import BenchError
from fusedisk import remote

MiB = 1 << 20
#: the file's size: (full run, quick run)
SIZES = (1 << 30, 64 << 20)
WAN_DELAY = "5ms"
STEPS = ("local", "remote", "nbdcopy", "remote-wan")




def _local_copy(source: Path, dest: Path) -> float:
    started = time.monotonic()
    src = os.open(source, os.O_RDONLY)
    dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        offset = 0
        while chunk := os.pread(src, MiB, offset):
            os.pwrite(dst, chunk, offset)
            offset += len(chunk)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return time.monotonic() - started


def _nbdcopy(source: Path, store: remote.RemoteStore, export: str) -> float:
    store.agent.call("create", path=export, size=source.stat().st_size, exclusive=False)
    ep = store.endpoint
    uri = (f"nbds://{ep.tls_username}@{ep.host}:{ep.port}/{export}"
           f"?tls-psk-file={ep.tls_psk}")
    started = time.monotonic()
    subprocess.run(["nbdcopy", "--flush", "--connections=4", str(source), uri], check=True,
                   capture_output=True, timeout=3600)
    return time.monotonic() - started


def copy_remote(context: ScenarioContext) -> Outcome:
    size = SIZES[1] if context.quick else SIZES[0]
    reps = context.repetitions(3)
    work = context.work("copy-remote")
    site = work / "remote-store"
    site.mkdir()
    keys = work / "nbd.psk"
    keys.write_text(f"bench:{secrets.token_hex(32)}\n")
    os.chmod(keys, 0o600)
    source = work / "disk0.img"
    with open(source, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    digest = sha256_of(source)
    plain = remote.parse_spec("bench", f"nbd+local://{site}?tls-psk={keys}")
    wan = remote.parse_spec("bench", f"nbd+local://{site}?tls-psk={keys}&nbdkit-filter=delay"
                            f"&nbdkit-param=delay-write={WAN_DELAY}")
    have_nbdcopy = shutil.which("nbdcopy") is not None
    runs: list[dict[str, Any]] = []
    with remote.connect(plain) as store, remote.connect(wan) as slow:
        for rep in range(reps):
            order = STEPS if rep % 2 == 0 else tuple(reversed(STEPS))
            result: dict[str, Any] = {"rep": rep, "order": ", ".join(order)}
            for step in order:
                if step == "nbdcopy" and not have_nbdcopy:
                    continue
                evict(source)
                if step == "local":
                    dest = site / "local.img"
                    seconds = _local_copy(source, dest)
                elif step == "nbdcopy":
                    dest = site / "nbdcopy.img"
                    seconds = _nbdcopy(source, store, dest.name)
                else:
                    dest = site / f"{step}.img"
                    dest.unlink(missing_ok=True)
                    stats = trio.run(_remote_copy, store if step == "remote" else slow,
                                     source, dest.name)
                    seconds = stats.elapsed_s
                if sha256_of(dest) != digest:
                    raise BenchError(f"copy-remote: the {step} copy differs from the source")
                dest.unlink()
                result[f"{step}_s"] = seconds
                result[f"{step}_mbps"] = size / seconds / 1e6
                say(f"copy-remote r{rep}: {step} {size >> 20} MiB in {seconds:.2f} s "
                    f"({size / seconds / 1e6:.0f} MB/s)")
            result["ratio"] = result["local_s"] / result["remote_s"]
            runs.append(result)
        endpoint = str(store.endpoint)
    table = [["copy", "MB/s (median)", "× local"]]
    local_mbps = median([r["local_mbps"] for r in runs])
    summary: dict[str, Any] = {"size_bytes": size, "reps": reps}
    for step in STEPS:
        rate = median([r[f"{step}_mbps"] for r in runs if f"{step}_mbps" in r])
        summary[f"{step}_mbps"] = rate
        share = rate / local_mbps if rate and local_mbps else None
        table.append([step, number(rate, 0), number(share, 2)])
    ratio = median([r["ratio"] for r in runs])
    summary["remote_vs_local"] = ratio
    return Outcome(
        caption=(f"copy-remote: a {size >> 20} MiB file of random data copied to a loopback "
                 f"remote store (nbdkit file plugin, TLS-PSK, at {endpoint}) vs locally, "
                 f"median of {reps}"),
        summary=summary, table=table, runs=runs,
        targets=[target_check("remote copy rate / local copy rate", ratio, "≥ 0.8",
                              None if ratio is None else ratio >= 0.8, 17)],
        commands=["python -m bench --scenarios copy-remote",
                  f"fusedisk.remote.copy_file_to(source, nbd+local://{site}, connections=4, "
                  "depth=8, request_size=1M)",
                  f"nbdcopy --flush --connections=4 {source} nbds://bench@HOST:PORT/EXPORT",
                  f"nbdkit --filter=delay file dir={site} delay-write={WAN_DELAY}"],
        notes=["local: 1 MiB pread/pwrite + fsync on the same file system; every copy is "
               "checked against the source's SHA-256; sources are evicted before each copy.",
               "nbdkit decrypts and writes on the same 2 cores as the client encrypts: "
               "nbdcopy (C, threads) shows what the TLS link allows here."],
    )


async def _remote_copy(store: remote.RemoteStore, source: Path, export: str
                       ) -> remote.CopyStats:
    return await store.copy_file_to(source, export, connections=4, depth=8,
                                    request_size=MiB)
