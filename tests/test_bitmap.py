"""The block bitmap against a trivial reference, and ranges of any length.

The reference is the obvious one: a Python ``int`` whose bit *b* is block
*b*, over a universe of a few chunks (so every boundary case of chunks and
whole-chunk runs is reached). A seeded generator drives every method of
:class:`~fusedisk.bitmap.Bitmap` with ranges biased towards chunk
boundaries; huge ranges (far more blocks than memory has bits) are checked
analytically, under an address-space limit so that a bitmap that spends
memory per block fails fast instead of taking the machine down.
"""

from __future__ import annotations

import base64
import json
import random
import resource
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fusedisk.bitmap import CHUNK_BITS, Bitmap
from fusedisk.sizes import block_span

UNIVERSE = 6 * CHUNK_BITS
#: blocks of a 10^15-byte file at 4 KiB blocks, and more
HUGE = 1 << 48


class Model:
    """The reference: bit *b* of an int is block *b*."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def mark(self, blockno: int, nblocks: int) -> None:
        if nblocks > 0:
            self.value |= ((1 << nblocks) - 1) << blockno

    def clear(self, blockno: int, nblocks: int) -> None:
        if nblocks > 0:
            self.value &= ~(((1 << nblocks) - 1) << blockno)

    def truncate(self, nblocks: int) -> None:
        self.value &= (1 << nblocks) - 1

    @property
    def count(self) -> int:
        return self.value.bit_count()

    def test(self, blockno: int) -> bool:
        return bool(self.value >> blockno & 1)

    def next_dirty(self, blockno: int) -> int | None:
        rest = self.value >> blockno
        return None if not rest else blockno + (rest & -rest).bit_length() - 1

    def extents(self) -> list[tuple[int, int]]:
        out, value, pos = [], self.value, 0
        while value:
            skip = (value & -value).bit_length() - 1
            value >>= skip
            pos += skip
            ones = (value ^ (value + 1)).bit_length() - 1
            out.append((pos, ones))
            value >>= ones
            pos += ones
        return out


def random_range(rng: random.Random, universe: int = UNIVERSE) -> tuple[int, int]:
    """A range whose ends are often exactly on, or one off, a chunk boundary."""

    def point() -> int:
        choice = rng.random()
        if choice < 0.4:
            return rng.randrange(universe // CHUNK_BITS + 1) * CHUNK_BITS + rng.choice((-1, 0, 1))
        if choice < 0.5:
            return rng.randrange(universe // CHUNK_BITS + 1) * CHUNK_BITS + rng.randrange(-64, 64)
        return rng.randrange(universe)

    a, b = sorted((min(max(point(), 0), universe), min(max(point(), 0), universe)))
    if rng.random() < 0.25:  # the write path: one block, or a few
        return a, rng.choice((1, 1, 1, 2, 16))
    return a, b - a


def check(bits: Bitmap, model: Model, rng: random.Random, full: bool) -> None:
    assert bits.count == model.count
    for _ in range(8):
        blockno = rng.randrange(UNIVERSE + CHUNK_BITS)
        assert bits.test(blockno) == model.test(blockno), blockno
        assert bits.next_dirty(blockno) == model.next_dirty(blockno), blockno
    assert bits.next_dirty(0) == model.next_dirty(0)
    if full:
        extents = list(bits.extents())
        assert extents == model.extents()
        # from_record(to_record) is the identity, through JSON as the record is stored
        restored = Bitmap.from_record(json.loads(json.dumps(bits.to_record())))
        assert list(restored.extents()) == extents and restored.count == bits.count
        copy = bits.copy()
        assert list(copy.extents()) == extents and copy.count == bits.count


@pytest.mark.parametrize("seed", range(12))
def test_every_method_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    bits, model = Bitmap(), Model()
    for step in range(600):
        op = rng.random()
        blockno, nblocks = random_range(rng)
        if op < 0.45:
            bits.mark(blockno, nblocks)
            model.mark(blockno, nblocks)
        elif op < 0.8:
            bits.clear(blockno, nblocks)
            model.clear(blockno, nblocks)
        elif op < 0.88:
            other, other_model = Bitmap(), Model()
            for _ in range(rng.randrange(4)):
                start, n = random_range(rng)
                other.mark(start, n)
                other_model.mark(start, n)
            bits.update(other)
            model.value |= other_model.value
            assert list(other.extents()) == other_model.extents()  # *other* is untouched
        elif op < 0.92:
            bits.truncate(blockno)
            model.truncate(blockno)
        elif op < 0.96:
            copy = bits.copy()
            copy.mark(*random_range(rng))
            copy.clear(*random_range(rng))  # a copy shares nothing with its original
        else:
            bits = Bitmap.from_record(json.loads(json.dumps(bits.to_record())))
        check(bits, model, rng, full=step % 25 == 0)
    check(bits, model, rng, full=True)


def test_extents_are_sorted_merged_and_cross_chunks() -> None:
    bits = Bitmap()
    bits.mark(CHUNK_BITS - 3, 3)  # the end of chunk 0
    bits.mark(CHUNK_BITS, 2 * CHUNK_BITS)  # chunks 1 and 2, whole
    bits.mark(3 * CHUNK_BITS, 5)  # the start of chunk 3
    bits.mark(5 * CHUNK_BITS + 7)
    assert list(bits.extents()) == [(CHUNK_BITS - 3, 2 * CHUNK_BITS + 8), (5 * CHUNK_BITS + 7, 1)]
    assert bits.count == 2 * CHUNK_BITS + 9


def test_records_written_by_the_first_format_are_read() -> None:
    """Version 1 (the only one before ranges): chunk index → base64 of its 4 KiB of bits."""
    chunk = bytearray(CHUNK_BITS // 8)
    chunk[0] = 0b1000_0001  # blocks 0 and 7 of the chunk
    chunk[-1] = 0x80  # its last block
    full = b"\xff" * (CHUNK_BITS // 8)
    v1 = {"3": base64.b64encode(chunk).decode(), "4": base64.b64encode(full).decode(),
          "9": base64.b64encode(bytes(len(chunk))).decode()}  # an empty chunk: ignored
    bits = Bitmap.from_record(v1)
    base = 3 * CHUNK_BITS
    last = base + CHUNK_BITS - 1
    assert list(bits.extents()) == [(base, 1), (base + 7, 1), (last, 1 + CHUNK_BITS)]
    assert bits.count == 3 + CHUNK_BITS
    # a bitmap without runs is still written in the first format (an older fusedisk reads it)
    plain = Bitmap()
    plain.mark(base)
    plain.mark(base + 7)
    plain.mark(last)
    assert plain.to_record() == {"3": v1["3"]}


@pytest.mark.parametrize("record", [
    {"3": base64.b64encode(b"\x01" * 10).decode()},  # a chunk of the wrong size
    {"version": 2, "chunks": {}, "runs": [[5, 0]]},
    {"version": 2, "chunks": {}, "runs": [[-1, 5]]},
    {"version": 2, "chunks": {}, "runs": [["1", 5]]},
    {"version": 2, "chunks": {}},
    {"version": 3, "chunks": {}, "runs": []},
    {"-2": base64.b64encode(b"\x01" * (CHUNK_BITS // 8)).decode()},
])
def test_malformed_records_are_refused(record: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError, KeyError)):
        Bitmap.from_record(record)


# -- ranges of any length ---------------------------------------------------------------


@contextmanager
def address_space_limit(extra_bytes: int = 256 << 20) -> Iterator[None]:
    """Fail with MemoryError, instead of swapping the machine to death, past *extra_bytes*."""
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_huge_range_costs_what_a_small_one_does() -> None:
    start, n = 12345, HUGE
    with address_space_limit():
        bits = Bitmap()
        bits.mark(7)  # a write before the range, in the same chunk as its start
        bits.mark(start, n)
        assert bits.count == n + 1
        assert bits.memory_bytes <= 4 * (CHUNK_BITS // 8)
        assert list(bits.extents()) == [(7, 1), (start, n)]
        assert bits.test(start) and bits.test(start + n - 1) and not bits.test(start + n)
        assert not bits.test(start - 1)
        assert bits.next_dirty(8) == start
        assert bits.next_dirty(start + n // 2) == start + n // 2
        assert bits.next_dirty(start + n) is None
        record = bits.to_record()
        assert len(json.dumps(record)) < 4 * 8192
        again = Bitmap.from_record(json.loads(json.dumps(record)))
        assert list(again.extents()) == [(7, 1), (start, n)] and again.count == n + 1

        # marks inside the range change nothing; a hole punched in the middle splits it
        bits.mark(start + n // 3)
        bits.mark(start + 5, 3 * CHUNK_BITS)
        assert bits.count == n + 1
        middle = start + n // 2 + 3
        bits.clear(middle, 2 * CHUNK_BITS + 11)
        assert bits.count == n + 1 - (2 * CHUNK_BITS + 11)
        assert list(bits.extents()) == [
            (7, 1), (start, middle - start), (middle + 2 * CHUNK_BITS + 11,
                                               start + n - middle - 2 * CHUNK_BITS - 11)]
        assert bits.next_dirty(middle) == middle + 2 * CHUNK_BITS + 11
        assert not bits.test(middle) and bits.test(middle - 1)

        # OR of two huge bitmaps, a copy, a truncate, a huge clear
        other = Bitmap()
        other.mark(HUGE * 2, HUGE)
        other.mark(middle + 1)
        merged = bits.copy()
        merged.update(other)
        assert merged.count == bits.count + HUGE + 1
        assert list(other.extents()) == [(middle + 1, 1), (HUGE * 2, HUGE)]
        merged.truncate(HUGE * 2 + 10)
        assert merged.count == bits.count + 1 + 10
        merged.clear(0, HUGE * 4)
        assert merged.count == 0 and list(merged.extents()) == [] and merged.next_dirty(0) is None
        assert merged.memory_bytes == 0
        assert bits.count == n + 1 - (2 * CHUNK_BITS + 11)  # the copy shared nothing


class IntervalModel:
    """The reference for huge universes: a sorted list of disjoint ``[start, end)``."""

    def __init__(self) -> None:
        self.intervals: list[tuple[int, int]] = []

    def mark(self, blockno: int, nblocks: int) -> None:
        if nblocks <= 0:
            return
        merged: list[tuple[int, int]] = []
        for start, end in sorted([*self.intervals, (blockno, blockno + nblocks)]):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        self.intervals = merged

    def clear(self, blockno: int, nblocks: int) -> None:
        end = blockno + nblocks
        out: list[tuple[int, int]] = []
        for s, e in self.intervals:
            out += [(a, b) for a, b in ((s, min(e, blockno)), (max(s, end), e)) if a < b]
        self.intervals = out

    @property
    def count(self) -> int:
        return sum(e - s for s, e in self.intervals)

    def test(self, blockno: int) -> bool:
        return any(s <= blockno < e for s, e in self.intervals)

    def next_dirty(self, blockno: int) -> int | None:
        return min((max(s, blockno) for s, e in self.intervals if e > blockno), default=None)

    def extents(self) -> list[tuple[int, int]]:
        return [(s, e - s) for s, e in self.intervals]


def test_huge_ranges_against_the_reference() -> None:
    """Random ranges over a universe of 2^48 blocks, against an interval-list reference."""
    rng = random.Random(5)
    with address_space_limit():
        bits, model = Bitmap(), IntervalModel()
        for step in range(400):
            blockno, nblocks = random_range(rng, HUGE)
            if rng.random() < 0.6:
                bits.mark(blockno, nblocks)
                model.mark(blockno, nblocks)
            else:
                bits.clear(blockno, nblocks)
                model.clear(blockno, nblocks)
            assert bits.count == model.count
            for probe in (rng.randrange(HUGE), blockno, blockno + nblocks, blockno - 1):
                probe = max(probe, 0)
                assert bits.test(probe) == model.test(probe), probe
                assert bits.next_dirty(probe) == model.next_dirty(probe), probe
            if step % 50 == 0:
                assert list(bits.extents()) == model.extents()
                bits = Bitmap.from_record(json.loads(json.dumps(bits.to_record())))
        assert list(bits.extents()) == model.extents()
        assert bits.memory_bytes < 64 << 20


def test_block_span_is_exactly_the_blocks_a_byte_range_touches() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        shift = rng.choice((12, 16, 20))
        size = 1 << shift
        offset = rng.choice((0, rng.randrange(1 << 40), rng.randrange(8) * size))
        length = rng.choice((1, size, size - 1, size + 1, rng.randrange(1, 5 * size)))
        first, nblocks = block_span(offset, length, shift)
        touched = {b for b in range(offset // size - 1, (offset + length) // size + 2)
                   if b * size < offset + length and (b + 1) * size > offset}
        assert set(range(first, first + nblocks)) == touched, (offset, length, shift)


def test_a_few_low_blocks_cost_a_few_bytes_and_records_keep_their_format() -> None:
    """A relocation keeps a bitmap of what it copied for every file of an entry:
    the one block of a small file must not cost a 4 KiB chunk (100k files: 400
    MiB). Chunks grow as higher bits are set; records are written as before."""
    bits = Bitmap()
    bits.mark(0)
    assert bits.memory_bytes <= 8
    bits.mark(1, 3)
    assert bits.memory_bytes <= 8 and bits.count == 4
    bits.mark(200)  # grows the chunk to hold bit 200, no further
    assert 8 < bits.memory_bytes <= 32
    assert bits.test(200) and not bits.test(201) and not bits.test(CHUNK_BITS - 1)
    assert bits.next_dirty(5) == 200 and bits.next_dirty(201) is None
    record = bits.to_record()
    assert all(len(base64.b64decode(text)) == CHUNK_BITS // 8 for text in record.values())
    again = Bitmap.from_record(json.loads(json.dumps(record)))
    assert list(again.extents()) == [(0, 4), (200, 1)] and again.memory_bytes <= 32
    bits.clear(0, 201)
    assert bits.count == 0 and bits.memory_bytes == 0 and list(bits.extents()) == []
    # a clear past the end of a short chunk, and one that leaves it partly set
    bits.mark(70)
    bits.clear(100, 5000)
    bits.clear(71, 1)
    assert list(bits.extents()) == [(70, 1)]
    other = Bitmap()
    other.mark(CHUNK_BITS - 1)
    bits.update(other)
    assert list(bits.extents()) == [(70, 1), (CHUNK_BITS - 1, 1)] and bits.count == 2
