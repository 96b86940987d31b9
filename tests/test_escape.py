"""Nothing reached through the mount may leave the store that holds it.

Objects are planted *directly on the backing stores* (as a careless admin, a
restored backup or a hostile guest tool could leave them) and then handled
through the mount. The daemon runs as root, so any symlink it followed or
any path it re-walked would let a request change a file outside the stores;
every test here checks the outside target, down to its ctime, afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

import pytest

from .mounting import MountedDatastore, store_names
from .test_posix import AT_FDCWD, AT_SYMLINK_NOFOLLOW, expect_errno, fill

pytestmark = pytest.mark.mount

_libc = ctypes.CDLL(None, use_errno=True)


def lchmod(path: Path, mode: int) -> None:
    """``fchmodat(AT_SYMLINK_NOFOLLOW)`` (glibc does it through an O_PATH handle)."""
    if _libc.fchmodat(AT_FDCWD, os.fsencode(path), mode, AT_SYMLINK_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def outside_target(tmp_path: Path) -> Path:
    """A root-owned file outside every store, with attributes worth protecting."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "shadow"
    target.write_bytes(b"precious")
    os.chmod(target, 0o640)
    os.setxattr(target, "user.secret", b"u")
    os.setxattr(target, "trusted.secret", b"t")
    os.utime(target, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return target


def fingerprint(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)  # looking must not change atime
    try:
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, sorted(os.listxattr(path)), data)


@pytest.mark.parametrize("where", ["top-level", "inside-entry"])
def test_planted_symlink_out_of_the_store(
    datastore: MountedDatastore, tmp_path: Path, where: str
) -> None:
    target = outside_target(tmp_path)
    store = datastore.stores["a"]
    (datastore.mnt / "vm").mkdir()
    if where == "top-level":
        planted = store / "evil"
        os.symlink(target, planted)
        datastore.stop()  # a new top-level name is adopted when the datastore opens
        datastore.start()
        link = datastore.mnt / "evil"
        assert "evil" in os.listdir(datastore.mnt)
    else:
        planted = store / "vm" / "evil"
        os.symlink(target, planted)
        link = datastore.mnt / "vm" / "evil"
        assert "evil" in os.listdir(datastore.mnt / "vm")
    before = fingerprint(target)

    st = os.lstat(link)
    assert stat.S_ISLNK(st.st_mode)
    assert os.readlink(link) == str(target)

    # chown / utimens of the link itself change the link on the store
    os.chown(link, 1000, 1000, follow_symlinks=False)
    assert (os.lstat(link).st_uid, os.lstat(link).st_gid) == (1000, 1000)
    assert (os.lstat(planted).st_uid, os.lstat(planted).st_gid) == (1000, 1000)
    os.utime(link, ns=(123_000_000_007, 456_000_000_009), follow_symlinks=False)
    assert os.lstat(link).st_mtime_ns == 456_000_000_009
    assert os.lstat(planted).st_mtime_ns == 456_000_000_009
    # a symlink has no mode of its own to change
    expect_errno((errno.EOPNOTSUPP, errno.ENOTSUP), lchmod, link, 0o777)

    # extended attributes of the link: refused, and the target's never show
    for name in ("trusted.evil", "user.evil"):
        expect_errno((errno.EPERM, errno.ENOTSUP), os.setxattr, link, name, b"1",
                     follow_symlinks=False)
    for name in ("trusted.secret", "user.secret"):
        expect_errno(errno.ENODATA, os.getxattr, link, name, follow_symlinks=False)
        expect_errno((errno.ENODATA, errno.EPERM), os.removexattr, link, name,
                     follow_symlinks=False)
    assert not {"trusted.secret", "user.secret"} & set(os.listxattr(link, follow_symlinks=False))

    # a hard link of the symlink is a second name of the symlink, never of the target
    if where == "inside-entry":
        os.link(link, link.with_name("evil2"), follow_symlinks=False)
        twin = store / "vm" / "evil2"
        assert stat.S_ISLNK(os.lstat(twin).st_mode)
        assert os.lstat(twin).st_ino == os.lstat(planted).st_ino
        assert os.lstat(link).st_nlink == 2
    else:
        expect_errno(errno.EXDEV, os.link, link, datastore.mnt / "evil2", follow_symlinks=False)
    # renaming and removing the link touch the link only
    os.rename(link, link.with_name("moved"))
    os.unlink(link.with_name("moved"))
    assert fingerprint(target) == before
    assert os.getxattr(target, "trusted.secret") == b"t"


def test_dotdot_of_an_entry_is_the_mount_root(datastore: MountedDatastore) -> None:
    mnt = datastore.mnt
    # store-internal names that must never show through the mount
    (datastore.stores["a"] / ".fusedisk-reloc").mkdir()
    fill(datastore.stores["a"] / ".fusedisk-reloc" / "part", b"p")
    fill(datastore.stores["b"] / ".fusedisk-journal", b"j")
    (datastore.stores["b"] / "vmb").mkdir()  # an entry on the other store
    datastore.stop()
    datastore.start()
    (mnt / "vm" / "sub" / "deeper").mkdir(parents=True)
    fill(mnt / "top.img", b"t")
    entries = {"vm", "vmb", "top.img"}
    assert set(os.listdir(mnt)) == entries

    root_ino = os.stat(mnt).st_ino
    for up in (mnt / "vm" / "..", mnt / "vmb" / "..", mnt / "vm" / "sub" / ".." / "..",
               mnt / "vm" / "sub" / "deeper" / ".." / ".." / ".."):
        assert os.stat(up).st_ino == root_ino, up
        assert set(os.listdir(up)) == entries, up
    assert set(os.listdir(mnt / "vm" / "sub" / "..")) == {"sub"}
    # through directory descriptors, the way openat()-based tools walk up
    fd = os.open(mnt / "vm" / "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        up1 = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        up2 = os.open("../..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        up3 = os.open("../../..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        try:
            assert os.listdir(up1) == ["sub"]
            assert set(os.listdir(up2)) == entries
            assert os.fstat(up2).st_ino == root_ino
            # one more step leaves the mount for the directory it is mounted on
            assert os.fstat(up3).st_ino == os.stat(datastore.root).st_ino
        finally:
            for f in (up1, up2, up3):
                os.close(f)
    finally:
        os.close(fd)
    # nothing can be created next to an entry by walking up from inside it
    fill(mnt / "vm" / ".." / "new.img", b"n")
    assert "new.img" in os.listdir(mnt)
    assert (datastore.stores["a"] / "new.img").read_bytes() == b"n"
    assert store_names(datastore.stores["a"]) == [".fusedisk-reloc", "new.img",
                                                        "top.img", "vm"]


def test_reserved_names_are_invisible_and_cannot_be_made(datastore: MountedDatastore) -> None:
    mnt = datastore.mnt
    a, b = datastore.stores["a"], datastore.stores["b"]
    (a / ".fusedisk-reloc").mkdir()
    fill(a / ".fusedisk-reloc" / "disk", b"half copied")
    fill(b / ".fusedisk", b"scratch")
    datastore.stop()
    datastore.start()
    (mnt / "vm").mkdir()
    assert os.listdir(mnt) == ["vm"]
    assert ".fusedisk-reloc" not in datastore.status()["placement"]
    for name in (".fusedisk-reloc", ".fusedisk"):
        expect_errno(errno.ENOENT, os.stat, mnt / name)
        expect_errno(errno.ENOENT, os.open, mnt / name, os.O_RDONLY)
        expect_errno(errno.ENOENT, os.listdir, mnt / name)
        expect_errno(errno.ENOENT, os.unlink, mnt / name)
    expect_errno(errno.ENOENT, os.stat, mnt / ".fusedisk-reloc" / "disk")

    refused = (errno.EPERM, errno.EACCES, errno.EEXIST)
    for name in (".fusedisk-new", ".fusedisk", ".fusedisk-reloc", ".fusediskX"):
        path = mnt / name
        expect_errno(refused, os.open, path, os.O_CREAT | os.O_WRONLY, 0o644)
        expect_errno(refused, os.mkdir, path)
        expect_errno(refused, os.mkfifo, path)
        expect_errno(refused, os.symlink, "vm", path)
        expect_errno(refused, os.rename, mnt / "vm", path)
        expect_errno((*refused, errno.EXDEV), os.link, mnt / "vm", path)
    # nothing reached the stores, nothing moved
    assert store_names(a) == [".fusedisk-reloc", "vm"]
    assert os.listdir(a / ".fusedisk-reloc") == ["disk"]
    assert store_names(b) == [".fusedisk"]
    assert (b / ".fusedisk").read_bytes() == b"scratch"
    assert os.listdir(mnt) == ["vm"]
    # inside an entry the prefix is an ordinary name
    fill(mnt / "vm" / ".fusedisk-notes", b"mine")
    assert os.listdir(mnt / "vm") == [".fusedisk-notes"]


def test_lost_found_of_store_filesystems_is_not_an_entry(datastore: MountedDatastore) -> None:
    """Stores on their own ext4 disks each have lost+found at the root: not an
    entry, not a conflict, not creatable through the mount, left alone."""
    for store in ("a", "b"):
        (datastore.stores[store] / "lost+found").mkdir(mode=0o700)
    datastore.stop()
    datastore.start()
    status = datastore.status()
    assert status["conflicts"] == {}
    assert "lost+found" not in status["placement"]
    assert os.listdir(datastore.mnt) == []
    expect_errno(errno.ENOENT, os.stat, datastore.mnt / "lost+found")
    expect_errno((errno.EPERM, errno.EACCES), os.mkdir, datastore.mnt / "lost+found")
    for store in ("a", "b"):
        assert store_names(datastore.stores[store]) == ["lost+found"]
    assert "lost+found" not in datastore.log()


@pytest.mark.daemon_errors  # the daemon logs the conflict as an error, by design
def test_name_on_two_stores_is_not_served(datastore: MountedDatastore) -> None:
    """A name found on both stores and not placed is left out, never merged."""
    for store in ("a", "b"):
        (datastore.stores[store] / "twin").mkdir()
        fill(datastore.stores[store] / "twin" / "disk", store.encode())
    datastore.stop()
    datastore.start()
    assert os.listdir(datastore.mnt) == []
    expect_errno(errno.ENOENT, os.stat, datastore.mnt / "twin")
    expect_errno((errno.EEXIST, errno.EPERM), os.mkdir, datastore.mnt / "twin")
    assert "twin" in datastore.status()["conflicts"]
    assert (datastore.stores["a"] / "twin" / "disk").read_bytes() == b"a"
    assert (datastore.stores["b"] / "twin" / "disk").read_bytes() == b"b"
