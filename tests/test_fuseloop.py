"""The poll-first FUSE request reader, driven alone: a pipe stands in for /dev/fuse.

What is proven here is the reader's contract with pyfuse3's worker loop: True
only when a read cannot block, no yield for up to ``burst`` queued requests,
one waiter on the fd, every waiter released when the fd is closed. That pyfuse3
really calls it, and what it gains, is shown on a real mount (test_clients).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator

import pyfuse3
import pytest
import trio
import trio.testing

from fusedisk.fuseloop import RequestLoop, _LastInFirstOut, dev_fuse_fds, find_session_fd


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)  # a read that would block fails the test instead
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def end_session(monkeypatch: pytest.MonkeyPatch, fd: int) -> None:
    """pyfuse3.terminate() without a session: it wakes the fd's waiter with
    ClosedResourceError (and sets an exit flag our reader cannot see)."""
    monkeypatch.setattr(pyfuse3, "terminate", lambda: trio.lowlevel.notify_closing(fd))


async def test_queued_requests_are_taken_without_yielding_up_to_the_burst(
        pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    loop = RequestLoop(read_end, max_tasks=4, burst=3)
    os.write(write_end, b"x" * 10)
    others_ran = []

    async def other() -> None:  # runs once we yield
        others_ran.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(3):
            assert await loop._wait_readable()
        assert others_ran == [] and loop.without_wait == 3
        assert await loop._wait_readable()  # the fourth waits: a scheduling point
        assert loop.after_wait == 1
        assert await loop._wait_readable()  # a new burst
        assert loop.without_wait == 4


async def test_an_idle_fd_is_waited_for(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    loop = RequestLoop(read_end, max_tasks=4)
    results = []

    async def worker() -> None:
        results.append(await loop._wait_readable())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        os.write(write_end, b"x")
    assert results == [True] and loop.after_wait == 1


async def test_workers_emulating_pyfuse3_never_read_an_empty_fd(
        pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Many workers, requests arriving at random, handlers that yield at random:
    every True is followed by a read that finds a request (the fd is non-blocking
    here, so a violation raises), and every request is taken once."""
    read_end, write_end = pipe
    end_session(monkeypatch, read_end)
    loop = RequestLoop(read_end, max_tasks=8, burst=4)
    rng = random.Random(7)
    total = 3000
    taken = 0
    all_taken = trio.Event()

    async def worker() -> None:
        nonlocal taken
        while await loop._wait_readable():
            assert len(os.read(read_end, 1)) == 1  # what pyfuse3 does next, with no await
            taken += 1
            if taken == total:
                all_taken.set()
            for _ in range(rng.randrange(3)):  # a handler that waits, sometimes
                await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(loop.max_tasks):
                nursery.start_soon(worker)
            sent = 0
            while sent < total:
                burst = min(rng.randrange(1, 40), total - sent)
                os.write(write_end, b"r" * burst)
                sent += burst
                await trio.lowlevel.checkpoint()
                if rng.random() < 0.3:
                    await trio.testing.wait_all_tasks_blocked()
            await all_taken.wait()
            loop.terminate()  # some workers wait on the fd or the lock, some were just woken
    assert taken == total
    assert loop.without_wait > 0 and loop.after_wait > 0
    assert loop.woken_empty > 0, "the interleaving this test exists for did not occur"


async def test_terminate_releases_every_waiter(
        pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, _ = pipe
    end_session(monkeypatch, read_end)
    loop = RequestLoop(read_end, max_tasks=4)
    results = []

    async def worker() -> None:
        results.append(await loop._wait_readable())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one waits on the fd, two on the lock
                nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            loop.terminate()
    assert results == [False, False, False]


async def test_the_turn_to_wait_goes_to_the_worker_that_queued_last() -> None:
    """So under load the same few workers read, and the rest never touch
    their receive buffers."""
    turn = _LastInFirstOut()
    order = []

    async def worker(name: str) -> None:
        await turn.acquire()
        order.append(name)
        await trio.lowlevel.checkpoint()
        turn.release()

    await turn.acquire()
    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(worker, name)
            await trio.testing.wait_all_tasks_blocked()
        turn.release()
    assert order == ["c", "b", "a"]
    await turn.acquire()  # free again: taken at once
    turn.release()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    turn = _LastInFirstOut()
    await turn.acquire()
    got = []
    scopes: dict[str, trio.CancelScope] = {}

    async def worker(name: str) -> None:
        with trio.CancelScope() as scopes[name]:
            await turn.acquire()
            got.append(name)
            turn.release()

    async with trio.open_nursery() as nursery:
        for name in ("kept", "cancelled"):
            nursery.start_soon(worker, name)
            await trio.testing.wait_all_tasks_blocked()
        scopes["cancelled"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        turn.release()
    assert got == ["kept"]


def test_dev_fuse_fds_sees_an_open_dev_fuse() -> None:
    before = dev_fuse_fds()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert dev_fuse_fds() - before == {fd}
    finally:
        os.close(fd)
    assert fd not in dev_fuse_fds()


def test_without_a_new_session_fd_pyfuse3s_own_loop_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fusedisk.fuseloop"):
        assert find_session_fd(dev_fuse_fds()) is None
    assert "running pyfuse3's own request loop" in caplog.text
    assert not RequestLoop(None, max_tasks=4).batching


def test_a_pyfuse3_without_the_hook_gets_its_own_loop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    before = dev_fuse_fds()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert find_session_fd(before) == fd
        monkeypatch.delattr(pyfuse3, "_wait_fuse_readable")
        with caplog.at_level(logging.WARNING, logger="fusedisk.fuseloop"):
            assert find_session_fd(before) is None
    finally:
        os.close(fd)
    assert "has no _wait_fuse_readable()" in caplog.text
