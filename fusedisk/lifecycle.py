"""A relocation's life: its states, what moves it between them, and what each command answers.

One room holds the whole state machine of a relocation job, as tables:

- :data:`TRANSITIONS`: (state, event) → the next state. Any other pair is a
  bug, and :meth:`Lifecycle.move` raises :class:`IllegalTransition` for it.
- :data:`PHASE_OF`: the phase the datastore record persists in each state
  (``copying`` until the commit, ``committed`` from it, ``abandoned`` once a
  job failed or was cancelled, until its partial copy is gone). The record
  is saved whenever a move changes the phase, before the state changes: a
  save that fails leaves the job where it was.
- :data:`COMMANDS`: for each control command, in each state, ``ok`` or the
  exact refusal (error code and line) the control socket answers.

:class:`Lifecycle` is the one copy of a job's state: relocation.py moves it
(nothing else assigns a state), commands.py asks it what to answer, the
watch stream waits on :attr:`Lifecycle.changed`, and the datastore record's
phase comes from it. ``docs/control-protocol.md`` carries the tables as
:func:`markdown` renders them (a test compares the two).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .api import FINAL_STATES, State

log = logging.getLogger(__name__)


class Event(enum.StrEnum):
    """What happens to a relocation job."""

    RESUME_FOUND = "resume-found"  #: a partial copy to resume from was found
    PASS_DONE = "pass-done"  #: the first pass of a resumed job is over
    MIRROR = "mirror"  #: writes are mirrored to both stores from now on
    SWITCH = "switch"  #: a switchover attempt begins (the gate closes)
    ABANDON = "abandon"  #: the attempt did not fit the pause budget; copying goes on
    ABANDON_MIRRORING = "abandon-mirroring"  #: the same, while mirroring
    COMMIT = "commit"  #: the commit record is saved: the destination is the truth
    DONE = "done"  #: the old copy is gone (or kept aside); the record ended
    FAIL = "fail"  #: an error before the commit; the source is still the truth
    CANCEL = "cancel"  #: an accepted cancel took effect
    SUSPEND = "suspend"  #: the daemon stops; the next mount resumes the job


class Phase(enum.StrEnum):
    """What the datastore record says of a relocation (what a crash recovery acts on)."""

    COPYING = "copying"  #: the source is the truth: resume from the partial copy
    COMMITTED = "committed"  #: the destination is the truth: finish the switch
    ABANDONED = "abandoned"  #: failed or cancelled: remove the partial copy


_PRE_SWITCH = (State.RESUMING, State.COPYING, State.MIRRORING)

#: (state, event) → next state. Every state change of a job is one of these.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.COPYING, Event.RESUME_FOUND): State.RESUMING,
    (State.RESUMING, Event.PASS_DONE): State.COPYING,
    (State.RESUMING, Event.MIRROR): State.MIRRORING,
    (State.COPYING, Event.MIRROR): State.MIRRORING,
    (State.COPYING, Event.SWITCH): State.SWITCHING,
    (State.MIRRORING, Event.SWITCH): State.SWITCHING,
    (State.SWITCHING, Event.ABANDON): State.COPYING,
    (State.SWITCHING, Event.ABANDON_MIRRORING): State.MIRRORING,
    (State.SWITCHING, Event.COMMIT): State.FINISHING,
    (State.FINISHING, Event.DONE): State.DONE,
    **{(s, Event.FAIL): State.FAILED for s in (*_PRE_SWITCH, State.SWITCHING)},
    **{(s, Event.CANCEL): State.CANCELLED for s in (*_PRE_SWITCH, State.SWITCHING)},
    **{(s, Event.SUSPEND): State.SUSPENDED for s in (*_PRE_SWITCH, State.SWITCHING)},
}

#: The phase the datastore record holds while a job is in each state.
PHASE_OF: dict[State, Phase] = {
    State.RESUMING: Phase.COPYING,
    State.COPYING: Phase.COPYING,
    State.MIRRORING: Phase.COPYING,
    State.SWITCHING: Phase.COPYING,
    State.SUSPENDED: Phase.COPYING,
    State.FINISHING: Phase.COMMITTED,
    State.DONE: Phase.COMMITTED,
    State.FAILED: Phase.ABANDONED,
    State.CANCELLED: Phase.ABANDONED,
}


class Command(enum.StrEnum):
    """The control commands that act on an entry's job."""

    MIGRATE = "migrate"  #: a new job, while this one is in the state
    RESTART = "migrate --restart"  #: cancel this job, then start a new one
    PAUSE = "pause"
    RESUME = "resume"
    RATE = "rate"
    CANCEL = "cancel"
    WATCH = "watch"


@dataclass(frozen=True, slots=True)
class Answer:
    """``ok`` (``code`` is None) or a refusal: its name in the tables, its error
    code and its line.

    The line's ``{what}`` is the job as the request named it (``'vm1'``, or
    ``job 1f2e of 'vm1'``), ``{entry}`` the entry's name, ``{hint}`` a
    clause the caller adds (or nothing)."""

    name: str = "ok"
    code: str | None = None
    line: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None

    def text(self, *, entry: str, what: str | None = None, hint: str = "") -> str:
        return self.line.format(entry=repr(entry), what=what or repr(entry), hint=hint)

    def __str__(self) -> str:
        return self.name


OK = Answer()
NO_JOB = Answer("no-job", "no-job", "{what} is not being relocated")
TOO_LATE = Answer("too-late", "too-late", "the relocation of {entry} is already switching "
                  "over; it will complete")
BUSY = Answer("busy", "refused", "{entry} is already being relocated{hint}")
#: A job suspended by the daemon's stop keeps its record and its partial copy.
SUSPENDED = Answer("suspended", "refused", "the relocation of {entry} is suspended; the "
                   "next mount resumes it")
#: Every refusal of :data:`COMMANDS`.
REFUSALS = (NO_JOB, TOO_LATE, BUSY, SUSPENDED)


def _by_state(active: Answer, switching: Answer | None = None, final: Answer = NO_JOB,
              suspended: Answer | None = None) -> dict[State, Answer]:
    late = active if switching is None else switching
    return {**{s: active for s in _PRE_SWITCH},
            State.SWITCHING: late, State.FINISHING: late,
            **{s: final for s in FINAL_STATES},
            State.SUSPENDED: final if suspended is None else suspended}


#: command → state of the entry's job → the answer. A job in a final state is
#: over: the commands that act on a running job answer ``no-job`` for it.
COMMANDS: dict[Command, dict[State, Answer]] = {
    Command.MIGRATE: _by_state(BUSY, final=OK, suspended=SUSPENDED),
    Command.RESTART: _by_state(OK, TOO_LATE, final=OK, suspended=SUSPENDED),
    Command.PAUSE: _by_state(OK),
    Command.RESUME: _by_state(OK),
    Command.RATE: _by_state(OK),
    Command.CANCEL: _by_state(OK, TOO_LATE),
    Command.WATCH: _by_state(OK, final=OK),
}


class IllegalTransition(RuntimeError):
    """A move the transition table does not have: a bug in the caller."""


#: Saves the record's new phase (or raises, and the move does not happen).
Persist = Callable[[Phase], Awaitable[None]]


class Lifecycle:
    """One job's state, moved only through :data:`TRANSITIONS`.

    ``recorded`` says whether the datastore holds a record for the job (from
    :meth:`recorded_as` until the record ends): only then does a change of
    phase save it. ``changed`` is set, and replaced, at every move (the watch
    stream waits on it)."""

    def __init__(self, name: str, persist: Persist, state: State = State.COPYING) -> None:
        self.name = name
        self.state = state
        self.recorded = False
        self.visited: set[State] = {state}
        self.changed = trio.Event()
        self._persist = persist

    @property
    def phase(self) -> Phase:
        return PHASE_OF[self.state]

    @property
    def committed(self) -> bool:
        """The commit record was saved: the destination is the truth."""
        return self.phase == Phase.COMMITTED

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def answer(self, command: Command) -> Answer:
        return COMMANDS[command][self.state]

    def next_state(self, event: Event) -> State:
        """The state *event* leads to; IllegalTransition if the table has no such move."""
        try:
            return TRANSITIONS[self.state, event]
        except KeyError:
            raise IllegalTransition(f"relocation of {self.name!r}: no move on {event} from "
                                    f"{self.state}") from None

    async def advance(self, event: Event) -> State:
        """Move on *event*; when the phase changes and a record exists, save it first."""
        new = self.next_state(event)
        if self.recorded and PHASE_OF[new] != self.phase:
            await self._persist(PHASE_OF[new])
        return self._set(event, new)

    def move(self, event: Event) -> State:
        """Move on *event*, which must not change the persisted phase (it is not saved here)."""
        new = self.next_state(event)
        if self.recorded and PHASE_OF[new] != self.phase:
            raise IllegalTransition(f"relocation of {self.name!r}: {event} changes the phase "
                                    f"to {PHASE_OF[new]}; it must be saved (advance)")
        return self._set(event, new)

    def recorded_as(self, recorded: bool) -> None:
        """The datastore record of the job now exists (True) or ended (False)."""
        self.recorded = recorded

    def _set(self, event: Event, new: State) -> State:
        log.info("relocation of %r: %s → %s (%s)", self.name, self.state, new, event)
        self.state = new
        self.visited.add(new)
        self.changed.set()
        self.changed = trio.Event()
        return new


def markdown() -> str:
    """The transition and command tables, as ``docs/control-protocol.md`` shows them."""
    lines = ["| state | event | next state |", "|---|---|---|"]
    for (state, event), new in TRANSITIONS.items():
        lines.append(f"| `{state}` | {event} | `{new}` |")
    lines += ["", "| state | phase saved |", "|---|---|"]
    lines += [f"| `{state}` | {PHASE_OF[state]} |" for state in State]
    states = list(State)
    lines += ["", "| command | " + " | ".join(f"`{s}`" for s in states) + " |",
              "|---|" + "---|" * len(states)]
    for command, answers in COMMANDS.items():
        cells = [answers[s].name for s in states]
        lines.append(f"| {command} | " + " | ".join(cells) + " |")
    lines += ["", "| answer | error code | line |", "|---|---|---|"]
    for answer in REFUSALS:
        lines.append(f"| {answer.name} | `{answer.code}` | {answer.line} |")
    return "\n".join(lines)
