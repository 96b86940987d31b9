"""Changed block tracking: per-file bitmaps, change ids, crash-safe persistence.

**The CBT ordering rule.** A write sets its bits only *after* its data
reached the backing file; a consumer (a relocation copy pass) clears a bit
*before* it reads that block. Whatever interleaving the two take, a block
whose newest data a consumer may have missed is dirty again afterwards. The
rule is kept by :meth:`Tracker.mark` being called by the data path after
``pwrite`` returns, with no checkpoint in between, and nowhere else.

**Change ids** (VMware's ``changeId``): ``<file id>/<sequence>``. A file's
history is a list of *segments*; the last one receives every mark, and
:meth:`Tracker.checkpoint` starts a new one and names it. "Changes since
id k" is the union of the segments from k on. At most
:data:`MAX_CHECKPOINTS` live at once; the oldest is merged into the next
and its id expires. The file id is kept in the backing file's
``trusted.fusedisk.id`` xattr, so it follows the file through renames and
relocations; clients never see that xattr.

**Whose history it is.** A saved history names the backing ``(st_dev,
st_ino)`` keys it belongs to, and a file adopts it only under one of them:
a ``cp -a`` on a store copies the id xattr but gets its own inode, so it
starts a history of its own instead of answering for the original's. A
relocation moves a file to another inode (its pool file on the
destination, linked into place at the commit), so before the commit the
history is saved with the pool file's key as an *alias* (see
:meth:`Tracker.add_alias`): a crash after the commit finds it.

**Crash consistency** (after DRBD's activity log and dm-era): the bitmaps
are saved (record ``<id>.bitmap``) only at checkpoints, activity-log
evictions and clean close. In between, a write may land only in a coarse
*region* (:data:`REGION_SIZE`) that is listed in the durable activity log
(record ``<id>.al``). After a crash, every region of the log is marked
dirty: the answer is a superset of the truth, larger by at most the hot
window (:data:`AL_CAPACITY` x :data:`REGION_SIZE`), never smaller. A clean
close saves the bitmaps and an empty log: the answer is then exact.

Log protocol (see :meth:`Tracker.log`): a region added to the log carries
the sequence number of the first log save that will contain it; a write
into it proceeds only once that save completed. Evicting regions snapshots
the bitmaps, drops the regions from the log *in the same step*, saves the
bitmaps, then the log, all under one lock: a record that omits a region is
durable only after the bitmaps that cover its writes are.

**Nothing durable until it is worth it.** A history with no live change id
and no relocation mark answers nobody: no one holds an id to ask about, and
a crash may lose it whole (the next open starts a new one under a new id,
which refuses nothing that was ever handed out). Until a checkpoint or a
relocation's mark makes it :attr:`Tracker.durable`, a file's writes log
nothing, and a clean close saves nothing (unless the log on disk still says
"unclean" from a durable past, which the close then settles): a file that is
created, written and removed costs the state directory nothing. Turning
durable needs no catching up: a checkpoint saves the bitmaps it starts from
(the changes before it belong to no id), a relocation saves its marks before
it trusts them (progress.py), and every write from that instant on is logged
first. The data path checks and marks without an await in between (vdisk.py),
so no write can straddle the change.

**Relocation marks.** A relocation gives each file it copies an internal
mark (:meth:`Tracker.start_relocation_mark`): a bitmap, by generation, that
every mark also sets, saved with the bitmaps and recovered from the activity
log like the last segment, but never shown as a change id nor counted among
:data:`MAX_CHECKPOINTS`. After a crash, a generation's bitmap is a superset
of what changed since the generation started: that is what lets a relocation
resume from what its destination already holds (progress.py).

**When the state directory refuses a save** (full, read-only, I/O error):
data keeps flowing, and no answer may be wrong. A write whose region cannot
be logged durably would leave a crash unable to know it changed the file,
so the history is *withdrawn* instead (:meth:`Tracker.withdraw`): the file
gets a new id on its store, made durable before the write goes on, so its
old change ids are refused from then on (a full backup is needed) — before
and after a crash alike. Tracking goes on in memory without a log until a
save succeeds again (the next clean close or checkpoint), which makes the
new history trustworthy. :class:`SaveHealth` keeps what ``status`` shows.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import backing
from .bitmap import Bitmap
from .errors import FusediskError, StateError
from .metadata import (
    atomic_write,
    decode_record,
    encode_record,
    read_slotted,
    write_slotted,
)
from .sizes import block_span

log = logging.getLogger(__name__)

REGION_SHIFT = 24
#: Activity-log granularity: 16 MiB.
REGION_SIZE = 1 << REGION_SHIFT
#: Regions in the log: the most a crash can over-report is 128 x 16 MiB = 2 GiB a file.
AL_CAPACITY = 128
#: Live change ids a file keeps; asking for an older one needs a full backup.
MAX_CHECKPOINTS = 32
ID_XATTR = "trusted.fusedisk.id"
#: Ids this daemon gave files and saved nothing under, remembered for a reopen
#: (see :meth:`CbtStore.open_tracker`); beyond this many the memory starts anew.
SESSION_IDS_MAX = 1 << 16
#: Size of each of the activity log's two slots (a record of 128 regions is ~1.5 KiB).
AL_SLOT_SIZE = 8192


def _shown(change_id: str) -> str:
    """A client's change id as an error line quotes it: not all of a huge one."""
    return repr(change_id if len(change_id) <= 80 else change_id[:77] + "...")


class ChangeIdError(FusediskError):
    """A change id that cannot be answered exactly: the caller needs a full backup."""


class SaveHealth:
    """Whether the state directory takes CBT saves; what ``status`` reports.

    The log says it once when saves start failing and once when they work again.
    """

    def __init__(self) -> None:
        #: why the last save failed; None while saves succeed
        self.error: str | None = None
        #: histories withdrawn because a save failed (their change ids were refused)
        self.withdrawn = 0

    def failed(self, error: OSError) -> None:
        if self.error is None:
            log.warning("the state directory refuses CBT saves (%s): change ids of files "
                        "written meanwhile are withdrawn; data keeps flowing",
                        error.strerror or error)
        self.error = error.strerror or str(error)

    def succeeded(self) -> None:
        if self.error is not None:
            log.warning("the state directory takes CBT saves again")
            self.error = None

    def statistics(self) -> dict[str, Any]:
        return {"save_error": self.error, "withdrawn_histories": self.withdrawn}


class Tracker:
    """The change history of one regular file, while it is open."""

    def __init__(
        self,
        home: Path,
        file_id: str,
        block_size: int,
        key: tuple[int, int],
        segments: list[tuple[int, Bitmap]] | None = None,
        next_seq: int = 1,
        health: SaveHealth | None = None,
    ) -> None:
        self.home = home
        self.health = health or SaveHealth()
        self.file_id = file_id
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        #: backing (st_dev, st_ino) this history belongs to (a relocation's re-point changes it)
        self.key = key
        #: more keys the saved history is accepted under, each while its test is true
        self._aliases: dict[tuple[int, int], Callable[[], bool]] = {}
        self.segments = segments or [(0, Bitmap())]
        self.next_seq = next_seq
        #: region → number of the first log save that contains it
        self._al: OrderedDict[int, int] = OrderedDict()
        self._al_next_save = 1
        self._al_saved = 0
        #: no write since the last clean close (the log on disk says "clean")
        self._clean = True
        self._lock = trio.Lock()
        self.al_saves = 0
        #: why this history was withdrawn (see :meth:`withdraw`); None while it is trusted
        self.withdrawn: str | None = None
        #: a relocation's internal marks: generation → what changed since it started
        self.relocation_marks: dict[int, Bitmap] = {}
        #: opening gave the file a new id on its store, which moved its backing
        #: ctime; the ctime the mount showed is kept beside its identity (see
        #: :meth:`CbtStore._new_id`), and the mount must show that one from now on
        self.moved_ctime = False
        #: once durable, durable until closed: a relocation that drops its marks
        #: (cancelled) may still be resumed from them after a crash before its
        #: clean-up, so the log must keep covering what is written meanwhile
        self._keep_log = False

    # -- the data path ------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """True while something a crash must not lose depends on this history:
        a live change id, or a relocation's mark (see "Nothing durable until
        it is worth it" in the module doc)."""
        return self._keep_log or len(self.segments) > 1 or bool(self.relocation_marks)

    def logged(self, offset: int, length: int) -> bool:
        """True if a write of ``[offset, offset+length)`` may proceed now."""
        if self.withdrawn is not None or not self.durable:
            return True  # no change id to protect: the marks in memory are enough
        al = self._al
        saved = self._al_saved
        last = (offset + max(length, 1) - 1) >> REGION_SHIFT
        for region in range(offset >> REGION_SHIFT, last + 1):
            seq = al.get(region)
            if seq is None or seq > saved:
                return False
            al.move_to_end(region)
        return True

    async def log(self, offset: int, length: int) -> None:
        """Make the regions of a write durable in the activity log (slow path)."""
        first = offset >> REGION_SHIFT
        last = (offset + max(length, 1) - 1) >> REGION_SHIFT
        for region in range(first, last + 1):
            if region not in self._al:
                self._al[region] = self._al_next_save
        async with self._lock:
            if len(self._al) > AL_CAPACITY:
                await self._evict()
            if all(self._al.get(r, self._al_next_save) <= self._al_saved
                   for r in range(first, last + 1)):
                return
            await self._save_al()

    def mark_bytes(self, offset: int, length: int) -> None:
        """Record that bytes ``[offset, offset+length)`` changed; call after the data landed.

        (In bytes; the bitmaps below are in blocks.)
        """
        if length <= 0:
            return
        first, nblocks = block_span(offset, length, self._shift)
        self.segments[-1][1].mark(first, nblocks)
        for bits in self.relocation_marks.values():
            bits.mark(first, nblocks)

    # -- a relocation's internal marks --------------------------------------------------

    def start_relocation_mark(self, gen: int) -> None:
        """Start generation *gen* of the relocation mark (sync; :meth:`save` makes it durable)."""
        self.relocation_marks.setdefault(gen, Bitmap())
        self._keep_log = True

    def drop_relocation_marks(self, below: int | None = None) -> None:
        """Forget the generations before *below* (all of them: None). Sync."""
        for gen in list(self.relocation_marks):
            if below is None or gen < below:
                del self.relocation_marks[gen]

    async def mark_bytes_durably(self, offset: int, length: int) -> None:
        """Mark a change and save the bitmaps *before* it happens (truncate).

        A truncate may span far more than the activity log covers (any
        length: the bitmaps hold a range as a range), so its range is made
        durable in the bitmaps, not in the log; the caller marks again after
        the change landed, which keeps the CBT ordering rule. The mark is
        made under the lock: a checkpoint waiting for it cannot start a new
        segment between the mark and the save, which would leave the saved
        new segment without it.
        """
        async with self._lock:
            self.mark_bytes(offset, length)
            if self.withdrawn is None and self.durable:
                await self._save_bitmaps(self._bitmap_record())

    @property
    def clean(self) -> bool:
        """True when no write happened since the last clean close."""
        return self._clean

    async def withdraw(self, fd: int, error: OSError) -> None:
        """The state directory refused a save (*error*): give up this history.

        The file's id on its store (backing descriptor *fd*) is replaced by a
        new one, fsynced, so the old change ids are refused from now on, after
        a crash too; then tracking goes on in memory under the new id with no
        log (nothing durable depends on it) until a save succeeds (a clean
        close or a checkpoint). Raises *error* if the new id cannot be made
        durable: then the write that needed the log must fail.
        """
        async with self._lock:
            if self.withdrawn is not None:
                return
            new_id = secrets.token_hex(8)
            try:
                await backing.run_blocking(_replace_file_id, fd, new_id)
            except OSError as e:
                log.error("CBT history %s cannot be withdrawn (%s): the write is refused",
                          self.file_id, e.strerror or e)
                raise error from None
            old_id, self.file_id = self.file_id, new_id
            self.segments = [(0, Bitmap())]
            self.next_seq = 1
            self._al.clear()
            self._clean = False
            self.withdrawn = error.strerror or str(error)
            self.health.withdrawn += 1
            log.warning("CBT history %s withdrawn (the state directory refused a save: %s); "
                        "the file is tracked anew as %s and its old change ids need a full "
                        "backup", old_id, self.withdrawn, new_id)
            await backing.run_blocking(_drop_history, self.home, old_id)

    # -- whose history it is ---------------------------------------------------------

    def add_alias(self, key: tuple[int, int], alive: Callable[[], bool]) -> None:
        """From the next save on, while ``alive()`` is true, save the history as
        belonging to *key* too.

        For a relocation: *key* is the pool file that becomes this file at the
        commit, so a daemon killed after the commit finds the history under
        the key the file then has. An alias whose relocation ended without a
        commit (its pool file is deleted) is dead, and the next save drops it.
        Sync; see :meth:`save` to make it durable.
        """
        self._aliases[key] = alive

    @property
    def has_change_ids(self) -> bool:
        """True while one of this history's change ids is live (losing it loses them)."""
        return len(self.segments) > 1

    async def save(self) -> None:
        """Make the bitmaps and the keys they belong to durable now."""
        async with self._lock:
            await self._save_bitmaps(self._bitmap_record())

    # -- change ids ------------------------------------------------------------------

    async def checkpoint(self) -> str:
        """Start a new segment; return its change id once it is durable.

        On a withdrawn history, a checkpoint that saves makes it trusted
        again: every write from here on is logged as usual.
        """
        async with self._lock:
            label = self.next_seq
            self.next_seq += 1
            self.segments.append((label, Bitmap()))
            self._keep_log = True
            while len(self.segments) > MAX_CHECKPOINTS + 1:
                (l0, b0), (_l1, b1) = self.segments[0], self.segments[1]
                b0.update(b1)
                self.segments[:2] = [(l0, b0)]
            try:
                await self._save_bitmaps(self._bitmap_record())
            except OSError:
                self.segments.pop()  # never handed out
                self.next_seq -= 1
                raise
            self.withdrawn = None
        return f"{self.file_id}/{label}"

    def changes(self, change_id: str, file_size: int,
                until: str | None = None) -> list[tuple[int, int]]:
        """Byte extents changed since *change_id* (up to the later change id *until*, when
        given: e.g. a snapshot's), merged, sorted, within *file_size*."""
        seq = self._seq(change_id)
        end = self._seq(until) if until is not None else None
        if end is not None and end < seq:
            raise ChangeIdError(f"change id {_shown(until or '')} is older than "
                                f"{_shown(change_id)}")
        union = Bitmap()
        for label, bits in self.segments:
            if label >= seq and (end is None or label < end):
                union.update(bits)
        out: list[tuple[int, int]] = []
        for blockno, nblocks in union.extents():
            start = blockno << self._shift
            stop = min((blockno + nblocks) << self._shift, file_size)
            if start < stop:
                out.append((start, stop - start))
        return out

    def _seq(self, change_id: str) -> int:
        """The segment label of one of this file's live change ids; ChangeIdError if none."""
        file_id, _, seq_text = change_id.partition("/")
        if file_id != self.file_id or not seq_text.isdigit():
            raise ChangeIdError(
                f"change id {_shown(change_id)} does not belong to this file's current history "
                "(another file's, or the history was reset); a full backup is needed"
            )
        seq = int(seq_text)
        labels = [label for label, _ in self.segments]
        if seq == 0 or seq not in labels:
            raise ChangeIdError(
                f"change id {_shown(change_id)} is unknown or has expired (only the last "
                f"{MAX_CHECKPOINTS} are kept); a full backup is needed"
            )
        return seq

    def statistics(self) -> dict[str, Any]:
        return {
            "file_id": self.file_id,
            "change_ids": [f"{self.file_id}/{label}" for label, _ in self.segments[1:]],
            "dirty_blocks": self.segments[-1][1].count,
            "al_regions": len(self._al),
            "al_saves": self.al_saves,
            "memory_bytes": sum(b.memory_bytes for _, b in self.segments),
            "withdrawn": self.withdrawn,
        }

    # -- persistence -----------------------------------------------------------------

    def _bitmap_record(self) -> dict[str, Any]:
        for alias, alive in list(self._aliases.items()):
            if not alive():
                del self._aliases[alias]
        keys = dict.fromkeys([self.key, *self._aliases])
        return {
            "file_id": self.file_id,
            "block_size": self.block_size,
            "key": list(self.key),  # the file's own, as the first records had it
            "keys": [list(k) for k in keys],
            "next_seq": self.next_seq,
            "segments": [{"label": label, "bits": b.to_record()} for label, b in self.segments],
            "relocation_marks": [{"gen": gen, "bits": b.to_record()}
                                 for gen, b in sorted(self.relocation_marks.items())],
        }

    async def _save_bitmaps(self, record: dict[str, Any]) -> None:
        try:
            await backing.run_blocking(
                _save, self.home, f"{self.file_id}.bitmap", "cbt-bitmap", record
            )
        except OSError as e:
            self.health.failed(e)
            raise
        self.health.succeeded()

    async def _save_al(self) -> None:
        seq = self._al_next_save
        self._al_next_save += 1
        regions = sorted(self._al)
        self._clean = False
        try:
            await backing.run_blocking(
                _write_al, self.home / f"{self.file_id}.al", seq, regions, False
            )
        except OSError as e:
            self.health.failed(e)
            raise
        self.health.succeeded()
        self._al_saved = seq
        self.al_saves += 1

    async def _evict(self, keep: int = AL_CAPACITY // 2) -> None:
        # no await between the snapshot and dropping the regions (see module doc)
        record = self._bitmap_record()
        while len(self._al) > keep:
            self._al.popitem(last=False)
        await self._save_bitmaps(record)
        await self._save_al()

    def _snapshot_for_clean_close(self) -> tuple[dict[str, Any], int, list[int]]:
        """Bitmaps, log sequence and regions of a clean close; disarms the regions.

        No await may come between this and the caller's first save: a write
        after it finds its region disarmed and must log it again (an unclean
        record, saved after the clean one), so "clean" never hides a write.
        """
        record = self._bitmap_record()
        seq = self._al_next_save
        self._al_next_save += 1
        for region in self._al:
            self._al[region] = self._al_next_save
        return record, seq, sorted(self._al)

    async def close(self) -> None:
        """Clean close: exact bitmaps, and a log that says so.

        The log keeps its regions (disarmed): the next open's first write
        re-arms them all with one save instead of one save per region.
        """
        async with self._lock:
            if self._clean and not self.durable:
                return  # nothing on disk depends on what changed: see the module doc
            record, seq, regions = self._snapshot_for_clean_close()
            await self._save_bitmaps(record)
            await backing.run_blocking(
                _write_al, self.home / f"{self.file_id}.al", seq, regions, True
            )
            self._al_saved = max(self._al_saved, seq)
            self._clean = self._al_next_save > self._al_saved  # no write re-armed meanwhile
            # saved exactly: a withdrawn history is whole again (the marks made
            # while it had no log are in the bitmaps just saved)
            self.withdrawn = None

    def close_blocking(self) -> None:
        """Clean close at unmount (or after recovery), when no other task runs. Blocking."""
        if self._clean and not self.durable and self.withdrawn is None:
            return
        record, seq, regions = self._snapshot_for_clean_close()
        try:
            _save(self.home, f"{self.file_id}.bitmap", "cbt-bitmap", record)
            _write_al(self.home / f"{self.file_id}.al", seq, regions, True)
        except OSError as e:
            self.health.failed(e)
            raise
        self.health.succeeded()
        self._al_saved = seq
        self._clean = True
        self.withdrawn = None


def _replace_file_id(fd: int, file_id: str) -> None:
    """Give the file behind *fd* a new CBT id, durably. Blocking."""
    backing.setxattr(fd, ID_XATTR, file_id.encode(), 0)
    backing.fsync(fd, False)  # fdatasync would not carry the xattr


def _drop_history(home: Path, file_id: str) -> None:
    """Remove a withdrawn history's records (best effort: nothing refers to them). Blocking."""
    for suffix in (".al", ".bitmap"):
        try:
            (home / f"{file_id}{suffix}").unlink(missing_ok=True)
        except OSError:
            pass


def _save(home: Path, name: str, kind: str, body: dict[str, Any]) -> None:
    atomic_write(home, name, encode_record(kind, body))


def _write_al(path: Path, seq: int, regions: list[int], clean: bool) -> None:
    body = {"regions": regions, "region_size": REGION_SIZE, "clean": clean}
    write_slotted(path, "cbt-al", seq, body, AL_SLOT_SIZE)


def _read_al(path: Path) -> tuple[int, list[int], bool] | None:
    """The newest activity-log record as ``(seq, regions, clean)``, or None."""
    found = read_slotted(path, "cbt-al", AL_SLOT_SIZE)
    if found is None:
        return None
    seq, body = found
    try:
        return seq, [int(r) for r in body["regions"]], bool(body["clean"])
    except (KeyError, TypeError, ValueError):
        raise StateError(f"{path}: malformed activity log") from None


def _is_file_id(text: str) -> bool:
    """A file id is hex (made by :meth:`CbtStore._new_id`): never a path."""
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _keys_of(bitmap: dict[str, Any]) -> set[tuple[int, int]]:
    """The backing keys a saved history belongs to (records before aliases have one)."""
    try:
        keys = bitmap["keys"] if "keys" in bitmap else [bitmap["key"]]
        return {(int(dev), int(ino)) for dev, ino in keys}
    except (KeyError, TypeError, ValueError):
        raise StateError("malformed bitmap record: no usable key") from None


def _load(path: Path, kind: str) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode_record(kind, data, str(path))


class CbtStore:
    """Finds, creates and loads the trackers of files; owns ``<state>/cbt/``."""

    def __init__(self, state_dir: Path, block_size: int) -> None:
        self.home = state_dir / "cbt"
        self._home_prefix = f"{self.home}/"
        self.block_size = block_size
        #: file id → backing key, for the ids :meth:`_new_id` gave since the mount
        self._session_ids: dict[str, tuple[int, int]] = {}
        self.home.mkdir(mode=0o700, exist_ok=True)
        #: shared by every tracker: whether the state directory takes saves
        self.health = SaveHealth()

    def file_id(self, path_fd: int) -> str | None:
        try:
            return backing.getxattr(path_fd, ID_XATTR).decode()
        except OSError:
            return None

    def _nothing_saved(self, file_id: str) -> bool:
        """No record of *file_id* is in the state directory (two ``stat`` calls)."""
        for suffix in (".bitmap", ".al"):
            try:
                os.stat(f"{self._home_prefix}{file_id}{suffix}")
            except FileNotFoundError:
                continue
            except OSError:
                return False
            return False
        return True

    def _new_id(self, path_fd: int, key: tuple[int, int], fresh: bool) -> tuple[str, bool]:
        """Give the file a new id on its store; return it, and whether the
        ctime the mount shows is now a kept one. Writing the xattr moves the
        file's ctime, which nothing the guest did moved: unless the file was
        just created, the ctime the mount showed is kept beside its identity
        (:data:`backing.INO_XATTR`), as a relocation keeps it."""
        file_id = secrets.token_hex(8)
        if len(self._session_ids) >= SESSION_IDS_MAX:
            self._session_ids.clear()
        self._session_ids[file_id] = key
        ino, kept_ctime = (None, None) if fresh else backing.kept_identity(path_fd)
        ctime_ns = None if fresh or kept_ctime is not None else backing.fstat(path_fd).st_ctime_ns
        try:
            backing.setxattr(path_fd, ID_XATTR, file_id.encode(), 0)
            if ctime_ns is not None:
                backing.keep_identity(path_fd, ino, ctime_ns)
        except OSError as e:
            # Tracking still works while the file is open; its change ids just
            # cannot be recognised after it is closed (they ask for a full backup).
            log.warning("cannot keep a CBT file id on the store (%s); ids last one open", e)
        return file_id, not fresh

    def has_history(self, file_id: str) -> bool:
        """Whether a history of *file_id* may be saved in the state directory: False
        when it has no bitmap record (what :meth:`forget` would look for first).

        One ``stat`` of a local file, on the caller's thread: most files never save a
        history (see "Nothing durable until it is worth it"), and asking here spares
        their removal a worker thread's hop (measured: the most of an ``rm``'s daemon
        CPU per file). A save running meanwhile is no worse off than with
        :meth:`forget` on its thread: it runs after the look either way.
        """
        if not _is_file_id(file_id):
            return False
        try:
            os.stat(f"{self._home_prefix}{file_id}.bitmap")  # (pathlib's would double it)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # let forget judge (and report) it
        return True

    def forget(self, file_id: str, key: tuple[int, int]) -> bool:
        """Remove the history of a file that is gone (its last link removed, no
        user left). Blocking, small I/O; whether anything was removed.

        Only a history recorded for *key* goes: a file copied on the store
        with its xattrs carries another file's id, and that file's history stays.
        """
        if not _is_file_id(file_id):
            return False
        try:
            bitmap = _load(self.home / f"{file_id}.bitmap", "cbt-bitmap")
            if bitmap is None or key not in _keys_of(bitmap):
                return False
        except StateError:
            return False  # not ours to judge; open_tracker replaces it if it is ever used
        for suffix in (".al", ".bitmap"):  # the bitmap last: it is what proves ownership
            (self.home / f"{file_id}{suffix}").unlink(missing_ok=True)
        log.info("CBT history of removed file %s dropped", file_id)
        return True

    def open_tracker(self, path_fd: int, key: tuple[int, int], fresh: bool = False) -> Tracker:
        """Load (or start) the history of the file behind *path_fd* (*fresh*:
        just created by the mount). Blocking, small I/O.

        A history that cannot be trusted (corrupt records, another block size,
        another file's) is replaced by a new one under a new file id, so its
        old change ids are refused rather than answered wrongly.
        """
        # a file the mount has just created carries no id (nor anything else) yet
        file_id = None if fresh else self.file_id(path_fd)
        if (file_id is not None and self._session_ids.get(file_id) == key
                and self._nothing_saved(file_id)):
            # An id given since the mount, to this very file, with nothing saved
            # under it: no change id of it was ever handed out (a checkpoint saves
            # first), so the file takes it again, and its store is not touched
            # (a new id cost two xattr writes and a kept ctime at every reopen).
            return Tracker(self.home, file_id, self.block_size, key, health=self.health)
        if file_id is not None and _is_file_id(file_id):
            try:
                tracker = self._load_tracker(file_id, key)
            except StateError as e:
                log.warning("CBT history of file %s is not usable (%s); starting anew", file_id, e)
                tracker = None
            if tracker is not None:
                return tracker
        file_id, moved_ctime = self._new_id(path_fd, key, fresh)
        tracker = Tracker(self.home, file_id, self.block_size, key, health=self.health)
        tracker.moved_ctime = moved_ctime
        return tracker

    def _load_tracker(self, file_id: str, key: tuple[int, int]) -> Tracker | None:
        bitmap = _load(self.home / f"{file_id}.bitmap", "cbt-bitmap")
        al = _read_al(self.home / f"{file_id}.al")
        if bitmap is None:
            if al and not al[2]:
                raise StateError("activity log without bitmaps")
            return None
        if bitmap.get("block_size") != self.block_size:
            log.warning(
                "CBT block size of file %s changed (%s → %s); its change ids are reset",
                file_id, bitmap.get("block_size"), self.block_size,
            )
            return None
        if key not in _keys_of(bitmap):
            return None  # a copy of another file (its xattr came along): its own history
        try:
            segments = [
                (int(seg["label"]), Bitmap.from_record(seg["bits"])) for seg in bitmap["segments"]
            ]
            next_seq = int(bitmap["next_seq"])
            marks = {int(m["gen"]): Bitmap.from_record(m["bits"])
                     for m in bitmap.get("relocation_marks", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"malformed bitmap record: {e}") from None
        tracker = Tracker(self.home, file_id, self.block_size, key, segments, next_seq,
                          health=self.health)
        tracker.relocation_marks = marks
        tracker._keep_log = bool(marks)
        al_seq, regions, clean = al or (0, [], True)
        tracker._clean = clean
        tracker._al_saved, tracker._al_next_save = al_seq, al_seq + 1
        for region in regions[-AL_CAPACITY:]:  # disarmed: the first write re-arms them
            tracker._al[int(region)] = tracker._al_next_save
        if not clean:
            region_blocks = REGION_SIZE // self.block_size
            for region in regions:
                for bits in (segments[-1][1], *marks.values()):
                    bits.mark(int(region) * region_blocks, region_blocks)
            log.warning(
                "file %s was not closed cleanly: marked %d hot region(s) (%d MiB) changed",
                file_id, len(regions), len(regions) * REGION_SIZE >> 20,
            )
            # the recovered marks must be durable before a new log replaces the old;
            # if the state directory refuses, the old log stays as it is (it lists
            # the regions) and the tracker keeps them in its own log: still a superset
            try:
                tracker.close_blocking()
            except OSError as e:
                self.health.failed(e)
        return tracker
