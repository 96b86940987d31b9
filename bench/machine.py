"""What the benchmark ran on: CPU, memory, kernel, OS, filesystems, tool versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.fio import fio_version
from bench.mount import REPO_ROOT
from fusedisk import mountinfo


def _first_value(path: str, key: str, separator: str = ":") -> str | None:
    """The value of the first ``key<separator>value`` line in a text file, or None."""
    try:
        with open(path) as lines:
            for line in lines:
                name, sep, value = line.partition(separator)
                if sep and name.strip() == key:
                    return value.strip().strip('"')
    except OSError:
        return None
    return None


def _command_output(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (e.g. ``ext4``), from the mount table."""
    return mountinfo.fstype_holding(path) or "unknown"


def machine_info(fio: str, dirs: dict[str, Path]) -> dict[str, Any]:
    """A JSON-ready description of this machine; ``dirs`` names the directories whose
    filesystem type to record (e.g. the raw store and the stores behind the mount)."""
    mem_kib = _first_value("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _first_value("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "kernel": platform.release(),
        "os": _first_value("/etc/os-release", "PRETTY_NAME", "="),
        "python": platform.python_version(),
        "fio": fio_version(fio),
        "filesystems": {name: filesystem_type(path) for name, path in dirs.items()},
        "git_revision": _command_output(["git", "-C", str(REPO_ROOT), "describe", "--always",
                                         "--dirty"]),
        "process_placement": "not pinned: fio, the daemon and the kernel share all CPUs",
    }
