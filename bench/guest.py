"""A real QEMU guest for the benchmark: a tiny Linux booted under TCG, probing its disk.

    python -m bench.guest DISK [--mode gap|rounds] [--seconds S] [--iterations N]

The guest is Debian's packaged cloud kernel (``linux-image-*-cloud-amd64``,
extracted by ``scripts/setup`` into :data:`KERNEL_DIR`) with an initramfs
built here at run time: busybox-static, the virtio modules of that kernel,
and ``bench/guest_probe.c`` compiled with ``gcc -static`` (no image download,
no network). ``/init`` loads the modules, waits for ``/dev/vda``, runs the
probe and reboots, which ends QEMU (``-no-reboot``).

QEMU runs the way a hypervisor runs a VM disk on a datastore:
``-drive file=DISK,format=raw,if=none,id=d0,cache=none,aio=io_uring`` on a
virtio-blk PCI device, ``-nographic``, the serial console on QEMU's stdio
(read line by line by a thread that stamps each line with the host's
``time.monotonic()`` on arrival) and QMP on a unix socket. KVM is not used
(TCG), so the guest is slow at computing but its disk I/O is real I/O on the
host file.

The probe (see ``bench/guest_probe.c``) stops when it reads ``q`` on the
console. Its times are the guest's CLOCK_MONOTONIC; :meth:`Guest.offset_s`
maps them onto the host's clock from the lines' arrival times (the smallest
arrival − print difference: the line that waited least on its way out).

A :class:`Guest` is a context manager; leaving it always kills QEMU (SIGTERM,
then SIGKILL) and reaps it, so no process outlives the ``with`` block.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.errors import BenchError

KERNEL_DIR = Path(os.environ.get("FUSEDISK_GUEST_KERNEL_DIR", "/var/cache/fusedisk/guest-kernel"))
PROBE_SOURCE = Path(__file__).resolve().parent / "guest_probe.c"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
#: The modules /dev/vda needs in the cloud kernel (built as modules there), by file name.
MODULES = ("virtio.ko", "virtio_ring.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
           "virtio_pci.ko", "virtio_blk.ko")
GUEST_MEMORY_MB = 256
BOOT_TIMEOUT_S = 180.0
PREFIX = "FDPROBE "

_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.order); do
  /bin/busybox insmod /modules/$m || echo "FDPROBE ERROR insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do /bin/busybox usleep 10000; i=$((i+1)); done
/probe
echo "FDPROBE EXIT rc=$?"
/bin/busybox reboot -f
"""


# --------------------------------------------------------------------- building the guest

def find_kernel(kernel_dir: Path = KERNEL_DIR) -> tuple[Path, Path]:
    """(vmlinuz, the kernel's module directory) in ``kernel_dir``, or BenchError."""
    kernels = sorted((kernel_dir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BenchError(f"no guest kernel in {kernel_dir}/boot (bash scripts/setup install "
                         "extracts Debian's linux-image-cloud-amd64 there)")
    vmlinuz = kernels[-1]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    modules = kernel_dir / "lib" / "modules" / release
    if not modules.is_dir():
        raise BenchError(f"the guest kernel {vmlinuz} has no modules in {modules}")
    return vmlinuz, modules


def _module_depends(data: bytes) -> list[str]:
    """The ``depends=`` of a .ko's modinfo section (module names, '-' as '_')."""
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    value = data[start + len(b"\0depends="):data.index(b"\0", start + 1)].decode()
    return [name.replace("-", "_") for name in value.split(",") if name]


def _modules_in_order(modules_dir: Path) -> list[tuple[str, bytes]]:
    """(file name, contents) of :data:`MODULES`, each after the modules it depends on."""
    found: dict[str, tuple[Path, bytes]] = {}
    for name in MODULES:
        paths = sorted(modules_dir.rglob(name)) + sorted(modules_dir.rglob(name + ".xz"))
        if not paths:
            continue  # built into this kernel
        if paths[0].suffix == ".xz":
            raise BenchError(f"{paths[0]} is compressed; busybox insmod needs a plain .ko")
        found[name.removesuffix(".ko")] = (paths[0], paths[0].read_bytes())
    ordered: list[str] = []

    def visit(module: str, seen: tuple[str, ...]) -> None:
        if module in ordered or module not in found:
            return
        if module in seen:
            raise BenchError(f"module dependency cycle through {module}")
        for dep in _module_depends(found[module][1]):
            visit(dep, (*seen, module))
        ordered.append(module)

    for module in found:
        visit(module, ())
    if "virtio_blk" not in found:
        raise BenchError(f"no virtio_blk.ko under {modules_dir}")
    return [(found[m][0].name, found[m][1]) for m in ordered]


def build_probe(work: Path) -> Path:
    """``bench/guest_probe.c`` compiled with ``gcc -static -O2`` into ``work``."""
    out = work / "guest_probe"
    if out.exists() and out.stat().st_mtime >= PROBE_SOURCE.stat().st_mtime:
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found on PATH (the guest probe is compiled at run time)")
    done = subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(out), str(PROBE_SOURCE)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"gcc -static {PROBE_SOURCE.name} failed: "
                         f"{done.stderr.strip().splitlines()[-1:] or '?'}")
    return out


class _Cpio:
    """A newc cpio archive written in memory (what the kernel unpacks as an initramfs)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
            ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._parts)


def build_initramfs(work: Path, kernel_dir: Path = KERNEL_DIR) -> Path:
    """An uncompressed initramfs in ``work``: busybox, the virtio modules, the probe, /init."""
    if not BUSYBOX.exists():
        raise BenchError(f"{BUSYBOX} not found (install busybox-static: bash scripts/setup "
                         "install)")
    busybox = BUSYBOX.read_bytes()
    if b"ld-linux" in busybox[:4096] or b"/lib64/ld-" in busybox:
        raise BenchError(f"{BUSYBOX} is not static (install busybox-static)")
    _, modules_dir = find_kernel(kernel_dir)
    modules = _modules_in_order(modules_dir)
    probe = build_probe(work).read_bytes()
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("bin/busybox", stat.S_IFREG | 0o755, busybox)
    archive.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    archive.add("probe", stat.S_IFREG | 0o755, probe)
    archive.add("init", stat.S_IFREG | 0o755, _INIT.encode())
    archive.add("modules.order", stat.S_IFREG | 0o644,
                "".join(f"{name}\n" for name, _ in modules).encode())
    for name, data in modules:
        archive.add(f"modules/{name}", stat.S_IFREG | 0o644, data)
    out = work / "initramfs.cpio"
    out.write_bytes(archive.finish())
    return out


# --------------------------------------------------------------------- QMP

@dataclass(slots=True)
class QmpEvent:
    """An asynchronous QMP event and the host's time.monotonic() when it arrived."""

    t: float
    name: str
    data: dict[str, Any]


class Qmp:
    """A minimal blocking QMP client on a unix socket (commands answered in order)."""

    def __init__(self, path: Path, timeout_s: float = 30.0,
                 alive: Callable[[], bool] = lambda: True) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock.connect(str(path))
                break
            except OSError as e:
                if not isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
                    self._sock.close()
                    raise BenchError(f"cannot connect to QMP at {path}: {e}") from None
                if not alive():
                    self._sock.close()
                    raise BenchError("QEMU exited before its QMP socket opened") from None
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise BenchError(f"QMP socket {path} did not open within "
                                     f"{timeout_s:.0f} s") from None
                time.sleep(0.05)
        self._file = self._sock.makefile("rb")
        self.events: list[QmpEvent] = []
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise BenchError("QEMU closed its QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run one QMP command; its ``return`` value, or BenchError with QEMU's error."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(QmpEvent(time.monotonic(), message["event"],
                                            message.get("data") or {}))
                continue
            if "error" in message:
                raise BenchError(f"QMP {name} failed: {message['error'].get('desc')}")
            return message.get("return")

    def wait_event(self, name: str, timeout_s: float, **match: Any) -> QmpEvent:
        """The first event ``name`` (whose data contains ``match``), waiting if need be."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.name == name and all(event.data.get(k) == v for k, v in match.items()):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no QMP event {name} within {timeout_s:.0f} s")
            self._sock.settimeout(left)
            try:
                message = self._read()
            except TimeoutError:
                continue
            if "event" in message:
                self.events.append(QmpEvent(time.monotonic(), message["event"],
                                            message.get("data") or {}))

    def close(self) -> None:
        """Close the socket (never raises)."""
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------- the running guest

@dataclass(frozen=True, slots=True)
class GuestFiles:
    """What a guest boots: the kernel and the initramfs built for this run."""

    kernel: Path
    initramfs: Path


def prepare(work: Path, kernel_dir: Path = KERNEL_DIR) -> GuestFiles:
    """Check QEMU, build the probe and the initramfs in ``work``; BenchError if impossible."""
    if shutil.which(QEMU) is None:
        raise BenchError(f"{QEMU} not found (install qemu-system-x86: bash scripts/setup "
                         "install)")
    work.mkdir(parents=True, exist_ok=True)
    kernel, _ = find_kernel(kernel_dir)
    return GuestFiles(kernel=kernel, initramfs=build_initramfs(work, kernel_dir))


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the bench dies, even by SIGKILL (a QEMU must
    not outlive the run that started it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(slots=True)
class Guest:
    """QEMU running the probe on ``disk``; use as a context manager.

    ``params`` become ``fdprobe.NAME=VALUE`` on the kernel command line.
    ``lines`` collects (host monotonic arrival time, text) of every console line.
    """

    files: GuestFiles
    disk: Path
    work: Path
    params: dict[str, str | int]
    process: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    _ended: threading.Event = field(default_factory=threading.Event)
    _probe_started: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None
    _console: IO[str] | None = None
    #: a short directory for the QMP socket (a unix socket path has at most 107 bytes)
    _socket_dir: Path | None = None

    @property
    def qmp_path(self) -> Path:
        """The QMP socket (in a temporary directory while the guest runs)."""
        return (self._socket_dir or Path(tempfile.gettempdir(), "fusedisk-qmp-XXXX")) / "qmp.sock"

    @property
    def console_path(self) -> Path:
        """Where the whole console output is kept."""
        return self.work / "console.log"

    def argv(self) -> list[str]:
        """QEMU's command line."""
        append = " ".join(["console=ttyS0", "quiet", "loglevel=3", "panic=-1",
                           *(f"fdprobe.{k}={v}" for k, v in self.params.items())])
        return [QEMU, "-machine", "pc", "-accel", "tcg", "-m", str(GUEST_MEMORY_MB),
                "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
                "-serial", "stdio", "-monitor", "none", "-no-reboot",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-kernel", str(self.files.kernel), "-initrd", str(self.files.initramfs),
                "-append", append,
                "-drive", f"file={self.disk},format=raw,if=none,id=d0,cache=none,aio=io_uring",
                "-device", "virtio-blk-pci,drive=d0,id=vd0"]

    @property
    def command(self) -> str:
        """The command line, for the report."""
        return " ".join(f"'{a}'" if " " in a else a for a in self.argv())

    def __enter__(self) -> Guest:
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            self._socket_dir = Path(tempfile.mkdtemp(prefix="fusedisk-qmp-"))
            self._console = open(self.console_path, "w")
            self.started = time.monotonic()
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent)
            self._reader = threading.Thread(target=self._read_console, daemon=True)
            self._reader.start()
            process = self.process
            self.qmp = Qmp(self.qmp_path, alive=lambda: process.poll() is None)
        except BenchError as e:
            self._kill()
            raise BenchError(str(e), self._tail()) from None
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._kill()

    def _read_console(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            t = time.monotonic()
            text = raw.decode(errors="replace").rstrip("\r\n")
            at = text.find(PREFIX)
            if at > 0:  # behind the terminal resets the firmware and the kernel print
                text = text[at:]
            self.lines.append((t, text))
            if self._console is not None:
                self._console.write(f"{t - self.started:10.3f} {text}\n")
            if text.startswith(PREFIX + "START"):
                self._probe_started.set()
            elif text.startswith(PREFIX + "END"):
                self._ended.set()
        self._ended.set()  # QEMU's stdout closed: nothing more will come

    def _kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _tail(self) -> str:
        return "\n".join(text for _, text in self.lines[-15:])

    def wait_probe_started(self, timeout_s: float = BOOT_TIMEOUT_S) -> float:
        """Wait for the probe's START line; the boot time in seconds (BenchError on failure)."""
        deadline = time.monotonic() + timeout_s
        while not self._probe_started.wait(0.1):
            if self._ended.is_set() or time.monotonic() > deadline:
                break
        if not self._probe_started.is_set():
            raise BenchError(f"the guest's probe did not start within {timeout_s:.0f} s "
                             f"(console: {self.console_path})", self._tail())
        return next(t for t, text in self.lines if text.startswith(PREFIX + "START")) - \
            self.started

    def stop(self, timeout_s: float = 60.0) -> list[tuple[float, str]]:
        """Ask the probe to finish (``q`` on the console) and wait for its END line and for
        QEMU's exit; the console lines. BenchError if it does not end in time."""
        assert self.process is not None and self.process.stdin is not None
        if not self._ended.is_set():
            try:
                self.process.stdin.write(b"q\n")
                self.process.stdin.flush()
            except OSError:
                pass
        return self.wait_end(timeout_s)

    def wait_end(self, timeout_s: float) -> list[tuple[float, str]]:
        """Wait for the probe's END line and QEMU's exit; the console lines."""
        assert self.process is not None
        if not self._ended.wait(timeout_s):
            raise BenchError(f"the guest's probe did not end within {timeout_s:.0f} s "
                             f"(console: {self.console_path})", self._tail())
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError("QEMU did not exit after the probe ended") from None
        if not any(text.startswith(PREFIX + "END") for _, text in self.lines):
            raise BenchError(f"QEMU exited (status {self.process.returncode}) before the "
                             f"probe's END line (console: {self.console_path})", self._tail())
        return list(self.lines)

    def offset_s(self) -> float:
        """Host monotonic − guest monotonic, from the timed lines (see the module doc)."""
        return clock_offset_s(self.lines)


# --------------------------------------------------------------------- parsing the console

def clock_offset_s(lines: list[tuple[float, str]]) -> float:
    """Host − guest clock from lines ``FDPROBE I|R <print time ns> ...``: the smallest
    arrival − print difference."""
    offsets = []
    for t, text in lines:
        parts = text.split()
        if len(parts) >= 3 and parts[0] == PREFIX.strip() and parts[1] in ("I", "R"):
            try:
                offsets.append(t - int(parts[2]) / 1e9)
            except ValueError:
                raise BenchError(f"the guest printed a garbled line: {text!r}") from None
    if not offsets:
        raise BenchError("the guest printed no timed lines to align its clock with")
    return min(offsets)


def _fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split()[2:] if "=" in part)


def _summary(lines: list[tuple[float, str]], mode: str) -> dict[str, str]:
    errors = [text for _, text in lines if text.startswith(PREFIX + "ERROR")]
    if errors:
        raise BenchError(f"the guest's probe failed: {errors[0].removeprefix(PREFIX)}")
    for _, text in lines:
        if text.startswith(PREFIX + "SUMMARY"):
            fields = _fields(text)
            if fields.get("mode") != mode:
                raise BenchError(f"the guest's probe ran mode {fields.get('mode')}, not {mode}")
            return fields
    raise BenchError("the guest's probe printed no SUMMARY line")


@dataclass(frozen=True, slots=True)
class Interval:
    """One ``FDPROBE I`` line on the host's clock: [start, end), iterations, the longest
    iteration (µs) and when it started, errors."""

    start: float
    end: float
    iterations: int
    max_us: int
    max_at: float
    errors: int


@dataclass(frozen=True, slots=True)
class GapResult:
    """What the gap probe reported, times on the host's clock."""

    iterations: int
    errors: int
    bad: int
    max_us: int
    p50_us: int
    p99_us: int
    last_seq: int
    intervals: list[Interval]
    top: list[tuple[int, float]]
    #: each iteration of ``slow_us`` or more: (host time it started, µs); empty when the
    #: probe was not asked for them (slow_us 0)
    slow: list[tuple[float, int]] = field(default_factory=list)
    slow_us: int = 0

    def longest(self, start: float | None, end: float | None, inside: bool = True
                ) -> tuple[float | None, float | None]:
        """(the longest iteration in ms, its host time) among the intervals overlapping
        [start, end] (``inside``) or not overlapping it."""
        chosen = [i for i in self.intervals
                  if ((start is None or i.end >= start) and (end is None or i.start <= end))
                  == inside and i.iterations]
        worst = max(chosen, key=lambda i: i.max_us, default=None)
        return (None, None) if worst is None else (worst.max_us / 1000, worst.max_at)


    def spanning_ms(self, start: float, end: float) -> float | None:
        """The longest iteration (ms) that overlaps [start, end] itself: the guest's I/O
        that waited for what happened in it. An iteration under ``slow_us`` is not
        listed, so when none of the listed ones overlaps, ``slow_us`` is the answer
        (an upper bound); None when the probe listed none at all."""
        if not self.slow_us:
            return None
        spans = [us for at, us in self.slow if at <= end and at + us / 1e6 >= start]
        return max(spans, default=self.slow_us) / 1000

    def floor_ms(self, start: float, end: float) -> float | None:
        """The noise floor next to [start, end]: the median, over consecutive stretches of
        the same length outside it, of each stretch's longest iteration (ms)."""
        length = max(end - start, 1e-3)
        outside = sorted((i for i in self.intervals
                          if (i.end < start or i.start > end) and i.iterations),
                         key=lambda i: i.start)
        if not outside:
            return None
        stretches: dict[int, int] = {}
        for i in outside:
            key = int((i.start - outside[0].start) // length)
            stretches[key] = max(stretches.get(key, 0), i.max_us)
        return statistics.median(stretches.values()) / 1000


def parse_gap(lines: list[tuple[float, str]]) -> GapResult:
    """The gap probe's results, its times mapped to the host clock (BenchError if absent)."""
    fields = _summary(lines, "gap")
    offset = clock_offset_s(lines)
    intervals, top, slow = [], [], []
    for _, text in lines:
        parts = text.split()
        try:
            if len(parts) == 4 and parts[:2] == ["FDPROBE", "S"]:
                slow.append((int(parts[2]) / 1e9 + offset, int(parts[3])))
            elif len(parts) == 8 and parts[:2] == ["FDPROBE", "I"]:
                printed, start, n, max_us, max_at, errors = (int(p) for p in parts[2:])
                intervals.append(Interval(start / 1e9 + offset, printed / 1e9 + offset, n,
                                          max_us, max_at / 1e9 + offset, errors))
            elif len(parts) == 5 and parts[:2] == ["FDPROBE", "TOP"]:
                top.append((int(parts[3]), int(parts[4]) / 1e9 + offset))
        except ValueError:
            raise BenchError(f"the guest printed a garbled line: {text!r}") from None
    try:
        return GapResult(iterations=int(fields["iterations"]), errors=int(fields["errors"]),
                         bad=int(fields["bad"]), max_us=int(fields["max_us"]),
                         p50_us=int(fields["p50_us"]), p99_us=int(fields["p99_us"]),
                         last_seq=int(fields["last_seq"]), intervals=intervals, top=top,
                         slow=slow, slow_us=int(fields.get("slow_us", 0)))
    except (KeyError, ValueError):
        raise BenchError("the guest's gap SUMMARY line is incomplete") from None


@dataclass(frozen=True, slots=True)
class RoundsResult:
    """What the rounds probe reported."""

    rounds: int
    ops: int
    bytes: int
    flushes: int
    seconds: float
    rounds_per_s: float
    errors: int


def parse_rounds(lines: list[tuple[float, str]]) -> RoundsResult:
    """The rounds probe's results (BenchError if absent)."""
    fields = _summary(lines, "rounds")
    try:
        return RoundsResult(rounds=int(fields["rounds"]), ops=int(fields["ops"]),
                            bytes=int(fields["bytes"]), flushes=int(fields["flushes"]),
                            seconds=float(fields["seconds"]),
                            rounds_per_s=float(fields["rounds_per_s"]),
                            errors=int(fields["errors"]))
    except (KeyError, ValueError):
        raise BenchError("the guest's rounds SUMMARY line is incomplete") from None


MARKER = struct.Struct("4096s")


def read_marker(disk: Path) -> str:
    """The probe's end marker (``FDPROBE-DONE mode=... count=...``) at offset 0 of ``disk``,
    read from the file itself (the store's copy); '' if there is none."""
    with open(disk, "rb") as f:
        block = f.read(MARKER.size)
    text = block.split(b"\0", 1)[0].decode(errors="replace").strip()
    return text if text.startswith("FDPROBE-DONE") else ""


def main(argv: list[str] | None = None) -> int:
    """Boot the guest on DISK once and print what the probe reported."""
    parser = argparse.ArgumentParser(prog="python -m bench.guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("disk", type=Path, metavar="DISK")
    parser.add_argument("--mode", choices=("gap", "rounds"), default="gap")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fusedisk-guest"))
    args = parser.parse_args(argv)
    if not args.disk.is_file():
        print(f"bench.guest: {args.disk} is not a file", file=sys.stderr)
        return 1
    params: dict[str, str | int] = {"mode": args.mode, "seconds": args.seconds,
                                    "report_ms": 50}
    if args.iterations is not None:
        params["iterations"] = args.iterations
    try:
        files = prepare(args.work)
        with Guest(files, args.disk, args.work, params) as guest:
            boot_s = guest.wait_probe_started()
            lines = guest.wait_end(args.seconds + 60)
        print(f"boot {boot_s:.2f} s")
        if args.mode == "gap":
            gap = parse_gap(lines)
            print(f"gap: {gap.iterations} iterations, {gap.errors} errors, {gap.bad} bad, "
                  f"p50 {gap.p50_us} µs, p99 {gap.p99_us} µs, max {gap.max_us} µs")
        else:
            rounds = parse_rounds(lines)
            print(f"rounds: {rounds.rounds} in {rounds.seconds:.2f} s = "
                  f"{rounds.rounds_per_s:.2f}/s, {rounds.flushes} flushes, "
                  f"{rounds.errors} errors")
        print(f"marker: {read_marker(args.disk)!r}")
    except BenchError as e:
        print(f"bench.guest: {e}", file=sys.stderr)
        if e.detail:
            print(e.detail, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
