"""The Copier driven directly on trio's autojump clock: rate limit, live rate changes, pause.

No mount and no real waiting: the copier's token bucket and its pauses run
on trio's clock, which the autojump clock advances whenever every task
waits, so "a 4 MiB copy at 1 MiB/s takes 4 s" is checked exactly and at
once. The data is checked too: the pool file must equal the source.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from fusedisk.gate import Gate
from fusedisk.mirror import CHUNK_SIZE, Copier, FileCopy
from fusedisk.vdisk import OpenFiles

BLOCK = 64 << 10
MIB = 1 << 20


@asynccontextmanager
async def copying(tmp_path: Path, size: int) -> AsyncIterator[tuple[Copier, FileCopy, bytes]]:
    """A copier with one source file of *size* random bytes added."""
    data = os.urandom(size)
    source = tmp_path / "disk.img"
    source.write_bytes(data)
    pool = tmp_path / "pool"
    pool.mkdir()
    files = OpenFiles(None, BLOCK)
    pool_fd = os.open(pool, os.O_PATH)
    src_fd = os.open(source, os.O_PATH)
    copier = Copier(files, Gate(), pool_fd, BLOCK)
    try:
        st = os.fstat(src_fd)
        copy = copier.add(src_fd, (st.st_dev, st.st_ino))
        yield copier, copy, data
    finally:
        for fd in copier.detach():
            os.close(fd)
        files.close_all()
        os.close(src_fd)
        os.close(pool_fd)


def copied(copy: FileCopy, size: int) -> bytes:
    return os.pread(copy.dst_fd, size, 0)


async def test_a_rate_limit_is_held_on_the_clock(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with copying(tmp_path, 4 * MIB) as (copier, copy, data):
        copier.rate_limit = MIB
        start = trio.current_time()
        await copier.copy_pass()
        took = trio.current_time() - start
        # the bucket starts empty: every byte waits for its tokens (one chunk of slack)
        assert 3.0 <= took <= 4.0 + 1.0, took
        assert copied(copy, len(data)) == data
        assert copier.bytes_copied == len(data) and copier.dirty_bytes() == 0


async def test_a_new_rate_takes_effect_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Even from a rate of one byte a second, whose debt would last for days.
    Two copy steps' worth of data: the first step's debt holds the second."""
    async with copying(tmp_path, 2 * CHUNK_SIZE) as (copier, copy, data):
        copier.rate_limit = 1
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier.copy_pass)
            await trio.sleep(10)
            assert copier.bytes_copied < len(data)  # held by the limit
            copier.rate_limit = 0
        took = trio.current_time() - start
        assert 10 <= took <= 11.5, took
        assert copied(copy, len(data)) == data


async def test_a_paused_copy_waits_and_resumes_where_it_was(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with copying(tmp_path, 2 * MIB) as (copier, copy, data):
        copier.pause()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copier.copy_pass)
            await trio.sleep(3600)
            assert copier.bytes_copied == 0 and copier.paused
            copier.resume()
        assert copied(copy, len(data)) == data
        assert copier.dirty_bytes() == 0
