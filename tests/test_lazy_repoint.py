"""Issue 12: the inodes a switchover does not re-point inside its pause.

Inside the pause only what may be in use is re-pointed (open files, inodes
with handles or pinned fds); every other inode the kernel knows moves to
its staged self when a request next reaches it, or by a sweep once the gate
is open (fs.py ``_PendingRepoint``; closed VFiles likewise, vdisk.py). These
tests hold the switchover right after its pause (``FUSEDISK_HOLD``), before
that sweep, and drive the mount from outside meanwhile: every inode is then
still pending, so each request meets the lazy path.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .mounting import MountedDatastore, fusedisk, wait_for
from .test_relocation import job, wait_state

pytestmark = pytest.mark.mount

DIRS = 4
FILES_PER_DIR = 30


class Reference:
    """The tree as the guest left it: path → object, object → bytes and st_ino."""

    def __init__(self) -> None:
        self.path_obj: dict[str, int] = {}
        self.data: dict[int, bytes] = {}
        self.ino: dict[int, int] = {}
        self._next = 0

    def new(self, path: str, data: bytes) -> int:
        self._next += 1
        self.path_obj[path] = self._next
        self.data[self._next] = data
        return self._next

    def check(self, root: Path, path: str) -> None:
        obj = self.path_obj[path]
        st = os.stat(root / path)
        assert (root / path).read_bytes() == self.data[obj], path
        if obj in self.ino:
            assert st.st_ino == self.ino[obj], (path, "inode number changed")
        else:
            self.ino[obj] = st.st_ino
        assert st.st_nlink == sum(1 for o in self.path_obj.values() if o == obj), path

    def check_all(self, root: Path) -> None:
        for path in sorted(self.path_obj):
            self.check(root, path)
        listed = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        assert listed == set(self.path_obj), sorted(listed ^ set(self.path_obj))


def _random_op(rng: random.Random, root: Path, ref: Reference, step: int) -> None:
    paths = sorted(ref.path_obj)
    kind = rng.choice(["stat", "read", "write", "rename", "unlink", "create", "link",
                       "list", "stat"])
    path = rng.choice(paths)
    if kind in ("stat", "read"):
        ref.check(root, path)
    elif kind == "write":
        obj = ref.path_obj[path]
        buf = bytearray(ref.data[obj])
        offset = rng.randrange(0, len(buf) + 1)
        chunk = rng.randbytes(rng.randrange(1, 3000))
        with open(root / path, "r+b") as f:
            f.seek(offset)
            f.write(chunk)
        buf[offset:offset + len(chunk)] = chunk
        ref.data[obj] = bytes(buf)
        ref.check(root, path)
    elif kind == "rename":
        new = f"d{rng.randrange(DIRS)}/r{step}"
        os.rename(root / path, root / new)
        ref.path_obj[new] = ref.path_obj.pop(path)
        ref.check(root, new)
    elif kind == "unlink" and len(paths) > 10:
        os.unlink(root / path)
        del ref.path_obj[path]
        # a new file right away: ext4 may give it the removed one's number
        new = f"{os.path.dirname(path)}/n{step}"
        data = rng.randbytes(rng.randrange(0, 5000))
        (root / new).write_bytes(data)
        ref.new(new, data)
        ref.check(root, new)
    elif kind == "create":
        new = f"d{rng.randrange(DIRS)}/c{step}"
        data = rng.randbytes(rng.randrange(0, 5000))
        (root / new).write_bytes(data)
        ref.new(new, data)
        ref.check(root, new)
    elif kind == "link":
        new = f"d{rng.randrange(DIRS)}/l{step}"
        os.link(root / path, root / new)
        ref.path_obj[new] = ref.path_obj[path]
        ref.check(root, new)
        ref.check(root, path)
    elif kind == "list":
        directory = os.path.dirname(path)
        names = set(os.listdir(root / directory))
        assert names == {os.path.basename(p) for p in ref.path_obj
                         if os.path.dirname(p) == directory}, directory


@pytest.mark.parametrize("seed", range(3))
def test_requests_between_the_pause_and_the_sweep_see_the_moved_tree(
        tmp_path: Path, seed: int) -> None:
    """Every file of the entry was looked up before the relocation (the kernel
    knows all their inodes), one stays open across it. Held after the pause,
    random stats, reads, writes, renames, unlinks followed by creates (the
    freed inode number comes back), hard links and listings all see the
    guest's tree with unchanged inode numbers; and so does everything after
    the sweep, after dropping the caches and after a remount."""
    rng = random.Random(seed)
    ds = MountedDatastore(tmp_path)
    hold_file = tmp_path / "hold"
    try:
        ds.start(env={"FUSEDISK_HOLD": f"after-pause:{hold_file}"})
        root = ds.mnt / "vm1"
        root.mkdir()
        ref = Reference()
        for d in range(DIRS):
            (root / f"d{d}").mkdir()
            for n in range(FILES_PER_DIR):
                data = rng.randbytes(rng.randrange(0, 6000))
                (root / f"d{d}" / f"f{n}").write_bytes(data)
                ref.new(f"d{d}/f{n}", data)
        ref.check_all(root)  # looked up, inode numbers recorded
        kept = open(root / "d0" / "f0", "r+b")  # open across the switchover
        kept_obj = ref.path_obj["d0/f0"]
        try:
            hold_file.touch()
            result = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--no-wait")
            assert result.returncode == 0, result.stderr
            wait_for(lambda: "hold point after-pause reached" in ds.log(), 60,
                     "the switchover's pause to end")
            assert ds.status()["placement"]["vm1"] == "b"  # committed
            assert "re-point of 'vm1'" in ds.log()
            for step in range(150):
                _random_op(rng, root, ref, step)
            # the write through the descriptor kept open was re-pointed in the pause
            kept.seek(0)
            kept.write(b"kept open")
            kept.flush()
            ref.data[kept_obj] = b"kept open" + ref.data[kept_obj][9:]
            ref.check_all(root)
            # all of it ran before the sweep: the switchover was still held
            assert "hold point after-pause released" not in ds.log()
            assert job(ds, "vm1")["state"] not in ("done", "failed", "cancelled")
        finally:
            kept.close()
            hold_file.unlink(missing_ok=True)
        wait_state(ds, "vm1", {"done", "failed", "cancelled"}, 120)
        assert job(ds, "vm1")["state"] == "done", job(ds, "vm1")
        ref.check_all(root)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        ref.check_all(root)
        ds.stop()
        ds.start()
        ref.check_all(root)
        assert not (ds.stores["a"] / "vm1").exists()
    finally:
        hold_file.unlink(missing_ok=True)
        ds.teardown()
