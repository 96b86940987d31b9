"""Running under systemd: installing the unit, and the clean-up after a dead daemon.

``fusedisk install-service`` copies ``systemd/fusedisk@.service`` into
``PREFIX/systemd/system/`` with its commands pointed at the absolute path
of the fusedisk executable that runs the installation (so a virtualenv
works and nothing is written outside PREFIX), and the commented example
configuration to ``PREFIX/fusedisk/example.toml.sample`` unless one is there.

``fusedisk cleanup`` is the unit's ``ExecStopPost=``: when the daemon died
(SIGKILL, OOM killer), its mount stays behind, dead ("Transport endpoint is
not connected"); it is detached — but only a *fusedisk* mount that no live
daemon serves, never another filesystem or a working datastore.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from . import control
from .config import load_file
from .daemon import FSNAME, detach_dead_mount
from .errors import ConfigError, FusediskError, MountError
from .mountinfo import fstype_at

UNIT_NAME = "fusedisk@.service"
EXAMPLE_NAME = "example.toml"
#: What the unit file in the source tree says; install-service replaces both.
UNIT_EXECUTABLE = "/usr/local/bin/fusedisk"
UNIT_CONFIG_DIR = "/etc/fusedisk"
DEFAULT_PREFIX = Path("/etc")
#: How long ``cleanup`` waits for a mount to answer before deciding it is alive.
PROBE_TIMEOUT_S = 5.0

# Characters systemd would interpret in a command line (quoting, specifiers,
# variables, escapes); paths containing them are refused, not escaped.
_UNIT_UNSAFE = set(" \t\n\"'\\%$;")


def source_dir() -> Path:
    """``systemd/`` of the source tree this package runs from."""
    return Path(__file__).resolve().parent.parent / "systemd"


def fusedisk_executable() -> Path:
    """The absolute path of the ``fusedisk`` command that belongs to this Python."""
    candidates = [Path(sys.executable).parent / "fusedisk"]
    found = shutil.which("fusedisk")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return Path(os.path.abspath(candidate))
    raise FusediskError(
        f"cannot find the fusedisk executable (looked for {candidates[0]} and on PATH); "
        "install the package first (bash scripts/setup install)"
    )


def _check_unit_safe(path: Path, what: str) -> None:
    if not path.is_absolute() or _UNIT_UNSAFE & set(str(path)):
        raise FusediskError(
            f"{what} {path} cannot be written into a unit file "
            "(it must be absolute, without spaces, quotes, '\\', '%', '$' or ';')"
        )


def render_unit(template: str, executable: Path, config_dir: Path) -> str:
    """*template* with its commands pointed at *executable* and configs in *config_dir*."""
    _check_unit_safe(executable, "the executable")
    _check_unit_safe(config_dir, "the configuration directory")
    if UNIT_EXECUTABLE not in template or f"{UNIT_CONFIG_DIR}/%i.toml" not in template:
        raise FusediskError(f"{UNIT_NAME} in the source tree does not look like fusedisk's unit")
    text = template.replace(UNIT_EXECUTABLE, str(executable))
    return text.replace(f"{UNIT_CONFIG_DIR}/", f"{config_dir}/")


def systemd_booted() -> bool:
    """True when systemd is PID 1 (the test sd_booted(3) uses)."""
    return os.path.isdir("/run/systemd/system")


def _write_file(path: Path, data: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise FusediskError(f"cannot write {path}: {e.strerror}") from None


def install(prefix: Path, executable: Path | None = None) -> list[str]:
    """Install the unit and the example config under *prefix*; return what was done."""
    src = source_dir()
    try:
        template = (src / UNIT_NAME).read_text()
        example = (src / EXAMPLE_NAME).read_text()
    except OSError as e:
        raise FusediskError(
            f"cannot read the unit template in {src} ({e.strerror}); install-service works "
            "from a source checkout (pip install -e)"
        ) from None
    prefix = Path(os.path.abspath(prefix))
    unit_path = prefix / "systemd" / "system" / UNIT_NAME
    config_dir = prefix / "fusedisk"
    unit = render_unit(template, executable or fusedisk_executable(), config_dir)
    done = []
    _write_file(unit_path, unit, 0o644)
    done.append(f"installed {unit_path}")
    sample = config_dir / "example.toml.sample"
    if sample.exists():
        done.append(f"kept {sample} (already there)")
    else:
        _write_file(sample, example, 0o644)
        done.append(f"installed {sample}")
    if systemd_booted():
        result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["failed"])[-1]
            raise FusediskError(f"installed {unit_path}, but systemctl daemon-reload: {detail}")
        done.append("reloaded systemd")
    else:
        done.append("systemd is not running here: no daemon-reload")
    done.append(
        f"next: write {config_dir}/NAME.toml (see the sample), then "
        "systemctl enable --now fusedisk@NAME"
    )
    return done


# -- ExecStopPost: detach what a dead daemon left behind -----------------------------


def _daemon_answers(mountpoint: Path) -> bool:
    """True if a daemon accepts connections on the control socket of *mountpoint*."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        try:
            sock.connect(str(control.socket_path(mountpoint)))
        except OSError:
            return False
    return True


def _connection_dead(mountpoint: Path) -> bool:
    """True if the mount on *mountpoint* fails with ENOTCONN (its daemon is gone).

    ``statvfs``, because the kernel answers ``stat`` of the root from its
    attribute cache for a while even after the daemon died. The probe runs in
    a helper thread: on a live but hung daemon it would block, and then the
    mount counts as alive and is left alone.
    """
    outcome: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
            outcome.append(0)
        except OSError as e:
            outcome.append(e.errno or -1)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome == [errno.ENOTCONN]


def cleanup(mountpoint: Path) -> str:
    """Detach the mount on *mountpoint* if it is a fusedisk mount whose daemon is dead."""
    mountpoint = Path(os.path.abspath(mountpoint))
    fstype = fstype_at(mountpoint)
    if fstype is None:
        return f"{mountpoint}: nothing mounted, nothing to clean up" + _views_detached(mountpoint)
    if fstype != f"fuse.{FSNAME}":
        return f"{mountpoint}: a {fstype} mount, left alone"
    if _daemon_answers(mountpoint) or not _connection_dead(mountpoint):
        return f"{mountpoint}: served by a running fusedisk daemon, left alone"
    detach_dead_mount(mountpoint)
    if fstype_at(mountpoint) == f"fuse.{FSNAME}":
        raise MountError(f"cannot detach the dead mount on {mountpoint}")
    return (f"{mountpoint}: detached the mount its dead daemon left behind"
            + _views_detached(mountpoint))


def _views_detached(mountpoint: Path) -> str:
    """Dead remote-store views of that datastore, detached too (storeviews.py)."""
    from .storeviews import detach_dead_views

    gone = detach_dead_views(mountpoint)
    return f"; and {len(gone)} dead remote-store view(s)" if gone else ""


def cleanup_target(mountpoint: str | None, config_file: Path | None) -> Path:
    """The mountpoint ``cleanup`` works on: given, or read from the config file."""
    if mountpoint:
        return Path(mountpoint)
    if config_file is None:
        raise ConfigError("cleanup needs MOUNTPOINT or --config FILE")
    value = load_file(config_file).get("mountpoint")
    if not value:
        raise ConfigError(f"{config_file}: no mountpoint given")
    return Path(value)
