"""The control API (fusedisk/api.py): its codec against a reference, and the document against it.

The codec is driven with random requests: every valid request must survive
encode → JSON → decode unchanged, and every mutation that breaks one rule
(an unknown key, a wrong type, a value out of range, a missing argument)
must be refused with ``bad-argument`` naming the key. The protocol document
must list exactly the commands and arguments the code defines.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fusedisk import api, lifecycle, mountinfo
from fusedisk.config import MAX_PAUSE_MS, MAX_RATE, MIN_PAUSE_MS
from fusedisk.errors import ControlError

DOC = Path(__file__).resolve().parent.parent / "docs" / "control-protocol.md"
SEEDS = range(12)


def _name(rng: random.Random) -> str:
    alphabet = "abcXYZ019 ._-é"
    while True:
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        if name not in (".", ".."):
            return name


def _valid(cls: type[api.Request[Any]], rng: random.Random) -> dict[str, Any]:
    """A random valid wire form of *cls*, some optional arguments left out."""
    wire: dict[str, Any] = {"cmd": cls.command}
    for f in dataclasses.fields(cls):
        optional = f.default is not dataclasses.MISSING
        if optional and rng.random() < 0.4:
            continue
        makers: dict[str, Callable[[], object]] = {
            "entry": lambda: _name(rng),
            "path": lambda: "/".join(_name(rng) for _ in range(rng.randint(1, 3))),
            "to": lambda: _name(rng),
            "since": lambda: rng.choice(["*", "0123abcd-1"]),
            "rate": lambda: rng.choice([0, 1, MAX_RATE, rng.randint(0, MAX_RATE), "200M"]),
            "max_pause_ms": lambda: rng.randint(MIN_PAUSE_MS, MAX_PAUSE_MS),
            "mode": lambda: rng.choice([m.value for m in api.Mode]),
            "keep_source": lambda: rng.random() < 0.5,
            "restart": lambda: rng.random() < 0.5,
            "stall_timeout_s": lambda: rng.choice([0, 1, 86400, rng.randrange(86400)]),
            "job": lambda: f"{rng.getrandbits(64):016x}",
            "name": lambda: rng.choice(["s1", "before-move", "a.b_c"]),
            "start": lambda: rng.choice([0, 1, rng.randrange(1 << 62), "1G"]),
            "length": lambda: rng.choice([1, rng.randrange(1, 1 << 62), "64M"]),
            "until": lambda: "0123abcd/2",
        }
        wire[f.name] = makers[f.name]()
    return wire


#: For each argument: values that break it, whatever the command.
_WRONG: dict[str, list[Any]] = {
    "entry": ["", ".", "..", "a/b", "a\0b", "x" * 256, 5, None, ["vm"]],
    "path": ["/abs", "a//b", "a/../b", "a/", "", 7, None],
    "to": [1, None, ["b"]],
    "since": [1, None],
    "rate": [-1, 1.5, MAX_RATE + 1, "1e400", "fast", True, None],
    "max_pause_ms": [MIN_PAUSE_MS - 1, MAX_PAUSE_MS + 1, 1.5, "100", True, None],
    "mode": ["fast", 1, None],
    "keep_source": [1, "yes", None],
    "restart": [1, "yes", None],
    "stall_timeout_s": [-1, 86401, 1.5, "10", True, None],
    "job": ["", "../x", "a" * 65, 5, None],
    "name": ["", "../x", "-x", "a" * 65, 5, None],
    "until": [5, ["x"]],
    "start": [-1, 1 << 63, "x", None, 1.5],
    "length": [0, -1, 1 << 63, "0", None],
}


@pytest.mark.parametrize("seed", SEEDS)
def test_requests_round_trip_and_every_broken_rule_is_refused(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        cls = rng.choice(list(api.REQUESTS.values()))
        wire = _valid(cls, rng)
        decoded = cls.decode(json.loads(json.dumps(wire)))
        again = cls.decode(json.loads(json.dumps(decoded.encode())))
        assert again == decoded, wire
        for key, value in wire.items():  # what was sent is what was understood
            if key not in ("cmd", "rate", "start", "length"):  # sizes: "1G" is a number
                got = getattr(decoded, key)
                assert (got.value if isinstance(got, api.Mode) else got) == value
        broken = dict(wire)
        rule = rng.choice(["unknown", "wrong", "missing"])
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        if rule == "missing" and required:
            key = rng.choice(required)
            broken.pop(key, None)
        elif rule == "wrong" and len(wire) > 1:
            key = rng.choice([k for k in wire if k != "cmd"])
            broken[key] = rng.choice(_WRONG[key])
        else:
            key = rng.choice(["frobnicate", "Entry", "from", "cmd2"])
            broken[key] = 1
        with pytest.raises(api.RequestError) as refused:
            cls.decode(broken)
        assert refused.value.code == "bad-argument"
        assert repr(key) in str(refused.value), (broken, str(refused.value))


def _job(rng: random.Random) -> api.Job:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(api.Job):
        kind = str(f.type)
        values[f.name] = (
            rng.choice(list(api.State)) if f.name == "state"
            else rng.choice(list(api.Mode)) if f.name == "mode"
            else rng.random() < 0.5 if kind == "bool"
            else rng.randint(0, 1 << 40) if kind == "int"
            else rng.random() * 1e3 if kind == "float"
            else rng.choice([None, rng.random()]) if kind == "float | None"
            else rng.choice([None, _name(rng)]) if kind == "str | None"
            else _name(rng)
        )
    return api.Job(**values)


@pytest.mark.parametrize("seed", SEEDS)
def test_jobs_round_trip_through_their_wire_form(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        job = _job(rng)
        wire = json.loads(json.dumps(job.to_wire()))
        assert {"from", "to", "pass", "id"} <= set(wire)
        assert api.Job.from_wire(wire) == job
        assert set(wire) == set(api.JobWire.__annotations__)  # the wire type is the wire
        assert job.final == (job.state in {api.State.DONE, api.State.FAILED,
                                           api.State.CANCELLED, api.State.SUSPENDED})
        wire.pop(rng.choice(sorted(wire)))
        with pytest.raises(ControlError):
            api.Job.from_wire(wire)


def test_final_active_and_cancellable_states_partition_the_states() -> None:
    assert api.FINAL_STATES | api.ACTIVE_STATES == set(api.State)
    assert not api.FINAL_STATES & api.ACTIVE_STATES
    assert api.PRE_SWITCH_STATES <= api.ACTIVE_STATES
    assert api.State.SWITCHING not in api.PRE_SWITCH_STATES


def _doc_commands() -> dict[str, str]:
    """cmd → its arguments cell, from the document's command table."""
    rows = {}
    text = DOC.read_text()
    text = text[:text.index("<!-- lifecycle tables: begin -->")]  # those rows are states
    for line in text.splitlines():
        m = re.match(r"\| (`[a-z-]+`(?:, `[a-z-]+`)*) \| ([^|]*) \|", line)
        if m:
            for cmd in re.findall(r"`([a-z-]+)`", m[1]):
                rows[cmd] = m[2]
    return rows


def test_the_protocol_document_lists_every_command_and_argument() -> None:
    documented = {cmd: cell for cmd, cell in _doc_commands().items() if cmd in api.REQUESTS
                  or not cmd.startswith(("bad-", "unknown-", "line-", "idle-", "too-",
                                         "internal-"))}
    assert set(documented) == set(api.REQUESTS)
    for cmd, cell in documented.items():
        named = set(re.findall(r"`([a-z_]+)`", cell)) - {m.value for m in api.Mode}
        assert named == set(api.REQUESTS[cmd].arguments()), cmd


def test_the_protocol_document_names_every_job_field_and_state() -> None:
    text = DOC.read_text()
    paragraph = text[text.index("A job (in"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    wire = set(_job(random.Random(0)).to_wire())
    assert wire <= named, wire - named
    assert {s.value for s in api.State} <= named


def test_the_protocol_document_shows_the_lifecycle_tables_of_the_code() -> None:
    """The transition and command tables of docs/control-protocol.md are the code's."""
    text = DOC.read_text()
    begin, end = "<!-- lifecycle tables: begin -->\n", "\n<!-- lifecycle tables: end -->"
    shown = text[text.index(begin) + len(begin):text.index(end)]
    assert shown == lifecycle.markdown(), "run: python -c 'from fusedisk import lifecycle; " \
        "print(lifecycle.markdown())' and paste it into the document"


# -- the mount table ---------------------------------------------------------------------


def test_mountinfo_unescapes_paths_and_finds_the_topmost_mount() -> None:
    table = (
        b"22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n"
        b"40 22 0:40 / /mnt/with\\040space\\134and\\011tab rw master:1 - fuse.fusedisk "
        b"fusedisk rw,user_id=0\n"
        b"41 40 0:41 / /mnt/with\\040space\\134and\\011tab rw - xfs /dev/loop0 rw\n"
        b"garbage line\n"
    )
    mounts = mountinfo.parse(table)
    assert [m.fstype for m in mounts] == ["proc", "fuse.fusedisk", "xfs"]
    assert mounts[1].mountpoint == b"/mnt/with space\\and\ttab"
    assert mounts[2].source == "/dev/loop0"
    assert mountinfo.fstype_at("/proc") == "proc"
    assert mountinfo.is_mounted("/proc")
    assert mountinfo.fstype_holding("/proc/self") == "proc"
    assert mountinfo.fstype_at("/proc/self") is None
