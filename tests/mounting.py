"""Run a real fusedisk daemon in a subprocess, and always take it down again.

:class:`MountedDatastore` starts ``python -m fusedisk mount --foreground``
with a ready pipe, so "mounted" is a fact when :meth:`start` returns. Its
:meth:`teardown` never raises and never leaves a mount behind: clean
unmount first, then a lazy detach and SIGKILL when that does not work
in time. Tests never touch the mount from a thread of the daemon (it runs
in another process), so nothing here can deadlock on the FUSE loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusedisk import mountinfo
from fusedisk.datastore import OWNER_NAME
from fusedisk.storeviews import view_mountpoint

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def is_mounted(path: Path) -> bool:
    return mountinfo.is_mounted(path)


def store_names(path: Path) -> list[str]:
    """What a store directory holds besides its owner record (which every store
    a datastore has claimed carries, mounted or not), sorted."""
    return sorted(name for name in os.listdir(path) if name != OWNER_NAME)


def force_unmount(path: Path) -> None:
    """Detach whatever is mounted on *path* (lazy, so a hung daemon cannot block it)."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, check=False, capture_output=True)


def fusedisk(
    *args: str, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``fusedisk`` command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "fusedisk", *args],
        capture_output=True, text=True, check=check, timeout=timeout,
    )


class MountedDatastore:
    """A datastore with stores ``a`` and ``b`` (by default) under *root*."""

    def __init__(
        self,
        root: Path,
        stores: Sequence[str] = ("a", "b"),
        default_store: str = "a",
        extra_args: Sequence[str] = (),
        nofile: int | None = None,
        remote: Sequence[str] = (),
    ) -> None:
        self.root = root
        #: stores served as remote stores (``nbd+local://``: the agent and nbdkit run
        #: here, and the store's directory below is the "remote host's" directory)
        self.remote = tuple(remote)
        #: more spec options of a remote store (e.g. an nbdkit filter), by store name
        self.remote_query: dict[str, str] = {}
        #: a remote store's whole spec instead of nbd+local (e.g. nbd+ssh), by store name
        self.remote_spec: dict[str, str] = {}
        #: the daemon's RLIMIT_NOFILE (soft and hard), None: inherited
        self.nofile = nofile
        self.mnt = root / "mnt"
        self.state_dir = root / "state"
        self.stores = {name: root / "stores" / name for name in stores}
        self.default_store = default_store
        self.extra_args = list(extra_args)
        self.log_path = root / "daemon.log"
        #: added to the daemon's environment at every start (e.g. a stall point)
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.mnt.mkdir(parents=True, exist_ok=True)
        for path in self.stores.values():
            path.mkdir(parents=True, exist_ok=True)
        self.psk = root / "nbd.psk"
        if self.remote and not self.psk.exists():
            self.psk.write_text(f"fusedisk:{secrets.token_hex(32)}\n")
            os.chmod(self.psk, 0o600)

    def store_spec(self, name: str) -> str:
        """What ``--store`` says for store *name*."""
        path = self.stores[name]
        if name in self.remote_spec:
            return f"{name}={self.remote_spec[name]}"
        if name in self.remote:
            extra = self.remote_query.get(name, "")
            return f"{name}=nbd+local://{path}?tls-psk={self.psk}" + (f"&{extra}" if extra
                                                                        else "")
        return f"{name}={path}"

    # -- life cycle --------------------------------------------------------------

    def argv(self, ready_fd: int | None = None) -> list[str]:
        argv = [sys.executable, "-m", "fusedisk", "mount", "--foreground", str(self.mnt),
                "--state-dir", str(self.state_dir), "--default-store", self.default_store]
        for name in self.stores:
            argv += ["--store", self.store_spec(name)]
        if ready_fd is not None:
            argv += ["--ready-fd", str(ready_fd)]
        return argv + self.extra_args

    def start(self, env: dict[str, str] | None = None) -> MountedDatastore:
        """Mount; *env* adds to the daemon's environment (e.g. a failpoint)."""
        read_end, write_end = os.pipe()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(write_end), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                pass_fds=(write_end,), env={**os.environ, **self.env, **(env or {})},
                preexec_fn=self._limit_fds if self.nofile is not None else None,
            )
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], READY_TIMEOUT_S)
            answer = os.read(read_end, 4096).decode().strip() if ready else ""
        finally:
            os.close(read_end)
        if answer != "OK":
            self.teardown()
            raise RuntimeError(f"daemon did not come up ({answer!r}); log:\n{self.log()}")
        return self

    def _limit_fds(self) -> None:
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def stop(self) -> int:
        """Unmount cleanly the way an operator does; return the daemon's exit code."""
        assert self.proc is not None
        result = fusedisk("umount", str(self.mnt), timeout=STOP_TIMEOUT_S)
        assert result.returncode == 0, result.stderr
        code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would; the dead mount stays behind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for a daemon that ends by itself (a failpoint); the dead mount stays."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout_s)
        self.proc = None
        return code

    def teardown(self) -> None:
        """Never raises; leaves no mount and no daemon behind."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            if is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False,
                               capture_output=True, timeout=STOP_TIMEOUT_S)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(self.mnt)
        self.end_views()

    def end_views(self) -> None:
        """Wait for the remote stores' views to go (they follow a dead daemon), then make
        sure: kill what is left of them and of their agents and nbdkits, by pid."""
        for name in self.remote:
            view = view_mountpoint(self.mnt, name)
            marker = os.fsencode(str(self.stores[name]))
            deadline = time.monotonic() + 30
            while True:
                left = [pid for pid, argv in processes()
                        if any(marker in arg for arg in argv)]
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            force_unmount(view)
            with contextlib.suppress(OSError):
                view.rmdir()


    # -- helpers -------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return fusedisk(*args)

    def status(self) -> dict[str, Any]:
        result = fusedisk("status", str(self.mnt), "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def processes() -> list[tuple[int, list[bytes]]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            out.append((int(entry), argv))
    return out
