"""Scenario ``relocate-remote`` (issue 17): an entry relocated onto remote stores vs locally.

One datastore, four stores: ``near`` (default) and ``near2``, two local
directories of the same file system, ``far`` (``nbd+local://``: the agent and
nbdkit's ``file`` plugin with TLS-PSK on this host, served to the datastore
by a ``fusedisk store-view``) and ``wan`` (the same through nbdkit's
``delay`` filter, 5 ms per read and per write). Entry ``vm`` holds a disk of
random data (1 GiB, 256 MiB with ``--quick``), a guest file ``io.img`` and
two small files. Each repetition:

1. fio 4 KiB random writes QD1 O_DIRECT on ``vm/io.img`` while vm is on near;
2. for each destination of near2, far, wan (order reversed every other
   repetition): ``fusedisk migrate MNT vm --to DEST`` (timed, the daemon's
   pause from its ``--json`` line), every file checked against the source's
   SHA-256 in the destination's directory, the same fio job on ``io.img``
   while vm lives there, then ``migrate --to near`` (timed too) and the
   files checked again.

Copy rate = disk + files bytes over the migrate command's wall time; far and
wan are compared with near2 of the same repetition. After the last
repetition the daemon's and the views' descriptors and RSS are read from
/proc. A relocation whose result differs from its source stops the scenario:
no speed is reported for a wrong copy.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import fusedisk_cli
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
from bench.fio import parse_figures
from bench.fusedisk_cli import Migration
from bench.mount import Daemon, serving

NAME = "relocate-remote"
ENTRY = "vm"
DISK = "disk.img"
GUEST_FILE = "io.img"
HOME = "near"
LOCAL, FAR, WAN = "near2", "far", "wan"
DESTS = (LOCAL, FAR, WAN)
WAN_DELAY = "5ms"
MiB = 1 << 20
#: (full run, quick run)
DISK_SIZES = (1 << 30, 256 * MiB)
GUEST_SIZES = (128 * MiB, 32 * MiB)
FIO_RUNTIMES_S = (10, 3)
#: the view of a remote store starts the agent, nbdkit and a TLS handshake first
MOUNT_TIMEOUT_S = 180.0
_MIGRATE_BASE_S = 300.0
_MIN_RATE = 2e6




def _digests(entry_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the entry, by name (the entry is flat)."""
    return {p.name: sha256_of(p) for p in sorted(entry_dir.iterdir()) if p.is_file()}


def _entry_bytes(entry_dir: Path) -> int:
    return sum(p.stat().st_size for p in entry_dir.iterdir() if p.is_file())


def _proc_figures(pid: int) -> dict[str, Any]:
    """Open descriptors, VmRSS and VmHWM (KiB) of a process, None where unreadable."""
    figures: dict[str, Any] = {"pid": pid, "fds": None, "rss_kib": None, "hwm_kib": None}
    try:
        figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                figures["rss_kib"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                figures["hwm_kib"] = int(line.split()[1])
    except OSError:
        pass
    return figures


def view_pids(daemon_pid: int) -> dict[str, int]:
    """The daemon's ``fusedisk store-view`` children, by store name."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != daemon_pid or b"store-view" not in argv:
            continue
        spec = argv[argv.index(b"store-view") + 1].decode(errors="replace")
        found[spec.split("=", 1)[0]] = int(entry)
    return found


def _processes(daemon: Daemon) -> dict[str, int]:
    """The daemon and its views, by what the tables call them."""
    return {"daemon": daemon.pid, **{f"view {n}": p for n, p in view_pids(daemon.pid).items()}}


class _Site:
    """The mount and its store directories."""

    def __init__(self, root: Path, daemon: Daemon, dirs: dict[str, Path]) -> None:
        self.root = root
        self.daemon = daemon
        self.mountpoint = daemon.mountpoint
        self.dirs = dirs

    def entry_dir(self, store: str) -> Path:
        """Where vm's files are in the store's own directory (a remote one's too: it is
        on this host)."""
        return self.dirs[store] / ENTRY

    def placement(self) -> str | None:
        placement = fusedisk_cli.status(self.mountpoint).get("placement") or {}
        where = placement.get(ENTRY)
        return where if isinstance(where, str) else None


def _migrate(context: ScenarioContext, site: _Site, src: str, dest: str, tag: str,
             size: int) -> dict[str, Any]:
    """``fusedisk migrate MNT vm --to DEST``, timed, the result verified file by file."""
    source_dir = site.entry_dir(src)
    digests = _digests(source_dir)
    moved_bytes = _entry_bytes(source_dir)
    for path in source_dir.iterdir():
        evict(path)
    log = context.out / "relocate-remote" / f"{tag}-migrate.log"
    migration = Migration.start(site.mountpoint, ENTRY, dest, log)
    try:
        migration.wait(_MIGRATE_BASE_S + size / _MIN_RATE)
    except BenchError:
        site.daemon.check_alive()
        raise
    finally:
        migration.kill()
    where = site.placement()
    if where != dest:
        raise BenchError(f"{tag}: {migration.command} exited 0 but {ENTRY} is on {where!r}")
    got = _digests(site.entry_dir(dest))
    if got != digests:
        bad = sorted(n for n in set(digests) | set(got) if digests.get(n) != got.get(n))
        raise BenchError(f"{tag}: after {src} → {dest}, {ENTRY}'s files differ from the source: "
                         f"{', '.join(bad)}")
    job = migration.final
    assert job is not None
    memory = {who: _proc_figures(pid)["rss_kib"] for who, pid in _processes(site.daemon).items()}
    return {"from": src, "to": dest, "wall_s": migration.wall_s, "job_elapsed_s": job.elapsed_s,
            "bytes": moved_bytes, "mbps": moved_bytes / migration.wall_s / 1e6,
            "pause_ms": job.pause_ms, "passes": job.pass_no, "state": str(job.state),
            "verified": True, "command": migration.command, "rss_kib_after": memory}


def _guest_io(context: ScenarioContext, site: _Site, store: str, tag: str,
              runtime_s: int, guest_size: int) -> dict[str, Any]:
    """The fio job on vm/io.img through the mount while vm lives on ``store``."""
    file = site.mountpoint / ENTRY / GUEST_FILE
    output = context.out / "relocate-remote" / f"{tag}-fio.json"
    argv = [context.runner.fio, "--name=guest-randwrite", f"--filename={file}",
            f"--size={guest_size}", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=1",
            "--ioengine=psync", f"--runtime={runtime_s}", "--time_based",
            "--output-format=json", f"--output={output}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=runtime_s + 120,
                          check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        site.daemon.check_alive()
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise BenchError(f"{tag}: fio on {file} failed: "
                         f"{lines[-1] if lines else done.returncode}")
    figures = parse_figures(json.loads(output.read_text()))
    say(f"{tag}: fio randwrite 4k QD1 on {store}: {figures.iops:.0f} IOPS, "
        f"p99 {figures.p99_us:.0f} µs")
    return {"store": store, "iops": figures.iops, "p99_us": figures.p99_us,
            "command": " ".join(argv)}


def _specs(root: Path, keys: Path) -> dict[str, str]:
    """Store name → ``--store`` text."""
    delay = (f"&nbdkit-filter=delay&nbdkit-param=delay-write={WAN_DELAY}"
             f"&nbdkit-param=delay-read={WAN_DELAY}")
    return {HOME: str(root / HOME), LOCAL: str(root / LOCAL),
            FAR: f"nbd+local://{root / FAR}?tls-psk={keys}",
            WAN: f"nbd+local://{root / WAN}?tls-psk={keys}{delay}"}


def _make_entry(context: ScenarioContext, site: _Site, size: int, guest_size: int) -> str:
    entry = site.mountpoint / ENTRY
    entry.mkdir()
    (entry / f"{ENTRY}.conf").write_text("# a VM home made by python -m bench\n"
                                          "memory = 4096\ndisk0 = disk.img\n")
    (entry / "nvram.bin").write_bytes(os.urandom(128 * 1024))
    command = context.runner.lay_out(entry / DISK, f"{NAME}-disk", size)
    context.runner.lay_out(entry / GUEST_FILE, f"{NAME}-guest", guest_size)
    if site.placement() != HOME:
        raise BenchError(f"new entry {ENTRY} is on store {site.placement()!r}, not {HOME!r}")
    return command


def relocate_remote(context: ScenarioContext) -> Outcome:
    """Relocation near → near2 / far / wan and back, and guest I/O on each store."""
    quick = 1 if context.quick else 0
    size, guest_size = DISK_SIZES[quick], GUEST_SIZES[quick]
    runtime_s = FIO_RUNTIMES_S[quick]
    reps = context.repetitions(3)
    root = context.work(NAME)
    log = context.daemon_log(NAME)
    (context.out / NAME).mkdir(parents=True, exist_ok=True)
    keys = root / "nbd.psk"
    keys.write_text(f"fusedisk:{secrets.token_hex(32)}\n")
    os.chmod(keys, 0o600)
    dirs = {name: root / name for name in (HOME, *DESTS)}
    for path in (*dirs.values(), root / "state", root / "mnt"):
        path.mkdir()
    specs = _specs(root, keys)
    argv = [sys.executable, "-m", "fusedisk", "mount", "--foreground"]
    for name, text in specs.items():
        argv += ["--store", f"{name}={text}"]
    argv += ["--default-store", HOME, "--state-dir", str(root / "state"), str(root / "mnt")]
    moves: list[dict[str, Any]] = []
    ios: list[dict[str, Any]] = []
    with serving(argv, root / "mnt", log, MOUNT_TIMEOUT_S) as daemon:
        say(f"{NAME}: mounted {root / 'mnt'} (daemon pid {daemon.pid}, views "
            f"{view_pids(daemon.pid)})")
        site = _Site(root, daemon, dirs)
        layout = _make_entry(context, site, size, guest_size)
        for rep in range(reps):
            order = DESTS if rep % 2 == 0 else tuple(reversed(DESTS))
            ios.append({"rep": rep, **_guest_io(context, site, HOME, f"r{rep}-{HOME}",
                                                runtime_s, guest_size)})
            for dest in order:
                there = _migrate(context, site, HOME, dest, f"r{rep}-to-{dest}", size)
                moves.append({"rep": rep, "order": ", ".join(order), **there})
                say(f"{NAME} r{rep}: {HOME} → {dest} {there['bytes'] >> 20} MiB in "
                    f"{there['wall_s']:.2f} s ({there['mbps']:.0f} MB/s), pause "
                    f"{number(there['pause_ms'], 1)} ms, verified")
                if dest != LOCAL:
                    ios.append({"rep": rep, **_guest_io(context, site, dest, f"r{rep}-{dest}",
                                                        runtime_s, guest_size)})
                back = _migrate(context, site, dest, HOME, f"r{rep}-from-{dest}", size)
                moves.append({"rep": rep, "order": ", ".join(order), **back})
                say(f"{NAME} r{rep}: {dest} → {HOME} in {back['wall_s']:.2f} s "
                    f"({back['mbps']:.0f} MB/s), verified")
        after = {who: _proc_figures(pid) for who, pid in _processes(daemon).items()}
    return _outcome(moves, ios, after, reps, size, guest_size, runtime_s, layout, specs)


def _rate(moves: list[dict[str, Any]], src: str, dest: str, rep: int | None = None
          ) -> float | None:
    rates = [m["mbps"] for m in moves if m["from"] == src and m["to"] == dest
             and (rep is None or m["rep"] == rep)]
    return median(rates)


def _outcome(moves: list[dict[str, Any]], ios: list[dict[str, Any]],
             after: dict[str, dict[str, Any]], reps: int, size: int, guest_size: int,
             runtime_s: int, layout: str, specs: dict[str, str]) -> Outcome:
    summary: dict[str, Any] = {"reps": reps, "disk_bytes": size, "guest_file_bytes": guest_size,
                               "fio_runtime_s": runtime_s, "after": after}
    table = [["relocation", "MB/s (median)", "× near→near2", "pause ms (median)",
              "wall s (median)"]]
    for src, dest in [(HOME, d) for d in DESTS] + [(d, HOME) for d in DESTS]:
        chosen = [m for m in moves if m["from"] == src and m["to"] == dest]
        rate = median([m["mbps"] for m in chosen])
        local = _rate(moves, HOME, LOCAL) if src == HOME else _rate(moves, LOCAL, HOME)
        pause = median([m["pause_ms"] for m in chosen if m["pause_ms"] is not None])
        key = f"{src}_to_{dest}"
        summary[f"{key}_mbps"] = rate
        summary[f"{key}_pause_ms"] = pause
        table.append([f"{src} → {dest}", number(rate, 0),
                      number(rate / local if rate and local else None, 3),
                      number(pause, 1), number(median([m["wall_s"] for m in chosen]), 2)])
    # the ratios: per repetition against the local copy of the same repetition
    for dest in (FAR, WAN):
        ratios = []
        for rep in range(reps):
            local, remote_rate = _rate(moves, HOME, LOCAL, rep), _rate(moves, HOME, dest, rep)
            if local and remote_rate:
                ratios.append(remote_rate / local)
        summary[f"{dest}_vs_local"] = median(ratios)
    io_table = [["guest store", "IOPS (median)", "× near", "clat p99 µs (median)", "× near"]]
    near_iops = median([r["iops"] for r in ios if r["store"] == HOME])
    near_p99 = median([r["p99_us"] for r in ios if r["store"] == HOME])
    for store in (HOME, FAR, WAN):
        iops = median([r["iops"] for r in ios if r["store"] == store])
        p99 = median([r["p99_us"] for r in ios if r["store"] == store])
        summary[f"io_{store}_iops"] = iops
        summary[f"io_{store}_p99_us"] = p99
        summary[f"io_{store}_iops_vs_near"] = iops / near_iops if iops and near_iops else None
        summary[f"io_{store}_p99_vs_near"] = p99 / near_p99 if p99 and near_p99 else None
        io_table.append([store, number(iops, 0), number(summary[f"io_{store}_iops_vs_near"], 3),
                         number(p99, 0), number(summary[f"io_{store}_p99_vs_near"], 2)])
    proc_table = [["process", "pid", "fds", "RSS MiB", "peak RSS MiB",
                   "RSS MiB after the first relocation"]]
    first = moves[0]["rss_kib_after"] if moves else {}
    for who, fig in after.items():
        fig["rss_kib_after_first_relocation"] = first.get(who)
        proc_table.append([who, str(fig["pid"]), number(fig["fds"]),
                           number(None if fig["rss_kib"] is None else fig["rss_kib"] / 1024, 1),
                           number(None if fig["hwm_kib"] is None else fig["hwm_kib"] / 1024, 1),
                           number(None if first.get(who) is None else first[who] / 1024, 1)])
    ratio = summary[f"{FAR}_vs_local"]
    fio_command = next((r["command"] for r in ios), "")
    return Outcome(
        caption=(f"{NAME}: entry {ENTRY} ({size >> 20} MiB disk of random data, a "
                 f"{guest_size >> 20} MiB guest file, two small files) relocated from local "
                 f"store {HOME} to {LOCAL} (same file system), {FAR} (nbd+local, TLS-PSK) and "
                 f"{WAN} (the same with nbdkit's delay filter, {WAN_DELAY} per read and write) "
                 f"and back, median of {reps}; fio 4k random writes QD1 on each"),
        summary=summary, table=table,
        extra_tables={"guest I/O (fio randwrite 4k QD1 O_DIRECT)": io_table,
                      "daemon and views after the last relocation": proc_table},
        targets=[target_check(f"relocation rate {HOME}→{FAR} / {HOME}→{LOCAL}", ratio, "≥ 0.8",
                              None if ratio is None else ratio >= 0.8, 17)],
        runs=[*({"kind": "relocation", **m} for m in moves),
              *({"kind": "fio", **r} for r in ios)],
        commands=[*(f"--store {name}={text}" for name, text in specs.items()), layout,
                  f"fusedisk migrate MNT {ENTRY} --to DEST --json", fio_command],
        notes=["MB/s = bytes of all of the entry's files over the wall time of fusedisk "
               "migrate (1e6 bytes/s); every file is checked against the source's SHA-256 in "
               "the destination's directory after each relocation; sources are evicted from "
               "the page cache before each; ratios compare with near→near2 of the same "
               "repetition; pause = the daemon's pause_ms of the job.",
               "the remote stores are on this host: agent, nbdkit (TLS) and the store view "
               "share the 2 cores with the daemon."],
    )
