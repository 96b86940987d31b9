"""The daemon's remote stores: one ``fusedisk store-view`` process each, mounted as a directory.

At start the daemon runs a view (storeview.py) for every remote store of its
configuration, on a mount point of its own under the run directory (never
inside the state directory: nothing that cleans up there may walk into a
remote store), and from then on uses that directory like any local store.
The view process is the daemon's child in all but name:

- it answers ``ready`` on a pipe once it is mounted, or ``ERR <one line>``
  (an unreachable host, another version, a bad key: what ``store-check``
  says), which the daemon turns into the mount's one-line error;
- it holds the read end of a second pipe whose write end only the daemon
  has: when the daemon ends, even by ``kill -9``, the view sees EOF,
  unmounts and exits (its agent then gets EOF and stops nbdkit);
- the daemon stops it after its own mount is gone and every descriptor
  into the view is closed (close the pipe, wait, SIGKILL and a lazy
  unmount if it does not go).

A view that dies while the daemon serves leaves its mount dead (ENOTCONN):
the entries on that store then fail with EIO, as on a local disk that went
away, and the daemon logs it; a remount starts a new view.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .remote import RemoteError, RemoteSpec

log = logging.getLogger(__name__)

#: How long a view may take to mount (the agent over ssh, nbdkit, the TLS handshake).
START_TIMEOUT_S = 120.0
#: How long a view may take to unmount and exit once asked.
STOP_TIMEOUT_S = 30.0


def views_dir() -> Path:
    from .control import RUN_DIR  # the run directory's one definition

    return RUN_DIR / "stores"


def view_mountpoint(mountpoint: Path, name: str) -> Path:
    """Where the view of store *name* of the datastore on *mountpoint* is mounted."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:20]
    return views_dir() / f"{digest}-{name}"


def detach_dead_views(mountpoint: Path) -> list[Path]:
    """Detach the views of the datastore on *mountpoint* whose process is gone (a view
    killed with its daemon, say, leaves a dead mount); the ones detached."""
    prefix = view_mountpoint(mountpoint, "").name
    done = []
    try:
        # no is_dir(): a dead mount answers stat with ENOTCONN
        candidates = sorted(p for p in views_dir().iterdir()
                            if p.name.startswith(prefix) and not p.name.endswith(".json"))
    except OSError:
        return []
    for path in candidates:
        try:
            os.statvfs(path)
            continue  # a live view, or a plain directory
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                continue
        subprocess.run(["fusermount3", "-uz", str(path)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        with contextlib.suppress(OSError):
            path.rmdir()
        done.append(path)
    return done


@dataclass(slots=True)
class _View:
    name: str
    spec: RemoteSpec
    path: Path
    proc: subprocess.Popen[bytes]
    watch_w: int  #: the write end the view watches (-1 once closed)


class StoreViews:
    """The views of one daemon's remote stores."""

    def __init__(self, mountpoint: Path, owner: str = "", owner_note: str = "") -> None:
        self.mountpoint = mountpoint
        #: the datastore id each view claims its store for (agent.py ``Agent._claim``)
        self.owner = owner
        self.owner_note = owner_note
        self._views: dict[str, _View] = {}

    async def start(self, specs: dict[str, RemoteSpec]) -> dict[str, Path]:
        """Mount a view of every remote store; their directories by store name.

        RemoteError (one line, the view's own) if one cannot start; the views
        already started are stopped again before it is raised.
        """
        try:
            for name in sorted(specs):
                self._views[name] = await trio.to_thread.run_sync(self._start_one, name,
                                                                  specs[name])
        except BaseException:
            self.stop()
            raise
        return {name: view.path for name, view in self._views.items()}

    def _start_one(self, name: str, spec: RemoteSpec) -> _View:
        path = view_mountpoint(self.mountpoint, name)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        ready_r, ready_w = os.pipe()
        watch_r, watch_w = os.pipe()
        status = self._status_file(path)
        with contextlib.suppress(FileNotFoundError):
            status.unlink()
        argv = [sys.executable, "-m", "fusedisk", "store-view", f"{name}={spec.text}",
                str(path), "--ready-fd", str(ready_w), "--watch-fd", str(watch_r),
                "--status-file", str(status)]
        if self.owner:
            argv += ["--owner", self.owner, "--owner-note", self.owner_note]
        try:
            # stderr: the daemon's log; no new session: a signal to the daemon's group
            # (a terminal's ^C in the foreground) reaches the view too, which unmounts
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(ready_w, watch_r),
                                    cwd="/")  # python -m: never a checkout in the cwd
        except OSError as e:
            for fd in (ready_r, ready_w, watch_r, watch_w):
                os.close(fd)
            raise RemoteError(f"store {name!r}: cannot run its view ({e.strerror})") from None
        os.close(ready_w)
        os.close(watch_r)
        view = _View(name, spec, path, proc, watch_w)
        with os.fdopen(ready_r, "rb") as ready:
            answer = _read_line(ready, START_TIMEOUT_S).decode(errors="replace").strip()
        if answer == "ready":
            log.info("store %r: %s mounted on %s (view pid %d)", name, spec.where, path,
                     proc.pid)
            return view
        self._stop_one(view)
        if answer.startswith("ERR "):
            raise RemoteError(answer[4:])
        raise RemoteError(f"store {name!r}: its view exited (code {proc.returncode}) before "
                          "mounting; see the daemon's log")

    def stop(self) -> None:
        """Unmount and end every view (blocking; at the daemon's end)."""
        views, self._views = self._views, {}
        for view in views.values():
            self._stop_one(view)

    def _stop_one(self, view: _View) -> None:
        if view.watch_w >= 0:
            os.close(view.watch_w)  # EOF: the view unmounts and exits
            view.watch_w = -1
        try:
            code = view.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("store %r: its view (pid %d) did not exit within %g s; killed",
                      view.name, view.proc.pid, STOP_TIMEOUT_S)
            view.proc.send_signal(signal.SIGKILL)
            code = view.proc.wait()
        if code not in (0, None):
            log.warning("store %r: its view exited with code %s", view.name, code)
        # a view that was killed leaves its mount behind
        subprocess.run(["fusermount3", "-uz", str(view.path)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        with contextlib.suppress(OSError):
            view.path.rmdir()
        with contextlib.suppress(OSError):
            self._status_file(view.path).unlink()

    @staticmethod
    def _status_file(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def lost(self) -> list[str]:
        """The stores whose view has exited while the daemon serves (their entries fail)."""
        return sorted(name for name, view in self._views.items() if view.proc.poll() is not None)

    def statistics(self) -> dict[str, Any]:
        """Each remote store: where it is, its view, and what the view last reported
        (connected, reconnects, agent latency, NBD traffic; ``report_age_s``)."""
        out: dict[str, Any] = {}
        for name, view in sorted(self._views.items()):
            info: dict[str, Any] = {"where": f"{view.spec.where}:{view.spec.directory}",
                                    "view": str(view.path), "view_pid": view.proc.pid,
                                    "running": view.proc.poll() is None}
            try:
                reported = json.loads(self._status_file(view.path).read_text())
            except (OSError, ValueError):
                reported = None
            if isinstance(reported, dict):
                info.update({k: v for k, v in reported.items()
                             if k not in ("store", "where", "pid", "updated")})
                info["report_age_s"] = round(time.time() - float(reported.get("updated", 0)), 1)
            out[name] = info
        return out


def _read_line(stream: Any, timeout_s: float) -> bytes:
    """One line from a pipe, or b"" at EOF or after *timeout_s*."""
    fd = stream.fileno()
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return b""
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
    return buffer.partition(b"\n")[0]
