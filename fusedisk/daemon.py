"""Composition root: builds every room, owns the nursery, mounts and unmounts.

Start-up order, each step a fact before the next one starts:
stores checked → mountpoint checked (a dead fusedisk mount left by a crash
is detached) → state directory locked → every store claimed (its owner
file locked: see datastore.StoreClaims) → placement loaded and repaired →
FUSE session mounted → control socket listening → the mount answers a
``stat`` from another thread → *ready* (``READY=1`` to systemd, ``OK`` to
a waiting ``fusedisk mount``).

Shut-down: SIGTERM/SIGINT or ``fusedisk umount`` end the FUSE session; the
kernel mount is removed, every backing handle closed, the placement saved,
the stores' owner files and the state directory unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import __version__, backing, control, fuseshim
from .cbt import CbtStore, ChangeIdError
from .config import (
    MAX_PAUSE_MS,
    MAX_RATE,
    MAX_STALL_TIMEOUT_S,
    MIN_PAUSE_MS,
    Config,
    check_directories,
)
from .control import ControlServer
from .datastore import Datastore, Entry, StoreClaims
from .errors import MountError
from .fs import Operations
from .fuseloop import RequestLoop, dev_fuse_fds, find_session_fd
from .metadata import StateDir
from .relocation import Mode, Options, RelocationError, Relocator
from .vdisk import OpenFiles, VFile

log = logging.getLogger(__name__)

FSNAME = "fusedisk"
#: FUSE worker tasks: how many handlers may wait at once (an offloaded fsync,
#: a write held at a paused entry) before requests queue in the kernel.
MAX_WORKER_TASKS = 64
#: How often the systemd status line is refreshed while serving.
STATUS_INTERVAL_S = 5.0


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
        # statvfs, not stat: the kernel answers stat() of a dead FUSE mount's
        # root from its attribute cache for a while after the daemon died.
        os.statvfs(mountpoint)
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


def sd_notify(message: str, *, wait: bool = True) -> None:
    """Send *message* to systemd's notify socket, if we run under Type=notify.

    With ``wait=False`` the message is dropped rather than block when the
    socket's queue is full (for advisory messages such as ``STATUS=``).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.send(message.encode(), 0 if wait else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("cannot notify systemd: %s", e.strerror)


_last_status: str | None = None


def notify_status(text: str) -> None:
    """Show *text* as the service's status line (``systemctl status``); never blocks.

    Call it at transitions and for progress (e.g. a relocation's percentage);
    repeating the current text sends nothing, so periodic callers are cheap.
    """
    global _last_status
    line = " ".join(text.split())
    if line != _last_status:
        _last_status = line
        sd_notify(f"STATUS={line}", wait=False)


class Daemon:
    """One mounted datastore: its rooms and their lifetimes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = StateDir(config.state_dir)
        self.claims = StoreClaims(self.state, config.mountpoint)
        self.datastore: Datastore | None = None
        self.files: OpenFiles | None = None
        self.ops: Operations | None = None
        self.fuse_loop: RequestLoop | None = None
        self._mounted = False
        self._stopping = False

    def prepare(self) -> None:
        """Everything that can fail on bad input, before anything is mounted."""
        check_directories(self.config)
        check_mountpoint(self.config.mountpoint)
        self.state.open()
        try:
            self.datastore = Datastore.open(self.config, self.state, self.claims)
            cbt = None
            if self.config.cbt:
                cbt = CbtStore(self.config.state_dir, self.config.block_size)
            self.files = OpenFiles(cbt, self.config.block_size)
        except BaseException:
            self.claims.release()
            self.state.abandon()  # a refused first mount leaves no state directory
            raise

    async def run(self, on_ready: Callable[[], None]) -> None:
        """Mount, serve until unmounted or signalled, then clean up."""
        assert self.datastore is not None and self.files is not None
        os.umask(0)  # new backing objects get exactly the mode the caller asked for
        os.chdir("/")  # every configured path is absolute; hold no directory busy
        _raise_fd_limit()
        self.ops = Operations(self.datastore, self.files)
        self.relocator = Relocator(
            self.datastore, self.files, self.config.block_size, self.ops.repoint
        )
        options = set(pyfuse3.default_options)
        options |= {f"fsname={FSNAME}", f"subtype={FSNAME}"}
        if self.config.allow_other:
            options.add("allow_other")
        fds_before_init = dev_fuse_fds()
        try:
            pyfuse3.init(self.ops, str(self.config.mountpoint), options)
        except RuntimeError as e:
            raise MountError(f"cannot mount on {self.config.mountpoint}: {e}") from None
        self._mounted = True
        if not fuseshim.sessions():
            log.warning("the libfuse shim is not in use (%s): RWF_DSYNC writes on O_DIRECT "
                        "descriptors are not synced (O_DSYNC/O_SYNC opens are)",
                        fuseshim.problem() or "unknown reason")
        self.fuse_loop = RequestLoop(find_session_fd(fds_before_init), max_tasks=MAX_WORKER_TASKS)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_fuse, nursery.cancel_scope)
                nursery.start_soon(self._handle_signals)
                await nursery.start(self.files.run)
                await nursery.start(self.relocator.run)
                self.relocator.resume_interrupted()
                control_server = ControlServer(self.config.mountpoint, self._control_handlers())
                await nursery.start(control_server.run)
                await trio.to_thread.run_sync(os.stat, self.config.mountpoint)
                log.info(
                    "fusedisk %s serving %s (stores: %s; default %s)",
                    __version__, self.config.mountpoint,
                    ", ".join(f"{n}={s.path}" for n, s in self.datastore.stores.items()),
                    self.datastore.default_store.name,
                )
                on_ready()
                sd_notify("READY=1")
                notify_status(self._status_line())
                nursery.start_soon(self._report_status)
        finally:
            self._shutdown()

    async def _serve_fuse(self, cancel_scope: trio.CancelScope) -> None:
        assert self.fuse_loop is not None
        await self.fuse_loop.run()
        log.info("FUSE session ended")
        cancel_scope.cancel()

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                log.info("%s received: unmounting", signal.Signals(signum).name)
                self._notify_stopping()
                await self.relocator.stop()
                assert self.fuse_loop is not None
                self.fuse_loop.terminate()

    def _status_line(self) -> str:
        """The one-line summary systemd shows as the service's status."""
        assert self.datastore is not None
        n = len(self.datastore.entries)
        line = f"serving {n} {'entry' if n == 1 else 'entries'} on {self.config.mountpoint}"
        if self.datastore.conflicts:
            line += f"; {len(self.datastore.conflicts)} in conflict (not served)"
        for job in self.relocator.statistics():
            if job["state"] in ("resuming", "copying", "mirroring", "switching", "finishing"):
                line += (
                    f"; relocating {job['entry']} {job['from']}->{job['to']}: "
                    f"{job['state']}, pass {job['pass']}, {job['progress']:.0%}, "
                    f"{job['copy_rate'] / 1e6:.0f} MB/s, {job['dirty_bytes'] >> 20} MiB dirty"
                )
        return line

    async def _report_status(self) -> None:
        """Keep the status line current while serving (only under systemd)."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        while True:
            busy = any(not job.finished.is_set() for job in self.relocator.jobs.values())
            await trio.sleep(1.0 if busy else STATUS_INTERVAL_S)
            notify_status(self._status_line())

    def _notify_stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            sd_notify("STOPPING=1")
            notify_status(f"unmounting {self.config.mountpoint}")

    def _health(self) -> dict[str, Any]:
        """``health``: "ok" or "degraded", and in ``degraded`` one line for each reason.

        Degraded means the mount serves, but not everything it was asked to
        keep is kept: each line says what is lost and what still holds.
        """
        assert self.datastore is not None and self.files is not None
        reasons = []
        if self.datastore.record_stale is not None:
            reasons.append(f"the datastore record cannot be saved ({self.datastore.record_stale}); "
                           "the stores hold every change, and the next mount rebuilds it from them")
        cbt = self.files.cbt
        if cbt is not None and cbt.health.error is not None:
            reasons.append(f"the state directory refuses CBT saves ({cbt.health.error}); "
                           "change ids of files written meanwhile are withdrawn "
                           "(a full backup is needed for them)")
        for entry, stores in sorted(self.datastore.conflicts.items()):
            reasons.append(f"entry {entry!r} is not served: it is on {', '.join(stores)}")
        return {
            "health": "degraded" if reasons else "ok",
            "degraded": reasons,
            "cbt_state": cbt.health.statistics() if cbt is not None else None,
        }

    def _control_handlers(self) -> dict[str, control.Command]:
        """The control commands, each with the arguments it takes (the server refuses others)."""

        async def status(request: dict[str, Any]) -> dict[str, Any]:
            assert self.datastore is not None and self.ops is not None
            return {
                "version": __version__,
                "pid": os.getpid(),
                "datastore_id": self.state.datastore_id,
                "mountpoint": str(self.config.mountpoint),
                "state_dir": str(self.config.state_dir),
                "block_size": self.config.block_size,
                **self.datastore.statistics(),
                "fs": self.ops.statistics(),
                "fuse_loop": self.fuse_loop.statistics() if self.fuse_loop else None,
                "fuse_shim": fuseshim.statistics(),
                "jobs": self.relocator.statistics(),
                **self._health(),
            }

        async def locate(request: dict[str, Any]) -> dict[str, Any]:
            entry = self._entry(request)
            return {"entry": entry.name, "store": entry.store.name,
                    "path": str(entry.store.path / entry.name)}

        async def cbt_checkpoint(request: dict[str, Any]) -> dict[str, Any]:
            async with self._open_file(request) as vfile:
                assert vfile.tracker is not None
                return {"change_id": await vfile.tracker.checkpoint()}

        async def cbt_changes(request: dict[str, Any]) -> dict[str, Any]:
            since = control.str_arg(request, "since")
            async with self._open_file(request) as vfile:
                assert vfile.tracker is not None
                size = vfile.size()
                if since == "*":
                    extents = await backing.run_blocking(backing.data_extents, vfile.fd)
                else:
                    try:
                        extents = vfile.tracker.changes(since, size)
                    except ChangeIdError as e:
                        raise control.RequestError("change-id", str(e)) from None
            return {"change_id": since, "file_size": size,
                    "extents": [[offset, length] for offset, length in extents]}

        async def cbt_info(request: dict[str, Any]) -> dict[str, Any]:
            async with self._open_file(request) as vfile:
                assert vfile.tracker is not None
                return {"block_size": self.config.block_size, "file_size": vfile.size(),
                        **vfile.tracker.statistics()}

        async def migrate(request: dict[str, Any]) -> dict[str, Any]:
            assert self.datastore is not None
            entry = self._entry(request)
            to = control.str_arg(request, "to")
            dst = self.datastore.stores.get(to)
            if dst is None:
                raise control.RequestError(
                    "unknown-store", f"{to!r} is not a store of this datastore "
                    f"({', '.join(sorted(self.datastore.stores))})")
            mode = control.str_arg(request, "mode", "auto")
            if mode not in {m.value for m in Mode}:
                raise control.RequestError(
                    "bad-argument", "mode must be one of auto, precopy, mirror")
            options = Options(
                mode=Mode(mode),
                rate=control.size_arg(request, "rate", 0, maximum=MAX_RATE),
                max_pause_ms=control.int_arg(request, "max_pause_ms", 100,
                                             minimum=MIN_PAUSE_MS, maximum=MAX_PAUSE_MS),
                keep_source=control.bool_arg(request, "keep_source", False),
                stall_timeout_s=control.int_arg(request, "stall_timeout_s", 0, minimum=0,
                                                maximum=MAX_STALL_TIMEOUT_S),
            )
            current = self.relocator.jobs.get(entry.name)
            if control.bool_arg(request, "restart", False) and current is not None and (
                    not current.finished.is_set()):
                # start over: the running (say, resumed) job and its copy go first
                if not current.cancel():
                    raise control.RequestError(
                        "too-late", f"the relocation of {entry.name!r} is already switching "
                        "over; it will complete")
                await current.finished.wait()
            try:
                job = self.relocator.start(entry, dst, options)
            except RelocationError as e:
                raise control.RequestError("refused", str(e)) from None
            return job.statistics().as_dict()

        def job_command(action: str) -> Any:
            async def handler(request: dict[str, Any]) -> dict[str, Any]:
                name = control.entry_arg(request)
                rate = control.size_arg(request, "rate", maximum=MAX_RATE) \
                    if action == "rate" else 0
                job = self.relocator.jobs.get(name)
                if job is None or job.finished.is_set():
                    raise control.RequestError(
                        "no-job", f"{name!r} is not being relocated")
                if action == "pause":
                    job.pause()
                elif action == "resume":
                    job.resume()
                elif action == "rate":
                    job.set_rate(rate)
                elif not job.cancel():  # the switchover began: it will not be undone
                    raise control.RequestError(
                        "too-late", f"the relocation of {name!r} is already switching over; "
                        "it will complete")
                return job.statistics().as_dict()

            return handler

        command = control.Command
        return {
            "status": command(status),
            "locate": command(locate, ("entry",)),
            "migrate": command(migrate, ("entry", "to", "rate", "max_pause_ms", "mode",
                                         "keep_source", "stall_timeout_s", "restart")),
            "pause": command(job_command("pause"), ("entry",)),
            "resume": command(job_command("resume"), ("entry",)),
            "cancel": command(job_command("cancel"), ("entry",)),
            "rate": command(job_command("rate"), ("entry", "rate")),
            "cbt-checkpoint": command(cbt_checkpoint, ("path",)),
            "cbt-changes": command(cbt_changes, ("path", "since")),
            "cbt-info": command(cbt_info, ("path",)),
        }

    @contextlib.asynccontextmanager
    async def _open_file(self, request: dict[str, Any]) -> AsyncIterator[VFile]:
        """The regular file a control request's ``path`` names, open for the request."""
        assert self.datastore is not None and self.files is not None
        parts = control.path_arg(request)
        try:
            entry, path_fd = self.datastore.resolve(parts)
        except OSError as e:
            raise control.RequestError(
                "bad-path", f"{'/'.join(parts)}: {e.strerror or e}") from None
        try:
            st = backing.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise control.RequestError("bad-path", f"{'/'.join(parts)} is not a regular file")
            try:
                vfile = self.files.open(path_fd, (st.st_dev, st.st_ino), entry.gate)
            except OSError as e:
                raise control.RequestError("io-error", f"cannot open: {e.strerror}") from None
            if vfile.tracker is None:
                self.files.release(vfile)
                if not self.config.cbt:
                    raise control.RequestError(
                        "cbt-off", "changed block tracking is off on this datastore")
                raise control.RequestError("read-only", "the file is read-only on its store")
            try:
                yield vfile
            finally:
                self.files.release(vfile)
        finally:
            backing.close(path_fd)

    def _entry(self, request: dict[str, Any], key: str = "entry") -> Entry:
        """The entry a control request names; RequestError unless it is one of ours."""
        assert self.datastore is not None
        name = control.entry_arg(request, key)
        entry = self.datastore.get(name)
        if entry is None:
            raise control.RequestError(
                "unknown-entry", f"{name!r} is not an entry of {self.config.mountpoint}")
        return entry

    def _shutdown(self) -> None:
        self._notify_stopping()
        if self._mounted:
            pyfuse3.close(unmount=True)
            self._mounted = False
        if self.ops is not None:
            self.ops.close()
        if self.datastore is not None:
            try:
                self.datastore.save_nowait_blocking()
            except OSError as e:  # as after a crash: the next mount repairs it
                log.warning("placement record not saved at unmount (%s)", e.strerror or e)
            finally:
                self.datastore.close()
        self.claims.release()
        self.state.close()
        log.info("unmounted %s", self.config.mountpoint)
