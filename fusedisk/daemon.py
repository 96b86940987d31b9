"""Composition root: builds every room, owns the nursery, mounts and unmounts (:func:`serve`).

Start-up order, each step a fact before the next one starts:
stores checked → mountpoint checked (a dead fusedisk mount left by a crash
is detached) → state directory locked → every store claimed (its owner
file locked: see datastore.StoreClaims) → placement loaded and repaired →
FUSE session mounted → control socket listening → the mount answers a
``stat`` from another thread → *ready* (``READY=1`` to systemd, ``OK`` to
a waiting ``fusedisk mount``).

Shut-down: SIGTERM/SIGINT or ``fusedisk umount`` end the FUSE session; then
what was built is taken down in reverse (one exit stack): the kernel mount
is removed, every backing handle closed, the placement saved, the stores'
owner files and the state directory unlocked. A failure at any start-up
step undoes exactly the steps before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from . import __version__, fuseshim, gcwatch, mountinfo, trace
from .cbt import CbtStore
from .commands import Commands
from .config import Config, check_directories
from .control import ControlServer
from .datastore import Datastore, StoreClaims
from .errors import MountError
from .extraops import ExtraOps
from .fs import Operations
from .fuseloop import RequestLoop, dev_fuse_fds, find_session_fd
from .metadata import StateDir
from .relocation import Relocator
from .snapshots import Snapshots
from .storeviews import StoreViews
from .vdisk import OpenFiles, VFile

log = logging.getLogger(__name__)

FSNAME = "fusedisk"
#: FUSE worker tasks: how many handlers may wait at once (an offloaded fsync,
#: a write held at a paused entry) before requests queue in the kernel.
MAX_WORKER_TASKS = 64
#: How often the systemd status line is refreshed while serving.
STATUS_INTERVAL_S = 5.0


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
        if mountinfo.fstype_at(mountpoint) != f"fuse.{FSNAME}":
            raise MountError(
                f"mountpoint {mountpoint} is a dead mount of another filesystem"
            ) from None
        log.warning("detaching the dead fusedisk mount left on %s by a crash", mountpoint)
        detach_dead_mount(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        kind = mountinfo.fstype_at(mountpoint) or "unknown"
        raise MountError(f"mountpoint {mountpoint} is busy: {kind} is already mounted there")


def _raise_fd_limit() -> None:
    """Allow as many descriptors as we may: the O_PATH LRU takes a quarter
    (fs.py), open files and a relocation's copies in progress the rest."""
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


async def serve(config: Config, on_ready: Callable[[], None]) -> None:
    """Build every room, serve until unmounted or signalled, and take it all down again.

    Each room's teardown is registered on one exit stack the moment the room
    exists, so a failure at any step undoes exactly what was built, in reverse
    order (state directory unlocked last), and a normal end does the same.
    """
    async with contextlib.AsyncExitStack() as stack:
        check_directories(config)
        check_mountpoint(config.mountpoint)
        state = StateDir(config.state_dir)
        state.open()
        prepared = False

        def unmounted() -> None:
            if prepared:
                log.info("unmounted %s", config.mountpoint)

        stack.callback(unmounted)
        # a first mount refused before it served leaves no state directory behind
        stack.callback(lambda: state.close() if prepared else state.abandon())
        # remote stores become directories (a view each): stopped after everything
        # that holds a descriptor into them is closed (the callbacks registered later)
        views = StoreViews(config.mountpoint, state.datastore_id,
                           f"state directory {config.state_dir}, mounted on {config.mountpoint}")
        stack.callback(views.stop)
        if config.remote_stores:
            mounted = await views.start(config.remote_stores)
            config = dataclasses.replace(config, stores={**config.stores, **mounted})
            check_directories(config)
        claims = StoreClaims(state, config.mountpoint, {
            name: f"{spec.where}:{spec.directory}" for name, spec in config.remote_stores.items()})
        stack.callback(claims.release)
        datastore = Datastore.open(config, state, claims)
        stack.callback(datastore.close)
        cbt = CbtStore(config.state_dir, config.block_size) if config.cbt else None
        files = OpenFiles(cbt, config.block_size)
        prepared = True
        # before the mount serves: a copy-before-write snapshot must see every write;
        # closed after the FUSE session and the files (a later callback runs earlier)
        snapshots = Snapshots(datastore, files)
        snapshots.load()
        stack.callback(snapshots.close)

        os.umask(0)  # new backing objects get exactly the mode the caller asked for
        os.chdir("/")  # every configured path is absolute; hold no directory busy
        _raise_fd_limit()
        stack.callback(_save_placement, datastore)
        ops = Operations(datastore, files, snapshots=snapshots)
        trace.install(ops)  # FUSEDISK_TRACE: before the mount serves
        stack.callback(trace.dump)
        snapshots.on_deleted = ops.view.deleted
        stack.callback(ops.close)
        relocator = Relocator(datastore, files, config.block_size, ops.repoint)
        fuse_loop, extra_ops = _mount(config, ops)
        stack.callback(pyfuse3.close, unmount=True)
        # first: no shim thread may still be answering a FSYNC when the session
        # goes, nor syncing an fd that ops.close closes
        stack.callback(fuseshim.drain)
        daemon = Daemon(config, state, datastore, files, ops, relocator, fuse_loop, extra_ops,
                        snapshots=snapshots, views=views)
        # stalls of the collector are worth a warning while the mount serves
        gcwatch.install()
        stack.callback(gcwatch.uninstall)
        stack.callback(daemon.notify_stopping)
        await daemon.serve(on_ready)


#: ``FUSEDISK_SHIM_OFF=fsync,parallel,writebehind``: turn off the shim's FSYNC on
#: its own threads, FOPEN_PARALLEL_DIRECT_WRITES and write-behind (fuseshim.py),
#: to measure what each one buys (bench A/B runs); unset, all are on.
SHIM_OFF_ENV = "FUSEDISK_SHIM_OFF"


def _shim_features_off() -> set[str]:
    return {name.strip() for name in os.environ.get(SHIM_OFF_ENV, "").split(",") if name.strip()}


def _mount(config: Config, ops: Operations) -> tuple[RequestLoop, ExtraOps | None]:
    """Mount the FUSE session; the request loop that will read it, and the server of
    the requests pyfuse3 does not pass on (None when the shim cannot serve them)."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if config.allow_other:
        options.add("allow_other")
    fds_before_init = dev_fuse_fds()
    fuseshim.enable_extra_ops()
    off = _shim_features_off()
    fuseshim.enable_fast_fsync("fsync" not in off)
    fuseshim.enable_parallel_writes("parallel" not in off)
    fuseshim.enable_killpriv("killpriv" not in off)
    fuseshim.disable_auto_inval("noautoinval" not in off)
    if "writebehind" in off:
        VFile.write_behind_bytes = 0
    try:
        pyfuse3.init(ops, str(config.mountpoint), options)
    except RuntimeError as e:
        raise MountError(f"cannot mount on {config.mountpoint}: {e}") from None
    if not fuseshim.sessions():
        log.warning("the libfuse shim is not in use (%s): RWF_DSYNC writes on O_DIRECT "
                    "descriptors are not synced (O_DSYNC/O_SYNC opens are)",
                    fuseshim.problem() or "unknown reason")
    loop = RequestLoop(find_session_fd(fds_before_init), max_tasks=MAX_WORKER_TASKS)
    event_fd = fuseshim.extra_ops_fd()
    if event_fd is None:
        log.warning("the libfuse shim's fallocate/lseek/copy_file_range handlers are not in "
                    "use (%s): fallocate gets EOPNOTSUPP and SEEK_HOLE finds no holes",
                    fuseshim.problem() or "unknown reason")
        return loop, None
    return loop, ExtraOps(ops, event_fd)


def _save_placement(datastore: Datastore) -> None:
    try:
        datastore.save_nowait_blocking()
    except OSError as e:  # as after a crash: the next mount repairs it
        log.warning("placement record not saved at unmount (%s)", e.strerror or e)


class Daemon:
    """One mounted datastore while it serves: its tasks, signals, status and health."""

    def __init__(self, config: Config, state: StateDir, datastore: Datastore, files: OpenFiles,
                 ops: Operations, relocator: Relocator, fuse_loop: RequestLoop,
                 extra_ops: ExtraOps | None, *, snapshots: Snapshots,
                 views: StoreViews | None = None) -> None:
        self.config = config
        self.views = views
        self.snapshots = snapshots
        self.state = state
        self.datastore = datastore
        self.files = files
        self.ops = ops
        self.relocator = relocator
        self.fuse_loop = fuse_loop
        self.extra_ops = extra_ops
        self._stopping = False

    async def serve(self, on_ready: Callable[[], None]) -> None:
        """Run every task until the FUSE session ends (unmount, signal, umount command)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_fuse, nursery.cancel_scope)
            nursery.start_soon(self._handle_signals)
            if self.extra_ops is not None:
                await nursery.start(self.extra_ops.run)
            await nursery.start(self.files.run)
            await nursery.start(self.datastore.run)
            await nursery.start(self.relocator.run)
            await nursery.start(self.snapshots.run)
            self.relocator.resume_interrupted()
            commands = Commands(
                mountpoint=self.config.mountpoint, state_dir=self.config.state_dir,
                datastore_id=self.state.datastore_id, block_size=self.config.block_size,
                cbt_enabled=self.config.cbt, datastore=self.datastore, files=self.files,
                relocator=self.relocator, snapshots=self.snapshots,
                extra_status=self._extra_status,
            )
            control_server = ControlServer(self.config.mountpoint, commands.table())
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

    async def _serve_fuse(self, cancel_scope: trio.CancelScope) -> None:
        await self.fuse_loop.run()
        log.info("FUSE session ended")
        cancel_scope.cancel()

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                log.info("%s received: unmounting", signal.Signals(signum).name)
                self.notify_stopping()
                await self.relocator.stop()
                self.fuse_loop.terminate()

    def _status_line(self) -> str:
        """The one-line summary systemd shows as the service's status."""
        n = len(self.datastore.entries)
        line = f"serving {n} {'entry' if n == 1 else 'entries'} on {self.config.mountpoint}"
        if self.datastore.conflicts:
            line += f"; {len(self.datastore.conflicts)} in conflict (not served)"
        for job in self.relocator.statistics():
            if not job.final:
                line += (
                    f"; relocating {job.entry} {job.src}->{job.dst}: "
                    f"{job.state}, pass {job.pass_no}, {job.progress:.0%}, "
                    f"{job.copy_rate / 1e6:.0f} MB/s, {job.dirty_bytes >> 20} MiB dirty"
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

    def notify_stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            sd_notify("STOPPING=1")
            notify_status(f"unmounting {self.config.mountpoint}")

    def _health(self) -> dict[str, Any]:
        """``health``: "ok" or "degraded", and in ``degraded`` one line for each reason.

        Degraded means the mount serves, but not everything it was asked to
        keep is kept: each line says what is lost and what still holds.
        """
        reasons = []
        if self.datastore.record_stale is not None:
            reasons.append(f"the datastore record cannot be saved ({self.datastore.record_stale}); "
                           "the stores hold every change, and the next mount rebuilds it from them")
        cbt = self.files.cbt
        if cbt is not None and cbt.health.error is not None:
            reasons.append(f"the state directory refuses CBT saves ({cbt.health.error}); "
                           "change ids of files written meanwhile are withdrawn "
                           "(a full backup is needed for them)")
        for lost in self.snapshots.statistics()["lost"]:
            reasons.append(f"snapshot {lost} (it cannot be read; delete it and make a new one)")
        for entry, stores in sorted(self.datastore.conflicts.items()):
            reasons.append(f"entry {entry!r} is not served: it is on {', '.join(stores)}")
        if self.views is not None:
            for name, info in self.views.statistics().items():
                if not info["running"]:
                    reasons.append(f"remote store {name!r}: its view exited; the entries on it "
                                   "fail with EIO until the next mount")
                elif info.get("connected") is False:
                    reasons.append(f"remote store {name!r} ({info['where']}): not connected; "
                                   "its requests wait for the link to come back, then fail "
                                   "with EIO")
        return {
            "health": "degraded" if reasons else "ok",
            "degraded": reasons,
            "cbt_state": cbt.health.statistics() if cbt is not None else None,
        }

    def _extra_status(self) -> dict[str, Any]:
        """The parts of ``status`` only the composition root knows."""
        return {
            "fs": self.ops.statistics(),
            "fuse_loop": self.fuse_loop.statistics(),
            "fuse_shim": {**fuseshim.statistics(), "extra_served":
                          self.extra_ops.statistics() if self.extra_ops else None},
            "remote_stores": self.views.statistics() if self.views is not None else {},
            **self._health(),
        }
