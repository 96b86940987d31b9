"""A store belongs to one datastore at a time, and places never overlap.

Every store holds ``.fusedisk-owner`` at its root: a record naming the
datastore it belongs to (its id, state directory, mountpoint and daemon
pid), flocked by that daemon for as long as it runs. A second daemon on the
same store is refused, and so is another datastore while the owner's state
directory still lists the store, even when its daemon is not running. A
crash never blocks a restart: the lock goes with the process.

All through the real command line, both ways ``mount`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusedisk import metadata
from fusedisk.control import socket_path

from .mounting import MountedDatastore, force_unmount, fusedisk, is_mounted

pytestmark = pytest.mark.mount

MODES = pytest.mark.parametrize("mode", [[], ["--foreground"]], ids=["background", "foreground"])
OWNER = ".fusedisk-owner"


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusedisk: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def owner_record(store: Path) -> dict[str, Any]:
    """The newest record of a store's owner file."""
    found = metadata.read_slotted(store / OWNER, "owner", metadata.OWNER_SLOT_SIZE)
    assert found is not None, f"{store / OWNER} holds no record"
    return found[1]


class Second:
    """Another datastore's mountpoint and state directory, for a mount that should fail."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "mnt"
        self.state = root / "state"
        self.spare = root / "spare"
        for d in (self.mnt, self.spare):
            d.mkdir(parents=True, exist_ok=True)

    def mount(self, *args: str) -> subprocess.CompletedProcess[str]:
        return fusedisk("mount", str(self.mnt), "--state-dir", str(self.state), *args)

    def assert_nothing_created(self) -> None:
        assert not self.state.exists(), "a refused mount created its state directory"
        assert not is_mounted(self.mnt)
        assert not socket_path(self.mnt).exists()
        assert list(self.spare.iterdir()) == []

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            fusedisk("umount", str(self.mnt))
        force_unmount(self.mnt)


def stopped_datastore(root: Path) -> MountedDatastore:
    """A datastore mounted once, with an entry vm1 on store a, and unmounted."""
    first = MountedDatastore(root)
    try:
        first.start()
        (first.mnt / "vm1").mkdir()
        first.stop()
    finally:
        first.teardown()
    return first


@pytest.fixture
def second(tmp_path: Path) -> Iterator[Second]:
    other = Second(tmp_path / "second")
    try:
        yield other
    finally:
        other.unmount()  # only when a test failed half-way


# -- one store, one datastore -------------------------------------------------------------


def test_owner_file_says_who_owns_each_store_and_is_no_entry(
    datastore: MountedDatastore,
) -> None:
    status = datastore.status()
    assert isinstance(status["datastore_id"], str) and len(status["datastore_id"]) == 32
    assert datastore.proc is not None
    for name, store in datastore.stores.items():
        record = owner_record(store)
        assert record["datastore_id"] == status["datastore_id"]
        assert record["state_dir"] == str(datastore.state_dir)
        assert record["mountpoint"] == str(datastore.mnt)
        assert record["pid"] == datastore.proc.pid
        assert record["store"] == name
        assert record["store_path"] == os.path.realpath(store)
    assert OWNER not in os.listdir(datastore.mnt)
    assert not (datastore.mnt / OWNER).exists()
    with pytest.raises(PermissionError):
        (datastore.mnt / OWNER).write_text("mine")
    assert "placement" in status and status["placement"] == {}


@MODES
def test_a_store_in_use_by_another_daemon_is_refused(
    datastore: MountedDatastore, second: Second, mode: list[str]
) -> None:
    store_a = datastore.stores["a"]
    before = (store_a / OWNER).read_bytes()
    assert datastore.proc is not None
    result = second.mount("--store", f"a={store_a}", "--store", f"s={second.spare}",
                          "--default-store", "s", *mode)
    one_line_error(result, f"store 'a' ({store_a}) is in use by another fusedisk datastore",
                   f"state directory {datastore.state_dir}", f"mounted on {datastore.mnt}",
                   f"daemon pid {datastore.proc.pid}")
    second.assert_nothing_created()
    # The owner is untouched and still serves, its lock and record intact.
    assert (store_a / OWNER).read_bytes() == before
    (datastore.mnt / "vm1").mkdir()
    assert datastore.status()["placement"] == {"vm1": "a"}


@MODES
def test_a_store_claimed_by_a_stopped_datastore_is_refused(
    tmp_path: Path, second: Second, mode: list[str]
) -> None:
    first = stopped_datastore(tmp_path / "first")
    store_a = first.stores["a"]
    before = (store_a / OWNER).read_bytes()
    result = second.mount("--store", f"a={store_a}", "--store", f"s={second.spare}",
                          "--default-store", "s", *mode)
    one_line_error(result, f"store 'a' ({store_a}) belongs to the datastore whose state "
                   f"directory is {first.state_dir}", "remove it from that datastore's stores",
                   f"delete {store_a / OWNER}")
    second.assert_nothing_created()
    assert (store_a / OWNER).read_bytes() == before
    assert (store_a / "vm1").is_dir()


@pytest.mark.parametrize("release", ["reconfigured", "state-dir-removed", "owner-file-removed"])
def test_a_released_store_can_be_claimed(tmp_path: Path, second: Second, release: str) -> None:
    """The three ways the refusal's hint gives to hand a store to another datastore."""
    first = MountedDatastore(tmp_path / "first")
    store_a = first.stores["a"]
    try:
        first.start()
        first.stop()
        if release == "reconfigured":  # mounted once without the store: it lets go of it
            again = MountedDatastore(first.root, stores=("b",), default_store="b")
            try:
                again.start()
                again.stop()
            finally:
                again.teardown()
        elif release == "state-dir-removed":
            shutil.rmtree(first.state_dir)
        else:
            (store_a / OWNER).unlink()
    finally:
        first.teardown()
    result = second.mount("--store", f"a={store_a}", "--default-store", "a")
    assert result.returncode == 0, result.stderr
    try:
        status = json.loads(fusedisk("status", str(second.mnt), "--json", check=True).stdout)
        record = owner_record(store_a)
        assert record["state_dir"] == str(second.state)
        assert record["datastore_id"] == status["datastore_id"]
        assert record["pid"] == status["pid"]
    finally:
        assert fusedisk("umount", str(second.mnt)).returncode == 0


def test_a_crash_never_blocks_the_restart(tmp_path: Path) -> None:
    ds = MountedDatastore(tmp_path)
    try:
        ds.start()
        (ds.mnt / "vm1").mkdir()
        (ds.mnt / "vm1" / "disk").write_bytes(b"acknowledged")
        ds.kill()  # the lock goes with the process; the record stays
        assert ds.proc is None
        ds.start()
        assert ds.proc is not None
        assert owner_record(ds.stores["a"])["pid"] == ds.proc.pid
        assert (ds.mnt / "vm1" / "disk").read_bytes() == b"acknowledged"
        ds.stop()
    finally:
        ds.teardown()


def test_a_copied_state_directory_cannot_serve_the_same_stores(
    tmp_path: Path, second: Second
) -> None:
    """Two state directories with one datastore id (a `cp -a`) are two datastores."""
    first = MountedDatastore(tmp_path / "first")
    try:
        first.start()
        first.stop()
    finally:
        first.teardown()
    shutil.copytree(first.state_dir, second.state)
    result = second.mount("--store", f"a={first.stores['a']}", "--store",
                          f"b={first.stores['b']}", "--default-store", "a")
    one_line_error(result, f"belongs to the datastore whose state directory is "
                   f"{first.state_dir}")
    assert not is_mounted(second.mnt)


# -- places that overlap --------------------------------------------------------------------


class Places:
    """A mountpoint, a state directory and two stores under *root*, all separate."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "mnt"
        self.state = root / "state"
        self.a = root / "stores" / "a"
        self.b = root / "stores" / "b"

    def mount(self, *mode: str) -> subprocess.CompletedProcess[str]:
        for d in (self.mnt, self.a, self.b):
            d.mkdir(parents=True, exist_ok=True)
        return fusedisk("mount", str(self.mnt), "--state-dir", str(self.state),
                        "--store", f"a={self.a}", "--store", f"b={self.b}",
                        "--default-store", "a", *mode)


def _nest(places: Places, case: str) -> str:
    """Rearrange *places* for *case*; return what the refusal must say."""
    root = places.root
    if case == "mountpoint-inside-a-store":
        places.mnt = places.a / "mnt"
        return f"the mountpoint ({places.mnt}) lies inside store 'a' ({places.a})"
    if case == "mountpoint-is-a-store":
        places.mnt = places.b
        return f"store 'b' and the mountpoint are the same directory ({places.b})"
    if case == "store-inside-the-mountpoint":
        places.b = places.mnt / "b"
        return f"store 'b' ({places.b}) lies inside the mountpoint ({places.mnt})"
    if case == "state-dir-inside-a-store":
        places.state = places.a / "state"
        return f"the state directory ({places.state}) lies inside store 'a' ({places.a})"
    if case == "store-inside-the-state-dir":
        places.b = places.state / "b"
        return f"store 'b' ({places.b}) lies inside the state directory ({places.state})"
    if case == "mountpoint-inside-the-state-dir":
        places.mnt = places.state / "mnt"
        return f"the mountpoint ({places.mnt}) lies inside the state directory ({places.state})"
    if case == "store-inside-a-store":
        places.b = places.a / "b"
        return f"store 'b' ({places.b}) lies inside store 'a' ({places.a})"
    if case == "one-store-through-a-symlink":
        places.a.mkdir(parents=True)
        (root / "alias").symlink_to(places.a)
        places.b = root / "alias"
        return f"store 'a' and store 'b' are the same directory ({places.a})"
    if case == "mountpoint-inside-a-store-through-a-symlink":
        places.a.mkdir(parents=True)
        (places.a / "inner").mkdir()
        (root / "shortcut").symlink_to(places.a / "inner")
        places.mnt = root / "shortcut"
        return f"the mountpoint ({places.mnt}) lies inside store 'a' ({places.a})"
    raise AssertionError(case)


OVERLAPS = ["mountpoint-inside-a-store", "mountpoint-is-a-store", "store-inside-the-mountpoint",
            "state-dir-inside-a-store", "store-inside-the-state-dir",
            "mountpoint-inside-the-state-dir", "store-inside-a-store",
            "one-store-through-a-symlink", "mountpoint-inside-a-store-through-a-symlink"]


@MODES
@pytest.mark.parametrize("case", OVERLAPS)
def test_overlapping_places_are_refused(tmp_path: Path, case: str, mode: list[str]) -> None:
    """The daemon would serve its own mount (deadlock), list its state as an entry,
    or serve one directory twice: each is one line, and nothing is created."""
    places = Places(tmp_path)
    expected = _nest(places, case)
    try:
        result = places.mount(*mode)
        one_line_error(result, expected)
        assert not is_mounted(places.mnt)
        assert not (places.state / "lock").exists()
        assert not (places.a / OWNER).exists() and not (places.b / OWNER).exists()
    finally:
        if is_mounted(places.mnt):  # only when the refusal is missing
            fusedisk("umount", "--lazy", str(places.mnt), timeout=30)
            force_unmount(places.mnt)


def test_one_directory_under_two_paths_is_refused(tmp_path: Path) -> None:
    """A bind mount gives one directory two real paths: the stores' inodes tell."""
    places = Places(tmp_path)
    for d in (places.mnt, places.a, places.b):
        d.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(places.a), str(places.b)], check=True)
    try:
        one_line_error(places.mount(), f"stores 'a' ({places.a}) and 'b' ({places.b}) are "
                       "the same directory")
        assert not is_mounted(places.mnt)
        assert not (places.a / OWNER).exists()
    finally:
        subprocess.run(["umount", str(places.b)], check=False)
        force_unmount(places.mnt)


def test_a_store_claimed_from_another_host_is_refused(tmp_path: Path, second: Second) -> None:
    """An owner record written on another host (a remote store, a disk shared between
    hosts) names a state directory this host cannot look at: its datastore may well
    still use the store, so the store is refused, and the line names that host."""
    first = stopped_datastore(tmp_path / "first")
    store_a = first.stores["a"]
    seq, record = metadata.read_slotted(store_a / OWNER, "owner", metadata.OWNER_SLOT_SIZE) \
        or (0, {})
    assert record["host"] == os.uname().nodename
    # as that host would have left it: its state directory is nowhere on this one
    record.update(host="elsewhere.example", state_dir="/var/lib/fusedisk-on-elsewhere")
    fd = os.open(store_a / OWNER, os.O_RDWR)
    try:
        metadata.write_slot_fd(fd, "owner", seq + 1, record, metadata.OWNER_SLOT_SIZE,
                               str(store_a / OWNER))
    finally:
        os.close(fd)
    result = second.mount("--store", f"a={store_a}", "--store", f"s={second.spare}",
                          "--default-store", "s")
    one_line_error(result, f"store 'a' ({store_a}) belongs to the datastore whose state "
                   "directory is /var/lib/fusedisk-on-elsewhere on host elsewhere.example",
                   f"delete {store_a / OWNER}")
    second.assert_nothing_created()
    assert (store_a / "vm1").is_dir()
