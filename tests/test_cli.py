"""The command line: exit codes, one-line errors, ``--json``, and nothing half-done.

Every failed ``mount`` is checked for leftovers: no state directory, no
mount, no control socket. Mount errors are tried both ways they are run:
in the background (what an operator types) and ``--foreground`` (what the
systemd unit runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusedisk import metadata
from fusedisk.control import socket_path

from .conftest import require_tools
from .mounting import MountedDatastore, force_unmount, fusedisk, is_mounted

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
