"""A fusedisk daemon the benchmark owns: start, wait for the mount, measure, always tear down.

The daemon runs in the foreground as our child, in its own process group so a
terminal's Ctrl-C reaches only us: teardown must unmount *before* the daemon
stops, never the other way round.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from fusedisk import mountinfo

REPO_ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT_S = 20.0
_EXIT_GRACE_S = 10.0
_TERM_GRACE_S = 5.0
_LOG_TAIL_LINES = 20
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def is_mounted(mountpoint: Path) -> bool:
    """Whether ``mountpoint`` is listed in this process's mount table.

    Unlike ``os.path.ismount`` this never touches the filesystem, so it is
    true for a mount whose daemon died, and it cannot hang on one that stalls.
    """
    target = os.path.realpath(mountpoint)
    return mountinfo.is_mounted(target)


def _answers(mountpoint: Path, timeout_s: float) -> bool:
    """Whether the mount answers a stat within ``timeout_s``; asked from a child so a
    stalled daemon cannot block us."""
    probe = "import os, sys; sys.exit(0 if os.path.ismount(sys.argv[1]) else 1)"
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(mountpoint)],
                              timeout=max(timeout_s, 0.5), check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def unmount(mountpoint: Path) -> None:
    """Unmount with ``fusermount3 -u``, then lazily with ``-uz`` if it is still mounted."""
    for flags in ("-u", "-uz"):
        if not is_mounted(mountpoint):
            return
        subprocess.run(["fusermount3", flags, str(mountpoint)], capture_output=True,
                       timeout=30, check=False)


@dataclass(frozen=True, slots=True)
class Daemon:
    """The running daemon: its process, mountpoint, log file and what to call it in errors."""

    process: subprocess.Popen[bytes]
    mountpoint: Path
    log_path: Path
    name: str = "fusedisk daemon"

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.process.pid

    def log_tail(self) -> str:
        """The last lines of the daemon's stdout/stderr, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def check_alive(self) -> None:
        """Raise BenchError (with the log tail) if the daemon has exited."""
        status = self.process.poll()
        if status is not None:
            raise BenchError(f"{self.name} exited with status {status}",
                             detail=self.log_tail())

    def cpu_time_s(self) -> float:
        """User + system CPU seconds the daemon (all its threads) has used so far."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError as exc:
            self.check_alive()
            raise BenchError(f"cannot read the {self.name}'s CPU time: {exc}") from None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def rss_bytes(self) -> int:
        """The daemon's resident set size (VmRSS of /proc/PID/status) in bytes."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError as exc:
            self.check_alive()
            raise BenchError(f"cannot read the daemon's memory use: {exc}") from None
        raise BenchError(f"/proc/{self.pid}/status has no VmRSS line")


def _wait_for_mount(daemon: Daemon, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = daemon.process.poll()
        if status is not None:
            raise BenchError(f"{daemon.name} exited with status {status} before the mount "
                             "came up", detail=daemon.log_tail())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"mount did not come up within {timeout_s:.0f} s",
                             detail=daemon.log_tail())
        if is_mounted(daemon.mountpoint) and _answers(daemon.mountpoint, remaining):
            return
        time.sleep(0.1)


def _stop(daemon: Daemon) -> list[str]:
    """Unmount, then let the daemon exit, escalating to SIGTERM and SIGKILL.

    Returns warnings about anything left behind; never raises.
    """
    warnings = []
    # Only a daemon that was serving a mount is expected to exit on its own after unmount.
    exit_grace_s = _EXIT_GRACE_S if is_mounted(daemon.mountpoint) else 0.0
    try:
        unmount(daemon.mountpoint)
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.append(f"fusermount3 failed: {exc}")
    if is_mounted(daemon.mountpoint):
        warnings.append(f"{daemon.mountpoint} is still mounted")
    process = daemon.process
    for action, grace_s in ((None, exit_grace_s), (process.terminate, _TERM_GRACE_S),
                            (process.kill, None)):
        if action is not None:
            action()
        try:
            process.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    return warnings


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while tearing down, so a second Ctrl-C cannot leave a mount."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def mounted(mountpoint: Path, stores: dict[str, Path], default_store: str, state_dir: Path,
            log_path: Path, timeout_s: float = MOUNT_TIMEOUT_S,
            extra_args: tuple[str, ...] = (), nofile: int | None = None) -> Iterator[Daemon]:
    """Run ``python -m fusedisk mount --foreground`` as our child until the block exits.

    Yields once ``mountpoint`` is mounted and answers. On every exit path
    (exceptions, KeyboardInterrupt) it unmounts and then stops the child;
    ``extra_args`` go to ``fusedisk mount`` (e.g. ``--no-cbt``); ``nofile`` is
    the daemon's fd limit (soft and hard, through ``prlimit``, which execs it);
    leftovers are reported on stderr, since raising there would hide the
    original error.
    """
    if shutil.which("fusermount3") is None:
        raise BenchError("fusermount3 not found on PATH (install fuse3)")
    argv = [sys.executable, "-m", "fusedisk", "mount", "--foreground"]
    if nofile is not None:
        if shutil.which("prlimit") is None:
            raise BenchError("prlimit not found on PATH (install util-linux)")
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *argv]
    for name, path in stores.items():
        argv += ["--store", f"{name}={path}"]
    argv += ["--default-store", default_store, "--state-dir", str(state_dir), *extra_args,
             str(mountpoint)]
    with serving(argv, mountpoint, log_path, timeout_s) as daemon:
        yield daemon


@contextmanager
def serving(argv: list[str], mountpoint: Path, log_path: Path,
            timeout_s: float = MOUNT_TIMEOUT_S, name: str = "fusedisk daemon"
            ) -> Iterator[Daemon]:
    """Run the FUSE daemon ``argv`` (foreground, serving ``mountpoint``) as our child.

    Yields once the mount answers; on every exit path it unmounts, then stops
    the child (SIGTERM, then SIGKILL). Used for fusedisk and for the C peer;
    ``name`` is what error messages call the daemon.
    """
    if shutil.which("fusermount3") is None:
        raise BenchError("fusermount3 not found on PATH (install fuse3)")
    if is_mounted(mountpoint):
        raise BenchError(f"{mountpoint} is already a mountpoint")
    daemon = None
    try:
        with open(log_path, "wb") as log:
            daemon = Daemon(
                process=subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO_ROOT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, process_group=0,
                ),
                mountpoint=mountpoint, log_path=log_path, name=name,
            )
        _wait_for_mount(daemon, timeout_s)
        yield daemon
    finally:
        if daemon is not None:
            with _signals_deferred():
                for warning in _stop(daemon):
                    print(f"bench: warning: {warning}", file=sys.stderr)
