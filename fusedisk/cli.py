"""Command line: argv → commands, exit codes, human and ``--json`` output.

Exit codes: 0 success, 1 the command failed (one line on stderr says why),
2 the command line itself is wrong (argparse), 130 interrupted, 141 the
reader of the output went away (``fusedisk status MNT | head -1``: nothing
more is printed, as a command killed by SIGPIPE would be reported).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import __version__, api, control
from .config import (
    MAX_PAUSE_MS,
    MAX_STALL_TIMEOUT_S,
    MIN_PAUSE_MS,
    Config,
    build_config,
    check_directories,
    parse_rate,
)
from .datastore import SNAPSHOT_VIEW_NAME
from .errors import ControlError, FusediskError, MountError
from .sizes import format_size, parse_size

log = logging.getLogger("fusedisk")

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """``<priority>message``: journald reads the priority from the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class _AbandonedReplies(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel refuses a reply with ENOENT: the
    request is no longer waited for. For a RELEASE that is what an unmount does
    to the ones still queued (the kernel has already dropped the file), not an
    error of ours; it is logged at INFO, everything else passes unchanged."""

    _ABANDONED = ("fuse_release(): fuse_reply_* failed with No such file or directory",
                  "fuse_releasedir(): fuse_reply_* failed with No such file or directory")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.getMessage() in self._ABANDONED:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"{record.getMessage()} (an unmount abandoned it)", None
        return True


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    pyfuse3_log = logging.getLogger("pyfuse3")
    pyfuse3_log.setLevel(logging.INFO if debug else logging.WARNING)
    pyfuse3_log.filters[:] = [_AbandonedReplies()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedisk",
        description=(
            "Live storage relocation for VM disks: a FUSE datastore that keeps each "
            "top-level entry (a VM home directory) on one of several backing stores."
        ),
    )
    p.add_argument("--version", action="version", version=f"fusedisk {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser(
        "mount",
        help="mount a datastore",
        description=(
            "Mount a datastore on MOUNTPOINT. Without --foreground this returns once the "
            "filesystem answers, and the daemon runs in the background (its log is "
            f"{control.RUN_DIR}/<id>.log; `fusedisk status` names it)."
        ),
    )
    m.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="where to mount (default: `mountpoint` from --config)")
    m.add_argument("--config", type=Path, help="TOML config file; flags override its keys")
    m.add_argument("--store", action="append", default=[], metavar="NAME=DIR",
                   help="a backing store (repeat for several); NAME=nbd+ssh://[user@]host/DIR "
                   "or NAME=nbd+local:///DIR is a remote store (checked, not served yet)")
    m.add_argument("--default-store", metavar="NAME", help="store that receives new entries")
    m.add_argument("--state-dir", metavar="DIR", help="where placement and CBT state live")
    m.add_argument("--block-size", metavar="SIZE", help="CBT block size, 4K..64M (default 64K)")
    m.add_argument("--allow-other", action="store_true", default=None,
                   help="let users other than root use the mount (e.g. a qemu user)")
    m.add_argument("--no-cbt", action="store_true",
                   help="no changed block tracking (no change ids for backup tools)")
    m.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground and log to stderr (systemd runs it so)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="unmount a datastore and stop its daemon",
                       description="Unmount MOUNTPOINT cleanly and wait for its daemon to exit.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--lazy", action="store_true",
                   help="detach even while files are open (they finish on the old mount)")

    s = sub.add_parser("status", help="show stores, placement and jobs",
                       description="Show the stores (with free space), the placement of "
                       "every entry, and relocation jobs.")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    i = sub.add_parser(
        "install-service", help="install the systemd unit fusedisk@.service",
        description="Install PREFIX/systemd/system/fusedisk@.service (running this fusedisk "
        "executable) and PREFIX/fusedisk/example.toml.sample; reload systemd if it runs.",
    )
    i.add_argument("--prefix", type=Path, default=Path("/etc"),
                   help="configuration root (default /etc)")

    c = sub.add_parser(
        "cleanup", help="detach a datastore mount whose daemon died",
        description="Detach the mount on MOUNTPOINT (or the config file's mountpoint) if it "
        "is a fusedisk mount whose daemon is gone; otherwise do nothing. The systemd unit "
        "runs it after the daemon exits.",
    )
    c.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    c.add_argument("--config", type=Path, help="TOML config file naming the mountpoint")

    mg = sub.add_parser(
        "migrate", help="relocate an entry (a VM home) to another store, live",
        description="Copy ENTRY to store STORE while it stays in use, then switch it over "
        "atomically: the path never changes. Waits and shows progress unless --no-wait; "
        "Ctrl-C only detaches (the relocation goes on).",
    )
    mg.add_argument("mountpoint", metavar="MOUNTPOINT")
    mg.add_argument("entry", metavar="ENTRY", help="a top-level entry of the datastore")
    mg.add_argument("--to", required=True, metavar="STORE", help="the destination store")
    mg.add_argument("--rate", metavar="SIZE/s", default="0",
                    help="copy rate limit, e.g. 200M (default: unlimited); change it later "
                    "with `fusedisk rate`")
    mg.add_argument("--max-pause", type=int, default=api.DEFAULT_MAX_PAUSE_MS, metavar="MS",
                    help=f"pause budget of the switchover in ms (default "
                    f"{api.DEFAULT_MAX_PAUSE_MS})")
    mg.add_argument("--mode", choices=[m.value for m in api.Mode], default=api.DEFAULT_MODE,
                    help="auto: pre-copy, then mirror writes if the VM outruns the copy "
                    "(default); precopy: never mirror; mirror: mirror from the start")
    mg.add_argument("--keep-source", action="store_true",
                    help="keep the old copy on the source store (as .fusedisk-kept-ENTRY)")
    mg.add_argument("--stall-timeout", type=int, default=0, metavar="S",
                    help="fail the relocation after S seconds without progress (default: "
                    "never; paused time does not count)")
    mg.add_argument("--restart", action="store_true",
                    help="copy everything again: cancel a running (e.g. resumed) relocation "
                    "of ENTRY and start a fresh one")
    mg.add_argument("--no-wait", action="store_true", help="return once the relocation started")
    mg.add_argument("--json", action="store_true", help="print only the final job as JSON")
    for verb, text in (("pause", "pause a relocation's copy"),
                         ("resume", "resume a paused relocation"),
                         ("cancel", "cancel a relocation (before its commit)")):
        a = sub.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument("mountpoint", metavar="MOUNTPOINT")
        a.add_argument("entry", metavar="ENTRY")
    r = sub.add_parser("rate", help="change a running relocation's copy rate limit")
    r.add_argument("mountpoint", metavar="MOUNTPOINT")
    r.add_argument("entry", metavar="ENTRY")
    r.add_argument("rate", metavar="SIZE/s", help="e.g. 100M, or 0 for unlimited")

    sn = sub.add_parser(
        "snapshot", help="point-in-time snapshots of an entry (every file at one instant)",
        description="A snapshot holds every file of ENTRY as it was at one instant (one "
        "pause of the entry's writes, so a VM's disks are consistent with each other), each "
        "paired with a new CBT change id. On XFS or btrfs files are cloned (reflinks); on "
        "other stores (ext4) each block is copied into the snapshot before the guest first "
        "changes it (copy-before-write; a crash at the wrong moment makes such a snapshot "
        "'lost', never wrong). Snapshots live on the store, under .fusedisk-snapshots; "
        "`list` shows their state and space; reflink ones are exported with "
        "`fusedisk export MNT ENTRY/FILE@NAME`.",
    )
    sn_sub = sn.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    sc = sn_sub.add_parser("create", help="snapshot an entry")
    sc.add_argument("mountpoint", metavar="MOUNTPOINT")
    sc.add_argument("entry", metavar="ENTRY")
    sc.add_argument("--name", default=None, help="default: the time, e.g. 20261202-154500")
    sl = sn_sub.add_parser("list", help="list snapshots")
    sl.add_argument("mountpoint", metavar="MOUNTPOINT")
    sl.add_argument("entry", metavar="ENTRY", nargs="?")
    sd = sn_sub.add_parser("delete", help="delete a snapshot")
    sd.add_argument("mountpoint", metavar="MOUNTPOINT")
    sd.add_argument("entry", metavar="ENTRY")
    sd.add_argument("name", metavar="NAME")
    for action in (sc, sl, sd):
        action.add_argument("--json", action="store_true", help="JSON, for scripts")

    ex = sub.add_parser(
        "export", help="serve a file of the datastore as a read-only NBD export",
        description="Serve FILE (a path inside the mount, absolute or relative to the mount "
        "root) over NBD, read-only, until Ctrl-C or SIGTERM: nbdcopy, nbdinfo, qemu-img and "
        "libnbd clients read it as they are. The meta context base:allocation tells data "
        "from holes; with --since ID, qemu:dirty-bitmap:ID marks what changed since that "
        "change id (an incremental backup). Both maps are taken when the export starts. "
        "FILE@SNAPSHOT serves the file as that snapshot holds it (a point in time); a "
        "plain FILE is read live. With --tls-psk, clients must use TLS with a key of that "
        "file (nbds:// URIs with tls-psk-file= and tls-username=). The URI is printed on "
        "stdout once clients can connect.",
    )
    ex.add_argument("mountpoint", metavar="MOUNTPOINT")
    ex.add_argument("file", metavar="FILE")
    ex.add_argument("--since", metavar="ID", help="also serve qemu:dirty-bitmap:ID")
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, metavar="PATH", help="listen on a Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP")
    ex.add_argument("--tls-psk", type=Path, metavar="FILE",
                    help="require TLS with a pre-shared key of FILE (psktool format: "
                    "IDENTITY:HEXKEY lines, as nbdkit and libnbd read it)")
    ex.add_argument("--name", default="", metavar="NAME",
                    help="export name (default: FILE as given relative to the mount)")

    sa = sub.add_parser(
        "store-agent", help="the remote side of a remote store (JSON lines on stdio)",
        description="Serve DIR to a fusedisk on another host: namespace operations, "
        "attributes, fsync and small files as JSON lines on stdin/stdout (one reply a "
        "request), and, with --tls-psk, nbdkit's file plugin on DIR for the disk data "
        "(started by the 'serve' request). The other host starts it over ssh; EOF on stdin "
        "ends it (and its nbdkit).",
    )
    sa.add_argument("dir", metavar="DIR", type=Path, help="the store directory")
    sa.add_argument("--tls-psk", type=Path, metavar="FILE",
                    help="nbdkit's TLS pre-shared key file (IDENTITY:HEXKEY lines); "
                    "without it the agent serves no NBD")
    sa.add_argument("--nbd-listen", default="tcp:0.0.0.0:10809", metavar="ADDR",
                    help="where nbdkit listens: tcp:HOST:PORT (port 0: any free port, "
                    "named in the reply) or unix:PATH (default tcp:0.0.0.0:10809)")
    sa.add_argument("--nbdkit", default="nbdkit", metavar="PATH", help=argparse.SUPPRESS)
    sa.add_argument("--prefer-aes", action=argparse.BooleanOptionalAction, default=True,
                    help="make nbdkit's GnuTLS choose AES-GCM over ChaCha20 where the CPU "
                    "has AES instructions and no GnuTLS system configuration decides "
                    "(3x faster here; default on)")
    sa.add_argument("--nbdkit-filter", action="append", default=[], metavar="NAME",
                    help="an nbdkit filter to stack (e.g. delay, error); repeat for several")
    sa.add_argument("--nbdkit-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter for nbdkit's plugin or filters (e.g. delay-write=5ms)")

    sc = sub.add_parser(
        "store-check", help="check remote stores up front (reachable, same version, TLS-PSK)",
        description="For each NAME=nbd+ssh://[user@]host/DIR (or nbd+local:///DIR): start "
        "the agent, check its protocol version, start nbdkit, connect with TLS-PSK; print "
        "one line per store. Exit 1, with one line, at the first store that fails.",
    )
    sc.add_argument("stores", nargs="+", metavar="NAME=SPEC")

    sv = sub.add_parser(
        "store-view", help="mount a remote store as a local directory (what a datastore uses)",
        description="Mount the remote store NAME=SPEC on MOUNTPOINT as a directory: its "
        "namespace, attributes and small files through the store agent, large files' data "
        "over NBD, every write acknowledged only once the remote host has it. A datastore "
        "with a remote store runs one of these for it; run by hand, it shows what the remote "
        "store holds. Runs until SIGTERM/SIGINT, then unmounts.",
    )
    sv.add_argument("store", metavar="NAME=SPEC")
    sv.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    sv.add_argument("--reconnect-timeout", type=float, default=30.0, metavar="S",
                    help="how long requests wait for a broken link to the remote host to be "
                    "made again before they fail with EIO (default 30)")
    sv.add_argument("--nbd-min-bytes", type=int, default=1 << 20, metavar="N",
                    help="files at least this large (when opened) carry their data over NBD, "
                    "smaller ones through the agent (default 1 MiB)")
    sv.add_argument("--nbd-connections", type=int, default=2, metavar="N",
                    help="NBD connections per open file (default 2)")
    sv.add_argument("--status-file", type=Path, default=None, metavar="FILE",
                    help="keep FILE holding the view's statistics as JSON (rewritten every "
                    "second: connection, reconnects, agent latency, NBD traffic)")
    sv.add_argument("--owner", default=None, metavar="ID",
                    help="claim the store on its host for this owner (a datastore's id) while "
                    "the view runs: a view of another owner is refused until then (default: "
                    "a new id of this view's own, so no other view may use the store)")
    sv.add_argument("--owner-note", default="", metavar="TEXT",
                    help="what a refused view is told about this owner (the datastore's "
                    "state directory and mount point, say)")
    sv.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    sv.add_argument("--watch-fd", type=int, default=None, help=argparse.SUPPRESS)

    d = sub.add_parser(
        "demo", help="a live relocation on a default local layout",
        description="Mount a datastore with two local stores under ROOT, create a VM home "
        "with a disk image, move it from one store to the other while fio writes to it, "
        "verify every block, show CBT and the status, unmount.",
    )
    d.add_argument("--root", type=Path, default=None, metavar="ROOT",
                   help="where the demo keeps everything (default /var/lib/fusedisk-demo)")
    d.add_argument("--seconds", type=int, default=20,
                   help="about how long the guest writes (default 20)")
    d.add_argument("--keep", action="store_true", help="leave the datastore mounted")

    cbt = sub.add_parser(
        "cbt", help="changed block tracking: change ids and changed areas",
        description="Changed block tracking, as backup tools use it: take a checkpoint "
        "(prints a change id), later ask which areas changed since that id. FILE is a path "
        "inside the mount, absolute or relative to the mount root.",
    )
    cbt_sub = cbt.add_subparsers(dest="cbt_command", metavar="ACTION", required=True)
    cp = cbt_sub.add_parser("checkpoint", help="start a new change id and print it")
    ch = cbt_sub.add_parser(
        "changes", help="areas changed since a change id",
        description="Print the byte extents of FILE that changed since change id ID "
        "(merged and sorted), or every allocated extent with --since '*'. An id that cannot "
        "be answered exactly is refused: the caller then needs a full backup.",
    )
    ch.add_argument("--since", required=True, metavar="ID", help="a change id, or '*'")
    ch.add_argument("--snapshot", metavar="NAME", default=None,
                    help="only the changes from ID up to snapshot NAME of the file's entry")
    ch.add_argument("--start", default="0", metavar="OFFSET",
                    help="only extents from this byte offset on (e.g. 1G; default 0)")
    ch.add_argument("--length", default=None, metavar="SIZE",
                    help="only extents within SIZE bytes from --start (default: to the end); "
                    "extents are clipped to the range, so pages can be asked one by one")
    inf = cbt_sub.add_parser("info", help="a file's CBT state: its live change ids, dirty blocks")
    for action in (cp, ch, inf):
        action.add_argument("mountpoint", metavar="MOUNTPOINT")
        action.add_argument("file", metavar="FILE")
    for action in (ch, inf):
        action.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    return p


def _config_from(args: argparse.Namespace) -> Config:
    return build_config(
        config_file=args.config,
        mountpoint=args.mountpoint,
        stores=args.store,
        default_store=args.default_store,
        state_dir=args.state_dir,
        block_size=args.block_size,
        allow_other=args.allow_other,
        cbt=False if args.no_cbt else None,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import check_mountpoint

    config = _config_from(args)
    if args.foreground:
        return _run_foreground(config, args.ready_fd)
    check_directories(config)
    check_mountpoint(config.mountpoint)
    return _spawn_daemon(config, args)


def _run_foreground(config: Config, ready_fd: int | None) -> int:
    import trio

    from .daemon import serve

    setup_logging(debug=logging.getLogger().level == logging.DEBUG)

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        trio.run(serve, config, lambda: report("OK"))
    except FusediskError as e:
        report(f"ERR {e}")
        raise
    return 0


def _spawn_daemon(config: Config, args: argparse.Namespace) -> int:
    control.RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    log_path = control.socket_path(config.mountpoint).with_suffix(".log")
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "fusedisk"] + (["--debug"] if args.debug else [])
    argv += ["mount", "--foreground", "--ready-fd", str(write_end), str(config.mountpoint),
             "--state-dir", str(config.state_dir), "--default-store", config.default_store,
             "--block-size", str(config.block_size)]
    for name, path in config.stores.items():
        argv += ["--store", f"{name}={path}"]
    for name, spec in config.remote_stores.items():
        argv += ["--store", f"{name}={spec.text}"]
    if config.allow_other:
        argv.append("--allow-other")
    if not config.cbt:
        argv.append("--no-cbt")
    with open(log_path, "ab") as logf:
        os.chmod(log_path, 0o600)
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            pass_fds=(write_end,), start_new_session=True,
        )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.readline().decode(errors="replace").strip()
    if answer == "OK":
        print(f"mounted {config.mountpoint} (daemon pid {child.pid}, log {log_path})")
        return 0
    if answer.startswith("ERR "):
        child.wait()
        raise FusediskError(answer[4:])
    code = child.wait()
    raise MountError(f"the daemon exited (code {code}) before mounting; see {log_path}")


def cmd_umount(args: argparse.Namespace) -> int:
    from .daemon import FSNAME, detach_dead_mount
    from .mountinfo import fstype_at

    mountpoint = Path(os.path.abspath(args.mountpoint))
    fstype = fstype_at(mountpoint)
    if fstype is None:
        raise MountError(f"{mountpoint} is not mounted")
    if fstype != f"fuse.{FSNAME}":
        raise MountError(f"{mountpoint} is a {fstype} mount, not a fusedisk datastore")
    try:
        pid: int | None = control.call(mountpoint, api.Status(), timeout_s=10)["pid"]
    except ControlError:
        pid = None
    if pid is None:
        detach_dead_mount(mountpoint)
        print(f"detached {mountpoint} (its daemon was not running)")
        return 0
    cmd = ["fusermount3", "-u"] + (["-z"] if args.lazy else []) + [str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        if "busy" in detail.lower():
            raise MountError(f"{mountpoint} is busy (files are open); close them or use --lazy")
        raise MountError(f"cannot unmount {mountpoint}: {detail}")
    deadline = time.monotonic() + 60
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            raise MountError(f"unmounted {mountpoint}, but daemon {pid} has not exited")
        time.sleep(0.05)
    print(f"unmounted {mountpoint}")
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    status = control.call(mountpoint, api.Status())
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    print(f"datastore {status['mountpoint']}  (fusedisk {status['version']}, pid {status['pid']})")
    for reason in status.get("degraded", []):
        print(f"DEGRADED: {reason}")
    print()
    print(f"{'STORE':<12} {'FREE':>12} {'SIZE':>12}  PATH")
    for name, store in status["stores"].items():
        mark = " *" if name == status["default_store"] else ""
        print(f"{name + mark:<12} {format_size(store['free_bytes']):>12} "
              f"{format_size(store['size_bytes']):>12}  {store['path']}")
    remotes = status.get("remote_stores") or {}
    if remotes:
        print()
        print(f"{'REMOTE':<12} {'LINK':<13} {'LATENCY':>9} {'RECONNECTS':>10}  "
              f"{'NBD READ':>10} {'NBD WRITTEN':>11}  WHERE")
        for name, info in remotes.items():
            link = ("view gone" if not info.get("running") else
                    "connected" if info.get("connected") else "reconnecting")
            latency = info.get("agent_latency_ms")
            print(f"{name:<12} {link:<13} "
                  f"{'-' if latency is None else f'{latency:.2f} ms':>9} "
                  f"{info.get('reconnects', 0):>10}  "
                  f"{format_size(info.get('nbd_bytes_read', 0)):>10} "
                  f"{format_size(info.get('nbd_bytes_written', 0)):>11}  {info['where']}")
    print()
    print(f"{'ENTRY':<32} STORE")
    for entry, store in status["placement"].items():
        print(f"{entry:<32} {store}")
    if not status["placement"]:
        print("(no entries)")
    for entry, stores in status.get("conflicts", {}).items():
        print(f"{entry:<32} CONFLICT: on {', '.join(stores)} (not served)")
    print()
    snaps = status.get("snapshots")
    if snaps and snaps["count"]:
        print(f"SNAPSHOTS  {snaps['count']}, {format_size(snaps['space_bytes'])} on the stores "
              f"({format_size(snaps['saved_bytes'])} saved by copy-before-write), "
              f"{len(snaps['lost'])} lost")
        print()
    if status["jobs"]:
        print("RELOCATIONS")
        for job in map(api.Job.from_wire, status["jobs"]):
            print(_progress_line(job))
            if job.pause_ms is not None:
                print(f"  switched over with a {job.pause_ms:.1f} ms pause "
                      f"after {job.elapsed_s:.1f} s")
            if job.resumed:
                print(f"  resumed after an interruption: "
                      f"{format_size(job.resumed_bytes)} of the partial copy kept")
            if job.last_abandoned:
                print(f"  switchover attempts: {job.attempts}; the last one abandoned: "
                      f"{job.last_abandoned}")
            if job.error:
                print(f"  failed: {job.error}")
    else:
        print("no relocation jobs")


def cmd_install_service(args: argparse.Namespace) -> int:
    from . import service

    for line in service.install(args.prefix):
        print(line)
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from . import service

    print(service.cleanup(service.cleanup_target(args.mountpoint, args.config)))
    return 0


def _file_in_mount(mountpoint: Path, file: str) -> str:
    """FILE as a path relative to the mount root (lexical: nothing on the mount is touched)."""
    full = os.path.abspath(file)
    if file.startswith("/") or full.startswith(str(mountpoint).rstrip("/") + "/"):
        return control.mount_relative(mountpoint, file)
    # relative to the mount root, and below it
    return control.mount_relative(mountpoint, os.path.join(mountpoint, file))


def _size_option(option: str, text: str) -> int:
    try:
        value = parse_size(text)
    except (ValueError, OverflowError) as e:
        raise FusediskError(f"{option}: {e}") from None
    if value > api.MAX_FILE_SIZE:
        raise FusediskError(f"{option}: {text} is past the largest file offset")
    return value


def _rate_arg(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as e:
        raise FusediskError(f"--rate: {e}") from None


def cmd_migrate(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    if not MIN_PAUSE_MS <= args.max_pause <= MAX_PAUSE_MS:
        raise FusediskError(f"--max-pause must be from {MIN_PAUSE_MS} to {MAX_PAUSE_MS} ms, "
                            f"not {args.max_pause}")
    if not 0 <= args.stall_timeout <= MAX_STALL_TIMEOUT_S:
        raise FusediskError(f"--stall-timeout must be from 0 (none) to {MAX_STALL_TIMEOUT_S} "
                            f"seconds, not {args.stall_timeout}")
    job = control.call(mountpoint, api.Migrate(
        entry=args.entry, to=args.to, rate=_rate_arg(args.rate),
        max_pause_ms=args.max_pause, mode=api.Mode(args.mode), keep_source=args.keep_source,
        stall_timeout_s=args.stall_timeout, restart=args.restart,
    ), timeout_s=120.0)
    if args.no_wait:
        if args.json:
            print(json.dumps(job.to_wire(), sort_keys=True))
        else:
            print(f"relocation of {args.entry} to {args.to} started; "
                  f"watch it with: fusedisk status {mountpoint}")
        return 0
    try:
        job = _watch(mountpoint, job, quiet=args.json)
    except KeyboardInterrupt:
        print(f"\ndetached: the relocation of {args.entry} goes on "
              f"(fusedisk status {mountpoint}; fusedisk cancel {mountpoint} {args.entry})",
              file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(job.to_wire(), sort_keys=True))
    if job.state == api.State.DONE:
        if not args.json:
            print(f"relocated {args.entry} from {job.src} to {job.dst}: "
                  f"{format_size(job.bytes_copied)} copied in {job.elapsed_s:.1f} s, "
                  f"{job.pass_no} pass(es), switchover pause {job.pause_ms or 0.0:.1f} ms")
        return 0
    if job.state == api.State.SUSPENDED:
        raise FusediskError(f"the daemon stopped during the relocation of {args.entry}; "
                            "it resumes at the next mount")
    if job.state == api.State.CANCELLED:
        raise FusediskError(f"the relocation of {args.entry} was cancelled; "
                            f"it stays on {job.src}")
    raise FusediskError(f"relocation of {args.entry} failed: {job.error}")


def _watch(mountpoint: Path, job: api.Job, quiet: bool) -> api.Job:
    """Show *job*'s progress until it ends (from the daemon's ``watch`` stream): a live
    line on a terminal, a line every few seconds otherwise. Returns the final job."""
    tty = sys.stderr.isatty() and not quiet
    last_line, last_print = "", 0.0
    for event in control.watch(mountpoint, api.Watch(entry=job.entry, job=job.id)):
        job = api.Job.from_wire(event)
        line = _progress_line(job)
        now = time.monotonic()
        if tty:
            print(f"\r\x1b[K{line}", end="" if not job.final else "\n", file=sys.stderr,
                  flush=True)
        elif not quiet and (job.final or now - last_print >= 2.0) and line != last_line:
            print(line, file=sys.stderr, flush=True)
            last_line, last_print = line, now
        if job.final:
            return job
    raise FusediskError(f"the daemon ended the progress of {job.entry} before the job ended")


def _progress_line(job: api.Job) -> str:
    width = 24
    filled = int(job.progress * width)
    bar = "#" * filled + "-" * (width - filled)
    eta = job.eta_s
    eta_text = f"ETA {eta:.0f}s" if eta is not None and eta > 0 else ""
    state = job.state + (" (paused)" if job.paused else "")
    return (f"{job.entry} {job.src}->{job.dst} {state:<10} pass {job.pass_no} "
            f"[{bar}] {job.progress:4.0%} {format_size(job.bytes_copied)}"
            f"/{format_size(job.bytes_total)} {format_size(job.copy_rate)}/s "
            f"dirty {format_size(job.dirty_bytes)} {eta_text}").rstrip()


def cmd_job(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    req: api.Request[api.Job]
    if args.command == "rate":
        req = api.Rate(entry=args.entry, rate=_rate_arg(args.rate))
    else:
        req = {"pause": api.Pause, "resume": api.Resume, "cancel": api.Cancel}[args.command](
            entry=args.entry)
    print(_progress_line(control.call(mountpoint, req)))
    return 0


def cmd_store_check(args: argparse.Namespace) -> int:
    from . import remote

    specs = []
    for text in args.stores:
        name, sep, spec = text.partition("=")
        if not sep or not remote.is_remote_spec(spec):
            raise FusediskError(f"store-check {text!r}: expected NAME=nbd+ssh://[user@]host/DIR "
                                "or NAME=nbd+local:///DIR")
        specs.append(remote.parse_spec(name, spec))
    for spec in specs:
        with remote.connect(spec) as store:
            print(f"ok: {store.summary()}", flush=True)
    return 0


def cmd_store_agent(args: argparse.Namespace) -> int:
    from . import agent

    root = Path(os.path.abspath(args.dir))
    if not root.is_dir():
        raise FusediskError(f"store-agent: {root} is not a directory")
    nbd: agent.NbdConfig | None = None
    if args.tls_psk is not None:
        if not os.access(args.tls_psk, os.R_OK):
            raise FusediskError(f"store-agent: --tls-psk {args.tls_psk}: cannot read it")
        try:
            listen = agent.parse_listen(args.nbd_listen)
        except ValueError as e:
            raise FusediskError(f"store-agent: {e}") from None
        for param in args.nbdkit_param:
            if "=" not in param:
                raise FusediskError(f"store-agent: --nbdkit-param {param!r}: expected KEY=VALUE")
        nbd = agent.NbdConfig(listen=listen, tls_psk=Path(os.path.abspath(args.tls_psk)),
                              nbdkit=args.nbdkit, filters=tuple(args.nbdkit_filter),
                              params=tuple(args.nbdkit_param), prefer_aes=args.prefer_aes)
    return agent.main(root, nbd)


def cmd_store_view(args: argparse.Namespace) -> int:
    from . import storeview

    if args.reconnect_timeout < 0:
        raise FusediskError("store-view: --reconnect-timeout must not be negative")
    if args.nbd_min_bytes < 0 or not 1 <= args.nbd_connections <= 16:
        raise FusediskError("store-view: --nbd-min-bytes must not be negative and "
                            "--nbd-connections must be 1..16")
    claim = {"owner": args.owner or f"view-{uuid.uuid4().hex}", "host": socket.gethostname(),
             "note": args.owner_note, "view_pid": os.getpid()}
    try:
        return storeview.main(args.store, str(args.mountpoint.absolute()), claim=claim,
                              ready_fd=args.ready_fd, watch_fd=args.watch_fd,
                              status_path=(str(args.status_file.absolute())
                                           if args.status_file else None),
                              reconnect_timeout_s=args.reconnect_timeout,
                              nbd_min_bytes=args.nbd_min_bytes,
                              nbd_connections=args.nbd_connections)
    except FusediskError as e:
        if args.ready_fd is not None:  # the daemon that started it says this line
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, f"ERR {e}\n".encode())
        raise


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_ROOT, run_demo

    if args.seconds < 1:
        raise FusediskError(f"--seconds must be at least 1, not {args.seconds}")
    try:
        return run_demo(args.root or DEFAULT_ROOT, args.seconds, args.keep)
    except OSError as e:  # a step of ours (not a command) failed; the mount is already undone
        raise FusediskError(f"demo failed: {e}") from None


def _snapshot_file(mountpoint: Path, entry: str, name: str,
                   inside: str) -> dict[str, Any]:
    """A file's record in snapshot *name* of *entry* (path inside the entry), plus its
    path in the mount's view of snapshots (read there like any file of the mount)."""
    for snapshot in control.call(mountpoint, api.SnapshotList(entry=entry)):
        if snapshot["name"] == name and snapshot["state"] == "lost":
            raise FusediskError(f"snapshot {entry}@{name} is lost: {snapshot['lost']}")
        if snapshot["name"] == name and snapshot["state"] == "ok":
            record = snapshot["files"].get(inside)
            if record is None:
                raise FusediskError(f"snapshot {entry}@{name} holds no regular file "
                                    f"{inside or entry!r}")
            where = mountpoint / SNAPSHOT_VIEW_NAME / f"{entry}@{name}"
            return {**record, "path": str(where / inside if inside else where)}
    raise FusediskError(f"{entry!r} has no snapshot named {name!r} "
                        f"(fusedisk snapshot list {mountpoint} {entry})")


def cmd_export(args: argparse.Namespace) -> int:
    from . import export

    mountpoint = Path(os.path.abspath(args.mountpoint))
    tcp = export.parse_tcp(args.tcp) if args.tcp else None
    tls = None
    if args.tls_psk is not None:
        from . import tlspsk

        tls = tlspsk.server_context(tlspsk.load_keys(args.tls_psk))
    if args.socket is not None and (args.socket.exists() or args.socket.is_symlink()):
        raise FusediskError(f"--socket {args.socket}: something is there already")
    file, at, snapshot_name = args.file.rpartition("@") if "@" in args.file \
        else (args.file, "", "")
    relative = _file_in_mount(mountpoint, file)
    snapshot = None
    if at:
        entry, _, inside = relative.partition("/")
        snapshot = _snapshot_file(mountpoint, entry, snapshot_name, inside)
    return export.run(mountpoint, relative, args.since, args.socket, tcp,
                      args.name or args.file, snapshot, tls)


def cmd_snapshot(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    if args.snapshot_command == "create":
        name = args.name or time.strftime("%Y%m%d-%H%M%S")
        result = control.call(mountpoint, api.SnapshotCreate(entry=args.entry, name=name),
                              timeout_s=600)
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(f"snapshot {args.entry}@{name}: {len(result['files'])} file(s) on store "
                  f"{result['store']}, {result['pause_ms']:.1f} ms pause")
        return 0
    if args.snapshot_command == "delete":
        result = control.call(mountpoint, api.SnapshotDelete(entry=args.entry, name=args.name))
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(f"deleted snapshot {args.entry}@{args.name}")
        return 0
    snapshots = control.call(mountpoint, api.SnapshotList(entry=args.entry))
    if args.json:
        print(json.dumps(snapshots, sort_keys=True))
        return 0
    for s in snapshots:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"])) \
            if s["created"] else "-"
        methods = sorted({f.get("method", "reflink") for f in s["files"].values()})
        print(f"{s['entry'] + '@' + s['name']:<40} {s['state']:<10} {when}  "
              f"{len(s['files'])} file(s)  store {s['store']}  "
              f"{format_size(s.get('space_bytes', 0))} ({'+'.join(methods) or '-'})")
        if s.get("lost"):
            print(f"  lost: {s['lost']}")
    if not snapshots:
        print("(no snapshots)")
    return 0


def cmd_cbt(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(args.mountpoint))
    path = _file_in_mount(mountpoint, args.file)
    if args.cbt_command == "checkpoint":
        print(control.call(mountpoint, api.CbtCheckpoint(path=path)))
        return 0
    if args.cbt_command == "info":
        info = control.call(mountpoint, api.CbtInfo(path=path))
        if args.json:
            print(json.dumps(info, indent=2, sort_keys=True))
        else:
            print(f"file id      {info['file_id']}")
            print(f"block size   {format_size(info['block_size'])}")
            print(f"dirty        {info['dirty_blocks']} block(s) since the newest change id")
            print(f"change ids   {' '.join(info['change_ids']) or '(none yet)'}")
        return 0
    start = _size_option("--start", args.start)
    length = None if args.length is None else _size_option("--length", args.length)
    if length == 0:
        raise FusediskError("--length must be at least 1 byte")
    until = None
    if args.snapshot is not None:
        entry, _, inside = path.partition("/")
        until = _snapshot_file(mountpoint, entry, args.snapshot, inside)["change_id"]
    changes = control.call(mountpoint, api.CbtChanges(path=path, since=args.since,
                                                      start=start, length=length,
                                                      until=until))
    if args.json:
        print(json.dumps(dataclasses.asdict(changes), sort_keys=True))
        return 0
    total = sum(length for _, length in changes.extents)
    for offset, length in changes.extents:
        print(f"{offset} {length}")
    print(f"# {len(changes.extents)} extent(s), {format_size(total)} of "
          f"{format_size(changes.file_size)}", file=sys.stderr)
    return 0


_COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "status": cmd_status,
             "install-service": cmd_install_service, "cleanup": cmd_cleanup, "cbt": cmd_cbt,
             "demo": cmd_demo, "export": cmd_export, "store-agent": cmd_store_agent,
             "store-view": cmd_store_view,
             "store-check": cmd_store_check,
             "snapshot": cmd_snapshot,
             "migrate": cmd_migrate, "pause": cmd_job, "resume": cmd_job, "cancel": cmd_job,
             "rate": cmd_job}


def main(argv: list[str] | None = None) -> int:
    _print_names_as_they_are()
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        return _reader_gone()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    try:
        return _COMMANDS[args.command](args)
    except FusediskError as e:
        print(f"fusedisk: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fusedisk: interrupted", file=sys.stderr)
        return 130


def _print_names_as_they_are() -> None:
    """File names that are not UTF-8 are printed as their bytes (as ``ls`` does).

    Python holds them as surrogate escapes, which a strict stream refuses
    with a traceback, and which ``backslashreplace`` (stderr's default)
    turns into text that names no file.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.encoding.lower().replace("-", "") \
                == "utf8":
            stream.reconfigure(errors="surrogateescape")


def _reader_gone() -> int:
    """Whoever read our output has gone (``| head -1``): end quietly, as Python's docs advise.

    Both streams are pointed at /dev/null, so that the flush at exit cannot
    fail again, and the exit code is the one a shell reports for SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
