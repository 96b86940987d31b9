"""NbdFile (nbdfile.py) against a real nbdkit started by a real agent, over TLS-PSK.

What is proven: 16 tasks reading and writing at random agree with a
reference bytearray, over NBD and in the store directory's file, also when
the server's maximum block size forces requests to be split; flush puts the
data in the file; zero and trim make holes; a write the server fails is
OSError(EIO), one line; nbdkit killed mid-traffic and started again by the
agent: the traffic resumes, the data matches, and the next flush fails
with EIO once (the flush-epoch rule); nbdkit that never comes back: EIO
after reconnect_timeout_s and an error logged naming store and export;
requests on the connections really overlap (many in flight at once).
Every nbdkit is stopped by pid in the fixture, also when a test fails.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from fusedisk import nbdfile, remote
from fusedisk.nbdfile import NbdFile

from .mounting import wait_for
from .test_remote import Site, hole_at, nbdkits_serving

KiB = 1 << 10
MiB = 1 << 20




def endpoint_of(store: remote.RemoteStore) -> Callable[[], Awaitable[remote.Endpoint]]:
    """What a store view would hand an NbdFile: the agent serves again (it restarts
    nbdkit if it died) and names the endpoint."""
    async def current() -> remote.Endpoint:
        return await trio.to_thread.run_sync(store.serve)
    return current


def create(store: remote.RemoteStore, name: str, size: int) -> None:
    store.agent.call("create", path=name, size=size, exclusive=False)


def one_line(e: BaseException, *words: str) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    for word in words:
        assert word in text, text
    return text


class Ranges:
    """Test-side ordering: no two concurrent operations of the test touch the same
    bytes, so the reference is exact whatever order the server runs them in."""

    def __init__(self) -> None:
        self.busy: list[tuple[int, int]] = []
        self.changed = trio.Condition()

    async def take(self, start: int, end: int) -> None:
        async with self.changed:
            while any(s < end and start < e for s, e in self.busy):
                await self.changed.wait()
            self.busy.append((start, end))

    async def give(self, start: int, end: int) -> None:
        async with self.changed:
            self.busy.remove((start, end))
            self.changed.notify_all()


async def random_traffic(f: NbdFile, reference: bytearray, seed: int, tasks: int = 16,
                         ops: int = 40, longest: int = 256 * KiB,
                         after_write: Callable[[], None] | None = None) -> None:
    """*tasks* tasks of *ops* random reads, writes and zeroings each (seeded), checked
    against and applied to *reference*."""
    size = len(reference)
    ranges = Ranges()

    async def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        for _ in range(ops):
            length = rng.choice([1, 512, 4096, rng.randrange(1, longest)])
            offset = rng.randrange(0, size - length + 1)
            if rng.random() < 0.1:  # a read across the end: short
                offset = size - length // 2
            end = min(offset + length, size)
            await ranges.take(offset, end)
            try:
                choice = rng.random()
                if choice < 0.45 or offset + length > size:
                    got = await f.pread(length, offset)
                    assert got == bytes(reference[offset:end]), (n, offset, length)
                elif choice < 0.55:
                    await f.zero(offset, length, punch=rng.random() < 0.5)
                    reference[offset:end] = bytes(end - offset)
                else:
                    data = rng.randbytes(length)
                    await f.pwrite(data, offset)
                    reference[offset:end] = data
                    if after_write is not None:
                        after_write()
            finally:
                await ranges.give(offset, end)

    async with trio.open_nursery() as nursery:
        for n in range(tasks):
            nursery.start_soon(worker, n)


async def whole(f: NbdFile) -> bytes:
    return await f.pread(f.size, 0)


@pytest.mark.parametrize("max_block", [0, 64 * KiB])
async def test_random_traffic_matches_a_reference(site: Site, max_block: int) -> None:
    """Differential: 16 tasks × 40 random reads/writes; then the whole export and the
    file in the store equal the reference. With a 64 KiB maximum block size that the
    server enforces (blocksize-policy, error), requests of up to 256 KiB must be split."""
    options = {} if not max_block else {
        "nbdkit-filter": "blocksize-policy",
        "nbdkit-param": f"blocksize-maximum={max_block}&nbdkit-param=blocksize-error-policy=error"}
    size = 8 * MiB + 12345
    reference = bytearray(size)
    with remote.connect(site.spec(**options)) as store:
        create(store, "disk0.img", size)
        f = NbdFile(endpoint_of(store), "disk0.img", connections=3)
        async with f.opened():
            assert f.size == size
            assert f._max_request == (max_block or 32 * MiB)
            await random_traffic(f, reference, seed=17 + max_block)
            assert await whole(f) == bytes(reference)
            await f.flush()
            assert (site.dir / "disk0.img").read_bytes() == bytes(reference)
            assert f.stats["errors"] == 0 and f.stats["reconnects"] == 0
            assert f.stats["bytes_written"] > MiB and f.stats["max_in_flight"] >= 2
    assert nbdkits_serving(site.dir) == []


async def test_flush_zero_trim(site: Site) -> None:
    """A flushed write is in the file; zero (punching) and trim leave holes, zero
    without punch leaves zeroes; FUA writes; reads past the end
    are short; writes past the end are ENOSPC."""
    size = 16 * MiB
    with remote.connect(site.spec()) as store:
        create(store, "disk1.img", size)
        f = NbdFile(endpoint_of(store), "disk1.img")
        async with f.opened():
            data = os.urandom(size)
            await f.pwrite(data, 0)
            await f.flush()
            path = site.dir / "disk1.img"
            assert path.read_bytes() == data and not hole_at(path, 0, size)
            await f.zero(2 * MiB, 2 * MiB)
            await f.trim(8 * MiB, 3 * MiB)
            await f.zero(12 * MiB, MiB, punch=False)
            await f.pwrite(b"fua", 15 * MiB, fua=True)
            await f.flush()
            assert hole_at(path, 2 * MiB, 2 * MiB) and hole_at(path, 8 * MiB, 3 * MiB)
            assert await f.pread(2 * MiB, 2 * MiB) == bytes(2 * MiB)
            assert await f.pread(MiB, 12 * MiB) == bytes(MiB)
            assert await f.pread(MiB, MiB) == data[MiB:2 * MiB]
            assert path.read_bytes()[15 * MiB:15 * MiB + 3] == b"fua"
            assert await f.pread(100, size - 10) == data[-10:]
            assert await f.pread(100, size + 10) == b""
            with pytest.raises(OSError) as caught:
                await f.pwrite(b"x" * 11, size - 10)
            assert caught.value.errno == errno.ENOSPC
            one_line(caught.value, "disk1.img", "beyond the end")


async def test_refresh_learns_the_new_size(site: Site) -> None:
    with remote.connect(site.spec()) as store:
        create(store, "grow.img", MiB)
        f = NbdFile(endpoint_of(store), "grow.img")
        async with f.opened():
            await f.pwrite(b"a" * 10, MiB - 10)
            os.truncate(site.dir / "grow.img", 3 * MiB)  # the file grew on the remote host
            assert f.size == MiB
            await f.refresh()
            assert f.size == 3 * MiB and f.stats["reconnects"] == 2
            await f.pwrite(b"b" * 10, 3 * MiB - 10)
            await f.flush()  # a refresh drops nothing: no EIO
            assert await f.pread(20, MiB - 10) == b"a" * 10 + bytes(10)


async def test_server_errors_are_oserror_with_its_errno(site: Site) -> None:
    with remote.connect(site.spec(**{"nbdkit-filter": "error",
                                     "nbdkit-param": "error-pwrite-rate=1"})) as store:
        create(store, "bad.img", MiB)
        (site.dir / "bad.img").write_bytes(b"z" * MiB)
        f = NbdFile(endpoint_of(store), "bad.img")
        async with f.opened():
            with pytest.raises(OSError) as caught:
                await f.pwrite(b"x" * 4096, 0)
            assert caught.value.errno == errno.EIO
            one_line(caught.value, "store 'far': bad.img", "write of 4096 bytes at 0 failed")
            assert await f.pread(4, 0) == b"zzzz"  # reads are untouched, the file too
            assert f.stats["errors"] == 1 and f.stats["reconnects"] == 0
    with remote.connect(site.spec(**{"nbdkit-filter": "error", "nbdkit-param":
                                     "error-pread-rate=1&nbdkit-param=error-pread=ENOSPC"})
                        ) as store:
        f = NbdFile(endpoint_of(store), "bad.img")
        async with f.opened():
            with pytest.raises(OSError) as caught:
                await f.pread(10, 0)
            assert caught.value.errno == errno.ENOSPC, caught.value


async def test_open_fails_in_one_line(site: Site) -> None:
    with remote.connect(site.spec()) as store:
        f = NbdFile(endpoint_of(store), "missing.img")
        with pytest.raises(remote.RemoteError) as caught:
            async with f.opened():
                pass
        one_line(caught.value, "store 'far'", "failed")
        with pytest.raises(OSError) as closed:
            await f.pread(1, 0)
        assert closed.value.errno == errno.EBADF


@pytest.mark.parametrize("host", ["same", "restarted", "unknown"])
async def test_nbdkit_killed_mid_traffic(site: Site, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         host: str) -> None:
    """SIGKILL nbdkit while 16 tasks write (slowly: the delay filter, so that many
    writes are in flight); the agent starts a new nbdkit on a new port when the
    NbdFile asks for an endpoint again. Every request completes and the data matches
    the reference. The host did not restart (same boot id): nothing acknowledged
    was lost, every flush succeeds. It restarted meanwhile (a new boot id, stood in
    for by the agent's FUSEDISK_BOOT_ID_PATH), or cannot say (no boot id): the next
    flush fails with EIO once, the one after succeeds."""
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setenv("FUSEDISK_BOOT_ID_PATH", str(boot))  # the agent inherits it
    size = 4 * MiB
    reference = bytearray(size)
    with remote.connect(site.spec(**{"nbdkit-filter": "delay",
                                     "nbdkit-param": "delay-write=20ms"})) as store:
        create(store, "disk0.img", size)
        first_pid, first_port = store.nbdkit_pid, store.endpoint.port
        f = NbdFile(endpoint_of(store), "disk0.img", connections=2)
        writes = [0]

        def kill_at_the_tenth() -> None:
            writes[0] += 1
            if writes[0] == 10:
                assert f.stats["in_flight"] >= 2
                if host == "restarted":
                    boot.write_text("boot-2\n")
                elif host == "unknown":
                    boot.unlink()
                os.kill(first_pid, signal.SIGKILL)

        async with f.opened():
            await random_traffic(f, reference, seed=5, ops=12, longest=64 * KiB,
                                 after_write=kill_at_the_tenth)
            assert writes[0] > 10 and f.stats["reconnects"] >= 1 and f.stats["resent"] >= 1
            assert store.nbdkit_pid != first_pid and store.endpoint.port != first_port
            assert await whole(f) == bytes(reference)
            if host == "same":
                await f.flush()
                assert f.loss_epoch == 0
            else:
                with pytest.raises(OSError) as caught:
                    await f.flush()
                assert caught.value.errno == errno.EIO
                one_line(caught.value, "store 'far': disk0.img", "may not have reached")
                await f.flush()  # reported once
            await f.flush()
            assert (site.dir / "disk0.img").read_bytes() == bytes(reference)
    lost = [r for r in caplog.records if "NBD connection" in r.getMessage()
            and r.levelno == logging.WARNING]
    assert lost and "store 'far': disk0.img" in lost[0].getMessage()


async def test_nbdkit_never_back(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """The agent is gone, so nbdkit too: requests fail with EIO after the reconnect
    timeout, with an error logged naming the store and the export; a later request
    fails fast (one attempt)."""
    with remote.connect(site.spec()) as store:
        create(store, "disk0.img", MiB)
        f = NbdFile(endpoint_of(store), "disk0.img", reconnect_timeout_s=1.0)
        async with f.opened():
            await f.pwrite(b"x" * 100, 0)
            store.agent.proc.kill()
            store.agent.proc.wait()
            os.kill(store.nbdkit_pid, signal.SIGKILL)
            wait_for(lambda: nbdkits_serving(site.dir) == [], 30, "nbdkit's end")
            started = trio.current_time()
            with pytest.raises(OSError) as caught:
                await f.pread(100, 0)
            assert trio.current_time() - started >= 1.0
            assert caught.value.errno == errno.EIO
            one_line(caught.value, "store 'far': disk0.img", "no NBD connection for 1 s")
            given_up = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert given_up and "store 'far': disk0.img" in given_up[0], given_up
            started = trio.current_time()
            with pytest.raises(OSError) as again:
                await f.pwrite(b"y", 0)
            assert again.value.errno == errno.EIO and trio.current_time() - started < 1.0
            with pytest.raises(OSError):
                await f.flush()


async def test_requests_overlap(site: Site) -> None:
    """64 tasks each write 4 KiB to a server that delays every write by 5 ms: many are
    in flight at once (the driver's count), and all land."""
    with remote.connect(site.spec(**{"nbdkit-filter": "delay",
                                     "nbdkit-param": "delay-write=5ms"})) as store:
        create(store, "disk0.img", MiB)
        f = NbdFile(endpoint_of(store), "disk0.img", connections=2)
        blocks = {n: os.urandom(4 * KiB) for n in range(64)}
        async with f.opened():
            async with trio.open_nursery() as nursery:
                for n, data in blocks.items():
                    nursery.start_soon(f.pwrite, data, n * 4 * KiB)
            await f.flush()
            assert f.stats["max_in_flight"] >= 8, f.stats
        on_disk = (site.dir / "disk0.img").read_bytes()
        assert all(on_disk[n * 4 * KiB:(n + 1) * 4 * KiB] == d for n, d in blocks.items())


async def test_a_request_without_answer(site: Site) -> None:
    """A server that takes 3 s for a write, a request timeout of 0.5 s: that write fails
    with EIO, the connection is replaced (reads go on). The dropped connection had
    acknowledged unflushed writes, but the server's host is the one it was (same
    boot id; the delay filter keeps no writes of its own): no flush fails."""
    with remote.connect(site.spec(**{"nbdkit-filter": "delay",
                                     "nbdkit-param": "delay-write=3"})) as store:
        create(store, "slow.img", MiB)
        (site.dir / "slow.img").write_bytes(b"s" * MiB)
        f = NbdFile(endpoint_of(store), "slow.img", connections=1, request_timeout_s=0.5)
        async with f.opened():
            await f.zero(0, 4096)  # not delayed: acknowledged, not flushed
            with pytest.raises(OSError) as caught:
                await f.pwrite(b"x" * 10, 8192)
            assert caught.value.errno == errno.EIO
            one_line(caught.value, "store 'far': slow.img", "no answer for 0.5 s")
            assert await f.pread(4, 4096) == b"ssss" and f.stats["reconnects"] == 1
            await f.flush()
            assert f.loss_epoch == 0
            assert await f.pread(4, 0) == bytes(4)


async def test_a_cancelled_caller(site: Site) -> None:
    """A caller cancelled while its write is in flight: the write still completes in
    the driver (its buffer kept; close waits for it), the file goes on serving."""
    with remote.connect(site.spec(**{"nbdkit-filter": "delay",
                                     "nbdkit-param": "delay-write=200ms"})) as store:
        create(store, "disk0.img", MiB)
        f = NbdFile(endpoint_of(store), "disk0.img", connections=1)
        async with f.opened():
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(f.pwrite, b"c" * 4096, 0)
                    await trio.testing.wait_all_tasks_blocked()  # the driver waits on nbdkit
                    assert f.stats["in_flight"] == 1
                    scope.cancel()
            assert scope.cancelled_caught
            await f.pwrite(b"d" * 4096, 4096)
            await f.flush()
            assert f.stats["errors"] == 0 and f.stats["requests"] >= 3
        assert (site.dir / "disk0.img").read_bytes()[:8192] == b"c" * 4096 + b"d" * 4096


async def test_buffers_are_used_again(site: Site) -> None:
    """python3-libnbd keeps every buffer it is given alive (remote.BufferPool): after
    64 MiB of writes and reads, in 256 KiB and odd-sized pieces, the pool has made no
    more than a few MiB of buffers."""
    with remote.connect(site.spec()) as store:
        create(store, "disk", 8 * MiB)
        f = NbdFile(endpoint_of(store), "disk", connections=2)
        async with f.opened():
            data = os.urandom(256 * KiB)
            before, made = _rss(), f._pool.allocated  # (the process's pool: nbdfile.BUFFERS)
            for i in range(256):
                length = 256 * KiB - (i % 3) * 512
                await f.pwrite(data[:length], (i % 32) * 256 * KiB)
                assert await f.pread(length, (i % 32) * 256 * KiB) == data[:length]
            assert f._pool.allocated - made < 4 * MiB, f._pool.allocated - made
            grown = _rss() - before
            assert grown < 32 * MiB, f"the process grew by {grown >> 20} MiB for 128 MiB of I/O"


async def test_files_opened_one_after_another_share_their_buffers(site: Site) -> None:
    """A store view opens a new NbdFile for every large file it serves: the buffers
    libnbd pins (remote.BufferPool) are the process's, so 20 files opened, written,
    read and closed one after another pin no more than the first one did."""
    with remote.connect(site.spec()) as store:
        data = os.urandom(MiB)
        allocated = []
        for n in range(20):
            create(store, f"disk{n}", 4 * MiB)
            f = NbdFile(endpoint_of(store), f"disk{n}", connections=2)
            async with f.opened():
                for i in range(4):
                    await f.pwrite(data, i * MiB)
                assert await f.pread(4 * MiB, 0) == data * 4
            allocated.append(nbdfile.BUFFERS.allocated)
        assert allocated[0] > 0 and allocated[-1] == allocated[0], allocated


def _rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) << 10
