"""The switchover: quiesce → last sync → flush → commit → re-point → resume.

Before it, the relocation has copied the data and staged the entry's tree
on the destination, kept in step with the source (staging.py). Inside the
pause, with the entry's gate closed and every request that was inside
drained, only what changed since the last sync is done:

1. the names of the directories the journal lists are brought in step
   (new files start copying), then the last dirty blocks are copied (no
   throttle), then the attributes of what changed, and the size and times
   of every file written since, are copied again;
2. what changed since the last flush is fsynced (files, then directories);
3. **the commit**: one atomic save of the datastore record flips the
   placement (datastore.py). Before it, the source is the truth and any
   failure leaves it so; from it on, the switch only goes forward (shielded
   from cancellation);
4. the tree is renamed to the entry's name on the destination store, the
   entry's inodes and open files are re-pointed there (same inode numbers),
   and the gate opens.

Reads never wait for the gate: until the re-point the source holds the
same bytes as the destination.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import backing, trace
from .datastore import Datastore, Entry, Store
from .errors import FusediskError
from .failpoint import failpoint, hold, stall
from .mirror import Copier, FileCopy, estimate_s
from .staging import TREE, StagedTree, StagingError
from .vdisk import Resolver

log = logging.getLogger(__name__)

class SwitchoverError(FusediskError):
    """The switchover could not complete before its commit; the source is still the truth."""


class PauseOverrun(SwitchoverError):
    """The pause would have overrun its budget: the attempt was abandoned
    before the commit and the gate reopened (the relocation goes on)."""


@dataclass(slots=True)
class Costs:
    """What the steps of a pause cost, as measured while the relocation runs;
    the units of :meth:`estimate_ms` and of the checks inside the pause."""

    #: per journal object a sync handles (names and attributes)
    object_ms: float = 0.05
    #: per object a flush fsyncs
    fsync_ms: float = 2.0
    #: the commit: one record save, fsynced
    commit_ms: float = 5.0

    def learn(self, field_name: str, total_ms: float, count: int) -> None:
        """Fold one measurement (*total_ms* for *count* units) into the estimate."""
        if count <= 0:
            return
        old = getattr(self, field_name)
        setattr(self, field_name, 0.5 * old + 0.5 * total_ms / count)

    def parts_ms(self, objects: int, dirty_bytes: int, copy_rate: float,
                 unsynced: int) -> dict[str, float]:
        """The estimate of a pause by part, named as the error messages name them."""
        return {
            f"{objects} namespace object(s) to sync": objects * self.object_ms,
            f"{dirty_bytes >> 10} KiB to copy": estimate_s(dirty_bytes, copy_rate) * 1000,
            f"{unsynced + objects} object(s) to fsync": (unsynced + objects) * self.fsync_ms,
            "the commit": self.commit_ms,
        }

    def estimate_ms(self, objects: int, dirty_bytes: int, copy_rate: float,
                    unsynced: int) -> float:
        return sum(self.parts_ms(objects, dirty_bytes, copy_rate, unsynced).values())


def explain(parts: dict[str, float]) -> str:
    """``a 1.0 ms, b 2.0 ms``, largest first."""
    return ", ".join(f"{what} {ms:.1f} ms"
                     for what, ms in sorted(parts.items(), key=lambda p: -p[1]) if ms >= 0.05)


#: after the gate opens, the switchover (and the relocation's clean-up after
#: it) waits this long before it goes on: the guests' requests that waited at
#: the gate and the ones that follow their replies go first (issue 12: a
#: guest's write held by the pause was otherwise answered after the next task
#: steps of the switchover and its clean-up, 1-6 ms later)
AFTER_PAUSE_GRACE_S = 0.02

#: directory handles a re-point keeps at once (its descriptors must not grow
#: with the entry's size)
_RESOLVER_DIRS = 64


class _Resolver:
    """Finds the new self of a source object on the destination, by its old key.

    Opens each object relative to its directory, whose handle it keeps until
    :meth:`close` (a re-point opens every object the kernel knows: one
    ``openat`` each, not one per path component).
    """

    def __init__(self, dst: Store, name: str, tree: StagedTree) -> None:
        self.tree = tree
        self._dirs: dict[tuple[str, ...], int] = {(): backing.open_path(dst.root_fd, name)}
        self._in_tree: dict[tuple[int, int], bool] = {}
        #: the source objects' old fds: closed once the gate is open again
        self.closing: list[int] = []
        #: what the switchover awaits once the gate is open again
        self.jobs: list[Callable[[], Awaitable[None]]] = []

    def _dir(self, parts: tuple[str, ...]) -> int:
        fd = self._dirs.get(parts)
        if fd is None:
            if len(self._dirs) >= _RESOLVER_DIRS:  # bounded: start over from the root
                for kept, dir_fd in list(self._dirs.items()):
                    if kept:
                        backing.close(dir_fd)
                        del self._dirs[kept]
            fd = self._dirs[parts] = backing.open_path(self._dir(parts[:-1]), parts[-1])
        return fd

    def __call__(self, key: tuple[int, int]) -> tuple[int, os.stat_result] | None:
        parts = self.tree.in_tree(key)
        if parts is None:
            return None  # unlinked (open only): it stays where its data is
        fd = backing.open_path(self._dir(parts[:-1]), parts[-1]) if parts else os.dup(
            self._dirs[()])
        try:
            return fd, backing.fstat(fd)
        except BaseException:
            backing.close(fd)
            raise

    def new_key(self, key: tuple[int, int]) -> tuple[int, int] | None:
        return self.tree.dst_key(key)

    def identity(self, key: tuple[int, int], memo: dict[tuple[int, int], bool] | None = None
                 ) -> tuple[tuple[int, int], bytes, int | None] | None:
        return self.tree.dst_identity(key, self._in_tree if memo is None else memo)

    def old_key(self, key: tuple[int, int]) -> tuple[int, int] | None:
        return self.tree.src_key(key)

    def lazy(self) -> bool:
        return self.tree.handles_complete()

    def close_later(self, fd: int) -> None:
        self.closing.append(fd)

    def after_pause(self, job: Callable[[], Awaitable[None]]) -> None:
        self.jobs.append(job)

    def close(self) -> None:
        for fd in self._dirs.values():
            backing.close(fd)
        self._dirs.clear()


async def switch_over(
    datastore: Datastore,
    entry: Entry,
    dst: Store,
    copier: Copier,
    tree: StagedTree,
    on_commit: Callable[[Entry, Resolver], None],
    commit: Callable[[], Awaitable[object]],
    budget_ms: float = math.inf,
    costs: Costs | None = None,
) -> float:
    """Quiesce, finish, commit and re-point *entry*; return the pause in milliseconds.

    Raises before the commit (the caller cleans up or, for
    :class:`PauseOverrun`, tries again later; the source is the truth);
    never after it. Before each step ahead of the commit, the time spent so
    far plus the estimate of what is left (*costs*) must fit *budget_ms*,
    or the attempt is abandoned there.
    """
    gate = entry.gate
    journal = entry.journal
    assert journal is not None
    costs = costs or Costs()
    pool_fds: list[int] = []
    parked: list[dict[tuple[int, int], FileCopy]] = []
    start = time.monotonic()
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = round((time.monotonic() - start) * 1000 - sum(steps.values()), 2)
        if trace.ON:
            trace.mark("switchover", name)

    def fits(what: str, left_ms: float) -> None:
        spent = (time.monotonic() - start) * 1000
        if spent + left_ms > budget_ms:
            raise PauseOverrun(f"{spent:.1f} ms spent and {what} to go would overrun the "
                               f"{budget_ms:g} ms pause budget")

    def left(objects: int, unsynced: int) -> tuple[str, float]:
        parts = costs.parts_ms(objects, copier.dirty_bytes(), copier.copy_rate(), unsynced)
        return explain(parts), sum(parts.values())

    collecting = gc.isenabled()
    if trace.ON:
        trace.mark("switchover", "closing the gate")
    try:
        # no cyclic collection inside the pause: a full one walks every object
        # made since the last freeze (gcwatch.py), tens of ms on a large entry
        gc.disable()
        # inside the try: a cancel that lands while draining reopens the gate
        await gate.close_and_drain()
        step("drain")
        changed = journal.take()
        try:
            fits(*left(len(changed), tree.pending()))
            await tree.sync_names(changed, final=True)
            step("names")
            fits(*left(0, tree.pending() + len(changed)))
            await copier.copy_pass(throttle=False)
            step("copy")
            error = copier.mirror_error()
            if error is not None:
                raise SwitchoverError(f"writing to the destination failed: {error.strerror}")
            await tree.sync_attributes(changed, final=True)
            step("attributes")
        except StagingError as e:
            raise SwitchoverError(str(e)) from None
        finally:
            for fd in changed.values():
                backing.close(fd)
        pending = tree.pending()
        fits(*left(0, pending))
        await stall("switchover-flush")
        await tree.flush()
        step("flush")
        costs.learn("fsync_ms", steps["flush"], pending)
        fits(f"the commit {costs.commit_ms:.1f} ms", costs.commit_ms)
        failpoint("before-commit")
        with trio.CancelScope(shield=True):
            await commit()  # the commit record (the job's lifecycle saves it)
            step("commit")
            costs.learn("commit_ms", steps["commit"], 1)
            # committed: from here on the switch only goes forward
            failpoint("after-commit")
            # the rename is made durable after the pause (below): a crash before
            # that finds a committed record and the tree under either name, and
            # the next mount finishes the rename (recovery's after-commit case)
            backing.renameat2(
                tree.staging_fd, TREE, dst.root_fd, entry.name, backing.RENAME_NOREPLACE
            )
            datastore.relocation_switched(entry, dst)
            step("rename")
            # before the gate opens: no write goes to the pool twice; and
            # before the re-point: a file that only the copy held open is
            # re-pointed when it is next opened, not now
            pool_fds = copier.detach(parked)
            step("detach")
            resolve = _Resolver(dst, entry.name, tree)
            try:
                on_commit(entry, resolve)
            finally:
                resolve.close()
            pool_fds += resolve.closing
            step("repoint")
    finally:
        gate.open()
        pause_ms = (time.monotonic() - start) * 1000
        if collecting:
            gc.enable()
        if trace.ON:
            trace.mark("switchover", "gate open")
        copier.forget_parked(parked)
        log.info("switchover of %r: %s ms", entry.name, steps)
        if trace.ON:
            trace.mark("switchover", "logged")
    # The gate is open, committed: from here on it only goes forward.
    with trio.CancelScope(shield=True):
        # First the guests: the requests that waited at the gate, and those their
        # replies set off, are served before anything else of the switchover's
        # runs (a task step, a thread's syscalls, a directory fsync), so the one
        # request that waited pays the pause and nothing more.
        await trio.sleep(AFTER_PAUSE_GRACE_S)
        # the pool's handles and the source objects' old ones go outside the
        # pause (nothing refers to them any more); the rename becomes durable;
        # what the re-point left for after it runs
        if trace.ON:
            trace.mark("switchover", "after the pause")
        for fd in pool_fds:
            backing.close(fd)
        await stall("switchover-rename-sync")
        await backing.run_blocking(backing.fsync_dir, dst.root_fd)
        await hold("after-pause")  # a test's hold before the re-point's sweep
        await stall("after-pause")
        for job in resolve.jobs:
            await job()
    if trace.ON:
        trace.mark("switchover", "after-pause jobs done")
    return pause_ms
