"""The relocation state machine: its tables, and real relocations walked through them.

Level: the datastore and the daemon's services on temp directories, no
mount (tests/directstore.py). Each (state, command) pair of
``lifecycle.COMMANDS`` is tried on a real Relocation held in that state (a
rate limit, or a stall point that waits, holds it there); a seeded-random
series of commands, on trio's autojump clock, is checked against a small
reference model of the table.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from fusedisk import api, control, lifecycle, mirror, switchover
from fusedisk import datastore as datastore_room
from fusedisk.api import State
from fusedisk.datastore import staging_name
from fusedisk.lifecycle import COMMANDS, TRANSITIONS, Command, Event, Lifecycle, Phase
from fusedisk.relocation import Relocation

from .directstore import Rig, services, store_config

MIB = 1 << 20
#: Slow enough that a job of DATA bytes copies for a minute: its first step
#: (up to a copy chunk) goes at once, the rest waits for the rate.
SLOW = 256 << 10
DATA = 4 * mirror.CHUNK_SIZE


# -- the tables ---------------------------------------------------------------------------


def test_every_state_is_reachable_and_only_final_states_have_no_way_out() -> None:
    reached, todo = {State.COPYING}, [State.COPYING]
    while todo:
        here = todo.pop()
        for (state, _event), new in TRANSITIONS.items():
            if state == here and new not in reached:
                reached.add(new)
                todo.append(new)
    assert reached == set(State)
    with_exits = {state for state, _event in TRANSITIONS}
    assert with_exits == set(State) - api.FINAL_STATES


def test_the_phase_and_command_tables_cover_every_state() -> None:
    assert set(lifecycle.PHASE_OF) == set(State)
    assert set(COMMANDS) == set(Command)
    for command, answers in COMMANDS.items():
        assert set(answers) == set(State), command
    # the commit is the only move into the committed phase, and nothing leaves it
    into = {(s, e) for (s, e), n in TRANSITIONS.items()
            if lifecycle.PHASE_OF[n] == Phase.COMMITTED != lifecycle.PHASE_OF[s]}
    assert into == {(State.SWITCHING, Event.COMMIT)}
    assert all(lifecycle.PHASE_OF[n] == Phase.COMMITTED for (s, _e), n in TRANSITIONS.items()
               if lifecycle.PHASE_OF[s] == Phase.COMMITTED)
    # a cancel is accepted exactly where it can still take effect
    accepted = {s for s, a in COMMANDS[Command.CANCEL].items() if a.ok}
    assert accepted == api.PRE_SWITCH_STATES


async def test_an_illegal_move_raises_and_a_phase_change_is_saved_first() -> None:
    saved: list[Phase] = []

    async def persist(phase: Phase) -> None:
        saved.append(phase)

    life = Lifecycle("vm1", persist)
    life.recorded_as(True)
    changed = life.changed
    with pytest.raises(lifecycle.IllegalTransition):
        life.move(Event.COMMIT)  # copying → commit: not a move
    with pytest.raises(lifecycle.IllegalTransition):
        life.move(Event.DONE)
    assert life.state == State.COPYING and not changed.is_set()
    life.move(Event.SWITCH)
    assert changed.is_set() and life.changed is not changed
    with pytest.raises(lifecycle.IllegalTransition):
        life.move(Event.COMMIT)  # changes the phase: must go through advance
    assert await life.advance(Event.COMMIT) == State.FINISHING
    assert saved == [Phase.COMMITTED] and life.committed

    async def failing(phase: Phase) -> None:
        raise OSError(errno.ENOSPC, "full")

    life = Lifecycle("vm2", failing)
    life.recorded_as(True)
    life.move(Event.SWITCH)
    with pytest.raises(OSError):
        await life.advance(Event.COMMIT)
    assert life.state == State.SWITCHING and not life.committed  # the save came first


# -- real relocations held in each state ----------------------------------------------------


class Holds:
    """Stall points (failpoint.stall) that block, or fail, on demand: a test's seam."""

    def __init__(self) -> None:
        self.point: str | None = None
        self.when: Callable[[], bool] = lambda: True
        self.error: OSError | None = None
        self.reached = trio.Event()
        self.release = trio.Event()

    def arm(self, point: str, when: Callable[[], bool] = lambda: True,
            error: OSError | None = None) -> None:
        self.point, self.when, self.error = point, when, error

    async def stall(self, name: str) -> None:
        if name != self.point or not self.when():
            return
        self.point = None  # once
        self.reached.set()
        if self.error is not None:
            raise self.error
        await self.release.wait()


@dataclass
class Held:
    rig: Rig
    holds: Holds
    job: Relocation
    tmp_path: Path
    data: bytes
    other: list[Relocation] = field(default_factory=list)
    final_store: str = ""


async def until(job: Relocation, check: Callable[[], bool], what: str) -> None:
    """Wait for *check*: at each move of *job*, and at least every 10 ms (for what is
    no move: the copy set up)."""
    with trio.fail_after(120):  # generous: a loaded machine is slow, never this slow
        while not check():
            with trio.move_on_after(0.01):
                await job.life.changed.wait()
    assert check(), what


async def start(rig: Rig, **options: object) -> Relocation:
    request = api.Migrate(entry="vm1", to="b", **options)  # type: ignore[arg-type]
    await rig.commands.migrate(request)
    return rig.relocator.jobs["vm1"]


async def _copying(h: Held) -> None:
    h.job = await start(h.rig, rate=SLOW)
    await until(h.job, lambda: h.job.tree is not None, "copying")


async def _mirroring(h: Held) -> None:
    h.job = await start(h.rig, rate=SLOW, mode=api.Mode.MIRROR)
    await until(h.job, lambda: h.job.state == State.MIRRORING, "mirroring")


async def _resuming(h: Held) -> None:
    await _suspended(h)
    h.other.append(h.job)
    h.job = h.rig.relocator.start(h.job.entry, h.job.dst, h.job.options, resume=True)
    await until(h.job, lambda: h.job.state == State.RESUMING, "resuming")


async def _switching(h: Held) -> None:
    h.holds.arm("switchover-flush")
    h.job = await start(h.rig)
    await h.holds.reached.wait()


async def _finishing(h: Held) -> None:
    job: list[Relocation] = []
    h.holds.arm("record-save", lambda: bool(job) and job[0].state == State.FINISHING)
    job.append(await start(h.rig))
    h.job = job[0]
    await h.holds.reached.wait()


async def _done(h: Held) -> None:
    h.job = await start(h.rig)
    await h.job.finished.wait()


async def _failed(h: Held) -> None:
    h.holds.arm("switchover-flush", error=OSError(errno.EIO, "a failing disk"))
    h.job = await start(h.rig)
    await h.job.finished.wait()


async def _cancelled(h: Held) -> None:
    await _copying(h)
    assert h.job.cancel()
    await h.job.finished.wait()


async def _suspended(h: Held) -> None:
    await _copying(h)
    h.job.suspend()
    await h.job.finished.wait()


REACH: dict[State, Callable[[Held], Awaitable[None]]] = {
    State.COPYING: _copying, State.MIRRORING: _mirroring, State.RESUMING: _resuming,
    State.SWITCHING: _switching, State.FINISHING: _finishing, State.DONE: _done,
    State.FAILED: _failed, State.CANCELLED: _cancelled, State.SUSPENDED: _suspended,
}


@asynccontextmanager
async def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               state: State) -> AsyncIterator[Held]:
    holds = Holds()
    monkeypatch.setattr(switchover, "stall", holds.stall)
    monkeypatch.setattr(datastore_room, "stall", holds.stall)
    config = store_config(tmp_path)
    (tmp_path / "a" / "vm1").mkdir()
    data = os.urandom(DATA)
    (tmp_path / "a" / "vm1" / "disk.img").write_bytes(data)
    async with services(config) as rig:
        h = Held(rig, holds, None, tmp_path, data)  # type: ignore[arg-type]
        await REACH[state](h)
        assert h.job.state == state
        yield h
        # let whatever runs end: release a hold, lift a pause and the limit
        holds.release.set()
        for job in (h.job, *rig.relocator.jobs.values()):
            job.resume()
            job.set_rate(0)
            await job.finished.wait()
        entry = rig.datastore.get("vm1")
        assert entry is not None
        h.final_store = entry.store.name


def request_of(command: Command, job: Relocation) -> api.Request[object]:
    return {
        Command.MIGRATE: api.Migrate(entry="vm1", to="a" if job.committed else "b"),
        Command.RESTART: api.Migrate(entry="vm1", to="a" if job.committed else "b",
                                     restart=True),
        Command.PAUSE: api.Pause(entry="vm1", job=job.id),
        Command.RESUME: api.Resume(entry="vm1", job=job.id),
        Command.RATE: api.Rate(entry="vm1", rate=12345, job=job.id),
        Command.CANCEL: api.Cancel(entry="vm1", job=job.id),
        Command.WATCH: api.Watch(entry="vm1", job=job.id),
    }[command]


async def send(rig: Rig, request: api.Request[object]) -> object:
    handler = rig.commands.table()[request.command].handler
    return await handler(request.encode())


def expected_refusal(answer: lifecycle.Answer, job: Relocation) -> tuple[str | None, str]:
    what = f"job {job.id} of 'vm1'"
    hint = ""
    if answer is lifecycle.BUSY and job.resumed:
        hint = "; it resumed after an interruption: `migrate --restart` starts it over"
    return answer.code, answer.text(entry="vm1", what=what, hint=hint)


def check_sides(h: Held, command: Command, before: State) -> None:
    """What an accepted command did to the job."""
    job = h.job
    if command == Command.PAUSE:
        assert job.statistics().paused and job.state == before
    elif command == Command.RESUME:
        assert not job.statistics().paused and job.state == before
    elif command == Command.RATE:
        assert job.statistics().rate_limit == 12345 and job.state == before


@pytest.mark.parametrize("state", list(State))
async def test_every_command_answers_in_every_state_as_the_table_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: State,
) -> None:
    for command in Command:
        answer = COMMANDS[command][state]
        where = tmp_path / command.value.replace(" ", "").replace("-", "")
        where.mkdir()
        async with held(where, monkeypatch, state) as h:
            job = h.job
            try:
                result = await send(h.rig, request_of(command, job))
            except api.RequestError as e:
                assert not answer.ok, f"{command} in {state}: refused ({e}), the table says ok"
                assert (e.code, str(e)) == expected_refusal(answer, job), (command, state)
                assert job.state == state  # a refusal changes nothing
            else:
                assert answer.ok, f"{command} in {state}: ok, the table says {answer}"
                if isinstance(result, control.Stream):
                    first = await anext(aiter(result.events))
                    assert first["state"] == state
                    await result.events.aclose()  # type: ignore[attr-defined]
                check_sides(h, command, state)
                if command in (Command.CANCEL, Command.RESTART) and state in (
                        api.PRE_SWITCH_STATES):
                    await job.finished.wait()
                    assert job.state == State.CANCELLED
                    assert job.entry.store.name == "a"  # the source stays the truth
                if command in (Command.MIGRATE, Command.RESTART):
                    new = h.rig.relocator.jobs["vm1"]
                    assert new is not job and not new.life.final
                    new.cancel()
        # what the job's end left: the job's last state, and one copy, where that says
        cancelled = answer.ok and command in (Command.CANCEL, Command.RESTART)
        on_b = state in (State.SWITCHING, State.FINISHING, State.DONE) or (
            state in api.PRE_SWITCH_STATES and not cancelled)
        assert job.state == (State.DONE if on_b else State.CANCELLED if state in (
            api.PRE_SWITCH_STATES) else state), (command, state)
        assert h.final_store == ("b" if on_b else "a"), (command, state)
        on, off = ("b", "a") if on_b else ("a", "b")
        assert (where / on / "vm1" / "disk.img").read_bytes() == h.data, (command, state)
        assert not (where / off / "vm1").exists(), (command, state)
        assert (where / "b" / staging_name("vm1")).exists() == (state == State.SUSPENDED)


# -- a random series of commands against a reference model of the table ---------------


@pytest.mark.parametrize("seed", range(6))
async def test_random_commands_follow_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
    seed: int,
) -> None:
    """Commands at random moments of a real job: each answer is the table's for the
    state the job is in, and the job ends as the accepted commands say (a model)."""
    rng = random.Random(seed)
    holds = Holds()
    monkeypatch.setattr(switchover, "stall", holds.stall)
    config = store_config(tmp_path)
    (tmp_path / "a" / "vm1").mkdir()
    (tmp_path / "a" / "vm1" / "disk.img").write_bytes(os.urandom(DATA))
    async with services(config) as rig:
        job = await start(rig, rate=SLOW, mode=rng.choice(list(api.Mode)))
        # the model: what the accepted commands leave
        paused, rate, cancelled = False, SLOW, False
        for _step in range(rng.randint(3, 12)):
            await trio.sleep(rng.choice([0, 0.5, 5, 20]))
            command = rng.choice([Command.PAUSE, Command.RESUME, Command.RATE, Command.CANCEL,
                                  Command.WATCH, Command.MIGRATE])
            state = job.state
            answer = COMMANDS[command][state]
            request: api.Request[object] = request_of(command, job)
            if command == Command.RATE:
                new_rate = rng.choice([SLOW, 4 * SLOW, 0])
                request = api.Rate(entry="vm1", rate=new_rate, job=job.id)
            try:
                result = await send(rig, request)
            except api.RequestError as e:
                assert (e.code, str(e)) == expected_refusal(answer, job), (command, state)
            else:
                assert answer.ok, (command, state)
                if isinstance(result, control.Stream):
                    await result.events.aclose()  # type: ignore[attr-defined]
                if command == Command.PAUSE:
                    paused = True
                elif command == Command.RESUME:
                    paused = False
                elif command == Command.RATE:
                    rate = new_rate
                elif command == Command.CANCEL:
                    cancelled = True
                elif command == Command.MIGRATE:
                    break  # a new job: the model has followed this one to its end
            if cancelled:
                break
            stats = job.statistics()
            if not job.life.final:
                assert (stats.paused, stats.rate_limit) == (paused, rate), (seed, command)
        job.resume()
        job.set_rate(0)
        await job.finished.wait()
        assert job.state == (State.CANCELLED if cancelled else State.DONE), seed
        assert rig.datastore.get("vm1").store.name == ("a" if cancelled else "b")  # type: ignore[union-attr]
        for other in rig.relocator.jobs.values():
            other.cancel()
            await other.finished.wait()
