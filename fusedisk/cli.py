"""Command line: argv → commands, exit codes, human and ``--json`` output.

Exit codes: 0 success, 1 the command failed (one line on stderr says why),
2 the command line itself is wrong (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, control
from .config import Config, build_config, check_directories
from .errors import ControlError, FusediskError, MountError
from .sizes import format_size

log = logging.getLogger("fusedisk")

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """``<priority>message``: journald reads the priority from the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


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
    logging.getLogger("pyfuse3").setLevel(logging.INFO if debug else logging.WARNING)


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
                   help="a backing store (repeat for several)")
    m.add_argument("--default-store", metavar="NAME", help="store that receives new entries")
    m.add_argument("--state-dir", metavar="DIR", help="where placement and CBT state live")
    m.add_argument("--block-size", metavar="SIZE", help="CBT block size, 4K..64M (default 64K)")
    m.add_argument("--allow-other", action="store_true", default=None,
                   help="let users other than root use the mount (e.g. a qemu user)")
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

    from .daemon import Daemon

    setup_logging(debug=logging.getLogger().level == logging.DEBUG)
    daemon = Daemon(config)

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
        daemon.prepare()
        trio.run(daemon.run, lambda: report("OK"))
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
    if config.allow_other:
        argv.append("--allow-other")
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
    from .daemon import FSNAME, _mount_fstype, detach_dead_mount

    mountpoint = Path(os.path.abspath(args.mountpoint))
    fstype = _mount_fstype(mountpoint)
    if fstype is None:
        raise MountError(f"{mountpoint} is not mounted")
    if fstype != f"fuse.{FSNAME}":
        raise MountError(f"{mountpoint} is a {fstype} mount, not a fusedisk datastore")
    try:
        pid: int | None = control.request(mountpoint, "status", timeout_s=10)["pid"]
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
    status = control.request(mountpoint, "status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    print(f"datastore {status['mountpoint']}  (fusedisk {status['version']}, pid {status['pid']})")
    print()
    print(f"{'STORE':<12} {'FREE':>12} {'SIZE':>12}  PATH")
    for name, store in status["stores"].items():
        mark = " *" if name == status["default_store"] else ""
        print(f"{name + mark:<12} {format_size(store['free_bytes']):>12} "
              f"{format_size(store['size_bytes']):>12}  {store['path']}")
    print()
    print(f"{'ENTRY':<32} STORE")
    for entry, store in status["placement"].items():
        print(f"{entry:<32} {store}")
    if not status["placement"]:
        print("(no entries)")
    for entry, stores in status.get("conflicts", {}).items():
        print(f"{entry:<32} CONFLICT: on {', '.join(stores)} (not served)")
    print()
    if status["jobs"]:
        for job in status["jobs"]:
            print(f"job {job['entry']}: {job['from']} → {job['to']} {job['state']}")
    else:
        print("no relocation jobs")


_COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
