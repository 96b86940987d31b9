"""Composition root: builds every room, owns the nursery, mounts and unmounts.

Start-up order, each step a fact before the next one starts:
stores checked → mountpoint checked (a dead fusedisk mount left by a crash
is detached) → state directory locked → placement loaded and repaired →
FUSE session mounted → control socket listening → the mount answers a
``stat`` from another thread → *ready* (``READY=1`` to systemd, ``OK`` to
a waiting ``fusedisk mount``).

Shut-down: SIGTERM/SIGINT or ``fusedisk umount`` end the FUSE session; the
kernel mount is removed, every backing handle closed, the placement saved
and the state directory unlocked.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import __version__
from .config import Config, check_directories
from .control import ControlServer
from .datastore import Datastore
from .errors import MountError
from .fs import Operations
from .metadata import StateDir

log = logging.getLogger(__name__)

FSNAME = "fusedisk"
#: FUSE worker tasks. Handlers run their syscalls on the loop, so more tasks
#: only help while one waits on an offloaded fsync; a fixed pool avoids
#: pyfuse3's task churn under queue depth.
WORKER_TASKS = 8


def _mount_fstype(mountpoint: Path) -> str | None:
    """The fstype of whatever is mounted exactly on *mountpoint*, if anything."""
    target = os.fsencode(os.path.abspath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            mount_at = fields[4].replace(b"\\040", b" ")
            if mount_at == target:
                return fields[sep + 1].decode()
    return None


def detach_dead_mount(mountpoint: Path) -> None:
    """Lazily unmount a fusedisk mount whose daemon is gone."""
    subprocess.run(
        ["fusermount3", "-u", "-z", str(mountpoint)],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def check_mountpoint(mountpoint: Path) -> None:
    """Make sure *mountpoint* can be mounted on; raise MountError otherwise."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"mountpoint {mountpoint}: {e.strerror}") from None
        if _mount_fstype(mountpoint) != f"fuse.{FSNAME}":
            raise MountError(
                f"mountpoint {mountpoint} is a dead mount of another filesystem"
            ) from None
        log.warning("detaching the dead fusedisk mount left on %s by a crash", mountpoint)
        detach_dead_mount(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        kind = _mount_fstype(mountpoint) or "unknown"
        raise MountError(f"mountpoint {mountpoint} is busy: {kind} is already mounted there")


def _raise_fd_limit() -> None:
    """Every inode the kernel knows holds a handle: allow as many as we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sd_notify(message: str) -> None:
    """Send *message* to systemd's notify socket, if we run under Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as e:
            log.warning("cannot notify systemd: %s", e.strerror)


class Daemon:
    """One mounted datastore: its rooms and their lifetimes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.datastore: Datastore | None = None
        self.ops: Operations | None = None
        self._mounted = False

    def prepare(self) -> None:
        """Everything that can fail on bad input, before anything is mounted."""
        check_directories(self.config)
        check_mountpoint(self.config.mountpoint)
        self.state.open()
        try:
            self.datastore = Datastore.open(self.config, self.state)
        except BaseException:
            self.state.close()
            raise

    async def run(self, on_ready: Callable[[], None]) -> None:
        """Mount, serve until unmounted or signalled, then clean up."""
        assert self.datastore is not None
        os.umask(0)  # new backing objects get exactly the mode the caller asked for
        os.chdir("/")  # every configured path is absolute; hold no directory busy
        _raise_fd_limit()
        self.ops = Operations(self.datastore)
        options = set(pyfuse3.default_options)
        options |= {f"fsname={FSNAME}", f"subtype={FSNAME}"}
        if self.config.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(self.ops, str(self.config.mountpoint), options)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {self.config.mountpoint}: {e}") from None
        self._mounted = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_fuse, nursery.cancel_scope)
                nursery.start_soon(self._handle_signals)
                control = ControlServer(self.config.mountpoint, self._control_handlers())
                await nursery.start(control.run)
                await trio.to_thread.run_sync(os.stat, self.config.mountpoint)
                log.info(
                    "fusedisk %s serving %s (stores: %s; default %s)",
                    __version__, self.config.mountpoint,
                    ", ".join(f"{n}={s.path}" for n, s in self.datastore.stores.items()),
                    self.datastore.default_store.name,
                )
                on_ready()
                sd_notify("READY=1\nSTATUS=serving")
        finally:
            self._shutdown()

    async def _serve_fuse(self, cancel_scope: trio.CancelScope) -> None:
        await pyfuse3.main(min_tasks=WORKER_TASKS, max_tasks=WORKER_TASKS)
        log.info("FUSE session ended")
        cancel_scope.cancel()

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                log.info("%s received: unmounting", signal.Signals(signum).name)
                sd_notify("STOPPING=1")
                pyfuse3.terminate()

    def _control_handlers(self) -> dict[str, Any]:
        async def status(request: dict[str, Any]) -> dict[str, Any]:
            assert self.datastore is not None and self.ops is not None
            return {
                "version": __version__,
                "pid": os.getpid(),
                "mountpoint": str(self.config.mountpoint),
                "state_dir": str(self.config.state_dir),
                "block_size": self.config.block_size,
                **self.datastore.statistics(),
                "fs": self.ops.statistics(),
                "jobs": [],
            }

        return {"status": status}

    def _shutdown(self) -> None:
        if self._mounted:
            pyfuse3.close(unmount=True)
            self._mounted = False
        if self.ops is not None:
            self.ops.close()
        if self.datastore is not None:
            try:
                self.datastore.save_nowait_blocking()
            finally:
                self.datastore.close()
        self.state.close()
        log.info("unmounted %s", self.config.mountpoint)
