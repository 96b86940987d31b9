"""Bounded descriptors (issue 12): the mount's O_PATH fds and a relocation's.

The table of O_PATH fds is tested alone against a dict reference (random
lookups, evictions, renames and unlinks); then a daemon with a low fd limit
serves and relocates many more files than the limit allows descriptors.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from fusedisk import backing
from fusedisk.backing import PathRef, PathTable

from .mounting import MountedDatastore, fusedisk, store_names, wait_for
from .test_relocation import tree_view

NOFILE = 256


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("seed", range(4))
def test_path_table_against_a_dict(tmp_path: Path, seed: int) -> None:
    """Random operations on real files; every ref always reaches its own object,
    after eviction, rename and unlink, and the open fds stay within the cap."""
    rng = random.Random(seed)
    root = tmp_path / "store"
    root.mkdir()
    root_fd = backing.open_dir_path(str(root))
    dev = os.fstat(root_fd).st_dev
    cap = 8
    table = PathTable(cap)
    table.add_filesystem(dev, root_fd)
    before = _open_fds()
    refs: dict[int, PathRef] = {}
    expected: dict[int, tuple[int, bytes]] = {}  # object → (st_ino, content)
    names: dict[str, int] = {}  # name on the store → object
    unlinked_pins: set[int] = set()
    try:
        for step in range(600):
            op = rng.choice(["create", "create", "lookup", "lookup", "lookup", "rename",
                             "unlink", "forget", "scope"])
            if op == "create" or not refs:
                obj = step
                name = f"n{step}"
                content = f"object {obj}".encode()
                (root / name).write_bytes(content)
                fd = backing.open_path(root_fd, name)
                refs[obj] = table.add(fd, dev)
                expected[obj] = (os.fstat(fd).st_ino, content)
                names[name] = obj
            elif op == "lookup":
                obj = rng.choice(list(refs))
                fd = table.fd(refs[obj])
                assert os.fstat(fd).st_ino == expected[obj][0]
                data_fd = backing.reopen(fd, os.O_RDONLY)
                try:
                    assert os.read(data_fd, 100) == expected[obj][1]
                finally:
                    os.close(data_fd)
            elif op == "rename" and names:
                old = rng.choice(list(names))
                new = f"r{step}"
                os.rename(root / old, root / new)
                names[new] = names.pop(old)
            elif op == "unlink" and names:
                name = rng.choice(list(names))
                obj = names.pop(name)
                table.pin(refs[obj])  # what fs.py does before a last link goes
                unlinked_pins.add(obj)
                os.unlink(root / name)
            elif op == "forget":
                obj = rng.choice(list(refs))
                table.drop(refs.pop(obj))
                del expected[obj]
                unlinked_pins.discard(obj)
                names = {n: o for n, o in names.items() if o != obj}
            elif op == "scope":
                chosen = rng.sample(list(refs), min(len(refs), cap + 3))
                with table.scope():
                    fds = [table.fd(refs[obj]) for obj in chosen]
                    # all stay open together, beyond the cap, until the scope ends
                    for obj, fd in zip(chosen, fds, strict=True):
                        assert os.fstat(fd).st_ino == expected[obj][0]
            stats = table.statistics()
            assert stats.evictable <= cap
            assert stats.open_fds <= cap + len(unlinked_pins)
            assert _open_fds() - before == stats.open_fds
        assert table.statistics().reopens > 0, "nothing was ever evicted: nothing was tested"
        for obj, ref in refs.items():
            assert os.fstat(table.fd(ref)).st_ino == expected[obj][0]
    finally:
        for ref in refs.values():
            table.drop(ref)
    assert _open_fds() == before
    table.close()
    os.close(root_fd)


def test_path_table_without_handles_keeps_fds(tmp_path: Path) -> None:
    """A filesystem the table was not given a way into (as one without handles)
    keeps every fd: nothing is evicted, nothing is lost."""
    table = PathTable(2)
    refs = []
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x")
        fd = os.open(tmp_path / f"f{i}", os.O_PATH)
        refs.append(table.add(fd, os.fstat(fd).st_dev))
    assert table.statistics().open_fds == 5
    assert table.statistics().without_handle == 5
    for ref in refs:
        assert os.fstat(table.fd(ref)).st_size == 1
        table.drop(ref)
    assert table.statistics().open_fds == 0


def _daemon_fds(ds: MountedDatastore) -> int:
    assert ds.proc is not None
    return len(os.listdir(f"/proc/{ds.proc.pid}/fd"))


def _content(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (1 + i % 5)


@pytest.mark.mount
def test_many_more_files_than_descriptors(tmp_path: Path) -> None:
    """A daemon limited to 256 fds: 1500 files are created, found, stat'ed,
    renamed, unlinked while open and read back, all exact; an entry whose
    inodes were evicted relocates, and so does the 1500-file one: data,
    names and metadata the same through the mount and on the new store."""
    ds = MountedDatastore(tmp_path, nofile=NOFILE)
    count = 1500
    try:
        ds.start()
        vm = ds.mnt / "vm"
        vm.mkdir()
        for d in range(10):
            (vm / f"d{d}").mkdir()
        for i in range(count):
            (vm / f"d{i % 10}" / f"f{i}").write_bytes(_content(i))
        # what a guest's `find` does: every name looked up and stat'ed
        found = subprocess.run(["find", str(vm), "-type", "f", "-newer", str(ds.mnt)],
                               capture_output=True, text=True, check=True)
        assert len(found.stdout.split()) == count
        assert _daemon_fds(ds) < NOFILE
        # names change under evicted fds: handles follow the objects
        os.rename(vm / "d0", vm / "d0-renamed")
        os.rename(vm / "d1" / "f1", vm / "d2" / "moved")
        held = os.open(vm / "d3" / "f3", os.O_RDWR)
        try:
            os.unlink(vm / "d3" / "f3")
            for i in range(0, count, 7):  # push every other fd out of the table
                os.stat(vm / f"d{i % 10}-renamed" if i % 10 == 0 else vm / f"d{i % 10}")
            subprocess.run(["find", str(vm), "-ls"], capture_output=True, check=True)
            assert os.pread(held, 4096, 0) == _content(3)
            os.pwrite(held, b"still here", 0)
            assert os.fstat(held).st_nlink == 0
        finally:
            os.close(held)
        assert (vm / "d2" / "moved").read_bytes() == _content(1)
        for i in range(0, count, 3):
            dname = f"d{i % 10}" + ("-renamed" if i % 10 == 0 else "")
            if i in (1, 3):
                continue
            assert (vm / dname / f"f{i}").read_bytes() == _content(i)
        # an entry written just now (its files' histories still saving) relocates,
        # after its inodes were evicted, and its inodes are re-pointed
        small = ds.mnt / "small"
        (small / "sub").mkdir(parents=True)
        for i in range(400):
            (small / ("sub" if i % 2 else ".") / f"s{i}").write_bytes(_content(i))
        subprocess.run(["find", str(vm), "-ls"], capture_output=True, check=True)
        before = tree_view(small)
        result = fusedisk("migrate", str(ds.mnt), "small", "--to", "b", timeout=600)
        assert result.returncode == 0, result.stderr + ds.log()[-3000:]
        assert ds.status()["placement"]["small"] == "b"
        assert tree_view(small) == before
        assert store_names(ds.stores["b"]) == ["small"]
        assert _daemon_fds(ds) < NOFILE
        store_view = tree_view(ds.stores["b"] / "small")
        assert {k: v["sha"] for k, v in store_view.items() if "sha" in v} == {
            k: v["sha"] for k, v in before.items() if "sha" in v}
        # and an entry of many more files than the daemon has descriptors
        before = tree_view(vm)
        result = fusedisk("migrate", str(ds.mnt), "vm", "--to", "b", timeout=600)
        assert result.returncode == 0, result.stderr + ds.log()[-3000:]
        assert ds.status()["placement"]["vm"] == "b"
        assert tree_view(vm) == before
        assert store_names(ds.stores["a"]) == []
        store_view = tree_view(ds.stores["b"] / "vm")
        assert {k: v["sha"] for k, v in store_view.items() if "sha" in v} == {
            k: v["sha"] for k, v in before.items() if "sha" in v}
        assert _daemon_fds(ds) < NOFILE
        assert ds.proc is not None and ds.proc.poll() is None
        (vm / "after").write_bytes(b"works")
        assert (vm / "after").read_bytes() == b"works"
        assert ds.stop() == 0
    finally:
        ds.teardown()
    log = ds.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_errno_of_a_stale_handle(tmp_path: Path) -> None:
    """A handle whose object is gone reopens as ESTALE (never another object)."""
    root_fd = backing.open_dir_path(str(tmp_path))
    try:
        (tmp_path / "gone").write_bytes(b"x")
        fd = backing.open_path(root_fd, "gone")
        handle = backing.handle_of(fd)
        assert handle is not None
        mount_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        reopened = backing.open_by_handle(mount_fd, handle)
        assert os.fstat(reopened).st_ino == os.fstat(fd).st_ino
        os.close(reopened)
        os.close(fd)
        os.unlink(tmp_path / "gone")
        with pytest.raises(OSError) as caught:
            os.close(backing.open_by_handle(mount_fd, handle))
        assert caught.value.errno == errno.ESTALE
        os.close(mount_fd)
    finally:
        os.close(root_fd)


@pytest.mark.mount
def test_parked_copies_see_every_change(tmp_path: Path) -> None:
    """Files a relocation parked after pass 1 (a daemon at 256 fds, held after
    each pass) are written, truncated, rewritten, appended, renamed, chmod'ed
    and unlinked by a guest, at random; after the switchover the mount and the
    new store hold exactly what a dict of the expected contents says."""
    rng = random.Random(12)
    ds = MountedDatastore(tmp_path, nofile=NOFILE)
    ds.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    try:
        vm = ds.mnt / "vm"
        vm.mkdir()
        expected: dict[str, bytes] = {}
        for i in range(600):
            expected[f"f{i}"] = _content(i)
            (vm / f"f{i}").write_bytes(expected[f"f{i}"])
        result = fusedisk("migrate", str(ds.mnt), "vm", "--to", "b", "--no-wait")
        assert result.returncode == 0, result.stderr

        def job() -> dict[str, object]:
            return next(j for j in ds.status()["jobs"] if j["entry"] == "vm")

        def held_or_ended() -> bool:
            state = job()
            return bool(state["paused"]) or state["state"] in ("done", "failed")

        wait_for(held_or_ended, 120, "the hold after pass 1")
        assert _daemon_fds(ds) < NOFILE
        modes: dict[str, int] = {}
        held = os.open(vm / "f0", os.O_RDWR)  # open across the switchover
        try:
            for step in range(3):
                for _ in range(150):
                    name = rng.choice(sorted(expected))
                    op = rng.choice(["pwrite", "truncate", "rewrite", "append", "rename",
                                     "chmod", "unlink"])
                    path = vm / name
                    if op == "pwrite":
                        offset = rng.randrange(0, 300)
                        data = os.urandom(rng.randrange(1, 200))
                        fd = os.open(path, os.O_WRONLY)
                        os.pwrite(fd, data, offset)
                        os.close(fd)
                        old = expected[name].ljust(offset, b"\0")
                        expected[name] = old[:offset] + data + old[offset + len(data):]
                    elif op == "truncate":
                        size = rng.randrange(0, 400)
                        os.truncate(path, size)
                        expected[name] = expected[name][:size].ljust(size, b"\0")
                    elif op == "rewrite":
                        expected[name] = os.urandom(rng.randrange(0, 300))
                        path.write_bytes(expected[name])
                    elif op == "append":
                        data = os.urandom(50)
                        with open(path, "ab") as f:
                            f.write(data)
                        expected[name] += data
                    elif op == "rename" and name != "f0":
                        new = f"{name}-r{step}"
                        path.rename(vm / new)
                        expected[new] = expected.pop(name)
                        if name in modes:
                            modes[new] = modes.pop(name)
                    elif op == "chmod":
                        modes[name] = rng.choice([0o600, 0o640, 0o755])
                        path.chmod(modes[name])
                    elif op == "unlink" and name != "f0":
                        path.unlink()
                        del expected[name]
                        modes.pop(name, None)
                if job()["state"] in ("done", "failed"):
                    break
                fusedisk("resume", str(ds.mnt), "vm")
                wait_for(held_or_ended, 120, "the next hold")
            os.pwrite(held, b"held", 0)
            old = expected["f0"]
            expected["f0"] = b"held" + old[4:]
            while job()["state"] not in ("done", "failed"):
                fusedisk("resume", str(ds.mnt), "vm")
                wait_for(held_or_ended, 120, "the next hold")
            assert job()["state"] == "done", job()
            os.pwrite(held, b"after", 10)
            expected["f0"] = expected["f0"][:10] + b"after" + expected["f0"][15:]
        finally:
            os.close(held)
        assert ds.status()["placement"]["vm"] == "b"
        assert sorted(os.listdir(vm)) == sorted(expected)
        assert sorted(os.listdir(ds.stores["b"] / "vm")) == sorted(expected)
        for name, data in expected.items():
            assert (vm / name).read_bytes() == data, name
            assert (ds.stores["b"] / "vm" / name).read_bytes() == data, name
        for name, mode in modes.items():
            assert (vm / name).stat().st_mode & 0o777 == mode, name
        assert _daemon_fds(ds) < NOFILE
    finally:
        ds.teardown()
    log = ds.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
