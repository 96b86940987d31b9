"""Thin provisioning through a real mount (issue 14): fallocate, SEEK_DATA/SEEK_HOLE,
copy_file_range and guest discard, driven by real clients (fallocate(1), qemu-io,
qemu-img, cp) and compared with a plain file or with the store's own file."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk, wait_for
from .test_cbt_mount import changes, checkpoint

pytestmark = pytest.mark.mount

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
SEEK_DATA, SEEK_HOLE = 3, 4
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20

_libc = ctypes.CDLL(None, use_errno=True)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_longlong(offset), ctypes.c_longlong(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def extents(path: Path) -> list[tuple[int, int]]:
    """``[start, end)`` of every data region by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            offset = os.lseek(fd, start, SEEK_HOLE)
            out.append((start, offset))
    finally:
        os.close(fd)
    return out


def shim(ds: MountedDatastore) -> dict[str, Any]:
    status: dict[str, Any] = ds.status()["fuse_shim"]
    return status


def queued(ds: MountedDatastore, op: str) -> int:
    return int(shim(ds)["extra_requests"][op])


def new_file(ds: MountedDatastore, name: str, size: int) -> tuple[Path, Path]:
    """A file ``vm/NAME`` of *size* bytes on the mount, and its file on store a."""
    (ds.mnt / "vm").mkdir(exist_ok=True)
    path = ds.mnt / "vm" / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path, ds.stores["a"] / "vm" / name


def test_the_shim_serves_fallocate_lseek_and_copy_file_range(
    datastore: MountedDatastore,
) -> None:
    """Not the kernel's fallbacks: each request is counted by the shim's handlers."""
    state = shim(datastore)
    assert state["extra_ops"] is True and state["problem"] == ""
    path, _ = new_file(datastore, "f", 4 * MiB)
    before = state["extra_requests"]
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 8192, MiB)
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, MiB, 4096)
        assert os.lseek(fd, 0, SEEK_DATA) == MiB + 4096
        assert os.copy_file_range(fd, fd, 4096, MiB, 2 * MiB) == 4096
    finally:
        os.close(fd)
    after = shim(datastore)["extra_requests"]
    for op in ("fallocate", "lseek", "copy_file_range"):
        assert after[op] > before[op], op
    assert shim(datastore)["extra_served"]["served"]["fallocate"] >= 1


@pytest.mark.parametrize("args", [
    ["--punch-hole"], ["--zero-range"], ["--zero-range", "--keep-size"], [], ["--keep-size"],
])
def test_fallocate_modes_act_as_on_a_plain_file(
    datastore: MountedDatastore, tmp_path: Path, args: list[str],
) -> None:
    require_tools("fallocate")
    path, store_file = new_file(datastore, "disk", 8 * MiB)
    reference = tmp_path / "reference"
    data = random.Random(1).randbytes(6 * MiB)
    for target in (path, reference):
        with open(target, "wb") as f:
            f.truncate(8 * MiB)
            f.write(data)
    first = checkpoint(datastore, "vm/disk")
    # a range that reaches past the end: the size changes where the mode lets it
    for target in (path, reference):
        done = subprocess.run(["fallocate", *args, "-o", str(5 * MiB + 4096),
                               "-l", str(4 * MiB), str(target)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert path.stat().st_size == reference.stat().st_size
    assert path.read_bytes() == reference.read_bytes()
    assert extents(path) == extents(store_file)
    # the store's allocation is the plain file's, to a block
    assert abs(store_file.stat().st_blocks - reference.stat().st_blocks) * 512 <= BLOCK
    touched = changes(datastore, "vm/disk", first)
    if "--punch-hole" in args or "--zero-range" in args:
        end = min(9 * MiB + 4096, reference.stat().st_size)
        low = (5 * MiB + 4096) // BLOCK * BLOCK
        assert touched == [(low, end - low)]  # whole blocks, up to the end of the file
    elif "--keep-size" not in args:  # grows the file: the new span is marked
        assert touched == [(8 * MiB, MiB + 4096)]
    else:
        assert touched == []


def test_unsupported_modes_get_eopnotsupp(datastore: MountedDatastore) -> None:
    path, _ = new_file(datastore, "f", 4 * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        for mode in (COLLAPSE_RANGE, INSERT_RANGE, PUNCH_HOLE):  # punch needs KEEP_SIZE
            with pytest.raises(OSError) as caught:
                fallocate(fd, mode, 0, BLOCK)
            assert caught.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        with pytest.raises(OSError) as caught:
            fallocate(fd, COLLAPSE_RANGE, 0, BLOCK)
        assert caught.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    # the mount still serves, and what works still works
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, KEEP_SIZE, 0, BLOCK)
    finally:
        os.close(fd)


def qemu_image_with_data(datastore: MountedDatastore) -> tuple[Path, Path]:
    """A 64 MiB raw image vm/disk.img on the mount, its first 16 MiB written by
    qemu-io (cache=none); the image's path, and its file on the store."""
    (datastore.mnt / "vm").mkdir()
    image = datastore.mnt / "vm" / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-t", "none", "-c", "write -P 0xab 0 16M",
                    str(image)], check=True, capture_output=True)
    return image, datastore.stores["a"] / "vm" / "disk.img"


def test_qemu_discard_frees_the_store_and_is_tracked(datastore: MountedDatastore) -> None:
    """qemu-io discard shrinks the store file; qemu-img map through the mount is the
    store file's map; ``cbt changes --since`` lists the discarded extent."""
    require_tools("qemu-io", "qemu-img")
    image, store_file = qemu_image_with_data(datastore)
    blocks = store_file.stat().st_blocks
    assert blocks * 512 >= 16 * MiB
    since = checkpoint(datastore, "vm/disk.img")
    for cache in ("none", "writeback"):
        offset = 8 * MiB if cache == "none" else 12 * MiB
        done = subprocess.run(["qemu-io", "-f", "raw", "-t", cache, "-c",
                               f"discard {offset} 1M", str(image)], capture_output=True, text=True)
        assert done.returncode == 0 and "discard 1048576/1048576" in done.stdout, done
    assert store_file.stat().st_blocks * 512 == blocks * 512 - 2 * MiB
    assert changes(datastore, "vm/disk.img", since) == [(8 * MiB, MiB), (12 * MiB, MiB)]

    def qemu_map(path: Path) -> list[dict[str, Any]]:
        out = subprocess.run(["qemu-img", "map", "-f", "raw", "--output=json", str(path)],
                             check=True, capture_output=True, text=True).stdout
        regions: list[dict[str, Any]] = json.loads(out)
        return regions

    mapped = qemu_map(image)
    assert mapped == qemu_map(store_file)
    assert [(r["start"], r["length"]) for r in mapped if r["data"]] == [
        (0, 8 * MiB), (9 * MiB, 3 * MiB), (13 * MiB, 3 * MiB)]
    with open(image, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(MiB) == bytes(MiB)


def test_sparse_copies_through_the_mount_see_the_holes(
    datastore: MountedDatastore, tmp_path: Path,
) -> None:
    path, store_file = new_file(datastore, "sparse", 256 * MiB)
    with open(path, "r+b") as f:
        for offset in (0, 100 * MiB, 255 * MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "--sparse=auto", str(path), str(copy)], check=True)
    assert copy.read_bytes() == path.read_bytes()
    assert copy.stat().st_blocks * 512 <= 4 * MiB
    assert extents(path) == extents(store_file) == [
        (0, MiB), (100 * MiB, 101 * MiB), (255 * MiB, 256 * MiB)]


def test_a_discard_of_a_gib_is_one_request(datastore: MountedDatastore) -> None:
    path, store_file = new_file(datastore, "big", 4 << 30)
    with open(path, "r+b") as f:
        for offset in range(0, 1 << 30, 64 * MiB):
            f.seek(offset)
            f.write(os.urandom(64 * KiB))
    since = checkpoint(datastore, "vm/big")
    before = queued(datastore, "fallocate")
    fd = os.open(path, os.O_RDWR)
    try:
        started = time.monotonic()
        fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 0, 1 << 30)
        elapsed_s = time.monotonic() - started
    finally:
        os.close(fd)
    assert queued(datastore, "fallocate") == before + 1
    assert store_file.stat().st_blocks == 0
    assert changes(datastore, "vm/big", since) == [(0, 1 << 30)]
    print(f"punching 1 GiB took {elapsed_s * 1000:.1f} ms")


def test_copy_file_range_inside_the_mount_marks_the_destination(
    datastore: MountedDatastore,
) -> None:
    src, _ = new_file(datastore, "src", 0)
    dst, _ = new_file(datastore, "dst", 32 * MiB)
    data = os.urandom(20 * MiB + 123)
    src.write_bytes(data)
    since = checkpoint(datastore, "vm/dst")
    before = queued(datastore, "copy_file_range")
    fin, fout = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        done = 0
        while done < len(data):  # as cp does: loop on short counts
            n = os.copy_file_range(fin, fout, len(data) - done, done, 5 * MiB + done)
            assert n > 0
            done += n
        assert os.copy_file_range(fin, fout, 4096, len(data), 0) == 0  # at the source's end
    finally:
        os.close(fin)
        os.close(fout)
    assert queued(datastore, "copy_file_range") > before
    with open(dst, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data
    low, high = 5 * MiB, -(-(5 * MiB + len(data)) // BLOCK) * BLOCK
    assert changes(datastore, "vm/dst", since) == [(low, high - low)]
    # across two entries (each may live on its own store): the same bytes
    (datastore.mnt / "other").mkdir()
    subprocess.run(["cp", "--reflink=never", str(src), str(datastore.mnt / "other" / "c")],
                   check=True)
    assert (datastore.mnt / "other" / "c").read_bytes() == data


# -- randomized: the mount against a plain file ------------------------------------------


_FILE_SIZE = 24 * MiB


def _random_op(rng: random.Random, size: int, direct: bool) -> tuple[Any, ...]:
    kind = rng.choices(["write", "punch", "zero", "zero_keep", "alloc", "alloc_keep",
                        "truncate", "seek"], [8, 4, 3, 2, 1, 1, 1, 4])[0]
    offset = rng.randrange(0, _FILE_SIZE)
    length = rng.choice((rng.randrange(1, 8 * KiB), rng.randrange(1, 512 * KiB),
                         rng.randrange(1, 4 * MiB)))
    if direct and kind == "write":
        offset, length = offset & ~4095, max(4096, length & ~4095)
    length = max(1, min(length, _FILE_SIZE - offset))
    if kind == "truncate":
        return ("truncate", rng.randrange(0, _FILE_SIZE))
    if kind == "seek":
        return ("seek", rng.choice((SEEK_DATA, SEEK_HOLE)), rng.randrange(0, max(size, 1) + MiB))
    if kind == "write":
        return ("write", offset, length, rng.randrange(1 << 30))
    return (kind, offset, length)


_MODES = {"punch": PUNCH_HOLE | KEEP_SIZE, "zero": ZERO_RANGE, "zero_keep": ZERO_RANGE | KEEP_SIZE,
          "alloc": 0, "alloc_keep": KEEP_SIZE}


def _apply(fd: int, op: tuple[Any, ...], direct: bool) -> Any:
    try:
        if op[0] == "write":
            data = random.Random(op[3]).randbytes(op[2])
            if direct:
                buf = mmap.mmap(-1, op[2])
                buf[:] = data
                try:
                    return os.pwritev(fd, [buf], op[1])
                finally:
                    buf.close()
            return os.pwrite(fd, data, op[1])
        if op[0] == "truncate":
            os.ftruncate(fd, op[1])
            return None
        if op[0] == "seek":
            return os.lseek(fd, op[2], op[1])
        fallocate(fd, _MODES[op[0]], op[1], op[2])
        return None
    except OSError as e:
        return errno.errorcode[e.errno or 0]


def _seek_is_consistent(data: bytes, op: tuple[Any, ...], answer: Any) -> bool:
    """SEEK_DATA/SEEK_HOLE may differ between two files with equal bytes (allocation
    is the filesystem's), but never lie: what it skips reads as zeros."""
    whence, offset = op[1], op[2]
    size = len(data)
    if offset >= size:
        return bool(answer == "ENXIO")
    if whence == SEEK_DATA:
        end = size if answer == "ENXIO" else answer
        return isinstance(end, int) and offset <= end <= size and not any(data[offset:end])
    # a hole starts at the answer: the end of the file, or bytes that read as zeros
    return isinstance(answer, int) and offset <= answer <= size and (
        answer == size or data[answer] == 0)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_random_thin_operations_match_a_plain_file(
    datastore: MountedDatastore, tmp_path: Path, direct: bool,
) -> None:
    """write, punch, zero (± KEEP_SIZE), allocation (± KEEP_SIZE), truncate and
    SEEK_DATA/SEEK_HOLE in a seeded random order, on the mount and on a plain file:
    equal answers and bytes; the mount's holes are exactly the store file's."""
    path, store_file = new_file(datastore, "disk", _FILE_SIZE)
    reference = tmp_path / "reference"
    with open(reference, "wb") as f:
        f.truncate(_FILE_SIZE)
    rng = random.Random(1400 + direct)
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    mount_fd, ref_fd = os.open(path, flags), os.open(reference, os.O_RDWR)
    store_fd = os.open(store_file, os.O_RDONLY)
    try:
        for step in range(400):
            op = _random_op(rng, os.fstat(ref_fd).st_size, direct)
            got, want = _apply(mount_fd, op, direct), _apply(ref_fd, op, False)
            if op[0] == "seek":
                data = reference.read_bytes()
                assert _seek_is_consistent(data, op, got), (step, op, got)
                assert got == _apply(store_fd, op, False), (step, op)  # the store's answer
            else:
                assert got == want, (step, op)
            if step % 25 == 24 or step == 399:
                assert path.stat().st_size == reference.stat().st_size, step
                assert path.read_bytes() == reference.read_bytes(), step
                assert extents(path) == extents(store_file), step
    finally:
        os.close(mount_fd)
        os.close(ref_fd)
        os.close(store_fd)


# -- relocation while the guest discards ---------------------------------------------------


def _allocated(path: Path) -> int:
    return sum(end - start for start, end in extents(path))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["auto", "mirror"])
def test_relocation_while_a_writer_discards_and_rewrites(
    datastore: MountedDatastore, tmp_path: Path, mode: str,
) -> None:
    require_tools("fallocate")
    path, _ = new_file(datastore, "disk", 64 * MiB)
    reference = tmp_path / "reference"
    with open(path, "r+b") as f:
        f.write(random.Random(7).randbytes(48 * MiB))
    with open(reference, "wb") as ref:
        ref.truncate(64 * MiB)
        ref.write(random.Random(7).randbytes(48 * MiB))
    stop = threading.Event()
    errors: list[BaseException] = []
    ops = 0

    def writer() -> None:
        nonlocal ops
        rng = random.Random(8)
        mount_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        ref_fd = os.open(reference, os.O_RDWR)
        buf = mmap.mmap(-1, 256 * KiB)
        try:
            while not stop.is_set() or ops < 50:
                offset = rng.randrange(0, 64 * MiB // BLOCK) * BLOCK
                if rng.random() < 0.5:
                    length = rng.choice((BLOCK, 2 * BLOCK, 4 * BLOCK))
                    fallocate(mount_fd, PUNCH_HOLE | KEEP_SIZE, offset, length)
                    fallocate(ref_fd, PUNCH_HOLE | KEEP_SIZE, offset, length)
                else:
                    data = rng.randbytes(256 * KiB)
                    buf[:] = data
                    offset = min(offset, 64 * MiB - len(data))
                    assert os.pwritev(mount_fd, [buf], offset) == len(data)
                    os.pwrite(ref_fd, data, offset)
                ops += 1
        except BaseException as e:  # reported by the test thread
            errors.append(e)
        finally:
            buf.close()
            os.close(mount_fd)
            os.close(ref_fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: ops >= 20 or bool(errors), 60, "the writer to start")
        done = fusedisk("migrate", str(datastore.mnt), "vm", "--to", "b", "--rate", "40M",
                        "--mode", mode, "--json", timeout=180)
        assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert datastore.status()["placement"]["vm"] == "b"
    dest = datastore.stores["b"] / "vm" / "disk"
    assert path.read_bytes() == reference.read_bytes()
    nextents = len(extents(reference))
    # the destination's allocation follows the source's, to a block per extent
    assert abs(_allocated(dest) - _allocated(reference)) <= nextents * BLOCK, (
        _allocated(dest), _allocated(reference), nextents)


def test_fstrim_in_an_ext4_image_on_the_mount_frees_the_store(
    datastore: MountedDatastore, tmp_path: Path,
) -> None:
    """A guest's view: an ext4 in an image file on the mount (a loop device passes
    discard down as punch-hole), files written and deleted, fstrim."""
    require_tools("mkfs.ext4", "e2fsck", "losetup", "fstrim")
    image, store_file = new_file(datastore, "guest.img", 256 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(image)], check=True)
    inside = tmp_path / "guest"
    inside.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(inside)], check=True)
        try:
            for i in range(8):
                (inside / f"f{i}").write_bytes(os.urandom(8 * MiB))
            os.sync()
            full = store_file.stat().st_blocks * 512
            for i in range(8):
                (inside / f"f{i}").unlink()
            os.sync()
            trimmed = subprocess.run(["fstrim", "-v", str(inside)], capture_output=True,
                                     text=True)
            assert trimmed.returncode == 0, trimmed.stderr
        finally:
            if subprocess.run(["umount", str(inside)], check=False).returncode:
                subprocess.run(["umount", "-l", str(inside)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    after = store_file.stat().st_blocks * 512
    assert full >= 64 * MiB and after <= full - 60 * MiB, (full, after)
    checked = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_qemu_detect_zeroes_unmap_punches_zero_writes(datastore: MountedDatastore) -> None:
    """With ``discard=unmap,detect-zeroes=unmap`` QEMU turns a guest's zero write
    into a discard, which now reaches the store (before, it wrote the zeros)."""
    require_tools("qemu-io", "qemu-img")
    image, store_file = qemu_image_with_data(datastore)
    full = store_file.stat().st_blocks * 512
    opts = (f"driver=raw,file.driver=file,file.filename={image},file.discard=unmap,"
            "detect-zeroes=unmap")
    done = subprocess.run(["qemu-io", "-t", "none", "--image-opts", opts, "-c",
                           "write -P 0 0 4M"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert store_file.stat().st_blocks * 512 == full - 4 * MiB
    with open(image, "rb") as f:
        assert f.read(4 * MiB) == bytes(4 * MiB)
        assert f.read(MiB) == b"\xab" * MiB


@pytest.mark.parametrize("mode", ["precopy", "mirror"])
def test_a_discard_after_the_copy_reaches_the_destination(tmp_path: Path, mode: str) -> None:
    """Held after pass 1 (FUSEDISK_PAUSE_AFTER_PASS), so nothing races the copy:
    ranges the pool already holds, discarded or zeroed on the mount, end up
    unallocated on the destination too (the next pass punches them, or the
    mirror does at once)."""
    ds = MountedDatastore(tmp_path)
    ds.start(env={"FUSEDISK_PAUSE_AFTER_PASS": "1"})
    try:
        path, _ = new_file(ds, "disk", 32 * MiB)
        data = bytearray(random.Random(3).randbytes(16 * MiB))
        with open(path, "r+b") as f:
            f.write(data)

        def job() -> dict[str, Any]:
            jobs: list[dict[str, Any]] = ds.status()["jobs"]
            return jobs[0]

        done = fusedisk("migrate", str(ds.mnt), "vm", "--to", "b", "--mode", mode, "--no-wait")
        assert done.returncode == 0, done.stderr
        wait_for(lambda: job()["paused"] and job()["pass"] == 1, 60, "the hold after pass 1")
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 2 * MiB, 4 * MiB)
            fallocate(fd, ZERO_RANGE | KEEP_SIZE, 8 * MiB, 2 * MiB)
        finally:
            os.close(fd)
        data[2 * MiB:6 * MiB] = bytes(4 * MiB)
        data[8 * MiB:10 * MiB] = bytes(2 * MiB)
        while job()["state"] not in ("done", "failed"):
            fusedisk("resume", str(ds.mnt), "vm")
            wait_for(lambda: job()["paused"] or job()["state"] in ("done", "failed"), 60,
                     "the next hold")
        assert job()["state"] == "done", job()
        dest = ds.stores["b"] / "vm" / "disk"
        assert dest.read_bytes()[:16 * MiB] == bytes(data)
        assert path.read_bytes()[:16 * MiB] == bytes(data)
        if mode == "precopy":  # the pass found zeros where the pool held data: punched
            assert _allocated(dest) == 10 * MiB, extents(dest)
        else:  # the same calls on both stores: the allocation of a plain file given them
            reference = tmp_path / "reference"
            with open(reference, "wb") as ref:
                ref.truncate(32 * MiB)
                ref.write(random.Random(3).randbytes(16 * MiB))
            fd = os.open(reference, os.O_RDWR)
            try:
                fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 2 * MiB, 4 * MiB)
                fallocate(fd, ZERO_RANGE | KEEP_SIZE, 8 * MiB, 2 * MiB)
            finally:
                os.close(fd)
            # (st_blocks: whether SEEK_DATA calls a zeroed, still allocated range
            # data depends on the page cache)
            assert abs(dest.stat().st_blocks - reference.stat().st_blocks) * 512 <= BLOCK
    finally:
        ds.teardown()
