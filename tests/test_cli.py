"""The command line: exit codes, one-line errors, ``--json``, and nothing half-done.

Every failed ``mount`` is checked for leftovers: no state directory, no
mount, no control socket. Mount errors are tried both ways they are run:
in the background (what an operator types) and ``--foreground`` (what the
systemd unit runs).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusedisk import control, metadata
from fusedisk.control import socket_path

from .conftest import require_tools
from .mounting import MountedDatastore, force_unmount, fusedisk, is_mounted, wait_for

MODES = pytest.mark.parametrize("mode", [[], ["--foreground"]], ids=["background", "foreground"])


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert exit code 1 and a single 'fusedisk: error:' line containing *fragments*."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusedisk: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


class Layout:
    """Stores a and b, a mountpoint and a state directory path under *root*."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "mnt"
        self.state = root / "state"
        self.a = root / "stores" / "a"
        self.b = root / "stores" / "b"
        for d in (self.mnt, self.a, self.b):
            d.mkdir(parents=True, exist_ok=True)

    def mount(self, *args: str, mnt: Path | None = None) -> subprocess.CompletedProcess[str]:
        return fusedisk("mount", str(mnt or self.mnt), "--state-dir", str(self.state),
                        "--store", f"a={self.a}", "--store", f"b={self.b}",
                        "--default-store", "a", *args)

    def config(self, text: str) -> Path:
        path = self.root / "ds.toml"
        path.write_text(text)
        return path

    def assert_nothing_created(self, mnt: Path | None = None) -> None:
        mnt = mnt or self.mnt
        assert not self.state.exists(), "a failed mount created its state directory"
        assert not is_mounted(mnt)
        assert not socket_path(mnt).exists()
        assert list(self.a.iterdir()) == [] and list(self.b.iterdir()) == []


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    lay = Layout(tmp_path)
    try:
        yield lay
    finally:
        force_unmount(lay.mnt)  # only if a test failed half-way


# -- mount: bad places -----------------------------------------------------------------


@MODES
def test_missing_mountpoint(layout: Layout, mode: list[str]) -> None:
    layout.mnt.rmdir()
    one_line_error(layout.mount(*mode), f"mountpoint {layout.mnt} does not exist")
    layout.assert_nothing_created()


def test_mountpoint_not_a_directory(layout: Layout) -> None:
    layout.mnt.rmdir()
    layout.mnt.write_text("")
    one_line_error(layout.mount(), f"mountpoint {layout.mnt} is not a directory")
    assert not layout.state.exists()


@MODES
def test_busy_mountpoint(datastore: MountedDatastore, tmp_path: Path, mode: list[str]) -> None:
    layout = Layout(tmp_path / "second")
    one_line_error(layout.mount(*mode, mnt=datastore.mnt),
                   f"mountpoint {datastore.mnt} is busy: fuse.fusedisk is already mounted there")
    assert not layout.state.exists()
    assert list(layout.a.iterdir()) == []
    # The datastore that was there is untouched and still serves.
    (datastore.mnt / "vm1").mkdir()
    assert datastore.status()["placement"] == {"vm1": "a"}


def test_state_directory_in_use(datastore: MountedDatastore, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "second")
    result = fusedisk("mount", str(layout.mnt), "--state-dir", str(datastore.state_dir),
                      "--store", f"a={layout.a}")
    one_line_error(result, f"state directory {datastore.state_dir} is in use by another "
                   "fusedisk daemon")
    assert not is_mounted(layout.mnt)
    assert datastore.status()["stores"]["a"]["path"] == str(datastore.stores["a"])


# -- mount: bad stores ---------------------------------------------------------------------


@MODES
def test_store_missing(layout: Layout, mode: list[str]) -> None:
    layout.b.rmdir()
    one_line_error(layout.mount(*mode), f"store 'b': directory {layout.b} does not exist")
    layout.b.mkdir()
    layout.assert_nothing_created()


def test_store_not_a_directory(layout: Layout) -> None:
    layout.b.rmdir()
    layout.b.write_text("not a directory")
    one_line_error(layout.mount(), f"store 'b': {layout.b} is not a directory")
    assert layout.b.read_text() == "not a directory"
    assert not layout.state.exists() and not is_mounted(layout.mnt)


def test_store_argument_without_directory(layout: Layout) -> None:
    result = fusedisk("mount", str(layout.mnt), "--state-dir", str(layout.state),
                      "--store", "a")
    one_line_error(result, "--store 'a': expected NAME=DIRECTORY")
    layout.assert_nothing_created()


# -- mount: bad configuration files -----------------------------------------------------------


def config_text(layout: Layout, **overrides: str) -> str:
    keys = {"mountpoint": f'"{layout.mnt}"', "state_dir": f'"{layout.state}"',
            "default_store": '"a"', "block_size": '"64K"', **overrides}
    body = "".join(f"{k} = {v}\n" for k, v in keys.items() if v)
    return body + f'[stores]\na = "{layout.a}"\nb = "{layout.b}"\n'


@MODES
@pytest.mark.parametrize("overrides, expected", [
    ({"colour": '"blue"'}, "unknown key 'colour' (known: "),
    ({"block_size": '"48K"'}, "key 'block_size': block size '48K' must be a power of two "
                               "from 4K to 64M"),
    ({"block_size": '"huge"'}, "key 'block_size': 'huge' is not a size"),
    ({"block_size": '"1G"'}, "must be a power of two from 4K to 64M"),
    ({"default_store": '"c"'}, "default_store 'c' is not one of the stores (a, b)"),
    ({"allow_other": '"yes"'}, "key 'allow_other' must be true or false"),
    ({"mountpoint": "42"}, "key 'mountpoint' must be a string"),
], ids=["unknown-key", "block-size-not-power-of-two", "block-size-not-a-size",
        "block-size-too-big", "default-store-unknown", "allow-other-type", "mountpoint-type"])
def test_config_errors(layout: Layout, mode: list[str], overrides: dict[str, str],
                       expected: str) -> None:
    path = layout.config(config_text(layout, **overrides))
    message = one_line_error(fusedisk("mount", "--config", str(path), *mode), expected)
    assert str(path) in message  # every config error names the file
    layout.assert_nothing_created()


def test_config_not_toml(layout: Layout) -> None:
    path = layout.config('mountpoint = "/x\nstores = {\n')
    one_line_error(fusedisk("mount", "--config", str(path)),
                   f"config file {path}: not valid TOML: ")
    layout.assert_nothing_created()


def test_config_file_missing(layout: Layout) -> None:
    path = layout.root / "nope.toml"
    one_line_error(fusedisk("mount", "--config", str(path)),
                   f"config file {path} does not exist")
    layout.assert_nothing_created()


def test_config_without_stores(layout: Layout) -> None:
    path = layout.config(f'mountpoint = "{layout.mnt}"\nstate_dir = "{layout.state}"\n')
    one_line_error(fusedisk("mount", "--config", str(path)), f"{path}: no stores given")
    layout.assert_nothing_created()


def test_flag_overrides_config_and_is_checked(layout: Layout) -> None:
    path = layout.config(config_text(layout))
    one_line_error(fusedisk("mount", "--config", str(path), "--block-size", "3K"),
                   "--block-size: block size '3K' must be a power of two from 4K to 64M")
    layout.assert_nothing_created()


def test_store_inside_the_mountpoint(layout: Layout) -> None:
    inner = layout.mnt / "inner"
    inner.mkdir()
    result = fusedisk("mount", str(layout.mnt), "--state-dir", str(layout.state),
                      "--store", f"a={inner}")
    one_line_error(result, f"store 'a' ({inner}) lies inside the mountpoint")
    assert not layout.state.exists() and not is_mounted(layout.mnt)


# -- mount: state from a newer fusedisk ------------------------------------------------------


@MODES
def test_state_directory_from_a_newer_version(layout: Layout, mode: list[str]) -> None:
    record = metadata.encode_record("datastore", {"stores": {"a": 1}, "placement": {}})
    header, _, payload = record.partition(b"\n")
    newer = header.replace(f" v{metadata.FORMAT_VERSION} ".encode(),
                           f" v{metadata.FORMAT_VERSION + 1} ".encode())
    assert newer != header
    layout.state.mkdir(mode=0o700)
    state_file = layout.state / "datastore.state"
    state_file.write_bytes(newer + b"\n" + payload)

    one_line_error(layout.mount(*mode), f"{state_file} was written by a newer fusedisk",
                   f"state format v{metadata.FORMAT_VERSION + 1}", "upgrade fusedisk")
    # Nothing was rewritten, nothing mounted.
    assert state_file.read_bytes() == newer + b"\n" + payload
    assert {p.name for p in layout.state.iterdir()} <= {"datastore.state", "lock"}
    assert not is_mounted(layout.mnt)
    assert not socket_path(layout.mnt).exists()


# -- commands on something that is not a datastore ----------------------------------------------


def test_status_on_a_directory_that_is_not_mounted(tmp_path: Path) -> None:
    for args in (["status", str(tmp_path)], ["status", str(tmp_path), "--json"]):
        result = fusedisk(*args)
        one_line_error(result, f"{tmp_path} is not served by a running fusedisk daemon")
        assert result.stdout == ""


def test_umount_of_a_directory_that_is_not_mounted(tmp_path: Path) -> None:
    one_line_error(fusedisk("umount", str(tmp_path)), f"{tmp_path} is not mounted")


def test_umount_refuses_other_filesystems(tmp_path: Path) -> None:
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fusedisk-test", str(target)], check=True)
    try:
        one_line_error(fusedisk("umount", str(target)),
                       f"{target} is a tmpfs mount, not a fusedisk datastore")
        assert is_mounted(target)
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_umount_of_a_dead_mount_detaches_it(tmp_path: Path) -> None:
    ds = MountedDatastore(tmp_path)
    try:
        ds.start()
        ds.kill()
        result = fusedisk("umount", str(ds.mnt))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"detached {ds.mnt} (its daemon was not running)\n"
        assert not is_mounted(ds.mnt)
    finally:
        ds.teardown()


def test_command_line_errors_exit_2() -> None:
    for args in ([], ["frobnicate"], ["mount", "--no-such-flag", "/x"], ["status"]):
        result = fusedisk(*args)
        assert result.returncode == 2, args
        assert "usage: fusedisk" in result.stderr
        assert "Traceback" not in result.stderr


# -- a mounted datastore ------------------------------------------------------------------------


def test_status_json_is_one_object_for_scripts(datastore: MountedDatastore) -> None:
    (datastore.mnt / "web01").mkdir()
    (datastore.mnt / "web01" / "disk0.img").write_bytes(b"x" * 8192)
    result = datastore.cli("status", str(datastore.mnt), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    status = json.loads(result.stdout)
    assert isinstance(status, dict)
    assert {"stores", "placement", "jobs"} <= set(status)
    assert set(status["stores"]) == {"a", "b"}
    for name, store in status["stores"].items():
        assert store["path"] == str(datastore.stores[name])
        assert store["free_bytes"] > 0 and store["size_bytes"] >= store["free_bytes"]
    assert status["placement"] == {"web01": "a"}
    assert status["jobs"] == []


def test_status_human_output(datastore: MountedDatastore) -> None:
    (datastore.mnt / "web01").mkdir()
    result = datastore.cli("status", str(datastore.mnt))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"datastore {datastore.mnt}")
    assert any(line.split()[:1] == ["STORE"] for line in lines)
    assert any(line.split() == ["web01", "a"] for line in lines)
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_status_accepts_a_relative_mountpoint(datastore: MountedDatastore) -> None:
    result = subprocess.run([sys.executable, "-m", "fusedisk", "status", "mnt", "--json"],
                            cwd=datastore.root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mountpoint"] == str(datastore.mnt)


def test_umount_then_status_fails_cleanly(tmp_path: Path) -> None:
    ds = MountedDatastore(tmp_path)
    try:
        ds.start()
        result = fusedisk("umount", str(ds.mnt))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"unmounted {ds.mnt}\n"
        assert ds.proc is not None and ds.proc.wait(timeout=30) == 0
        ds.proc = None
        assert not is_mounted(ds.mnt)
        one_line_error(fusedisk("status", str(ds.mnt)), "is not served by a running fusedisk")
        one_line_error(fusedisk("umount", str(ds.mnt)), f"{ds.mnt} is not mounted")
    finally:
        ds.teardown()


# -- the demo (README's first command) ----------------------------------------------------------


def test_demo_relocates_a_writing_guest_and_cleans_up(tmp_path: Path) -> None:
    """The main job end to end: mount, guest, migrate with progress, verify, CBT, unmount."""
    require_tools("fio")
    root = tmp_path / "demo"
    try:
        result = fusedisk("demo", "--root", str(root), "--seconds", "6", timeout=300)
    finally:
        force_unmount(root / "ds1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "relocated web01 from ssd to hdd" in out
    assert "verify: every block the guest wrote reads back with its checksum" in out
    changes = next(json.loads(line) for line in out.splitlines() if line.startswith('{"change_id"'))
    assert changes["extents"] == [[1 << 30, 1 << 20]]  # exactly the 1 MiB dd wrote at 1 GiB
    assert not is_mounted(root / "ds1")
    assert (root / "stores" / "hdd" / "web01" / "disk0.img").exists()
    assert not (root / "stores" / "ssd" / "web01").exists()


@pytest.mark.parametrize("args", [["--root", "/etc/passwd"],
                                  ["--root", "/proc/self/nonexistent"],
                                  ["--seconds", "0"]])
def test_demo_bad_input_fails_in_one_line(args: list[str]) -> None:
    result = fusedisk("demo", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("fusedisk: error:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- bad input, each one line and nothing done -----------------------------------------------


def test_a_store_given_twice_is_refused(layout: Layout) -> None:
    other = layout.root / "other"
    other.mkdir()
    one_line_error(layout.mount("--store", f"a={other}"),
                   "--store 'a' is given twice")
    one_line_error(layout.mount("--store", f"c={layout.a}"),
                   f"store 'a' and store 'c' are the same directory ({layout.a})")
    layout.assert_nothing_created()
    assert list(other.iterdir()) == []


def config_bytes(layout: Layout, store_c: str | None = None, **overrides: str) -> bytes:
    """config_text, plus a store ``c``; ``<FF>`` stands for a byte that is not UTF-8."""
    text = config_text(layout, **overrides) + (f"c = {store_c}\n" if store_c is not None else "")
    return text.encode().replace(b"<FF>", b"\xff")


@MODES
@pytest.mark.parametrize("store_c, overrides, expected", [
    (None, {"mountpoint": '"/srv/<FF>"'}, "is not UTF-8 text"),
    (None, {"mountpoint": '"/srv/a\\u0000b"'}, "key 'mountpoint' must not contain NUL"),
    ('""', {}, "key 'stores.c' must not be empty"),
    ('"/srv/\\u0000"', {}, "key 'stores.c' must not contain NUL"),
    (None, {"block_size": '"1e400"'}, "key 'block_size': '1e400' is not a size"),
    (None, {"block_size": '"inf"'}, "key 'block_size': 'inf' is not a size"),
    (None, {"block_size": "true"}, "key 'block_size' must be a size such as"),
], ids=["not-utf8", "nul-in-mountpoint", "empty-store", "nul-in-store", "block-size-1e400",
        "block-size-inf", "block-size-bool"])
def test_more_config_errors(layout: Layout, mode: list[str], store_c: str | None,
                            overrides: dict[str, str], expected: str) -> None:
    path = layout.root / "ds.toml"
    path.write_bytes(config_bytes(layout, store_c, **overrides))
    message = one_line_error(fusedisk("mount", "--config", str(path), *mode), expected)
    assert str(path) in message
    layout.assert_nothing_created()


@pytest.mark.parametrize("size", ["1e400", "inf", "-inf", "nan", "1e30"])
def test_an_absurd_block_size_flag_is_refused(layout: Layout, size: str) -> None:
    one_line_error(layout.mount(f"--block-size={size}"), "--block-size")
    layout.assert_nothing_created()


def run_bytes(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "fusedisk", *args], capture_output=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("rate", ["1e400", "inf", "nan", "1e30", "2T", "1025G", "-1", "x"])
def test_absurd_rates_are_refused_by_the_command_line(
    datastore: MountedDatastore, rate: str
) -> None:
    (datastore.mnt / "vm1").mkdir()
    one_line_error(fusedisk("migrate", str(datastore.mnt), "vm1", "--to", "b",
                            f"--rate={rate}", "--no-wait"), "--rate")
    one_line_error(fusedisk("rate", str(datastore.mnt), "vm1", "--", rate), "--rate")
    assert datastore.status()["jobs"] == []  # nothing was started


def test_the_largest_rate_is_one_tebibyte_per_second(datastore: MountedDatastore) -> None:
    (datastore.mnt / "vm1").mkdir()
    (datastore.mnt / "vm1" / "disk").write_bytes(b"x" * 4096)
    result = fusedisk("migrate", str(datastore.mnt), "vm1", "--to", "b", "--rate", "1T/s",
                      "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "done" and job["rate_limit"] == 1 << 40


@pytest.mark.parametrize("pause", ["0", "-5", "60001", "99999999999999999999"])
def test_a_pause_budget_out_of_range_is_refused(datastore: MountedDatastore, pause: str) -> None:
    (datastore.mnt / "vm1").mkdir()
    one_line_error(fusedisk("migrate", str(datastore.mnt), "vm1", "--to", "b",
                            f"--max-pause={pause}", "--no-wait"),
                   "--max-pause must be from 1 to 60000 ms")
    assert datastore.status()["jobs"] == []


@pytest.mark.parametrize("args", [
    ["status", "MNT"], ["status", "MNT", "--json"], ["--help"], ["status", "--help"],
    ["--version"], ["cbt", "checkpoint", "MNT", "vm1/disk"],
    ["cbt", "changes", "MNT", "vm1/disk", "--since", "*"], ["cbt", "info", "MNT", "vm1/disk"],
    ["cbt", "info", "MNT", "vm1/disk", "--json"], ["cleanup", "NOTMOUNTED"],
], ids=lambda args: "-".join(a.strip("-") for a in args if a not in ("MNT", "vm1/disk")))
def test_output_into_a_closed_pipe_ends_quietly(
    datastore: MountedDatastore, tmp_path: Path, args: list[str]
) -> None:
    """`fusedisk status MNT | head -1`: the reader is gone; no traceback, no message."""
    (datastore.mnt / "vm1").mkdir()
    (datastore.mnt / "vm1" / "disk").write_bytes(b"x" * 4096)
    argv = [str(datastore.mnt) if a == "MNT" else str(tmp_path) if a == "NOTMOUNTED" else a
            for a in args]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, however short the output
    try:
        result = subprocess.run([sys.executable, "-m", "fusedisk", *argv], stdout=write_end,
                                stderr=subprocess.PIPE, timeout=120, check=False)
    finally:
        os.close(write_end)
    assert result.stderr == b""
    # argparse ignores a failed write of its own --help/--version text and exits 0
    assert result.returncode == (0 if "--help" in args or "--version" in args else 141)


def test_names_that_are_not_utf8_print_as_they_are(datastore: MountedDatastore) -> None:
    name = b"vm-\xff\xfe"
    os.mkdir(os.fsencode(datastore.mnt) + b"/" + name)
    result = run_bytes("status", str(datastore.mnt))
    assert result.returncode == 0, result.stderr
    assert any(line.split() == [name, b"a"] for line in result.stdout.splitlines())
    assert json.loads(run_bytes("status", str(datastore.mnt), "--json").stdout)[
        "placement"] == {os.fsdecode(name): "a"}
    result = run_bytes("migrate", str(datastore.mnt), name, "--to", "b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"relocated " + name + b" from a to b")
    missing = run_bytes("migrate", str(datastore.mnt), b"gone-\xff", "--to", "b")
    assert missing.returncode == 1 and b"Traceback" not in missing.stderr
    assert len(missing.stderr.splitlines()) == 1


def test_a_mountpoint_that_is_not_utf8_gets_one_line(tmp_path: Path) -> None:
    path = os.fsencode(tmp_path) + b"/nowhere-\xff"
    all_args: list[list[str | bytes]] = [
        ["status", path], ["umount", path], ["cbt", "checkpoint", path, "f"],
        ["mount", path, "--state-dir", str(tmp_path / "state"), "--store", f"a={tmp_path}"],
    ]
    for args in all_args:
        result = run_bytes(*args)
        assert result.returncode == 1, args
        assert b"Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(b"fusedisk: error: "), result.stderr
        assert path in lines[0]
    assert not (tmp_path / "state").exists()


# -- a command's answer is the truth: no cancel once the switchover began ----------------------


class FreezableStore:
    """An ext4 store whose writes to its disk can be held back at will.

    The store's ext4 lives on a loop device over an image file that itself
    sits on a second ext4 (on its own loop device). Freezing that outer
    filesystem holds every write the store's disk makes, while the store's
    own page cache still serves reads: an ``fsync`` of a file with dirty data
    on the store then waits until :meth:`thaw`, nothing else does.
    """

    def __init__(self, root: Path, path: Path) -> None:
        self.root, self.path = root, path
        self.outer = root / "outer"
        self.loops: list[str] = []
        self.frozen = False

    def set_up(self) -> None:
        require_tools("mkfs.ext4", "losetup", "fsfreeze")
        self.outer.mkdir()
        outer_image, inner_image = self.root / "outer.img", self.outer / "store.img"
        self._mkfs(outer_image, 256 << 20)
        self._mount(outer_image, self.outer)
        self._mkfs(inner_image, 128 << 20)
        self.path.mkdir(parents=True, exist_ok=True)
        self._mount(inner_image, self.path, "noatime")

    def _mkfs(self, image: Path, size: int) -> None:
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(image)], check=True)

    def _mount(self, image: Path, target: Path, options: str = "defaults") -> None:
        loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        self.loops.append(loop)
        subprocess.run(["mount", "-o", options, loop, str(target)], check=True)

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "--freeze", str(self.outer)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "--unfreeze", str(self.outer)], check=False)
            self.frozen = False

    def tear_down(self) -> None:
        self.thaw()
        for target in (self.path, self.outer):
            if is_mounted(target):
                subprocess.run(["umount", str(target)], check=False)
            if is_mounted(target):
                subprocess.run(["umount", "-l", str(target)], check=False)
        for loop in reversed(self.loops):
            subprocess.run(["losetup", "-d", loop], check=False)


#: fsync(2) and fdatasync(2) as /proc/PID/task/TID/syscall numbers them
FSYNC_SYSCALLS = {"x86_64": ("74", "75"), "aarch64": ("82", "83")}


def fsync_blocked_on(pid: int, directory: Path) -> bool:
    """Whether a thread of *pid* is inside fsync/fdatasync of a file under *directory*."""
    numbers = FSYNC_SYSCALLS[os.uname().machine]
    prefix = str(directory) + "/"
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
            if fields and fields[0] in numbers:
                if os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}").startswith(prefix):
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def job_of(ds: MountedDatastore, entry: str) -> dict[str, Any]:
    jobs = [j for j in ds.status()["jobs"] if j["entry"] == entry]
    assert jobs, f"no job for {entry}"
    return dict(jobs[0])


@pytest.fixture
def freezable(tmp_path: Path) -> Iterator[FreezableStore]:
    store = FreezableStore(tmp_path, tmp_path / "ds" / "stores" / "a")
    try:
        store.set_up()
        yield store
    finally:
        store.tear_down()


def test_cancel_is_refused_once_the_switchover_began(freezable: FreezableStore) -> None:
    """A guest fsync that cannot finish holds the entry's gate, so the switchover
    waits in ``switching`` for as long as the test likes: a cancel then gets
    "too late" (exit 1), and the relocation completes as that answer says."""
    ds = MountedDatastore(freezable.root / "ds")
    assert ds.stores["a"] == freezable.path
    fd = -1
    fsynced: list[BaseException | None] = []
    guest = threading.Thread(target=lambda: None)
    try:
        ds.start()
        (ds.mnt / "vm1").mkdir()
        data = os.urandom(1 << 20)
        fd = os.open(ds.mnt / "vm1" / "disk0.img", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, data, 0)  # dirty in the store's page cache
        freezable.freeze()

        def fsync() -> None:
            try:
                os.fsync(fd)
                fsynced.append(None)
            except BaseException as e:
                fsynced.append(e)

        guest = threading.Thread(target=fsync, daemon=True)
        guest.start()
        assert ds.proc is not None
        pid = ds.proc.pid
        wait_for(lambda: fsync_blocked_on(pid, freezable.path), 60,
                 "the daemon's fsync of the guest's file to wait on the store")

        started = fusedisk("migrate", str(ds.mnt), "vm1", "--to", "b", "--no-wait")
        assert started.returncode == 0, started.stderr
        wait_for(lambda: job_of(ds, "vm1")["state"] == "switching", 60,
                 "the switchover to wait for the guest's fsync")

        one_line_error(fusedisk("cancel", str(ds.mnt), "vm1"),
                       "the relocation of 'vm1' is already switching over; it will complete")
        with pytest.raises(control.RequestRefused) as refused:
            control.request(ds.mnt, "cancel", entry="vm1")
        assert refused.value.code == "too-late"
        assert job_of(ds, "vm1")["state"] == "switching"
        assert fsynced == []  # still held: the refusal did not depend on timing

        freezable.thaw()
        guest.join(60)
        assert fsynced == [None]
        wait_for(lambda: job_of(ds, "vm1")["state"] in ("done", "failed", "cancelled"), 60,
                 "the relocation to end")
        final = job_of(ds, "vm1")
        assert final["state"] == "done", final
        assert ds.status()["placement"] == {"vm1": "b"}
        assert os.pread(fd, len(data), 0) == data
        assert (ds.stores["b"] / "vm1" / "disk0.img").read_bytes() == data
        assert not (freezable.path / "vm1").exists()
        os.close(fd)
        fd = -1
        ds.stop()
    finally:
        freezable.thaw()
        if guest.ident is not None:
            guest.join(60)
        if fd >= 0:
            os.close(fd)
        ds.teardown()
    log = ds.log()
    assert "Traceback" not in log and " ERROR " not in log, log


def test_a_release_the_unmount_abandoned_is_not_logged_as_an_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    """pyfuse3's ERROR for a RELEASE the kernel no longer waits for (an unmount
    drops the queued ones) is INFO; its other errors stay errors."""
    from fusedisk.cli import setup_logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(debug=False)
        pyfuse3_log = logging.getLogger("pyfuse3")
        pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s",
                          "No such file or directory")
        pyfuse3_log.error("fuse_releasedir(): fuse_reply_* failed with %s",
                          "No such file or directory")
        pyfuse3_log.error("fuse_write(): fuse_reply_* failed with %s", "No such file or directory")
        pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", "Bad file descriptor")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.getLogger("pyfuse3").filters.clear()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, lines
    assert " INFO pyfuse3: fuse_release(): " in lines[0] and "abandoned" in lines[0]
    assert " INFO pyfuse3: fuse_releasedir(): " in lines[1]
    assert " ERROR pyfuse3: fuse_write(): " in lines[2]
    assert " ERROR pyfuse3: fuse_release(): " in lines[3] and "Bad file" in lines[3]
