"""A sparse block bitmap: pure, synchronous, no I/O.

One bit per block; bits live in chunks of :data:`CHUNK_BITS` blocks that
exist only while one of their bits is set, so the holes of a sparse disk
cost nothing. Every method is a plain ``def`` with no checkpoint, so a
caller on the trio thread sees each call as atomic.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

#: Blocks per chunk (a chunk is 4 KiB of bits).
CHUNK_BITS = 1 << 15
_CHUNK_SHIFT = 15
_CHUNK_BYTES = CHUNK_BITS // 8


class Bitmap:
    """Dirty bits by block number; ``count`` is kept exact."""

    __slots__ = ("_chunks", "count")

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}
        #: number of set bits
        self.count = 0

    def mark(self, blockno: int, nblocks: int = 1) -> None:
        """Set the bits of blocks ``[blockno, blockno + nblocks)``."""
        if nblocks == 1:  # the common case on the write path
            chunk = self._chunks.get(blockno >> _CHUNK_SHIFT)
            if chunk is None:
                chunk = self._chunks[blockno >> _CHUNK_SHIFT] = bytearray(_CHUNK_BYTES)
            bit = blockno & (CHUNK_BITS - 1)
            byte, mask = chunk[bit >> 3], 1 << (bit & 7)
            if not byte & mask:
                chunk[bit >> 3] = byte | mask
                self.count += 1
            return
        end = blockno + nblocks
        while blockno < end:
            index = blockno >> _CHUNK_SHIFT
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = bytearray(_CHUNK_BYTES)
            base = index << _CHUNK_SHIFT
            stop = min(end, base + CHUNK_BITS)
            self.count += _change_bits(chunk, blockno - base, stop - base, True)
            blockno = stop

    def clear(self, blockno: int, nblocks: int = 1) -> None:
        """Clear the bits of blocks ``[blockno, blockno + nblocks)``."""
        end = blockno + nblocks
        while blockno < end:
            index = blockno >> _CHUNK_SHIFT
            base = index << _CHUNK_SHIFT
            stop = min(end, base + CHUNK_BITS)
            chunk = self._chunks.get(index)
            if chunk is not None:
                self.count -= _change_bits(chunk, blockno - base, stop - base, False)
                if not any(chunk):
                    del self._chunks[index]
            blockno = stop

    def test(self, blockno: int) -> bool:
        chunk = self._chunks.get(blockno >> _CHUNK_SHIFT)
        if chunk is None:
            return False
        bit = blockno & (CHUNK_BITS - 1)
        return bool(chunk[bit >> 3] & (1 << (bit & 7)))

    def extents(self) -> Iterator[tuple[int, int]]:
        """Runs of set bits as ``(blockno, nblocks)``, in order, merged across chunks."""
        run_start = run_end = -1
        for index in sorted(self._chunks):
            chunk = self._chunks[index]
            base = index << _CHUNK_SHIFT
            for byte_index, byte in enumerate(chunk):
                if not byte:
                    continue
                for bit in range(8):
                    if byte & (1 << bit):
                        blockno = base + byte_index * 8 + bit
                        if blockno == run_end:
                            run_end += 1
                        else:
                            if run_start >= 0:
                                yield run_start, run_end - run_start
                            run_start, run_end = blockno, blockno + 1
        if run_start >= 0:
            yield run_start, run_end - run_start

    def next_dirty(self, blockno: int) -> int | None:
        """The first set bit at or after *blockno*, or None."""
        for index in sorted(i for i in self._chunks if i >= blockno >> _CHUNK_SHIFT):
            chunk = self._chunks[index]
            base = index << _CHUNK_SHIFT
            start = max(0, blockno - base)
            for bit in range(start, CHUNK_BITS):
                if chunk[bit >> 3] & (1 << (bit & 7)):
                    return base + bit
        return None

    def update(self, other: Bitmap) -> None:
        """Set every bit that is set in *other* (in-place OR)."""
        for index, theirs in other._chunks.items():
            mine = self._chunks.get(index)
            if mine is None:
                self._chunks[index] = bytearray(theirs)
                self.count += _popcount(theirs)
            else:
                merged = bytes(a | b for a, b in zip(mine, theirs, strict=True))
                self.count += _popcount(merged) - _popcount(mine)
                mine[:] = merged

    def copy(self) -> Bitmap:
        out = Bitmap()
        out._chunks = {i: bytearray(c) for i, c in self._chunks.items()}
        out.count = self.count
        return out

    def truncate(self, nblocks: int) -> None:
        """Clear every bit at or beyond block *nblocks*."""
        for index in [i for i in self._chunks if (i + 1) << _CHUNK_SHIFT > nblocks]:
            start = max(nblocks, index << _CHUNK_SHIFT)
            self.clear(start, ((index + 1) << _CHUNK_SHIFT) - start)

    @property
    def memory_bytes(self) -> int:
        return len(self._chunks) * _CHUNK_BYTES

    def to_record(self) -> dict[str, str]:
        """A JSON-able form: chunk index → base64 of its bits."""
        return {str(i): base64.b64encode(c).decode() for i, c in sorted(self._chunks.items())}

    @classmethod
    def from_record(cls, record: dict[str, str]) -> Bitmap:
        out = cls()
        for key, text in record.items():
            chunk = bytearray(base64.b64decode(text))
            if len(chunk) != _CHUNK_BYTES:
                raise ValueError("bitmap chunk of the wrong size")
            if any(chunk):
                out._chunks[int(key)] = chunk
                out.count += _popcount(chunk)
        return out


def _change_bits(chunk: bytearray, lo: int, hi: int, value: bool) -> int:
    """Set (or clear) bits ``[lo, hi)`` of *chunk*; return how many bits flipped."""
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
