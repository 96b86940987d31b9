"""The read-only view of snapshots under ``MNT/.snapshots`` (fusedisk/snapview.py).

The store ``x`` is a loop-mounted XFS (reflink snapshots); ``a`` is the
test machine's ext4 (copy-before-write snapshots); both are tested. The
randomized test drives one entry with the seeded operations of
tests/differential.py (writes, truncates, fallocate, links, renames, modes,
owners, times, xattrs, special files …), takes snapshots between them, and
records what the mount showed at each snapshot's instant; at the end, after
the entry went on changing and moved to the other store, and after a
remount, every snapshot's view must show exactly that: names, types, modes,
owners, link counts and groups, sizes, contents, symlink targets, xattrs
and mtimes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from . import differential as diff
from .conftest import require_tools
from .mounting import MountedDatastore, fusedisk

VIEW = ".snapshots"
STEPS_PER_SNAPSHOT = 25
SNAPSHOTS = 4


def ok(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = fusedisk(*args, timeout=timeout)
    assert result.returncode == 0, (args, result.stderr)
    return result


def shown(tree: dict[str, diff.Obj]) -> dict[str, tuple[object, ...]]:
    """What a snapshot must keep of each object: all but ctime and atime (a
    snapshot's objects are new inodes; reading them moves atime)."""
    out: dict[str, tuple[object, ...]] = {}
    for path, o in tree.items():
        size = None if o.fmt == stat.S_IFDIR else o.size
        mtime = None if o.fmt == stat.S_IFLNK else o.mtime
        rdev = o.rdev if o.fmt in (stat.S_IFCHR, stat.S_IFBLK) else None
        out[path] = (stat.S_IFMT(o.fmt), oct(o.mode), o.uid, o.gid, o.nlink, size, rdev,
                     o.target, o.sha, o.xattrs, mtime)
    return out


def link_groups(tree: dict[str, diff.Obj]) -> set[frozenset[str]]:
    by_ino: dict[int, set[str]] = {}
    for path, o in tree.items():
        if o.fmt != stat.S_IFDIR:
            by_ino.setdefault(o.ino, set()).add(path)
    return {frozenset(g) for g in by_ino.values() if len(g) > 1}


def compare(name: str, expected: dict[str, diff.Obj], view: Path) -> None:
    got = diff.scan(str(view))
    want, have = shown(expected), shown(got)
    wrong = [f"{p}: instant {want.get(p)} view {have.get(p)}"
             for p in sorted(set(want) | set(have)) if want.get(p) != have.get(p)]
    assert not wrong, f"snapshot {name}: " + "\n".join(wrong[:10])
    assert link_groups(got) == link_groups(expected), name


@pytest.mark.parametrize("xds, seed, to", [("x", 7, "a"), ("x", 2026, "a"), ("a", 11, "x")],
                         indirect=["xds"], ids=["reflink-7", "reflink-2026", "cbw-11"])
def test_views_equal_the_instant_after_changes_a_move_and_a_remount(
    xds: MountedDatastore, tmp_path: Path, seed: int, to: str
) -> None:
    ref_root = tmp_path / "ref" / diff.ENTRY
    ref_root.mkdir(parents=True)
    entry = xds.mnt / diff.ENTRY
    entry.mkdir()
    ref, mnt = diff.Side("ref", ref_root), diff.Side("mnt", entry)
    gen = diff.Generator(seed)
    instants: dict[str, dict[str, diff.Obj]] = {}
    step = 0
    try:
        for round_no in range(SNAPSHOTS + 1):
            done = 0
            while done < STEPS_PER_SNAPSHOT:
                op = gen.next_op(step, ref)
                step += 1
                if op.kind in diff.EVENTS:
                    continue  # no relocation events here: the snapshots are the subject
                outcome = mnt.apply(op), ref.apply(op)
                assert outcome[0] == outcome[1], (step, op, outcome)
                done += 1
            if round_no == SNAPSHOTS:
                break  # the last round only changes the entry after every snapshot
            name = f"s{round_no}"
            instants[name] = diff.scan(str(entry))
            ok("snapshot", "create", str(xds.mnt), diff.ENTRY, "--name", name)
    finally:
        mnt.close_held()
        ref.close_held()
    view = xds.mnt / VIEW
    assert VIEW not in os.listdir(xds.mnt)  # hidden, as .zfs is
    assert sorted(os.listdir(view)) == [f"{diff.ENTRY}@{n}" for n in sorted(instants)]
    for name, instant in instants.items():
        compare(name, instant, view / f"{diff.ENTRY}@{name}")
    # the entry moves to the other store; the snapshots stay where they were made
    ok("migrate", str(xds.mnt), diff.ENTRY, "--to", to, timeout=300)
    xds.stop()
    xds.start()
    for name, instant in instants.items():
        compare(name, instant, view / f"{diff.ENTRY}@{name}")


@pytest.mark.parametrize("xds", ["x", "a"], indirect=True, ids=["reflink", "cbw"])
def test_view_is_read_only_and_serves_real_clients(xds: MountedDatastore,
                                                   tmp_path: Path) -> None:
    require_tools("qemu-img", "cp")
    home = xds.mnt / "vm1"
    home.mkdir()
    disk = home / "disk0.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M", str(disk)], check=True)
    (home / "vm1.vmx").write_text("memsize = 512\n")
    os.link(home / "vm1.vmx", home / "vm1.vmx.bak")
    os.setxattr(home / "vm1.vmx", "user.owner", b"ops")
    os.chown(home / "vm1.vmx", 1234, 5678)
    os.chmod(home / "vm1.vmx", 0o640)
    os.utime(home / "vm1.vmx", ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    expected_raw = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(expected_raw)],
                   check=True)
    before = tmp_path / "before"
    shutil.copytree(home, before, symlinks=True)
    ok("snapshot", "create", str(xds.mnt), "vm1", "--name", "nightly")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 0 8M", str(disk)], check=True)
    (home / "vm1.vmx").write_text("memsize = 4096\n")

    snap = xds.mnt / VIEW / "vm1@nightly"
    # real clients read the point in time as they read any directory
    copied = tmp_path / "copied"
    subprocess.run(["cp", "-a", str(snap), str(copied)], check=True)
    restored = tmp_path / "restored.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(snap / "disk0.img"),
                    str(restored)], check=True)
    assert restored.read_bytes() == expected_raw.read_bytes()
    for tree in (snap, copied):
        vmx = tree / "vm1.vmx"
        assert vmx.read_text() == "memsize = 512\n"
        st = os.stat(vmx)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
        assert st.st_mtime_ns == 1_500_000_000_123_456_789
        assert os.getxattr(vmx, "user.owner") == b"ops"
        assert os.stat(tree / "vm1.vmx.bak").st_ino == st.st_ino and st.st_nlink == 2
    assert not [n for n in os.listxattr(snap / "disk0.img") if n.startswith("trusted.")]
    # nothing in it can change
    attempts: list[Callable[[], object]] = [
        lambda: open(snap / "vm1.vmx", "a"),
        lambda: open(snap / "new", "w"),
        lambda: os.truncate(snap / "vm1.vmx", 0),
        lambda: os.unlink(snap / "vm1.vmx"),
        lambda: os.mkdir(snap / "d"),
        lambda: os.rename(snap / "vm1.vmx", snap / "x.vmx"),
        lambda: os.chmod(snap / "vm1.vmx", 0o600),
        lambda: os.utime(snap / "vm1.vmx"),
        lambda: os.setxattr(snap / "vm1.vmx", "user.x", b"1"),
        lambda: os.link(snap / "vm1.vmx", home / "stolen"),
        lambda: os.rename(snap, xds.mnt / "vm2"),
        lambda: os.symlink("x", snap / "l"),
        lambda: shutil.rmtree(snap),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno in (errno.EROFS, errno.EXDEV, errno.EPERM), caught.value
    assert sorted(os.listdir(snap)) == sorted(os.listdir(before))
    # the name is the mount's own: no entry may take it
    taking: list[Callable[[], object]] = [lambda: os.mkdir(xds.mnt / VIEW),
                                          lambda: os.rename(home, xds.mnt / VIEW)]
    for attempt in taking:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno in (errno.EEXIST, errno.EPERM, errno.EROFS, errno.ENOTEMPTY)
    assert home.is_dir()
    # a file open in the view keeps reading its point in time after the snapshot is
    # deleted; new lookups find nothing
    with open(snap / "vm1.vmx", "rb") as held:
        ok("snapshot", "delete", str(xds.mnt), "vm1", "nightly")
        assert held.read() == b"memsize = 512\n"
    assert os.listdir(xds.mnt / VIEW) == []
    assert not (snap / "vm1.vmx").exists()
