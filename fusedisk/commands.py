"""The control commands: what the daemon does for each request of ``api.py``.

Each handler takes its decoded request (a dataclass of ``api``) and answers
with a JSON-able result or an ``api.RequestError``; :meth:`Commands.table`
is what the control server serves. The rooms the handlers use are handed
in by the composition root (daemon.py), which also supplies ``status``'s
parts that only it knows (its health and the FUSE loop's counters).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from . import __version__, api, backing, control, fuseshim
from .cbt import ChangeIdError
from .datastore import Datastore, Entry
from .lifecycle import NO_JOB, Answer, Command
from .relocation import Options, Relocation, RelocationError, Relocator
from .snapshots import SnapshotError, Snapshots
from .vdisk import OpenFiles, VFile

#: How long ``status`` waits for the placement record's write-behind save, so that
#: ``record_stale`` tells how the record stands after every change made before it
STATUS_SAVE_WAIT_S = 2.0


class Commands:
    """The handlers of one mounted datastore's control commands."""

    def __init__(
        self,
        *,
        mountpoint: Path,
        state_dir: Path,
        datastore_id: str,
        block_size: int,
        cbt_enabled: bool,
        datastore: Datastore,
        files: OpenFiles,
        relocator: Relocator,
        snapshots: Snapshots,
        extra_status: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.mountpoint = mountpoint
        self.state_dir = state_dir
        self.datastore_id = datastore_id
        self.block_size = block_size
        self.cbt_enabled = cbt_enabled
        self.datastore = datastore
        self.files = files
        self.relocator = relocator
        self.snapshots = snapshots
        self.extra_status = extra_status

    def table(self) -> dict[str, control.Command]:
        """Every command of ``api.REQUESTS``, each with its handler."""
        handlers: dict[type[api.Request[object]], Any] = {
            api.Status: self.status,
            api.Locate: self.locate,
            api.Migrate: self.migrate,
            api.Pause: self.job_command,
            api.Resume: self.job_command,
            api.Cancel: self.job_command,
            api.Rate: self.job_command,
            api.Watch: self.watch,
            api.CbtCheckpoint: self.cbt_checkpoint,
            api.CbtChanges: self.cbt_changes,
            api.CbtInfo: self.cbt_info,
            api.SnapshotCreate: self.snapshot_create,
            api.SnapshotList: self.snapshot_list,
            api.SnapshotDelete: self.snapshot_delete,
        }
        assert set(handlers) == set(api.REQUESTS.values()), "a command without a handler"
        return {kind.command: control.typed(kind, handler) for kind, handler in handlers.items()}

    # -- the datastore ----------------------------------------------------------------

    async def status(self, request: api.Status) -> dict[str, Any]:
        with trio.move_on_after(STATUS_SAVE_WAIT_S):  # the record's health after every change
            await self.datastore.wait_saved()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "datastore_id": self.datastore_id,
            "mountpoint": str(self.mountpoint),
            "state_dir": str(self.state_dir),
            "block_size": self.block_size,
            **self.datastore.statistics(),
            "fuse_shim": fuseshim.statistics(),
            "jobs": [job.to_wire() for job in self.relocator.statistics()],
            "snapshots": self.snapshots.statistics(),
            **self.extra_status(),
        }

    async def locate(self, request: api.Locate) -> dict[str, Any]:
        entry = self._entry(request.entry)
        return {"entry": entry.name, "store": entry.store.name,
                "path": str(entry.store.path / entry.name)}

    # -- relocation ---------------------------------------------------------------------

    async def migrate(self, request: api.Migrate) -> api.JobWire:
        entry = self._entry(request.entry)
        dst = self.datastore.stores.get(request.to)
        if dst is None:
            raise api.RequestError(
                "unknown-store", f"{request.to!r} is not a store of this datastore "
                f"({', '.join(sorted(self.datastore.stores))})")
        options = Options(mode=request.mode, rate=request.rate,
                          max_pause_ms=request.max_pause_ms, keep_source=request.keep_source,
                          stall_timeout_s=request.stall_timeout_s)
        current = self.relocator.jobs.get(entry.name)
        if request.restart and current is not None:
            _check(current.life.answer(Command.RESTART), entry.name)
            if not current.finished.is_set():
                # start over: the running (say, resumed) job and its copy go first
                if not current.cancel():  # the state moved on since the table's answer
                    _check(current.life.answer(Command.RESTART), entry.name)
                await current.finished.wait()
        try:
            job = self.relocator.start(entry, dst, options)
        except RelocationError as e:
            raise api.RequestError("refused", str(e)) from None
        return job.statistics().to_wire()

    async def job_command(
        self, request: api.Pause | api.Resume | api.Cancel | api.Rate
    ) -> api.JobWire:
        job = self._job(request.entry, request.job)
        command = _COMMAND[type(request)]
        _check(job.life.answer(command), request.entry, request.job)
        if isinstance(request, api.Pause):
            job.pause()
        elif isinstance(request, api.Resume):
            job.resume()
        elif isinstance(request, api.Rate):
            job.set_rate(request.rate)
        elif not job.cancel():  # the table said yes: the state moved on since
            _check(job.life.answer(command), request.entry, request.job)
        return job.statistics().to_wire()

    async def watch(self, request: api.Watch) -> control.Stream:
        """The job's progress as events, the last one final (a finished job: that one only)."""
        job = self._job(request.entry, request.job)
        _check(job.life.answer(Command.WATCH), request.entry, request.job)
        return control.Stream(_progress(job))

    def _job(self, name: str, job_id: str | None) -> Relocation:
        """The entry's job (the one named *job_id*); ``no-job`` if there is none."""
        job = self.relocator.jobs.get(name)
        if job is None or (job_id is not None and job.id != job_id):
            _check(NO_JOB, name, job_id)
            raise AssertionError  # unreachable: a refusal raises
        return job

    # -- changed block tracking -----------------------------------------------------------

    async def cbt_checkpoint(self, request: api.CbtCheckpoint) -> dict[str, Any]:
        async with self._open_file(request.path) as vfile:
            assert vfile.tracker is not None
            return {"change_id": await vfile.tracker.checkpoint()}

    async def cbt_changes(self, request: api.CbtChanges) -> dict[str, Any]:
        async with self._open_file(request.path) as vfile:
            assert vfile.tracker is not None
            size = vfile.size()
            if request.since == "*":
                extents = await backing.run_blocking(backing.data_extents, vfile.fd)
            else:
                try:
                    extents = vfile.tracker.changes(request.since, size, request.until)
                except ChangeIdError as e:
                    raise api.RequestError("change-id", str(e)) from None
        lo = request.start
        hi = size if request.length is None else min(size, lo + request.length)
        clipped = [[max(o, lo), min(o + n, hi) - max(o, lo)] for o, n in extents
                   if o < hi and o + n > lo]
        return {"change_id": request.since, "file_size": size, "extents": clipped}

    async def cbt_info(self, request: api.CbtInfo) -> dict[str, Any]:
        async with self._open_file(request.path) as vfile:
            assert vfile.tracker is not None
            return {"block_size": self.block_size, "file_size": vfile.size(),
                    **vfile.tracker.statistics()}

    # -- snapshots ------------------------------------------------------------------------

    async def snapshot_create(self, request: api.SnapshotCreate) -> dict[str, Any]:
        entry = self._entry(request.entry)
        try:
            return (await self.snapshots.create(entry, request.name)).as_dict()
        except SnapshotError as e:
            raise api.RequestError("refused", str(e)) from None
        except OSError as e:
            raise api.RequestError("io-error", f"snapshot failed: {e.strerror or e}") from None

    async def snapshot_list(self, request: api.SnapshotList) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.snapshots.list(request.entry)]

    async def snapshot_delete(self, request: api.SnapshotDelete) -> dict[str, Any]:
        try:
            return (await self.snapshots.delete(request.entry, request.name)).as_dict()
        except SnapshotError as e:
            raise api.RequestError("no-snapshot", str(e)) from None
        except OSError as e:
            raise api.RequestError("io-error", f"delete failed: {e.strerror or e}") from None

    @contextlib.asynccontextmanager
    async def _open_file(self, path: str) -> AsyncIterator[VFile]:
        """The regular file *path* names (checked by api), open for the request."""
        parts = tuple(path.split("/"))
        try:
            entry, path_fd = self.datastore.resolve(parts)
        except OSError as e:
            raise api.RequestError("bad-path", f"{path}: {e.strerror or e}") from None
        try:
            st = backing.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise api.RequestError("bad-path", f"{path} is not a regular file")
            try:
                vfile = self.files.open(path_fd, (st.st_dev, st.st_ino), entry.gate)
            except OSError as e:
                raise api.RequestError("io-error", f"cannot open: {e.strerror}") from None
            if vfile.tracker is None:
                self.files.release(vfile)
                if not self.cbt_enabled:
                    raise api.RequestError(
                        "cbt-off", "changed block tracking is off on this datastore")
                raise api.RequestError("read-only", "the file is read-only on its store")
            try:
                yield vfile
            finally:
                self.files.release(vfile)
        finally:
            backing.close(path_fd)

    def _entry(self, name: str) -> Entry:
        """The entry *name*; RequestError unless it is one of ours."""
        entry = self.datastore.get(name)
        if entry is None:
            raise api.RequestError(
                "unknown-entry", f"{name!r} is not an entry of {self.mountpoint}")
        return entry


#: The command of the lifecycle table each job request is.
_COMMAND: dict[type[api.Request[object]], Command] = {
    api.Pause: Command.PAUSE, api.Resume: Command.RESUME, api.Rate: Command.RATE,
    api.Cancel: Command.CANCEL,
}


def _check(answer: Answer, entry: str, job_id: str | None = None) -> None:
    """Raise the refusal *answer* is (as the control socket answers it); nothing if ok."""
    if not answer.ok:
        assert answer.code is not None
        what = f"job {job_id} of {entry!r}" if job_id else None
        raise api.RequestError(answer.code, answer.text(entry=entry, what=what))


async def _progress(job: Relocation) -> AsyncIterator[api.JobWire]:
    """*job* now, then whenever it changed: at once when its state moves (the lifecycle's
    ``changed``), otherwise at most every WATCH_INTERVAL_S; the last event is final."""
    last: dict[str, object] | None = None
    while True:
        finished = job.finished.is_set()
        now = job.statistics().to_wire()
        moved = {k: v for k, v in now.items() if k != "elapsed_s"}
        # a final state is shown once the job is over (its clean-up done), as the
        # stream's last event: a client stops reading at the first final one
        if finished or (moved != last and not job.life.final):
            yield now
            last = moved
        if finished:
            return
        changed = job.life.changed
        with trio.move_on_after(api.WATCH_INTERVAL_S):
            async with trio.open_nursery() as nursery:  # whichever comes first
                for event in (job.finished, changed):
                    nursery.start_soon(_wait_then_cancel, event, nursery.cancel_scope)


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
