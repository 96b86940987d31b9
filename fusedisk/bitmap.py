"""A sparse block bitmap: pure, synchronous, no I/O.

One bit per block, held in two forms that never overlap:

- *chunks* of :data:`CHUNK_BITS` blocks (up to 4 KiB of bits each) that
  exist only while one of their bits is set, so the holes of a sparse disk
  cost nothing. A chunk's bytes go only as far as its highest set bit (in
  8-byte words; the rest reads as clear), so that the one block of a small
  file costs a few bytes, not 4 KiB: a relocation holds a bitmap of what it
  copied for every file of an entry. Single blocks, the write path's marks,
  always go here.
- *runs*: chunks that are wholly set, as an ordered set of chunk intervals.
  The whole chunks a range covers become (part of) one run, so marking or
  clearing any length (a truncate to 10^15 bytes) costs the same in time
  and memory as a short range: never a bit, nor a step, per block.

A chunk index is in at most one of the two. Every method is a plain
``def`` with no checkpoint, so a caller on the trio thread sees each call
as atomic. Costs: ``mark``/``clear`` of a range, O(log runs) plus the
chunks and runs it overlaps that exist; ``count``, O(1); ``test``, O(1) in
a chunk, O(log runs) elsewhere; ``next_dirty``, O(chunks + log runs).
"""

from __future__ import annotations

import base64
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Any

#: Blocks per chunk (a chunk is 4 KiB of bits).
CHUNK_BITS = 1 << 15
_CHUNK_SHIFT = 15
_CHUNK_BYTES = CHUNK_BITS // 8
_EMPTY = bytes(_CHUNK_BYTES)
_FULL = b"\xff" * _CHUNK_BYTES
_FULL_WORD = (1 << 64) - 1
#: Memory of one run, roughly (two list slots, two ints).
_RUN_BYTES = 80
#: The record format with runs (version 1, unversioned, has chunks only).
RECORD_VERSION = 2


class Bitmap:
    """Dirty bits by block number; ``count`` is kept exact."""

    __slots__ = ("_chunks", "_ends", "_starts", "count")

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}
        #: the runs: chunks [_starts[i], _ends[i]) are wholly set; sorted, disjoint,
        #: and never touching (touching runs are merged into one)
        self._starts: list[int] = []
        self._ends: list[int] = []
        #: number of set bits
        self.count = 0

    def mark(self, blockno: int, nblocks: int = 1) -> None:
        """Set the bits of blocks ``[blockno, blockno + nblocks)``."""
        if nblocks == 1:  # the common case on the write path
            chunk = self._chunks.get(blockno >> _CHUNK_SHIFT)
            bit = blockno & (CHUNK_BITS - 1)
            if chunk is None:
                if self._starts and self._in_run(blockno >> _CHUNK_SHIFT):
                    return
                chunk = self._chunks[blockno >> _CHUNK_SHIFT] = bytearray(_span(bit + 1))
            elif len(chunk) <= bit >> 3:
                _grow(chunk, bit + 1)
            byte, mask = chunk[bit >> 3], 1 << (bit & 7)
            if not byte & mask:
                chunk[bit >> 3] = byte | mask
                self.count += 1
            return
        if nblocks <= 0:
            return
        end = blockno + nblocks
        lo, hi = -(-blockno >> _CHUNK_SHIFT), end >> _CHUNK_SHIFT  # whole chunks: [lo, hi)
        if lo >= hi:
            self._change(blockno, end, True)
            return
        self._change(blockno, lo << _CHUNK_SHIFT, True)
        for index in self._chunks_within(lo, hi):  # they become part of the run
            self.count -= _popcount(self._chunks.pop(index))
        self.count += self._add_run(lo, hi) << _CHUNK_SHIFT
        self._change(hi << _CHUNK_SHIFT, end, True)

    def clear(self, blockno: int, nblocks: int = 1) -> None:
        """Clear the bits of blocks ``[blockno, blockno + nblocks)``."""
        if nblocks <= 0:
            return
        end = blockno + nblocks
        lo, hi = -(-blockno >> _CHUNK_SHIFT), end >> _CHUNK_SHIFT
        if lo >= hi:
            self._change(blockno, end, False)
            return
        self._change(blockno, lo << _CHUNK_SHIFT, False)
        for index in self._chunks_within(lo, hi):
            self.count -= _popcount(self._chunks.pop(index))
        self.count -= self._remove_runs(lo, hi) << _CHUNK_SHIFT
        self._change(hi << _CHUNK_SHIFT, end, False)

    def test(self, blockno: int) -> bool:
        chunk = self._chunks.get(blockno >> _CHUNK_SHIFT)
        if chunk is None:
            return bool(self._starts) and self._in_run(blockno >> _CHUNK_SHIFT)
        bit = blockno & (CHUNK_BITS - 1)
        return len(chunk) > bit >> 3 and bool(chunk[bit >> 3] & (1 << (bit & 7)))

    def extents(self) -> Iterator[tuple[int, int]]:
        """Runs of set bits as ``(blockno, nblocks)``, in order, merged across chunks."""
        run_start = run_end = -1
        for blockno, nblocks in self._pieces():
            if blockno == run_end:
                run_end += nblocks
            else:
                if run_start >= 0:
                    yield run_start, run_end - run_start
                run_start, run_end = blockno, blockno + nblocks
        if run_start >= 0:
            yield run_start, run_end - run_start

    def next_dirty(self, blockno: int) -> int | None:
        """The first set bit at or after *blockno*, or None."""
        blockno = max(blockno, 0)
        index = blockno >> _CHUNK_SHIFT
        found: int | None = None
        run = bisect_right(self._ends, index)  # the first run that ends after *index*
        if run < len(self._starts):
            if self._starts[run] <= index:
                return blockno
            found = self._starts[run] << _CHUNK_SHIFT
        chunk = self._chunks.get(index)
        if chunk is not None:
            rest = int.from_bytes(chunk, "little") >> (blockno & (CHUNK_BITS - 1))
            if rest:
                return blockno + _lowest_bit(rest)
        later = min((i for i in self._chunks if i > index), default=None)
        if later is not None and (found is None or later << _CHUNK_SHIFT < found):
            bits = int.from_bytes(self._chunks[later], "little")
            found = (later << _CHUNK_SHIFT) + _lowest_bit(bits)
        return found

    def update(self, other: Bitmap) -> None:
        """Set every bit that is set in *other* (in-place OR)."""
        for lo, hi in zip(other._starts, other._ends, strict=True):
            self.mark(lo << _CHUNK_SHIFT, (hi - lo) << _CHUNK_SHIFT)
        for index, theirs in other._chunks.items():
            mine = self._chunks.get(index)
            if mine is None:
                if not (self._starts and self._in_run(index)):
                    self._chunks[index] = bytearray(theirs)
                    self.count += _popcount(theirs)
                continue
            old = int.from_bytes(mine, "little")
            new = old | int.from_bytes(theirs, "little")
            if new != old:
                self.count += new.bit_count() - old.bit_count()
                mine[:] = new.to_bytes(max(len(mine), len(theirs)), "little")

    def copy(self) -> Bitmap:
        out = Bitmap()
        out._chunks = {i: bytearray(c) for i, c in self._chunks.items()}
        out._starts, out._ends = list(self._starts), list(self._ends)
        out.count = self.count
        return out

    def truncate(self, nblocks: int) -> None:
        """Clear every bit at or beyond block *nblocks*."""
        limit = max(max(self._chunks, default=-1) + 1, self._ends[-1] if self._ends else 0)
        limit <<= _CHUNK_SHIFT
        if limit > nblocks:
            self.clear(nblocks, limit - nblocks)

    @property
    def memory_bytes(self) -> int:
        return sum(map(len, self._chunks.values())) + len(self._starts) * _RUN_BYTES

    def to_record(self) -> dict[str, Any]:
        """A JSON-able form.

        Version 1 (the only one before runs; still written when there are
        none, so that an older fusedisk reads it): chunk index → base64 of
        its bits. Version 2: ``{"version": 2, "chunks": <a version 1 form>,
        "runs": [[blockno, nblocks], ...]}``, runs in blocks, so they mean
        the same whatever the chunk size.
        """
        chunks = {str(i): base64.b64encode(c.ljust(_CHUNK_BYTES, b"\0")).decode()
                  for i, c in sorted(self._chunks.items())}
        if not self._starts:
            return chunks
        runs = [
            [lo << _CHUNK_SHIFT, (hi - lo) << _CHUNK_SHIFT]
            for lo, hi in zip(self._starts, self._ends, strict=True)
        ]
        return {"version": RECORD_VERSION, "chunks": chunks, "runs": runs}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Bitmap:
        """The bitmap of a :meth:`to_record` form, of either version.

        Raises ValueError, TypeError or KeyError for a malformed one.
        """
        if not isinstance(record, dict):
            raise TypeError("a bitmap record is a JSON object")
        chunks, runs = record, []
        if "version" in record:
            if record["version"] != RECORD_VERSION:
                raise ValueError(f"bitmap record of unknown version {record['version']!r}")
            chunks, runs = record["chunks"], record["runs"]
            if not isinstance(chunks, dict) or not isinstance(runs, list):
                raise TypeError("malformed bitmap record")
        out = cls()
        for key, text in chunks.items():
            index = int(key)
            chunk = bytearray(base64.b64decode(text, validate=True))
            if len(chunk) != _CHUNK_BYTES or index < 0:
                raise ValueError("bitmap chunk of the wrong size or place")
            if chunk != _EMPTY:
                used = len(chunk.rstrip(b"\0"))  # what is kept of it (see the module doc)
                out._chunks[index] = chunk[:_span(used * 8)]
                out.count += _popcount(chunk)
        for run in runs:
            blockno, nblocks = run
            if not (type(blockno) is int and type(nblocks) is int):
                raise TypeError(f"malformed bitmap run {run!r}")
            if blockno < 0 or nblocks <= 0:
                raise ValueError(f"malformed bitmap run {run!r}")
            out.mark(blockno, nblocks)
        return out

    # -- the two forms ---------------------------------------------------------------

    def _in_run(self, index: int) -> bool:
        run = bisect_right(self._starts, index) - 1
        return run >= 0 and index < self._ends[run]

    def _change(self, blockno: int, end: int, value: bool) -> None:
        """Set (or clear) ``[blockno, end)``, a range within at most two chunks."""
        while blockno < end:
            index = blockno >> _CHUNK_SHIFT
            base = index << _CHUNK_SHIFT
            stop = min(end, base + CHUNK_BITS)
            chunk = self._chunks.get(index)
            if chunk is None and self._starts and self._in_run(index):
                if value:  # already set
                    blockno = stop
                    continue
                # part of a wholly set chunk is cleared: it leaves its run
                self._remove_runs(index, index + 1)
                chunk = self._chunks[index] = bytearray(_FULL)
            if chunk is None:
                if not value:
                    blockno = stop
                    continue
                chunk = self._chunks[index] = bytearray(_span(stop - base))
            elif value and len(chunk) < (stop - base + 7) >> 3:
                _grow(chunk, stop - base)
            flipped = _change_bits(chunk, blockno - base, min(stop - base, len(chunk) * 8),
                                   value)
            if value:
                self.count += flipped
            else:
                self.count -= flipped
                if flipped and chunk.count(0) == len(chunk):
                    del self._chunks[index]
            blockno = stop

    def _chunks_within(self, lo: int, hi: int) -> list[int]:
        """Indices of the existing chunks in ``[lo, hi)``, without walking a long range."""
        if hi - lo <= len(self._chunks):
            return [i for i in range(lo, hi) if i in self._chunks]
        return [i for i in self._chunks if lo <= i < hi]

    def _add_run(self, lo: int, hi: int) -> int:
        """Put chunks ``[lo, hi)`` in a run, merged with the runs it touches; return
        how many of them were in none before."""
        starts, ends = self._starts, self._ends
        first = bisect_left(ends, lo)  # runs from here end at or after lo...
        last = bisect_right(starts, hi)  # ...and up to here start at or before hi
        covered = sum(max(0, min(ends[i], hi) - max(starts[i], lo)) for i in range(first, last))
        added = hi - lo - covered
        if first < last:
            lo, hi = min(lo, starts[first]), max(hi, ends[last - 1])
        starts[first:last] = [lo]
        ends[first:last] = [hi]
        return added

    def _remove_runs(self, lo: int, hi: int) -> int:
        """Take chunks ``[lo, hi)`` out of the runs; return how many were in one."""
        starts, ends = self._starts, self._ends
        first = bisect_right(ends, lo)  # runs from here end after lo...
        last = bisect_left(starts, hi)  # ...and up to here start before hi
        if first >= last:
            return 0
        removed = sum(min(ends[i], hi) - max(starts[i], lo) for i in range(first, last))
        kept_starts, kept_ends = [], []
        if starts[first] < lo:
            kept_starts.append(starts[first])
            kept_ends.append(lo)
        if ends[last - 1] > hi:
            kept_starts.append(hi)
            kept_ends.append(ends[last - 1])
        starts[first:last] = kept_starts
        ends[first:last] = kept_ends
        return removed

    def _pieces(self) -> Iterator[tuple[int, int]]:
        """Set ranges as ``(blockno, nblocks)`` in order; neighbours may touch."""
        starts, ends = self._starts, self._ends
        run = 0
        for index in sorted(self._chunks):
            while run < len(starts) and starts[run] < index:
                yield starts[run] << _CHUNK_SHIFT, (ends[run] - starts[run]) << _CHUNK_SHIFT
                run += 1
            yield from _chunk_pieces(self._chunks[index], index << _CHUNK_SHIFT)
        for lo, hi in zip(starts[run:], ends[run:], strict=True):
            yield lo << _CHUNK_SHIFT, (hi - lo) << _CHUNK_SHIFT


def _span(nbits: int) -> int:
    """The bytes a chunk needs to hold bits ``[0, nbits)``: whole 8-byte words."""
    return ((nbits + 63) >> 6) << 3


def _grow(chunk: bytearray, nbits: int) -> None:
    """Lengthen *chunk* (with clear bits) to hold bits ``[0, nbits)``."""
    chunk.extend(bytes(_span(nbits) - len(chunk)))


def _change_bits(chunk: bytearray, lo: int, hi: int, value: bool) -> int:
    """Set (or clear) bits ``[lo, hi)`` of *chunk* (which holds them, or for a
    clear, ends before *hi*); return how many bits flipped."""
    if lo >= hi:
        return 0
    first, last = lo >> 3, (hi + 7) >> 3
    old = int.from_bytes(chunk[first:last], "little")
    mask = ((1 << (hi - lo)) - 1) << (lo - first * 8)
    new = old | mask if value else old & ~mask
    if new == old:
        return 0
    chunk[first:last] = new.to_bytes(last - first, "little")
    return (new ^ old).bit_count()


def _popcount(data: bytes | bytearray) -> int:
    return int.from_bytes(data, "little").bit_count()


def _lowest_bit(value: int) -> int:
    """The position of the lowest set bit of *value* (> 0)."""
    return (value & -value).bit_length() - 1


def _chunk_pieces(chunk: bytearray, base: int) -> Iterator[tuple[int, int]]:
    """Set ranges of one chunk as ``(blockno, nblocks)``, in order, by 64-bit words:
    empty and full words cost one step, others one step per range they hold."""
    words = array("Q", chunk)
    if sys.byteorder == "big":
        words.byteswap()  # bit i of byte j is block 8j + i: a little-endian number
    start = end = -1
    pos = base
    for word in words:
        if word == _FULL_WORD:
            if pos == end:
                end += 64
            else:
                if start >= 0:
                    yield start, end - start
                start, end = pos, pos + 64
        elif word:
            bit = pos
            while word:
                skip = _lowest_bit(word)
                word >>= skip
                bit += skip
                ones = (word ^ (word + 1)).bit_length() - 1
                if bit == end:
                    end += ones
                else:
                    if start >= 0:
                        yield start, end - start
                    start, end = bit, bit + ones
                word >>= ones
                bit += ones
        pos += 64
    if start >= 0:
        yield start, end - start


assert array("Q").itemsize == 8, "_chunk_pieces reads chunks as 64-bit words"
