"""Relocation jobs: move one entry to another store while it is in use.

A :class:`Relocation` runs::

    preflight → record "copying" → staging + pool → the tree staged
    (staging.py) → pass 1 (every allocated block) → passes over what was
    dirtied, each followed by a sync of the staged tree → [mirroring, when
    the dirty set stops shrinking] → flush → switchover (switchover.py) →
    source removed → record ended

Until the switchover's commit the source is the truth: a failure or a
cancel leaves it untouched and removes the partial copy. A crash, a restart
or a clean stop (the daemon's shutdown) keeps the partial copy and its
progress record (progress.py, saved every :data:`PROGRESS_INTERVAL_S` and
after each pass): the next mount *resumes* the relocation, copying only what
the record left pending and what changed since (the files' relocation marks,
cbt.py); ``--restart`` starts it over. ``stall_timeout_s`` fails a job that
makes no progress for that long (a stuck store), whatever its size. Convergence is
guaranteed in ``auto`` mode: when a pass does not shrink the dirty set by
at least a fifth, or after :data:`MAX_PRECOPY_PASSES`, writes are mirrored
to both stores and the next pass finishes the copy. ``precopy`` never
mirrors (and fails if it cannot converge); ``mirror`` mirrors from the start.

The :class:`Relocator` is the daemon's service that owns the jobs' tasks:
one job per entry at a time, any number of entries at once.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import backing, progress, trace
from .api import DEFAULT_MAX_PAUSE_MS, DEFAULT_MODE, Job, Mode, State
from .config import MAX_PAUSE_MS, MAX_RATE, MAX_STALL_TIMEOUT_S, MIN_PAUSE_MS
from .datastore import Datastore, Entry, Journal, Store, kept_source_name, staging_name
from .errors import FusediskError, StateError
from .failpoint import PAUSE_AFTER_PASS, armed_percent, failpoint, hold
from .lifecycle import Command, Event, Lifecycle, Phase
from .mirror import Copier, walk
from .staging import StagedTree
from .switchover import Costs, PauseOverrun, switch_over
from .vdisk import OpenFiles, Resolver

log = logging.getLogger(__name__)

MAX_PRECOPY_PASSES = 8
#: A pass must leave at most this share of what it copied (and of the previous
#: pass's dirty bytes), or the writer is outrunning the copy.
CONVERGE_RATIO = 0.8
#: Share of ``max_pause`` the estimated pause may take before the gate closes
#: (the rest is margin, and the re-point after the commit).
PAUSE_ESTIMATE_SHARE = 0.8
#: Switchover attempts abandoned for the budget before the relocation fails.
MAX_SWITCH_ATTEMPTS = 10
#: Wait after the n-th abandoned attempt: n times this (at most 2 s).
ABANDON_BACKOFF_S = 0.2
#: How often the copy saves its progress record (besides after each pass):
#: every second, or every so many bytes copied if that comes first. What was
#: copied since the last record is copied again after a crash.
PROGRESS_INTERVAL_S = 1.0
PROGRESS_BYTES = 128 << 20


class RelocationError(FusediskError):
    """A relocation failed; the source is still the truth."""


@dataclass(frozen=True, slots=True)
class Options:
    mode: Mode = DEFAULT_MODE
    rate: int = 0  #: bytes/s, 0 = unlimited
    max_pause_ms: int = DEFAULT_MAX_PAUSE_MS
    keep_source: bool = False
    #: fail the job after this long without progress (0: never)
    stall_timeout_s: float = 0.0

    def to_record(self) -> dict[str, Any]:
        return {"mode": str(self.mode), "rate": self.rate, "max_pause_ms": self.max_pause_ms,
                "stall_timeout_s": self.stall_timeout_s}

    @classmethod
    def from_record(cls, record: dict[str, Any], keep_source: bool) -> Options:
        """The options a relocation record saved (defaults for what it lacks)."""
        out = cls(keep_source=keep_source)
        try:
            return cls(
                mode=Mode(record.get("mode", out.mode)),
                rate=int(record.get("rate", out.rate)),
                max_pause_ms=int(record.get("max_pause_ms", out.max_pause_ms)),
                keep_source=keep_source,
                stall_timeout_s=float(record.get("stall_timeout_s", 0.0)),
            )
        except (TypeError, ValueError):
            return out


def allocated_bytes(entry_fd: int) -> int:
    """Bytes the entry occupies on its store (what the destination must hold)."""
    root = backing.fstat(entry_fd)
    total = root.st_blocks * 512
    if not stat.S_ISDIR(root.st_mode):
        return total
    seen: set[tuple[int, int]] = set()
    for _parts, _fd, st in walk(entry_fd):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


class Relocation:
    """One entry moving to another store. ``statistics()`` may be called any time."""

    def __init__(
        self,
        datastore: Datastore,
        files: OpenFiles,
        entry: Entry,
        dst: Store,
        options: Options,
        block_size: int,
        on_commit: Callable[[Entry, Resolver], None],
        resume: bool = False,
    ) -> None:
        self.datastore = datastore
        self.files = files
        self.resumed = resume
        self.entry = entry
        self.src = entry.store
        self.dst = dst
        self.options = options
        self.block_size = block_size
        self.on_commit = on_commit
        self.id = secrets.token_hex(8)
        #: the job's state, moved only through lifecycle.TRANSITIONS
        self.life = Lifecycle(entry.name, self._persist_phase)
        self.error: str | None = None
        self.pass_no = 0
        self.bytes_total = 0
        self.pause_ms: float | None = None
        self.copier: Copier | None = None
        self.tree: StagedTree | None = None
        self.costs = Costs()
        self.attempts = 0
        self.last_estimate_ms: float | None = None
        self.last_abandoned: str | None = None
        self._rate_limit = options.rate
        self._dirty_rate = 0.0
        self._progress = 0.0
        self._started = time.monotonic()
        self._ended: float | None = None
        self._cancel_scope = trio.CancelScope()
        self._staging_fd: int | None = None
        self._pool_fd: int | None = None
        self._gen = 1
        self._suspending = False
        self._stalled: str | None = None
        self.finished = trio.Event()

    @property
    def state(self) -> State:
        return self.life.state

    @property
    def committed(self) -> bool:
        return self.life.committed

    async def _persist_phase(self, phase: Phase) -> None:
        """Save the record's new phase (the lifecycle calls this when a move changes it).

        The commit's save raises when it fails (the commit did not happen); an
        abandoned record that cannot be saved only means the next mount
        resumes the copy rather than remove it (a cancel is then undone, never
        any data)."""
        if phase != Phase.ABANDONED:
            await self.datastore.relocation_phase(self.entry, phase)
            return
        try:
            with trio.CancelScope(shield=True):
                await self.datastore.relocation_phase(self.entry, phase)
        except OSError as e:
            log.warning("relocation record of %r not saved (%s)", self.entry.name,
                        e.strerror or e)

    # -- control --------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel unless the switchover has begun; return whether the cancel was accepted.

        The answer is the truth: an accepted cancel always takes effect,
        because the state becomes ``switching`` only right after a checkpoint
        that raises for a cancel accepted before it (:meth:`_switch_over`;
        the differential test once saw an accepted cancel end "done" when
        the job was already rescheduled from its last await). From ``switching`` on the
        job may be past its last checkpoint before the commit (or waiting on
        a flush that cannot be abandoned), so a cancel there could be
        silently outrun by the commit: it is refused, and the switch completes.
        """
        if not self.life.answer(Command.CANCEL).ok:
            return False
        self._cancel_scope.cancel()
        return True

    def suspend(self) -> None:
        """Stop for a daemon shutdown, keeping the partial copy for the next
        mount to resume (a switchover that has begun is let finish)."""
        self._suspending = True
        if not self.cancel():
            self._suspending = False

    def pause(self) -> None:
        if self.copier is not None:
            self.copier.pause()

    def resume(self) -> None:
        if self.copier is not None:
            self.copier.resume()

    def set_rate(self, rate: int) -> None:
        self._rate_limit = rate
        if self.copier is not None:
            self.copier.rate_limit = rate

    # -- the run --------------------------------------------------------------------

    async def run(self) -> None:
        name = self.entry.name
        log.info("relocation of %r from %r to %r %s (%s mode, max pause %d ms)",
                 name, self.src.name, self.dst.name, "resuming" if self.resumed else "started",
                 self.options.mode, self.options.max_pause_ms)
        try:
            failure: OSError | FusediskError | None = None
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    if self.options.stall_timeout_s > 0:
                        nursery.start_soon(self._watch_for_stalls)
                    try:
                        await self._run()
                    except (OSError, FusediskError) as e:
                        failure = e  # raised below: a nursery would wrap it in a group
                    nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
            if self._stalled is not None:
                raise RelocationError(self._stalled)
            if not self.committed and not self._suspending:
                await self.life.advance(Event.CANCEL)
                log.info("relocation of %r cancelled; %r is still authoritative", name,
                         self.src.name)
        except (OSError, FusediskError) as e:
            self.error = _one_line(e)
            if self.committed:  # the switch only goes forward: the clean-up finishes it
                log.error("relocation of %r to %r: %s after the commit; %r serves it",
                          name, self.dst.name, self.error, self.dst.name)
            else:
                with trio.CancelScope(shield=True):
                    await self.life.advance(Event.FAIL)
                log.warning("relocation of %r to %r failed: %s; %r is still authoritative",
                            name, self.dst.name, self.error, self.src.name)
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup()
            self._ended = time.monotonic()
            self.finished.set()

    async def _run(self) -> None:
        entry, dst = self.entry, self.dst
        src_fd = backing.open_path(entry.store.root_fd, entry.name)
        try:
            needed = await backing.run_blocking(allocated_bytes, src_fd)
        finally:
            backing.close(src_fd)
        vfs = dst.statvfs()
        free = vfs.f_bavail * vfs.f_frsize
        if needed > free:
            raise RelocationError(
                f"store {dst.name!r} has {free >> 20} MiB free, {entry.name!r} needs "
                f"{needed >> 20} MiB"
            )
        saving = time.monotonic()
        await self.datastore.relocation_started(entry, dst, self.options.keep_source,
                                                self.options.to_record())
        self.life.recorded_as(True)
        self.costs.learn("commit_ms", (time.monotonic() - saving) * 1000, 1)
        staging = staging_name(entry.name)
        found = None
        if self.resumed:
            found = await backing.run_blocking(_prepare_resume, dst, staging, self.src.name,
                                               self.block_size)
        if found is None:
            await backing.run_blocking(backing.remove_tree, dst.root_fd, staging)
            backing.mkdir_at(dst.root_fd, staging, 0o700)
        self._staging_fd = backing.open_path(dst.root_fd, staging)
        if found is None:
            backing.mkdir_at(self._staging_fd, "pool", 0o700)
        self._pool_fd = backing.open_path(self._staging_fd, "pool")
        copier = self.copier = Copier(self.files, entry.gate, self._pool_fd, self.block_size,
                                      entry.store.root_fd, write_piece=dst.write_piece)
        copier.rate_limit = self._rate_limit
        if found is not None:
            copier.plan = found.files
            copier.plan_gen = found.gen
            self._gen = copier.gen = found.gen + 1
            self.life.move(Event.RESUME_FOUND)
        # from here on the mount notes what it changes in the entry: the first
        # build sees all that came before, a sync all that came after
        entry.journal = Journal()
        tree = self.tree = StagedTree(self._staging_fd, copier, entry.store.store_id)
        src_fd = backing.open_path(entry.store.root_fd, entry.name)
        try:
            await tree.build(src_fd)
        finally:
            backing.close(src_fd)
        copier.plan = {}  # what the tree did not name any more is not kept
        self.bytes_total = copier.dirty_bytes() + copier.resumed_bytes
        if self.resumed:
            log.info("relocation of %r resumed: %d MiB of the partial copy kept, %d MiB to copy",
                     entry.name, copier.resumed_bytes >> 20, copier.dirty_bytes() >> 20)
        share = armed_percent("copied-")
        if share is not None:  # a test's crash part-way through the copy
            copier.kill_at = int(self.bytes_total * share / 100)
        copier.progress_hook = self._save_progress
        copier.progress_due = time.monotonic() + PROGRESS_INTERVAL_S
        copier.progress_due_bytes = copier.bytes_copied + PROGRESS_BYTES
        if self.options.mode == Mode.MIRROR:
            self._start_mirroring()

        previous_dirty: int | None = None
        while True:
            self.pass_no += 1
            pass_start = time.monotonic()
            copied_before = copier.bytes_copied
            await copier.copy_pass()
            if PAUSE_AFTER_PASS:  # a test's hold between passes (failpoint.py)
                copier.pause()
                log.info("relocation of %r paused after pass %d", entry.name, self.pass_no)
                await copier.wait_resumed()
            copied_in_pass = copier.bytes_copied - copied_before
            self._check_mirror()
            if self.state == State.RESUMING:
                self.life.move(Event.PASS_DONE)
            await self._save_progress()
            await self._sync()
            dirty = copier.dirty_bytes()
            self._dirty_rate = dirty / max(time.monotonic() - pass_start, 1e-3)
            log.info("relocation of %r: pass %d done, %d MiB dirty", entry.name, self.pass_no,
                     dirty >> 20)
            failpoint("mirroring" if copier.mirroring else "copying")
            fits = self._fits_pause()
            # mirroring, converged, and still over the estimate: try (the pause's
            # own checks abandon it early), so that a budget nothing can meet
            # ends in a clear failure rather than passes forever
            stuck = copier.mirroring and dirty == 0 and not fits
            if fits or stuck:
                if self.options.mode != Mode.PRECOPY and not copier.mirroring and dirty:
                    # Close to done: mirror from here on, so what the pause has to
                    # copy no longer depends on how fast the guest writes. Nothing
                    # dirty after a pass (an idle disk): no guest is racing the
                    # copy, switch over now (``mirrored`` stays false).
                    self._start_mirroring()
                    continue
                if trace.ON:
                    trace.mark("relocation", "sync and flush before the pause")
                await self._sync()
                await hold("before-pause-flush")  # a test's hold: a guest writes here
                await self._flush()  # the flush inside the pause stays small
                if trace.ON:
                    trace.mark("relocation", "flushed")
                self._check_mirror()
                if (self.options.mode != Mode.PRECOPY and not copier.mirroring
                        and copier.dirty_bytes()):
                    # The disk was idle after the pass, but a guest wrote while the
                    # tree synced and flushed: it is not idle. Mirror, or the pause
                    # would copy what it wrote (a copy step on a worker thread: 1-2
                    # ms of the pause for one block, issue 12).
                    self._start_mirroring()
                    continue
                if self._fits_pause() or stuck:
                    if await self._switch_over():
                        break
                    # abandoned for the budget: let a passing load spike go, converge
                    # further, try again
                    await trio.sleep(min(ABANDON_BACKOFF_S * self.attempts, 2.0))
                    continue
            if self.options.mode == Mode.PRECOPY:
                if self.pass_no >= MAX_PRECOPY_PASSES:
                    raise RelocationError(
                        f"pre-copy did not converge in {self.pass_no} passes (the VM writes "
                        "faster than the copy); use --mode auto or mirror, or a higher --rate"
                    )
            elif not copier.mirroring and (
                self.pass_no >= MAX_PRECOPY_PASSES
                or dirty > copied_in_pass * CONVERGE_RATIO
                or (previous_dirty is not None and dirty > previous_dirty * CONVERGE_RATIO)
            ):
                self._start_mirroring()
            previous_dirty = dirty

        log.info("relocation of %r committed: now on %r (pause %.1f ms)", entry.name, dst.name,
                 self.pause_ms)

    async def _switch_over(self) -> bool:
        """One switchover attempt; False if it was abandoned for the budget."""
        assert self.copier is not None and self.tree is not None
        # A cancel accepted until now must take effect: the job may have been
        # rescheduled from its last await (the flush's worker thread) when the
        # cancel came, and nothing between here and the commit is sure to be a
        # checkpoint (run_blocking is none). No await from this check to the
        # move: a cancel after it finds the state switching and is refused.
        await trio.lowlevel.checkpoint_if_cancelled()
        self.life.move(Event.SWITCH)
        self.attempts += 1
        try:
            self.pause_ms = await switch_over(
                self.datastore, self.entry, self.dst, self.copier, self.tree, self.on_commit,
                self._commit, self.options.max_pause_ms, self.costs,
            )
        except PauseOverrun as e:
            self.life.move(Event.ABANDON_MIRRORING if self.copier.mirroring else Event.ABANDON)
            self.last_abandoned = str(e)
            log.warning("relocation of %r: switchover attempt %d abandoned, the gate is open "
                        "again: %s", self.entry.name, self.attempts, e)
            if self.attempts >= MAX_SWITCH_ATTEMPTS:
                raise RelocationError(
                    f"the switchover did not fit the {self.options.max_pause_ms} ms pause "
                    f"budget in {self.attempts} attempts (last: {e}); raise --max-pause, or "
                    "lower the VM's rate of changes") from None
            # The commit's cost is known only from saves (a commit that never happens
            # teaches nothing): one slow fsync, on a loaded store, would refuse every
            # attempt to come. Measure it again now, outside the pause: a save of the
            # record as it is changes nothing.
            saving = time.monotonic()
            await self.datastore.save()
            self.costs.commit_ms = (time.monotonic() - saving) * 1000
            return False
        return True

    def _estimate_ms(self) -> float:
        """The pause if the gate closed now: dirty bytes at the copy rate, the
        journal's objects and the written files to sync, what a flush has left."""
        assert self.copier is not None and self.tree is not None
        journal = self.entry.journal
        objects = (len(journal) if journal is not None else 0) + self.tree.written()
        return self.costs.estimate_ms(objects, self.copier.dirty_bytes(),
                                      self.copier.copy_rate(), self.tree.pending())

    def _fits_pause(self) -> bool:
        """Does the pause, if the gate closed now, fit the budget (with a margin)?"""
        self.last_estimate_ms = self._estimate_ms()
        return self.last_estimate_ms <= self.options.max_pause_ms * PAUSE_ESTIMATE_SHARE

    async def _flush(self) -> None:
        assert self.tree is not None
        started = time.monotonic()
        count = await self.tree.flush()
        self.costs.learn("fsync_ms", (time.monotonic() - started) * 1000, count)

    async def _commit(self) -> None:
        """THE commit: the record's phase becomes ``committed`` (switch_over calls this)."""
        await self.life.advance(Event.COMMIT)

    async def _sync(self) -> None:
        """Bring the staged tree in step with what the mount changed since the last sync."""
        assert self.tree is not None and self.entry.journal is not None
        changed = self.entry.journal.take()
        started = time.monotonic()
        try:
            await self.tree.sync_names(changed)
            done = await self.tree.sync_attributes(changed)
            self.costs.learn("object_ms", (time.monotonic() - started) * 1000,
                             max(len(changed), done))
        finally:
            for fd in changed.values():
                backing.close(fd)

    def _start_mirroring(self) -> None:
        assert self.copier is not None
        self.copier.start_mirroring()
        self.life.move(Event.MIRROR)
        log.info("relocation of %r: mirroring writes to %r from now on", self.entry.name,
                 self.dst.name)

    def _check_mirror(self) -> None:
        assert self.copier is not None
        error = self.copier.mirror_error()
        if error is not None:
            raise RelocationError(f"writing to store {self.dst.name!r} failed: {error.strerror}")

    async def _save_progress(self) -> None:
        """Save the progress record (progress.py); a failure only costs a resume."""
        copier = self.copier
        if copier is None or self._staging_fd is None:
            return
        copier.progress_due = copier.progress_due_bytes = math.inf  # none from inside this one
        self._gen += 1
        gen = self._gen
        snapshot = copier.progress_snapshot(gen)
        files: dict[tuple[int, int], progress.FileProgress] = {}
        fds: list[int] = []
        try:
            for copy, pending in snapshot:
                if copy.vfile is None:
                    continue  # parked since (it shrank): copied afresh on a resume
                tracker = copy.vfile.tracker
                assert tracker is not None
                file_id = tracker.file_id
                try:
                    await tracker.save()
                except OSError:
                    continue
                if (copy.key not in copier.copies or tracker.file_id != file_id
                        or copy.dst_fd < 0):
                    continue  # dropped, parked, or the history was withdrawn meanwhile
                files[copy.key] = progress.FileProgress(
                    copy.key, file_id, backing.fstat(copy.dst_fd).st_ino, pending)
                fds.append(os.dup(copy.dst_fd))
            record = progress.Progress(gen, self.block_size, self.src.name, self.dst.name, files)
            await backing.run_blocking(_save_progress_blocking, fds,
                                       self.dst.path / staging_name(self.entry.name), record)
        except OSError as e:
            log.warning("relocation of %r: progress not saved (%s); a resume after a crash "
                        "copies more", self.entry.name, e.strerror or e)
        else:
            for copy in copier.attached():  # a parked one's tracker is closed
                if copy.vfile is not None and copy.vfile.tracker is not None:
                    copy.vfile.tracker.drop_relocation_marks(below=gen)
        finally:
            for fd in fds:
                backing.close(fd)
            copier.progress_due = time.monotonic() + PROGRESS_INTERVAL_S
            copier.progress_due_bytes = copier.bytes_copied + PROGRESS_BYTES

    async def _watch_for_stalls(self) -> None:
        """Fail the job when it makes no progress for ``stall_timeout_s`` (a
        paused job is not stuck)."""
        timeout_s = self.options.stall_timeout_s
        last: tuple[Any, ...] | None = None
        since = time.monotonic()
        while True:
            await trio.sleep(min(1.0, timeout_s / 4))
            copier = self.copier
            now = (self.state, self.pass_no, self.attempts,
                   copier.bytes_copied if copier else 0, bool(copier and copier.paused))
            if now != last or (copier is not None and copier.paused):
                last, since = now, time.monotonic()
                continue
            if time.monotonic() - since >= timeout_s:
                where = f"{self.state}, pass {self.pass_no}"
                message = (f"no progress for {timeout_s:g} s ({where}); the job is stuck "
                           "(--stall-timeout)")
                if self.cancel():
                    self._stalled = message
                    return

    async def _cleanup(self) -> None:
        """Undo (not committed) or finish (committed) on the stores; end the record.

        Interrupted, not failed nor cancelled (the daemon is stopping): keep the
        partial copy and the record, with a last progress record, for the next
        mount to resume."""
        if trace.ON:
            trace.mark("cleanup", "start")
        keep = not self.committed and not self.life.final
        if keep and self.copier is not None and self._staging_fd is not None:
            try:
                with trio.fail_after(30):
                    await self._save_progress()
            except trio.TooSlowError:
                pass
        if self.copier is not None:
            if not keep:
                for copy in self.copier.attached():  # a parked one's tracker is closed
                    if copy.vfile is not None and copy.vfile.tracker is not None:
                        copy.vfile.tracker.drop_relocation_marks()
            for pool_fd in self.copier.detach():
                backing.close(pool_fd)
        if self.entry.journal is not None:
            self.entry.journal.close()
            self.entry.journal = None
        if self.tree is not None:
            self.tree.close()
        for fd in (self._pool_fd, self._staging_fd):
            if fd is not None:
                backing.close(fd)
        self._pool_fd = self._staging_fd = None
        name = self.entry.name
        if keep:
            self.life.move(Event.SUSPEND)
            log.info("relocation of %r to %r suspended; the next mount resumes it", name,
                     self.dst.name)
            return
        if trace.ON:
            trace.mark("cleanup", "removing the staging directory")
        try:
            await backing.run_blocking(backing.remove_tree, self.dst.root_fd, staging_name(name))
            if trace.ON:
                trace.mark("cleanup", "removing the source")
            if self.committed:
                if self.options.keep_source:
                    kept = kept_source_name(name)
                    await backing.run_blocking(backing.remove_tree, self.src.root_fd, kept)
                    backing.renameat2(self.src.root_fd, name, self.src.root_fd, kept, 0)
                    log.info("relocation of %r: the old copy is kept as %s", name,
                             self.src.path / kept)
                else:
                    await backing.run_blocking(backing.remove_tree, self.src.root_fd, name)
            if trace.ON:
                trace.mark("cleanup", "ending the record")
            if self.life.recorded:
                await self.datastore.relocation_ended(self.entry)
                self.life.recorded_as(False)
            if trace.ON:
                trace.mark("cleanup", "done")
        except OSError as e:
            # the next mount finishes this from the record (its phase says how:
            # abandoned, or committed); nothing is lost
            log.error("relocation of %r: cleanup failed (%s); the next mount retries it",
                      name, e.strerror)
            if self.committed:  # served from the destination; the record stays
                self.error = (f"committed; removing the old copy failed ({e.strerror}); "
                              "the next mount retries it")
        if self.committed:
            self.life.move(Event.DONE)
            log.info("relocation of %r to %r done in %.1f s", name, self.dst.name,
                     time.monotonic() - self._started)

    # -- introspection -------------------------------------------------------------------

    def statistics(self) -> Job:
        copier = self.copier
        copied = copier.bytes_copied if copier else 0
        dirty = copier.dirty_bytes() if copier else 0
        rate = copier.copy_rate() if copier else 0.0
        kept = copier.resumed_bytes if copier else 0
        total = max(self.bytes_total, copied + kept + dirty)
        if self.state == State.DONE:
            self._progress = 1.0
        elif total:
            self._progress = max(self._progress, min((copied + kept) / total, 0.99))
        end = self._ended if self._ended is not None else time.monotonic()
        return Job(
            id=self.id,
            entry=self.entry.name,
            src=self.src.name,
            dst=self.dst.name,
            state=self.state,
            paused=bool(copier and copier.paused),
            mode=self.options.mode,
            pass_no=self.pass_no,
            files=len(copier.copies) if copier else 0,
            bytes_total=total,
            bytes_copied=copied,
            dirty_bytes=dirty,
            copy_rate=rate,
            dirty_rate=self._dirty_rate,
            rate_limit=self._rate_limit,
            eta_s=(dirty / rate if rate > 0 else None) if not self.life.final else 0.0,
            progress=self._progress,
            mirroring=bool(copier and copier.mirroring),
            mirrored=State.MIRRORING in self.life.visited,
            pause_ms=self.pause_ms,
            elapsed_s=end - self._started,
            error=self.error,
            attempts=self.attempts,
            last_estimate_ms=self.last_estimate_ms,
            last_abandoned=self.last_abandoned,
            resumed=self.resumed,
            resumed_bytes=kept,
            stall_timeout_s=self.options.stall_timeout_s,
        )


def _save_progress_blocking(fds: list[int], staging: Path, record: progress.Progress) -> None:
    """Steps 3 and 4 of progress.py: the data, then the record. Blocking."""
    for fd in fds:
        os.fdatasync(fd)
    progress.save(staging, record)


def _prepare_resume(
    dst: Store, staging: str, src_store: str, block_size: int
) -> progress.Progress | None:
    """Make an interrupted relocation's staging directory ready to resume: the
    destination files its progress record lists go back to ``pool`` (under
    their pool names), everything else goes. Return the record, with only
    the files found; None if there is nothing to resume from. Blocking."""
    try:
        found = progress.load(dst.path / staging)
    except StateError as e:
        log.warning("the progress record of %s cannot be used (%s): copying afresh",
                    dst.path / staging, e)
        return None
    if found is None or found.block_size != block_size or found.src_store != src_store or (
            found.dst_store != dst.name):
        return None
    staging_fd = backing.open_path(dst.root_fd, staging)
    try:
        if backing.exists_at(staging_fd, _KEEP):  # a crash in a resume: collect from it too
            backing.remove_tree(staging_fd, _KEEP + "-old")
            backing.renameat2(staging_fd, _KEEP, staging_fd, _KEEP + "-old", 0)
        backing.mkdir_at(staging_fd, _KEEP, 0o700)
        keep_fd = backing.open_path(staging_fd, _KEEP)
        try:
            by_ino = {f.dst_ino: f for f in found.files.values()}
            kept: dict[tuple[int, int], progress.FileProgress] = {}
            for name in backing.list_dir(staging_fd):
                if name not in (_KEEP, progress.NAME):
                    _collect(staging_fd, name, by_ino, keep_fd, kept)
            for name in backing.list_dir(staging_fd):
                if name not in (_KEEP, progress.NAME):
                    backing.remove_tree(staging_fd, name)
        finally:
            backing.close(keep_fd)
        backing.renameat2(staging_fd, _KEEP, staging_fd, "pool", 0)
    finally:
        backing.close(staging_fd)
    return progress.Progress(found.gen, found.block_size, found.src_store, found.dst_store,
                             kept)


_KEEP = "resume"


def _collect(dir_fd: int, name: str, by_ino: dict[int, progress.FileProgress], keep_fd: int,
             kept: dict[tuple[int, int], progress.FileProgress]) -> None:
    """Move the listed files found at or below *name* into *keep_fd*."""
    st = backing.lstat_at(dir_fd, name)
    if stat.S_ISREG(st.st_mode):
        plan = by_ino.get(st.st_ino)
        if plan is not None and plan.src_key not in kept:
            backing.renameat2(dir_fd, name, keep_fd, f"{plan.src_key[0]}-{plan.src_key[1]}",
                              backing.RENAME_NOREPLACE)
            kept[plan.src_key] = plan
    elif stat.S_ISDIR(st.st_mode):
        sub_fd = backing.open_path(dir_fd, name)
        try:
            for child in backing.list_dir(sub_fd):
                _collect(sub_fd, child, by_ino, keep_fd, kept)
        finally:
            backing.close(sub_fd)


def blockers(datastore: Datastore, entry: Entry, dst: Store, resume: bool = False) -> list[str]:
    """What stops *entry* from relocating to *dst*, checked before any work.

    Each would otherwise be found late: a same-name object on the destination
    (a copy the datastore ignores) only at the commit's rename, a read-only
    source only when its copy is to be removed after the commit.
    """
    found = []
    pending = datastore.relocations.get(entry.name)
    if pending is not None and not resume:
        found.append(
            f"the clean-up of its last relocation ({pending.get('from')} → {pending.get('to')}) "
            "has not finished; repair that store and mount again"
        )
    if backing.exists_at(dst.root_fd, entry.name):
        found.append(
            f"store {dst.name!r} already holds an object named {entry.name!r} that the "
            f"datastore does not serve; remove {dst.path / entry.name} first"
        )
    for store, why in ((dst, "the copy cannot be made"),
                       (entry.store, "the source copy could not be removed afterwards")):
        try:
            read_only = bool(store.statvfs().f_flag & os.ST_RDONLY)
        except OSError as e:
            found.append(f"store {store.name!r} cannot be used: {e.strerror}")
            continue
        if read_only:
            found.append(f"store {store.name!r} is read-only ({why})")
    return found


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class Relocator:
    """The daemon's relocation service: starts, tracks and stops jobs."""

    def __init__(
        self,
        datastore: Datastore,
        files: OpenFiles,
        block_size: int,
        on_commit: Callable[[Entry, Resolver], None],
    ) -> None:
        self.datastore = datastore
        self.files = files
        self.block_size = block_size
        self.on_commit = on_commit
        self.jobs: dict[str, Relocation] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(
        self, entry: Entry, dst: Store, options: Options, resume: bool = False
    ) -> Relocation:
        """Start relocating *entry* to *dst* (*resume*: an interrupted one, at
        mount); raise RelocationError for a bad request."""
        assert self._nursery is not None, "the relocator is not running"
        current = self.jobs.get(entry.name)
        busy = current.life.answer(Command.MIGRATE) if current is not None else None
        if not resume and busy is not None and not busy.ok:
            # (a record left by an ended job is a pending clean-up: blockers() says so)
            hint = ("; it resumed after an interruption: `migrate --restart` starts it over"
                    if current is not None and current.resumed else "")
            raise RelocationError(busy.text(entry=entry.name, hint=hint))
        if dst is entry.store:
            raise RelocationError(f"{entry.name!r} is already on store {dst.name!r}")
        if not (math.isfinite(options.max_pause_ms)
                and MIN_PAUSE_MS <= options.max_pause_ms <= MAX_PAUSE_MS):
            raise RelocationError(f"the pause budget must be from {MIN_PAUSE_MS} to "
                                  f"{MAX_PAUSE_MS} milliseconds")
        if not 0 <= options.rate <= MAX_RATE:
            raise RelocationError(f"the copy rate limit must be from 0 (unlimited) to "
                                  f"{MAX_RATE} bytes/s")
        if not (math.isfinite(options.stall_timeout_s) and 0 <= options.stall_timeout_s
                <= MAX_STALL_TIMEOUT_S):
            raise RelocationError(f"the stall timeout must be from 0 (none) to "
                                  f"{MAX_STALL_TIMEOUT_S} seconds")
        st = backing.lstat_at(entry.store.root_fd, entry.name)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise RelocationError(f"{entry.name!r} is neither a directory nor a regular file")
        found = blockers(self.datastore, entry, dst, resume)
        if found:
            raise RelocationError(f"cannot relocate {entry.name!r}: " + "; ".join(found))
        job = Relocation(self.datastore, self.files, entry, dst, options, self.block_size,
                         self.on_commit, resume)
        self.jobs[entry.name] = job
        self._nursery.start_soon(job.run, name=f"relocate {entry.name}")
        return job

    def resume_interrupted(self) -> None:
        """At mount: start again the relocations a crash or a stop interrupted."""
        for name, reloc in sorted(self.datastore.resumable.items()):
            entry = self.datastore.get(name)
            dst = self.datastore.stores.get(reloc.get("to", ""))
            if entry is None or dst is None:
                continue
            options = Options.from_record(reloc.get("options") or {},
                                          bool(reloc.get("keep_source")))
            try:
                self.start(entry, dst, options, resume=True)
            except RelocationError as e:
                # left as a pending clean-up: `migrate --restart` or the next mount
                log.error("relocation of %r to %r cannot be resumed: %s", name, dst.name, e)

    async def stop(self) -> None:
        """Before unmounting: suspend jobs still copying (the next mount resumes
        them); let a switchover finish first."""
        for job in list(self.jobs.values()):
            if job.finished.is_set():
                continue
            if not job.life.answer(Command.CANCEL).ok:  # switching or committed
                log.info("waiting for the switchover of %r to finish", job.entry.name)
            else:
                job.suspend()
            await job.finished.wait()

    def statistics(self) -> list[Job]:
        return [job.statistics() for job in self.jobs.values()]
