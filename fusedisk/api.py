"""The control API: every request, reply and enum the control socket carries, defined once.

``control.py`` moves lines; this room says what they mean. Each command is
a frozen dataclass whose fields are its arguments (with their defaults and
their checks), and whose :meth:`Request.reply` turns the daemon's result
back into a typed value. The daemon decodes with :func:`Request.decode`
(unknown or ill-typed arguments → ``bad-argument``); the CLI, the bench and
the tests build the same dataclasses and send them with
:func:`fusedisk.control.call`. ``docs/control-protocol.md`` is checked
against :data:`REQUESTS` by a test.

The relocation job's states and modes live here too, with the set of final
states defined once: every room that asks "is this job over?" imports
:data:`FINAL_STATES`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypedDict, TypeVar, cast

from .config import MAX_PAUSE_MS, MAX_RATE, MAX_STALL_TIMEOUT_S, MIN_PAUSE_MS
from .errors import ControlError
from .sizes import parse_size

#: Longest name of a top-level entry, in bytes (NAME_MAX).
MAX_NAME_BYTES = 255
#: The largest file offset Linux allows (loff_t): a byte count above it is no offset.
MAX_FILE_SIZE = (1 << 63) - 1
#: The pause budget of a switchover when a request names none, in milliseconds.
DEFAULT_MAX_PAUSE_MS = 100


class State(enum.StrEnum):
    """Where a relocation job is. ``paused`` is not a state: a paused job is still copying."""

    RESUMING = "resuming"  # pass 1 of a resumed relocation: copying what was not kept
    COPYING = "copying"
    MIRRORING = "mirroring"
    SWITCHING = "switching"
    FINISHING = "finishing"  # committed: removing the source copy
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUSPENDED = "suspended"  # the daemon stopped: the next mount resumes it


#: A job in one of these states is over in this daemon: nothing it does changes any more
#: (a suspended one goes on as a new job at the next mount).
FINAL_STATES = frozenset({State.DONE, State.FAILED, State.CANCELLED, State.SUSPENDED})
#: A job in one of these states is still working.
ACTIVE_STATES = frozenset(State) - FINAL_STATES
#: Before the switchover (a cancel is still accepted in these).
PRE_SWITCH_STATES = frozenset({State.RESUMING, State.COPYING, State.MIRRORING})


class Mode(enum.StrEnum):
    """How a relocation keeps the destination up to date while the guest writes."""

    AUTO = "auto"  #: pre-copy passes, then mirror writes if the guest outruns the copy
    PRECOPY = "precopy"  #: never mirror
    MIRROR = "mirror"  #: mirror writes from the start


DEFAULT_MODE = Mode.AUTO


# -- errors and argument checks ------------------------------------------------------


class RequestError(Exception):
    """A request was understood but refused; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Required(enum.Enum):
    """The default of an argument that has none: it must be in the request."""

    REQUIRED = enum.auto()


_REQUIRED = _Required.REQUIRED
T = TypeVar("T")
#: A JSON object as the wire carries it: its consumer checks each value it reads.
JSONObject = dict[str, Any]


def _bad(key: str, what: str) -> RequestError:
    return RequestError("bad-argument", f"argument {key!r} {what}")


def check_args(request: Mapping[str, object], *allowed: str) -> None:
    """Refuse any key of *request* other than ``cmd`` and *allowed*."""
    unknown = sorted(set(request) - {"cmd", *allowed})
    if unknown:
        raise RequestError("bad-argument", f"unknown argument {unknown[0]!r}")


def _default(key: str, default: T | _Required) -> T:
    """An absent argument's value: *default*, or ``bad-argument`` if it has none."""
    if isinstance(default, _Required):
        raise _bad(key, "is missing")
    return default


def str_arg(
    request: Mapping[str, object], key: str, default: T | _Required = _REQUIRED
) -> str | T:
    """A string argument (or *default*, which may be any value, when absent)."""
    if key not in request:
        return _default(key, default)
    value = request[key]
    if not isinstance(value, str):
        raise _bad(key, "must be a string")
    return value


def int_arg(
    request: Mapping[str, object], key: str, default: T | _Required = _REQUIRED,
    *, minimum: int | None = None, maximum: int | None = None,
) -> int | T:
    """An integer argument within [*minimum*, *maximum*]; booleans are not integers."""
    if key not in request:
        return _default(key, default)
    value = request[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(key, "must be an integer")
    if minimum is not None and value < minimum:
        raise _bad(key, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise _bad(key, f"must be at most {maximum}")
    return value


def bool_arg(
    request: Mapping[str, object], key: str, default: T | _Required = _REQUIRED
) -> bool | T:
    if key not in request:
        return _default(key, default)
    value = request[key]
    if not isinstance(value, bool):
        raise _bad(key, "must be true or false")
    return value


def size_arg(
    request: Mapping[str, object], key: str, default: T | _Required = _REQUIRED,
    *, maximum: int | None = None,
) -> int | T:
    """A byte count up to *maximum*: a non-negative integer, or a string such as ``"64M"``."""
    if key not in request:
        return _default(key, default)
    value = request[key]
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as e:
            raise _bad(key, f"is not a size: {e}") from None
        except OverflowError:  # "inf", "1e400": a float that is no integer
            raise _bad(key, "is not a size (it is too large)") from None
    elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(key, 'must be a size (a byte count, or a string such as "64M")')
    if maximum is not None and value > maximum:
        raise _bad(key, f"must be at most {maximum}")
    return value


def check_name(name: str, key: str = "entry") -> str:
    """*name* if it is a possible directory entry name: not empty, '.', '..', no '/' or NUL."""
    if name in ("", ".", ".."):
        raise _bad(key, f"{name!r} is not a name")
    if "/" in name or "\0" in name:
        raise _bad(key, f"{name!r} must be a single name, without '/'")
    try:
        encoded = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise _bad(key, "is not a valid file name") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise _bad(key, f"is longer than {MAX_NAME_BYTES} bytes")
    return name


def entry_arg(request: Mapping[str, object], key: str = "entry") -> str:
    """The name of a top-level entry (a VM home): syntax only; the caller checks it exists."""
    return check_name(str_arg(request, key), key)


def path_arg(request: Mapping[str, object], key: str = "path") -> tuple[str, ...]:
    """A path inside the mount, relative to its root, as its components.

    The first component is the top-level entry. Absolute paths, empty
    components, '.' and '..' are refused, so a path can never name anything
    outside the entry it starts with. Symlinks are not resolved here: a
    handler must open the components without following links.
    """
    path = str_arg(request, key)
    if path.startswith("/"):
        raise _bad(key, "must be relative to the mountpoint")
    parts = tuple(path.split("/"))
    for part in parts:
        check_name(part, key)
    return parts


def mode_arg(
    request: Mapping[str, object], key: str, default: T | _Required = _REQUIRED
) -> Mode | T:
    if key not in request:
        return _default(key, default)
    value = str_arg(request, key)
    if value not in {m.value for m in Mode}:
        raise _bad(key, "must be one of " + ", ".join(m.value for m in Mode))
    return Mode(value)


# -- requests -------------------------------------------------------------------------

#: How one argument is read from a request: (request, key, default) → value.
Check = Callable[[Mapping[str, object], str, object], object]


def _arg(check: Check, default: object = dataclasses.MISSING, doc: str = "") -> Any:
    """A request field: its check, its default (none: the argument is required), its doc.

    ``Any``: a dataclass field stands for a value of the field's own type."""
    meta = {"check": check, "doc": doc}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _entry_check(request: Mapping[str, object], key: str, default: object) -> object:
    return entry_arg(request, key)


def _path_check(request: Mapping[str, object], key: str, default: object) -> object:
    return "/".join(path_arg(request, key))


def _rate_check(request: Mapping[str, object], key: str, default: object) -> object:
    return size_arg(request, key, default, maximum=MAX_RATE)


def _pause_check(request: Mapping[str, object], key: str, default: object) -> object:
    return int_arg(request, key, default, minimum=MIN_PAUSE_MS, maximum=MAX_PAUSE_MS)


def _offset_check(request: Mapping[str, object], key: str, default: object) -> object:
    return size_arg(request, key, default, maximum=MAX_FILE_SIZE)


def _length_check(request: Mapping[str, object], key: str, default: object) -> object:
    value = size_arg(request, key, default, maximum=MAX_FILE_SIZE)
    if value == 0:
        raise _bad(key, "must be at least 1")
    return value


def _stall_check(request: Mapping[str, object], key: str, default: object) -> object:
    return int_arg(request, key, default, minimum=0, maximum=MAX_STALL_TIMEOUT_S)


def _job_check(request: Mapping[str, object], key: str, default: object) -> object:
    if key not in request:
        return _default(key, default)
    value = str_arg(request, key)
    if not (value and len(value) <= 64 and value.isalnum()):
        raise _bad(key, "is not a job id")
    return value


R = TypeVar("R", covariant=True)
Q = TypeVar("Q", bound="Request[object]")


@dataclass(frozen=True, slots=True)
class Request(Generic[R]):
    """One control command. Subclasses name it (``command``) and declare its arguments."""

    command: ClassVar[str]
    #: one line for ``--help`` texts and the protocol document
    summary: ClassVar[str]
    #: the command answers with a stream of events (see control.Stream)
    streams: ClassVar[bool] = False

    @classmethod
    def arguments(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def decode(cls: type[Q], request: Mapping[str, object]) -> Q:
        """The request from its wire form; RequestError (``bad-argument``) if it is not one."""
        check_args(request, *cls.arguments())
        values = {}
        for f in dataclasses.fields(cls):
            default = _REQUIRED if f.default is dataclasses.MISSING else f.default
            values[f.name] = f.metadata["check"](request, f.name, default)
        return cls(**values)

    def encode(self) -> dict[str, object]:
        """The wire form: ``cmd`` and every argument that has a value."""
        out: dict[str, object] = {"cmd": self.command}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:  # an optional argument left out is absent, not null
                out[f.name] = value.value if isinstance(value, enum.Enum) else value
        return out

    def reply(self, result: object) -> R:
        """The daemon's result as this command's reply type."""
        raise NotImplementedError


def _object(result: object) -> JSONObject:
    if not isinstance(result, dict):
        raise ControlError("the daemon sent a reply of the wrong shape")
    return result


@dataclass(frozen=True, slots=True)
class Status(Request[JSONObject]):
    command: ClassVar[str] = "status"
    summary: ClassVar[str] = "the datastore: stores, placement, counters, jobs, health"

    def reply(self, result: object) -> JSONObject:
        return _object(result)


@dataclass(frozen=True, slots=True)
class Location:
    entry: str
    store: str
    path: str  #: the backing directory or file


@dataclass(frozen=True, slots=True)
class Locate(Request[Location]):
    command: ClassVar[str] = "locate"
    summary: ClassVar[str] = "which store holds an entry, and its backing path"
    entry: str = _arg(_entry_check)

    def reply(self, result: object) -> Location:
        return _build(Location, result)


#: A job on the wire (:meth:`Job.to_wire`): JSON's types, and the names ``from``,
#: ``to`` and ``pass`` (keywords in Python).
JobWire = TypedDict("JobWire", {
    "id": str, "entry": str, "from": str, "to": str, "state": str, "paused": bool,
    "mode": str, "pass": int, "files": int, "bytes_total": int, "bytes_copied": int,
    "dirty_bytes": int, "copy_rate": float, "dirty_rate": float, "rate_limit": int,
    "eta_s": float | None, "progress": float, "mirroring": bool, "mirrored": bool,
    "pause_ms": float | None, "elapsed_s": float, "error": str | None, "attempts": int,
    "last_estimate_ms": float | None, "last_abandoned": str | None, "resumed": bool,
    "resumed_bytes": int, "stall_timeout_s": float,
})


@dataclass(frozen=True, slots=True)
class Job:
    """A relocation job as ``status``, ``migrate`` and the job commands show it."""

    id: str  #: unique per job of this daemon; job commands may name it
    entry: str
    src: str  #: wire name ``from``
    dst: str  #: wire name ``to``
    state: State
    paused: bool
    mode: Mode
    pass_no: int  #: wire name ``pass``
    files: int
    bytes_total: int  #: work known so far: copied plus dirty
    bytes_copied: int
    dirty_bytes: int
    copy_rate: float  #: bytes/s
    dirty_rate: float  #: bytes/s
    rate_limit: int  #: bytes/s, 0 = unlimited
    eta_s: float | None
    progress: float  #: 0–1, never decreasing, 1 only when done
    mirroring: bool  #: writes go to both stores now
    mirrored: bool  #: the job switched to mirroring at some point
    pause_ms: float | None  #: once switched
    elapsed_s: float
    error: str | None  #: when failed
    #: switchovers tried (each abandoned one reopened the gate before the commit)
    attempts: int
    #: the pause estimated before the last attempt, and why it was abandoned
    last_estimate_ms: float | None
    last_abandoned: str | None
    #: resumed after a crash or a stop, and the bytes of the partial copy it kept
    resumed: bool
    resumed_bytes: int
    #: the job fails after this long without progress (0: never)
    stall_timeout_s: float

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_wire(self) -> JobWire:
        out = dataclasses.asdict(self)
        out["state"], out["mode"] = str(self.state), str(self.mode)
        out["from"], out["to"], out["pass"] = out.pop("src"), out.pop("dst"), out.pop("pass_no")
        return cast(JobWire, out)  # the same keys: test_api checks it

    @classmethod
    def from_wire(cls, result: object) -> Job:
        raw = dict(_object(result))
        try:
            raw["src"], raw["dst"], raw["pass_no"] = raw.pop("from"), raw.pop("to"), raw.pop("pass")
            raw["state"], raw["mode"] = State(raw["state"]), Mode(raw["mode"])
        except (KeyError, ValueError):
            raise ControlError("the daemon sent a job of the wrong shape") from None
        return _build(cls, raw)


def _build(cls: type[T], result: object) -> T:
    """*cls* from a reply object; its keys must be exactly *cls*'s fields."""
    raw = _object(result)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if set(raw) != names:
        missing, extra = sorted(names - set(raw)), sorted(set(raw) - names)
        raise ControlError(f"the daemon sent a reply of the wrong shape "
                           f"(missing {missing}, unexpected {extra}): is it another version?")
    return cls(**raw)


@dataclass(frozen=True, slots=True)
class Migrate(Request[Job]):
    command: ClassVar[str] = "migrate"
    summary: ClassVar[str] = "start relocating an entry to another store; answers the new job"
    entry: str = _arg(_entry_check)
    to: str = _arg(str_arg, doc="a store")
    rate: int = _arg(_rate_check, 0, "bytes/s or a size such as \"200M\"; 0 = unlimited")
    max_pause_ms: int = _arg(_pause_check, DEFAULT_MAX_PAUSE_MS)
    mode: Mode = _arg(mode_arg, DEFAULT_MODE)  # noqa: RUF009 (_arg returns a field)
    keep_source: bool = _arg(bool_arg, False)
    #: fail the job after this many seconds without progress (0: never)
    stall_timeout_s: int = _arg(_stall_check, 0)
    #: cancel a running (e.g. resumed) job of the entry and copy everything again
    restart: bool = _arg(bool_arg, False)

    def reply(self, result: object) -> Job:
        return Job.from_wire(result)


@dataclass(frozen=True, slots=True)
class _JobRequest(Request[Job]):
    entry: str = _arg(_entry_check)
    #: the job id the caller means; another job of the entry is ``no-job``
    job: str | None = _arg(_job_check, None)

    def reply(self, result: object) -> Job:
        return Job.from_wire(result)


@dataclass(frozen=True, slots=True)
class Pause(_JobRequest):
    command: ClassVar[str] = "pause"
    summary: ClassVar[str] = "pause a job's copy (I/O to the entry goes on)"


@dataclass(frozen=True, slots=True)
class Resume(_JobRequest):
    command: ClassVar[str] = "resume"
    summary: ClassVar[str] = "resume a paused job"


@dataclass(frozen=True, slots=True)
class Cancel(_JobRequest):
    command: ClassVar[str] = "cancel"
    summary: ClassVar[str] = "cancel a job before its switchover (too-late once switching)"


@dataclass(frozen=True, slots=True)
class Rate(Request[Job]):
    command: ClassVar[str] = "rate"
    summary: ClassVar[str] = "change a job's copy rate limit, at once"
    entry: str = _arg(_entry_check)
    rate: int = _arg(_rate_check)
    job: str | None = _arg(_job_check, None)

    def reply(self, result: object) -> Job:
        return Job.from_wire(result)


@dataclass(frozen=True, slots=True)
class Watch(Request[None]):
    """Events: the job, whenever it changed (at once when its state changes, otherwise
    at most every ``WATCH_INTERVAL_S``), the last one final. The stream ends after the
    final event."""

    command: ClassVar[str] = "watch"
    summary: ClassVar[str] = "a stream of a job's progress, until it ends"
    streams: ClassVar[bool] = True
    entry: str = _arg(_entry_check)
    job: str | None = _arg(_job_check, None)

    def reply(self, result: object) -> None:
        return None


#: How often a ``watch`` stream reports a job that is still working, in seconds.
WATCH_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class CbtCheckpoint(Request[str]):
    command: ClassVar[str] = "cbt-checkpoint"
    summary: ClassVar[str] = "start a new change id of a file; answers it (change_id)"
    path: str = _arg(_path_check)

    def reply(self, result: object) -> str:
        change_id = _object(result).get("change_id")
        if not isinstance(change_id, str):
            raise ControlError("the daemon sent a reply of the wrong shape")
        return change_id


@dataclass(frozen=True, slots=True)
class Changes:
    change_id: str
    file_size: int
    extents: list[list[int]]  #: [[offset, length], ...], sorted and merged


@dataclass(frozen=True, slots=True)
class CbtChanges(Request[Changes]):
    command: ClassVar[str] = "cbt-changes"
    summary: ClassVar[str] = "the extents of a file changed since a change id (or all: \"*\")"
    path: str = _arg(_path_check)
    since: str = _arg(str_arg, doc='a change id, or "*"')
    #: only the extents within [start, start + length) (VDDK-style paging), clipped
    start: int = _arg(_offset_check, 0)
    length: int | None = _arg(_length_check, None)
    #: a later change id of the file (e.g. a snapshot's): changes up to it only, exact
    until: str | None = _arg(str_arg, None)

    def reply(self, result: object) -> Changes:
        return _build(Changes, result)


@dataclass(frozen=True, slots=True)
class CbtInfo(Request[JSONObject]):
    command: ClassVar[str] = "cbt-info"
    summary: ClassVar[str] = "a file's tracking state: block size, size, change ids, counters"
    path: str = _arg(_path_check)

    def reply(self, result: object) -> JSONObject:
        return _object(result)


#: What a snapshot may be named.
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _snapshot_name_check(request: Mapping[str, object], key: str, default: object) -> object:
    if key not in request:
        return _default(key, default)
    value = str_arg(request, key)
    if not SNAPSHOT_NAME.fullmatch(value):
        raise _bad(key, f"{value!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
                   "with a letter or digit")
    return value


@dataclass(frozen=True, slots=True)
class SnapshotCreate(Request[JSONObject]):
    command: ClassVar[str] = "snapshot-create"
    summary: ClassVar[str] = "a point-in-time snapshot of every file of an entry"
    entry: str = _arg(_entry_check)
    name: str = _arg(_snapshot_name_check)

    def reply(self, result: object) -> JSONObject:
        return _object(result)


@dataclass(frozen=True, slots=True)
class SnapshotList(Request[list[JSONObject]]):
    command: ClassVar[str] = "snapshot-list"
    summary: ClassVar[str] = "the snapshots (of one entry, or all)"
    entry: str | None = _arg(lambda r, k, d: entry_arg(r, k) if k in r else d, None)

    def reply(self, result: object) -> list[JSONObject]:
        if not isinstance(result, list) or not all(isinstance(s, dict) for s in result):
            raise ControlError("the daemon sent a reply of the wrong shape")
        return result


@dataclass(frozen=True, slots=True)
class SnapshotDelete(Request[JSONObject]):
    command: ClassVar[str] = "snapshot-delete"
    summary: ClassVar[str] = "delete a snapshot"
    entry: str = _arg(_entry_check)
    name: str = _arg(_snapshot_name_check)

    def reply(self, result: object) -> JSONObject:
        return _object(result)


#: Every command, by name.
REQUESTS: dict[str, type[Request[object]]] = {
    cls.command: cls
    for cls in (Status, Locate, Migrate, Pause, Resume, Cancel, Rate, Watch,
                CbtCheckpoint, CbtChanges, CbtInfo, SnapshotCreate, SnapshotList,
                SnapshotDelete)
}
