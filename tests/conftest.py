"""Fixtures shared by the tests: a real mounted datastore that always goes away."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mounting import MountedDatastore, is_mounted
from .test_remote import Site, stop_nbdkits

# Problems a daemon may log that are never expected in a test that passed.
_LOG_BUGS = ("Traceback", " ERROR ", " CRITICAL ")


def require_tools(*tools: str) -> None:
    """Fail the test when a tool that the README's setup installs is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run the README's test command, which installs them")


@pytest.fixture
def datastore(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MountedDatastore]:
    """A mounted datastore (stores a, b; default a) with a clean teardown.

    Fails the test if the daemon logged a traceback or an error that the test
    did not declare with ``@pytest.mark.daemon_errors``.
    """
    marker = request.node.get_closest_marker("datastore_args")
    args = list(marker.args) if marker else []
    ds = MountedDatastore(tmp_path, extra_args=args)
    try:
        ds.start()
        yield ds
    finally:
        ds.teardown()
    if request.node.get_closest_marker("daemon_errors") is None:
        log = ds.log()
        bad = [line for line in log.splitlines() if any(b in line for b in _LOG_BUGS)]
        assert not bad, "daemon logged errors:\n" + "\n".join(bad)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "datastore_args(*args): extra `fusedisk mount` flags")
    config.addinivalue_line("markers", "daemon_errors: the daemon is expected to log errors")


class XfsStore:
    """A loop-mounted XFS filesystem (with reflinks) as a store directory."""

    def __init__(self, image: Path, path: Path) -> None:
        self.image, self.path = image, path
        self.loop = ""

    def set_up(self) -> None:
        require_tools("mkfs.xfs", "losetup")
        with open(self.image, "wb") as f:
            f.truncate(512 << 20)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(self.image)], check=True)
        self.loop = subprocess.run(["losetup", "-f", "--show", str(self.image)], check=True,
                                   capture_output=True, text=True).stdout.strip()
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", self.loop, str(self.path)], check=True)

    def tear_down(self) -> None:
        if is_mounted(self.path):
            subprocess.run(["umount", str(self.path)], check=False)
        if is_mounted(self.path):
            subprocess.run(["umount", "-l", str(self.path)], check=False)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)


@pytest.fixture
def xds(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MountedDatastore]:
    """Stores x (loop-mounted XFS: reflink snapshots) and a (ext4: copy-before-write);
    new entries go to the one the test's indirect parameter names (default x)."""
    default = getattr(request, "param", "x")
    datastore = MountedDatastore(tmp_path, stores=("x", "a"), default_store=default)
    xfs = XfsStore(tmp_path / "x.img", datastore.stores["x"])
    try:
        xfs.set_up()
        datastore.start()
        yield datastore
    finally:
        datastore.teardown()
        xfs.tear_down()
    log = datastore.log()
    assert not any(bug in log for bug in _LOG_BUGS), log


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    """An ssh client configuration that reaches a real sshd for host 127.0.0.1.

    The sshd runs in inetd mode as the client's ProxyCommand (``sshd -i``): a
    real ssh session with its own host key and an authorized key made here,
    no port, no daemon to leave behind.
    """
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
        pytest.fail("openssh-server and openssh-client are needed (scripts/setup installs them)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("hostkey", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True, timeout=60)
    shutil.copy(keys / "id.pub", keys / "authorized_keys")
    (keys / "sshd_config").write_text(
        f"HostKey {keys}/hostkey\nAuthorizedKeysFile {keys}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\nPidFile none\n"
        "LogLevel ERROR\n")
    config = keys / "ssh_config"
    config.write_text(
        f"Host 127.0.0.1\n  ProxyCommand /usr/sbin/sshd -i -f {keys}/sshd_config\n"
        f"  User root\n  IdentityFile {keys}/id\n  IdentitiesOnly yes\n"
        "  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  LogLevel ERROR\n")
    return config


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A remote store's directory and key file (tests/test_remote.py's Site); every
    nbdkit serving it must be gone at the end."""
    s = Site(tmp_path)
    try:
        yield s
    finally:
        assert stop_nbdkits(s.dir) == [], "an nbdkit outlived its agent"
