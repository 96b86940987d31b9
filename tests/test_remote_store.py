"""Entries on a remote store, for real: local -> remote -> local under a guest's writes.

The remote host is this one (``nbd+local://``: the agent and nbdkit with TLS-PSK
run here; the store's directory is what the remote host holds). The daemon
mounts a view of the store (storeview.py) and uses it as a directory. What is
proven, with a guest (tests/journal_writer.py: O_DIRECT 4 KiB writes, each
journaled once acknowledged) and fio with ``--verify=crc32c`` writing while
the entry relocates:

- every acknowledged write is there after each switchover, after a remount,
  and in the remote directory itself; the small files and attributes too;
- the agent (and with it nbdkit) killed after the commit, while the guest
  writes to the entry on the remote store: the view reconnects, the guest's
  writes resume, nothing acknowledged is lost;
- nbdkit killed during a copy onto the remote store: the relocation ends
  (failed, the source still the truth, no partial copy left; or finished with
  every byte right), never a success that lost data;
- ``kill -9`` of the daemon while it copies onto the remote store: the view
  goes with it, the next mount resumes, the data is right;
- a remote store that cannot be reached is one line at mount, and nothing
  is left mounted or running;
- a second datastore on the same remote store is refused by the remote host
  while the first one's view runs (and by the owner record after it), and
  the first one goes on unharmed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusedisk.storeviews import view_mountpoint

from . import journal_writer
from .conftest import require_tools
from .mounting import (
    MountedDatastore,
    force_unmount,
    fusedisk,
    is_mounted,
    processes,
    wait_for,
)
from .test_remote import nbdkits_serving

pytestmark = pytest.mark.mount

MiB = 1 << 20
NBLOCKS = 4096  # the guest writes below 16 MiB of a 32 MiB disk


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[MountedDatastore]:
    d = MountedDatastore(tmp_path / "ds", stores=("near", "far"), default_store="near",
                         remote=("far",))
    try:
        yield d.start()
        assert "Traceback" not in d.log(), d.log()
    finally:
        d.teardown()
        assert not view_mountpoint(d.mnt, "far").exists() or not os.listdir(
            view_mountpoint(d.mnt, "far"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_vm(mnt: Path) -> dict[str, str]:
    vm = mnt / "vm"
    vm.mkdir()
    with open(vm / "disk.img", "wb") as f:
        f.write(os.urandom(8 * MiB))
        f.truncate(32 * MiB)
    (vm / "vm.conf").write_text("memory = 512\n")
    os.chmod(vm / "vm.conf", 0o640)
    (vm / "nvram").write_bytes(os.urandom(128 << 10))
    os.symlink("disk.img", vm / "current")
    return {"vm.conf": _sha(vm / "vm.conf"), "nvram": _sha(vm / "nvram")}


class Guest:
    """The journaling writer on the disk, and fio verifying its own file, in a loop."""

    def __init__(self, mnt: Path, tmp_path: Path, seed: int) -> None:
        self.disk = mnt / "vm" / "disk.img"
        self.journal = tmp_path / f"journal-{seed}"
        self.writer = subprocess.Popen([sys.executable, journal_writer.__file__,
                                        str(self.disk), str(self.journal), str(seed),
                                        str(NBLOCKS)])
        self.fio_file = mnt / "vm" / "fio.dat"
        self.fio_codes: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._fio = threading.Thread(target=self._fio_loop, daemon=True)
        self._fio.start()

    def _fio_loop(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(
                ["fio", "--name=guest", f"--filename={self.fio_file}", "--size=4M",
                 "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=psync",
                 "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                 "--output-format=terse"], capture_output=True, text=True, timeout=600)
            self.fio_codes.append((done.returncode, done.stderr[-400:]))

    def acked(self) -> int:
        try:
            text = self.journal.read_text()
        except FileNotFoundError:  # the writer has not started yet
            return 0
        return sum(1 for line in text.splitlines() if line.startswith("D "))

    def wait_acked(self, more: int) -> None:
        start = self.acked()
        wait_for(lambda: self.acked() >= start + more or self.writer.poll() is not None,
                 120, f"{more} more acknowledged guest writes")
        assert self.writer.poll() is None, "the guest's writer stopped (a write failed)"

    def stop(self) -> None:
        self._stop.set()
        self._fio.join(600)
        if self.writer.poll() is None:
            self.writer.send_signal(signal.SIGTERM)
        self.writer.wait(60)

    def check(self, disk: Path | None = None) -> int:
        acked, wrong = journal_writer.check(disk or self.disk, self.journal)
        assert wrong == [], f"{len(wrong)} acknowledged writes lost, e.g. at {wrong[:5]}"
        assert self.fio_codes and all(code == 0 for code, _ in self.fio_codes), self.fio_codes
        return acked


def migrate(ds: MountedDatastore, to: str, *extra: str) -> str:
    done = fusedisk("migrate", str(ds.mnt), "vm", "--to", to, *extra, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def placement(ds: MountedDatastore) -> str:
    return str(ds.status()["placement"]["vm"])


def test_local_remote_local_under_a_guest(tmp_path: Path, ds: MountedDatastore) -> None:
    require_tools("fio")
    small = make_vm(ds.mnt)
    guest = Guest(ds.mnt, tmp_path, 1)
    try:
        guest.wait_acked(200)
        assert "relocated vm from near to far" in migrate(ds, "far")
        assert placement(ds) == "far"
        guest.wait_acked(200)  # writes go on against the remote store
        acked_on_far = guest.acked()
        # what the guest sees is what the remote host holds
        remote = ds.stores["far"] / "vm"
        assert sorted(os.listdir(remote)) == sorted(os.listdir(ds.mnt / "vm"))
        assert not (ds.stores["near"] / "vm").exists()
        # status shows the remote store's link and its NBD traffic (the view reports
        # every second)
        wait_for(lambda: ds.status()["remote_stores"]["far"].get("nbd_bytes_written", 0)
                 >= 8 * MiB, 30, "the view's report of the copy's NBD writes")
        far = ds.status()["remote_stores"]["far"]
        assert far["connected"] is True and far["running"] is True, far
        assert far["where"].endswith(str(ds.stores["far"])), far
        shown = fusedisk("status", str(ds.mnt))
        assert "REMOTE" in shown.stdout and "connected" in shown.stdout, shown.stdout
        assert "relocated vm from far to near" in migrate(ds, "near")
        guest.wait_acked(200)
    finally:
        guest.stop()
    acked = guest.check()
    assert acked > acked_on_far
    assert {n: _sha(ds.mnt / "vm" / n) for n in small} == small
    assert oct(os.stat(ds.mnt / "vm" / "vm.conf").st_mode & 0o777) == "0o640"
    assert os.readlink(ds.mnt / "vm" / "current") == "disk.img"
    ds.stop()
    ds.start()
    guest.check()
    assert placement(ds) == "near"
    # the far store keeps nothing of the entry's (its export links went with the files)
    owner = os.stat(ds.stores["far"] / ".fusedisk-owner").st_ino
    assert sorted(os.listdir(ds.stores["far"])) == [
        ".fusedisk-agent-claim", ".fusedisk-owner", f".fusedisk-x{owner}"]


def agent_pids(store: Path) -> list[int]:
    """The agents serving *store*."""
    marker = os.fsencode(str(store))
    return [pid for pid, argv in processes() if marker in argv and b"store-agent" in argv]


def test_the_link_drops_after_the_commit(tmp_path: Path, ds: MountedDatastore) -> None:
    """The agent dies (and nbdkit with it) while the guest writes to the entry on the
    remote store: the view starts both again, the writes resume, nothing is lost."""
    require_tools("fio")
    make_vm(ds.mnt)
    migrate(ds, "far")
    guest = Guest(ds.mnt, tmp_path, 2)
    try:
        guest.wait_acked(100)
        for _ in range(2):
            old = agent_pids(ds.stores["far"])
            assert len(old) == 1, old
            os.kill(old[0], signal.SIGKILL)
            wait_for(lambda old=old: agent_pids(ds.stores["far"]) not in ([], old), 60,
                     "a new agent")
            guest.wait_acked(100)
    finally:
        guest.stop()
    guest.check()
    assert "reconnected" in ds.log()
    wait_for(lambda: ds.status()["remote_stores"]["far"].get("reconnects", 0) >= 2, 30,
             "status to count the reconnects")
    assert ds.status()["health"] == "ok"
    ds.stop()
    ds.start()
    guest.check(ds.stores["far"] / "vm" / "disk.img")


def test_nbdkit_killed_during_the_copy(tmp_path: Path, ds: MountedDatastore) -> None:
    """An NBD connection lost during the copy: the flush before the commit cannot
    vouch for the data, so the relocation fails with the source still the truth
    (or, should the loss not touch the copy, finishes with every byte right)."""
    make_vm(ds.mnt)
    before = _sha(ds.mnt / "vm" / "disk.img")
    done = fusedisk("migrate", str(ds.mnt), "vm", "--to", "far", "--rate", "4M",
                    "--no-wait", timeout=60)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: bool(nbdkits_serving(ds.stores["far"])) and any(
        j["bytes_copied"] > MiB for j in ds.status()["jobs"]), 120, "the copy to start")
    for pid in nbdkits_serving(ds.stores["far"]):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(j["state"] in ("done", "failed") for j in ds.status()["jobs"]),
             300, "the relocation to end")
    job = ds.status()["jobs"][-1]
    print("after nbdkit was killed the relocation", job["state"], job.get("error"))
    if job["state"] == "failed":
        assert placement(ds) == "near"
        assert not (ds.stores["far"] / "vm").exists()
        assert job.get("error"), job
    else:
        assert placement(ds) == "far"
    assert _sha(ds.mnt / "vm" / "disk.img") == before
    ds.stop()
    ds.start()
    assert _sha(ds.mnt / "vm" / "disk.img") == before


def test_kill_9_while_copying_to_the_remote_store(tmp_path: Path,
                                                  ds: MountedDatastore) -> None:
    make_vm(ds.mnt)
    guest = Guest(ds.mnt, tmp_path, 3)
    try:
        guest.wait_acked(100)
        done = fusedisk("migrate", str(ds.mnt), "vm", "--to", "far", "--rate", "4M",
                        "--no-wait", timeout=60)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: any(j["bytes_copied"] > 2 * MiB for j in ds.status()["jobs"]),
                 120, "the copy to get going")
    finally:
        guest.stop()
    ds.kill()
    ds.teardown()  # the view followed its daemon: nothing of it is left
    ds.start()
    wait_for(lambda: all(j["state"] in ("done", "failed") for j in ds.status()["jobs"]),
             300, "the resumed relocation to end")
    assert placement(ds) == "far"
    acked, wrong = journal_writer.check(ds.mnt / "vm" / "disk.img", guest.journal)
    assert acked > 0 and wrong == []


def test_write_errors_of_the_remote_store_fail_the_relocation(tmp_path: Path) -> None:
    """nbdkit's error filter fails writes: the relocation onto the remote store fails
    in one line, the entry stays on its source, whole, and nothing is left on the
    remote store."""
    d = MountedDatastore(tmp_path / "ds", stores=("near", "far"), default_store="near",
                         remote=("far",))
    d.remote_query["far"] = "nbdkit-filter=error&nbdkit-param=error-pwrite-rate=1"
    try:
        d.start()
        make_vm(d.mnt)
        before = _sha(d.mnt / "vm" / "disk.img")
        done = fusedisk("migrate", str(d.mnt), "vm", "--to", "far", timeout=300)
        assert done.returncode == 1, done
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("fusedisk: error: relocation of vm failed: "), done.stderr
        assert placement(d) == "near"
        assert _sha(d.mnt / "vm" / "disk.img") == before
        wait_for(lambda: not (d.stores["far"] / "vm").exists() and not any(
            n.startswith(".fusedisk-reloc") for n in os.listdir(d.stores["far"])), 60,
            "the partial copy to go")
        assert "Traceback" not in d.log()
    finally:
        d.teardown()


def test_an_unreachable_remote_store_is_one_line(tmp_path: Path) -> None:
    d = MountedDatastore(tmp_path / "ds", stores=("near", "far"), default_store="near",
                         remote=("far",))
    d.stores["far"].rmdir()  # the remote directory is not there
    done = fusedisk("mount", str(d.mnt), "--state-dir", str(d.state_dir), "--default-store",
                    "near", "--store", d.store_spec("near"), "--store", d.store_spec("far"))
    try:
        assert done.returncode == 1, done
        assert done.stderr.startswith("fusedisk: error: store 'far'") and \
            done.stderr.count("\n") == 1, done.stderr
        assert "not a directory" in done.stderr
        assert not view_mountpoint(d.mnt, "far").exists()
    finally:
        d.teardown()


def test_over_ssh_with_the_link_cut(tmp_path: Path, ssh_config: Path) -> None:
    """nbd+ssh for real (an sshd per session, tests/test_remote.py's ssh_config): the
    entry goes to the remote store and back under the guest's writes, and the ssh
    session is cut while the entry lives there (the agent dies with it): the view
    logs in again and the guest's writes go on."""
    d = MountedDatastore(tmp_path / "ds", stores=("near", "far"), default_store="near",
                         remote=("far",))
    fusedisk_bin = Path(sys.executable).parent / "fusedisk"
    d.remote_spec["far"] = (f"nbd+ssh://127.0.0.1{d.stores['far']}?tls-psk={d.psk}"
                            f"&nbd-port=0&ssh-config={ssh_config}"
                            f"&agent={fusedisk_bin}%20store-agent")
    guest = None
    try:
        d.start()
        make_vm(d.mnt)
        guest = Guest(d.mnt, tmp_path, 4)
        guest.wait_acked(100)
        migrate(d, "far")
        assert placement(d) == "far"
        guest.wait_acked(100)
        sessions = _sshd_sessions(d.stores["far"])
        assert sessions, "no sshd session carries the agent"
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: d.status()["remote_stores"]["far"].get("reconnects", 0) >= 1, 60,
                 "the view to log in again")
        guest.wait_acked(100)
        migrate(d, "near")
        guest.wait_acked(50)
        guest.stop()
        guest.check()
    finally:
        if guest is not None:
            guest.stop()
        d.teardown()


def _sshd_sessions(store: Path) -> list[int]:
    """The sshd processes the agents of *store* run under (their parents)."""
    found = []
    for pid in agent_pids(store):
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("PPid:"))
        if Path(f"/proc/{ppid}/comm").read_text().strip().startswith("sshd"):
            found.append(ppid)
    return found


def test_cleanup_after_the_daemon_and_its_view_were_killed(tmp_path: Path,
                                                           ds: MountedDatastore) -> None:
    make_vm(ds.mnt)
    migrate(ds, "far")
    before = _sha(ds.mnt / "vm" / "disk.img")
    view = view_mountpoint(ds.mnt, "far")
    view_pid = ds.status()["remote_stores"]["far"]["view_pid"]
    os.kill(view_pid, signal.SIGKILL)  # first: a daemon killed first takes its view along
    ds.kill()
    with pytest.raises(OSError):
        os.statvfs(view)  # a dead mount is left behind
    done = fusedisk("cleanup", str(ds.mnt))
    assert done.returncode == 0, done.stderr
    assert "1 dead remote-store view" in done.stdout, done.stdout
    assert not view.exists()
    ds.start()
    assert _sha(ds.mnt / "vm" / "disk.img") == before


def test_a_second_datastore_is_refused_by_the_remote_host(tmp_path: Path,
                                                         ds: MountedDatastore) -> None:
    """The owner file's lock is a flock on the view, which only this host sees; the
    store's agent holds the claim on the remote host (agent.py ``Agent._claim``)."""
    small = make_vm(ds.mnt)
    assert "relocated vm from near to far" in migrate(ds, "far")
    status = ds.status()
    other = MountedDatastore(tmp_path / "other", stores=("near", "far"), default_store="near",
                             remote=("far",))
    other.stores["far"], other.psk = ds.stores["far"], ds.psk

    def refused() -> str:
        try:
            done = fusedisk("mount", str(other.mnt), "--state-dir", str(other.state_dir),
                            "--default-store", "near", "--store", other.store_spec("near"),
                            "--store", other.store_spec("far"))
        finally:
            # not other.teardown(): it ends every process serving the shared directory
            if is_mounted(other.mnt):
                fusedisk("umount", str(other.mnt))
            force_unmount(other.mnt)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done
        assert "Traceback" not in done.stderr
        return done.stderr

    line = refused()
    assert line.startswith("fusedisk: error: store 'far' on local: "), line
    assert f"{ds.stores['far']} is in use by another fusedisk datastore" in line, line
    assert f"datastore {status['datastore_id']}" in line, line
    assert f"state directory {ds.state_dir}, mounted on {ds.mnt}" in line, line
    assert not view_mountpoint(other.mnt, "far").exists()
    assert not other.state_dir.exists()
    # the first one goes on: its files, and new writes, on the remote store
    assert {n: _sha(ds.mnt / "vm" / n) for n in small} == small
    (ds.mnt / "vm" / "after").write_bytes(b"still mine")
    assert (ds.stores["far"] / "vm" / "after").read_bytes() == b"still mine"
    assert ".fusedisk-agent-claim" not in os.listdir(view_mountpoint(ds.mnt, "far"))
    ds.stop()
    # with the first one stopped its view's claim is gone, and its owner record (its
    # state directory still lists the store) refuses the other datastore
    line = refused()
    assert f"belongs to the datastore whose state directory is {ds.state_dir}" in line, line
    assert f"delete local:{ds.stores['far']}/.fusedisk-owner" in line, line
    ds.start()
    assert (ds.mnt / "vm" / "after").read_bytes() == b"still mine"
