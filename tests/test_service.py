"""The systemd side: the unit file, install-service, sd_notify, ExecStart and ExecStopPost."""

from __future__ import annotations

import errno
import os
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusedisk import config, daemon, service
from fusedisk.control import socket_path
from fusedisk.errors import FusediskError

from .conftest import require_tools
from .mounting import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    MountedDatastore,
    force_unmount,
    fusedisk,
    is_mounted,
)

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "fusedisk@.service"
EXAMPLE = REPO / "systemd" / "example.toml"

#: Unit settings that give the service a mount namespace of its own, in which
#: the FUSE mount would be invisible to the hypervisor (systemd.exec(5), MountFlags=).
MOUNT_NAMESPACE_SETTINGS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "PrivateNetwork", "PrivateIPC", "PrivateUsers", "MountFlags",
    "RootDirectory", "RootImage", "MountAPIVFS", "StateDirectory", "CacheDirectory",
    "LogsDirectory", "DynamicUser",
}


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Section → key → values of a unit file (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings[key]
    assert len(values) == 1, f"{key} given {len(values)} times"
    return values[0]


# -- the unit file --------------------------------------------------------------------


def test_unit_is_a_notify_service_that_can_mount_on_the_host() -> None:
    sections = unit_settings(UNIT.read_text())
    svc = sections["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "KillMode") == "mixed"
    assert one(svc, "ExecStart") == (
        "/usr/local/bin/fusedisk mount --foreground --config /etc/fusedisk/%i.toml"
    )
    # The clean-up after a dead daemon must never fail the unit.
    assert one(svc, "ExecStopPost").startswith("-/usr/local/bin/fusedisk cleanup --config ")
    caps = set(one(svc, "CapabilityBoundingSet").split())
    assert "CAP_SYS_ADMIN" in caps  # mount(2)
    assert not caps & {"CAP_NET_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_SYS_TIME"}
    assert one(svc, "DevicePolicy") == "closed"
    assert "/dev/fuse rw" in svc["DeviceAllow"]
    assert one(svc, "NoNewPrivileges") == "yes"
    # A private mount namespace would hide the datastore from the hypervisor.
    assert not MOUNT_NAMESPACE_SETTINGS & set(svc), "unit would mount in a private namespace"
    assert one(sections["Install"], "WantedBy") == "multi-user.target"


def test_systemd_analyze_verify_accepts_the_installed_unit(tmp_path: Path) -> None:
    require_tools("systemd-analyze")
    result = fusedisk("install-service", "--prefix", str(tmp_path))
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "systemd" / "system" / "fusedisk@.service"
    # The installed unit is the source unit with only its two paths replaced.
    executable = service.fusedisk_executable()
    assert installed.read_text() == service.render_unit(
        UNIT.read_text(), executable, tmp_path / "fusedisk")
    assert f"ExecStart={executable} mount --foreground --config {tmp_path}/fusedisk/%i.toml" \
        in installed.read_text()

    verify = subprocess.run(["systemd-analyze", "verify", str(installed)],
                            capture_output=True, text=True, timeout=120)
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines()
                  if "fusedisk" in line]
    assert verify.returncode == 0, verify.stderr
    assert complaints == []

    # The verifier is not a rubber stamp: the same unit with a bad value and a
    # bad key draws complaints.
    broken = tmp_path / "broken@.service"
    broken.write_text(installed.read_text().replace("Type=notify", "Type=notifyy\nFrobnicate=1"))
    verify = subprocess.run(["systemd-analyze", "verify", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert "Frobnicate" in verify.stderr and "notifyy" in verify.stderr


def test_systemd_analyze_verify_checks_the_executable(tmp_path: Path) -> None:
    """The source unit names /usr/local/bin/fusedisk; verify fails if that is missing,
    which is why install-service writes the real path in."""
    require_tools("systemd-analyze")
    unit = tmp_path / "fusedisk@.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/fusedisk",
                                             str(tmp_path / "no-such-fusedisk")))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode != 0
    assert "no-such-fusedisk" in verify.stderr


# -- install-service --------------------------------------------------------------------


def test_install_service_keeps_an_edited_sample_and_replaces_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "systemd" / "system" / "fusedisk@.service"
    sample = tmp_path / "fusedisk" / "example.toml.sample"
    first = fusedisk("install-service", "--prefix", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert f"installed {unit}" in first.stdout and f"installed {sample}" in first.stdout
    assert "no daemon-reload" in first.stdout  # PID 1 is not systemd in the tests
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert sample.read_text() == EXAMPLE.read_text()

    sample.write_text("# edited by the operator\n")
    unit.write_text("stale")
    second = fusedisk("install-service", "--prefix", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert f"kept {sample}" in second.stdout
    assert sample.read_text() == "# edited by the operator\n"
    assert unit.read_text().startswith("# fusedisk datastore")
    assert sorted(p.name for p in unit.parent.iterdir()) == ["fusedisk@.service"]


def test_install_service_error_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = fusedisk("install-service", "--prefix", str(not_a_dir))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"fusedisk: error: cannot write {not_a_dir}/systemd/system/fusedisk@.service: "
        "Not a directory"
    ]


def test_render_unit_refuses_paths_systemd_would_misread(tmp_path: Path) -> None:
    template = UNIT.read_text()
    for bad in (Path("/opt/my venv/bin/fusedisk"), Path("/opt/100%/fusedisk"),
                Path("relative/fusedisk")):
        with pytest.raises(FusediskError, match="cannot be written into a unit file"):
            service.render_unit(template, bad, tmp_path)


# -- the example configuration ------------------------------------------------------------


def test_example_config_documents_every_key_and_is_valid() -> None:
    raw = config.load_file(EXAMPLE)
    assert set(raw) == config._KNOWN_KEYS
    # Every top-level key and the [stores] table sit right below their comment.
    lines = EXAMPLE.read_text().splitlines()
    documented = {lines[i].split("=")[0].strip().strip("[]")
                  for i in range(1, len(lines)) if lines[i - 1].startswith("#")
                  and lines[i] and not lines[i].startswith("#")}
    assert documented == config._KNOWN_KEYS
    built = config.build_config(config_file=EXAMPLE, mountpoint=None, stores=[],
                                default_store=None, state_dir=None, block_size=None,
                                allow_other=None)
    assert built.default_store in built.stores
    assert built.block_size == 64 << 10


# -- sd_notify ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setattr(daemon, "_last_status", None)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            return messages


def test_notify_status_is_one_line_and_sent_once_per_change(notify_socket: socket.socket) -> None:
    daemon.notify_status("copying web01:\n 40%")
    daemon.notify_status("copying web01: 40%")
    daemon.notify_status("copying web01: 41%")
    assert drain(notify_socket) == ["STATUS=copying web01: 40%", "STATUS=copying web01: 41%"]


def test_notify_status_never_blocks_when_nobody_reads(notify_socket: socket.socket) -> None:
    """A datagram queue holds a handful of messages; status updates beyond it are dropped."""
    for percent in range(1000):
        daemon.notify_status(f"copying web01: {percent / 10:.1f}%")
    received = drain(notify_socket)
    assert 1 <= len(received) < 1000
    assert received[0] == "STATUS=copying web01: 0.0%"


# -- ExecStart under a notify socket, as systemd runs it -------------------------------------------


def exec_start_argv(config_dir: Path, instance: str) -> list[str]:
    """The unit's ExecStart for *instance*, with its binary replaced by this interpreter."""
    exec_start = one(unit_settings(UNIT.read_text())["Service"], "ExecStart")
    argv = shlex.split(exec_start.replace("%i", instance))
    assert argv[0] == service.UNIT_EXECUTABLE
    argv = [sys.executable, "-m", "fusedisk", *argv[1:]]
    config_arg = argv.index("--config") + 1
    assert argv[config_arg] == f"/etc/fusedisk/{instance}.toml"
    argv[config_arg] = str(config_dir / f"{instance}.toml")
    return argv


def receive(sock: socket.socket, proc: subprocess.Popen[bytes], until: str) -> list[str]:
    """Notify messages, split into assignments, up to and including *until*."""
    got: list[str] = []
    while until not in got:
        ready, _, _ = select.select([sock], [], [], READY_TIMEOUT_S)
        if not ready:
            raise AssertionError(f"no {until} within {READY_TIMEOUT_S}s (exit {proc.poll()}); "
                                 f"got {got}")
        got += sock.recv(4096).decode().splitlines()
    return got


def receive_matching(
    sock: socket.socket, proc: subprocess.Popen[bytes], prefix: str, needle: str
) -> str:
    """The first notify assignment that starts with *prefix* and contains *needle*."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            for line in sock.recv(4096).decode().splitlines():
                if line.startswith(prefix) and needle in line:
                    return line
    raise AssertionError(f"no {prefix}...{needle} within {READY_TIMEOUT_S}s (exit {proc.poll()})")


def test_exec_start_notifies_ready_status_and_stopping(tmp_path: Path) -> None:
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    ssd, hdd = tmp_path / "srv" / "ssd", tmp_path / "srv" / "hdd"
    for d in (mnt, ssd, hdd):
        d.mkdir(parents=True)
    config_dir = tmp_path / "etc" / "fusedisk"
    config_dir.mkdir(parents=True)
    (config_dir / "ds1.toml").write_text(
        f'mountpoint = "{mnt}"\nstate_dir = "{state}"\ndefault_store = "ssd"\n'
        f'block_size = "128K"\nallow_other = true\n[stores]\nssd = "{ssd}"\nhdd = "{hdd}"\n'
    )
    tomllib.loads((config_dir / "ds1.toml").read_text())
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), INVOCATION_ID="0" * 32)
    log_path = tmp_path / "daemon.log"
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(exec_start_argv(config_dir, "ds1"), env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        before_ready = receive(notify, proc, "READY=1")
        # At the moment READY=1 arrives the mount answers and the control socket listens.
        assert is_mounted(mnt)
        assert os.stat(mnt).st_dev != os.stat(tmp_path).st_dev
        (mnt / "vm1").mkdir()
        assert (ssd / "vm1").is_dir()
        status = fusedisk("status", str(mnt), "--json")
        assert status.returncode == 0, status.stderr
        assert '"block_size": 131072' in status.stdout
        assert [m for m in before_ready if m != "READY=1"] == []

        after_ready = receive(notify, proc, f"STATUS=serving 0 entries on {mnt}")
        assert "STOPPING=1" not in after_ready

        # A relocation shows its progress in STATUS=; stopping suspends it while it
        # copies (the next start resumes it).
        with open(mnt / "vm1" / "disk.img", "wb") as f:
            f.write(os.urandom(8 << 20))
        started = fusedisk("migrate", str(mnt), "vm1", "--to", "hdd", "--rate", "1M",
                           "--no-wait")
        assert started.returncode == 0, started.stderr
        progress = receive_matching(notify, proc, "STATUS=serving 1 entry", "relocating vm1")
        assert "ssd->hdd: copying" in progress

        proc.send_signal(signal.SIGTERM)
        stopping = receive(notify, proc, "STOPPING=1")
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
        stopping += drain(notify)
        assert f"STATUS=unmounting {mnt}" in stopping
        assert stopping.count("STOPPING=1") == 1
        assert not is_mounted(mnt)
        assert not socket_path(mnt).exists()
        assert (ssd / "vm1" / "disk.img").stat().st_size == 8 << 20  # the source stays
        # the partial copy stays for the next start to resume; the store's owner
        # file stays too (it names this datastore)
        assert {p.name for p in hdd.iterdir()} <= {".fusedisk-owner", ".fusedisk-reloc-vm1"}
        assert "suspended; the next mount resumes it" in log_path.read_text()
        # Under systemd every log line carries a syslog priority for journald.
        lines = log_path.read_text().splitlines()
        assert lines and all(line.startswith(("<6>", "<7>")) for line in lines), lines
        assert any("SIGTERM received" in line for line in lines)
        assert "Traceback" not in log_path.read_text()
    finally:
        notify.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def test_exec_start_failure_reports_no_ready(tmp_path: Path) -> None:
    """A config error ends ExecStart with a one-line message and exit 1, never READY=1."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "bad.toml").write_text('mountpoint = "/nonexistent"\nstores = 5\n')
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    try:
        result = subprocess.run(exec_start_argv(config_dir, "bad"), capture_output=True,
                                text=True, timeout=60,
                                env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")))
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"fusedisk: error: {config_dir}/bad.toml: [stores] must be a table of "
            'name = "directory"'
        ]
        assert drain(notify) == []
    finally:
        notify.close()


# -- ExecStopPost: fusedisk cleanup ---------------------------------------------------------------


def test_cleanup_detaches_only_a_dead_fusedisk_mount(tmp_path: Path) -> None:
    ds = MountedDatastore(tmp_path)
    config_file = tmp_path / "ds.toml"
    config_file.write_text(f'mountpoint = "{ds.mnt}"\n')
    try:
        ds.start()
        (ds.mnt / "vm1").mkdir()
        alive = fusedisk("cleanup", "--config", str(config_file))
        assert alive.returncode == 0, alive.stderr
        assert "served by a running fusedisk daemon, left alone" in alive.stdout
        assert (ds.mnt / "vm1").is_dir()

        ds.kill()
        assert is_mounted(ds.mnt)
        with pytest.raises(OSError) as dead:
            os.statvfs(ds.mnt)  # stat() may still answer from the kernel's attribute cache
        assert dead.value.errno == errno.ENOTCONN
        detached = fusedisk("cleanup", "--config", str(config_file))
        assert detached.returncode == 0, detached.stderr
        assert "detached the mount its dead daemon left behind" in detached.stdout
        assert not is_mounted(ds.mnt)

        again = fusedisk("cleanup", str(ds.mnt))
        assert again.returncode == 0
        assert "nothing mounted" in again.stdout
    finally:
        ds.teardown()


def test_restart_right_after_a_crash_takes_over_the_dead_mount(tmp_path: Path) -> None:
    """Restart=on-failure: the next daemon detaches what the killed one left and serves."""
    first = MountedDatastore(tmp_path)
    second = MountedDatastore(tmp_path)
    try:
        first.start()
        (first.mnt / "vm1").mkdir()
        os.stat(first.mnt)  # the root's attributes are now in the kernel's cache
        first.kill()
        second.start()
        assert os.listdir(second.mnt) == ["vm1"]
        assert "detaching the dead fusedisk mount" in second.log()
        assert second.stop() == 0
        assert not is_mounted(second.mnt)
    finally:
        first.teardown()
        second.teardown()


def test_cleanup_leaves_other_filesystems_alone(tmp_path: Path) -> None:
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fusedisk-test", str(target)], check=True)
    try:
        (target / "keep").write_text("x")
        result = fusedisk("cleanup", str(target))
        assert result.returncode == 0, result.stderr
        assert "a tmpfs mount, left alone" in result.stdout
        assert (target / "keep").read_text() == "x"
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_cleanup_without_a_target_is_a_one_line_error() -> None:
    result = fusedisk("cleanup")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "fusedisk: error: cleanup needs MOUNTPOINT or --config FILE"]
