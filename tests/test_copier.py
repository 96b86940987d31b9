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


def _reference_dirty(copier: Copier) -> int:
    return sum(c.dirty.count for c in copier.copies.values()) * BLOCK


def _check_index(copier: Copier) -> None:
    """The copier's O(changed) view against a walk of every copy."""
    assert copier.dirty_bytes() == _reference_dirty(copier)
    work = set(copier.with_work())
    for copy in copier.copies.values():
        if copy.vfile is not None or copy.dirty.count or copy.unflushed or copy.restamp:
            assert copy in work, copy.key
    assert set(copier.attached()) == {c for c in copier.copies.values() if c.vfile is not None}


async def test_the_index_of_copies_with_work_matches_a_walk_of_every_copy(
        tmp_path: Path) -> None:
    """Parked copies (small files, closed) are found by the pass, the flush and the
    pause through the copier's index and running total, not by walking every file:
    at every step they match what a walk of all copies says."""
    src = tmp_path / "src"
    src.mkdir()
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(1000 + 5000 * i))
    files = OpenFiles(None, BLOCK)
    root_fd = os.open(src, os.O_PATH)
    pool_fd = os.open(pool, os.O_PATH)
    copier = Copier(files, Gate(), pool_fd, BLOCK, src_root_fd=root_fd)
    fds: list[int] = []
    try:
        for i in range(40):
            fd = os.open(src / f"f{i}", os.O_PATH)
            fds.append(fd)
            st = os.fstat(fd)
            copier.add(fd, (st.st_dev, st.st_ino))
        assert copier.attached() == []  # all parked: nobody else has them open
        _check_index(copier)
        assert copier.dirty_bytes() > 0
        await copier.copy_pass()
        _check_index(copier)
        assert copier.dirty_bytes() == 0
        # a guest opens one (attached again) and writes it: marked, then closes it
        st = os.fstat(fds[7])
        vfile = files.open(fds[7], (st.st_dev, st.st_ino), Gate())
        _check_index(copier)
        await vfile.write(2 * BLOCK, os.urandom(3 * BLOCK))
        _check_index(copier)
        assert copier.dirty_bytes() == 3 * BLOCK
        files.release(vfile)
        _check_index(copier)  # parked again, its dirty blocks counted while parked
        assert copier.dirty_bytes() == 3 * BLOCK
        copier.drop((st.st_dev, st.st_ino))  # its source went: not counted any more
        _check_index(copier)
        assert copier.dirty_bytes() == 0
        await copier.copy_pass()
        for i in (3, 11):
            st = os.fstat(fds[i])
            pool_file = copier.open_pool(copier.copies[(st.st_dev, st.st_ino)])
            try:
                assert os.pread(pool_file, 1 << 20, 0) == (src / f"f{i}").read_bytes()
            finally:
                os.close(pool_file)
    finally:
        for fd in copier.detach():
            os.close(fd)
        files.close_all()
        for fd in (*fds, root_fd, pool_fd):
            os.close(fd)
