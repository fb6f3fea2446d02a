"""Process managers: workflows that turn events into commands, with durable timers by name.

Pure Python, like the command handlers: a process manager is declared beside the aggregates,
names the event types it handles and, for each, the key of its instance (by default the id of
the aggregate the event happened to), and a handler per event type and per timer name::

    payments = ProcessManager("payment-deadline", PaymentWindow)

    @payments.on(OrderPlaced)
    def placed(event: OrderPlaced, state: PaymentWindow, react: Reaction) -> None:
        react.set_timer("payment", after=timedelta(minutes=30))

    @payments.on(OrderPaid)
    def paid(event: OrderPaid, state: PaymentWindow, react: Reaction) -> None:
        react.cancel_timer("payment")

    @payments.timer("payment")
    def expired(state: PaymentWindow, react: Reaction) -> None:
        react.send(CancelUnpaidOrder(), react.key)

A handler may change ``state`` in place or return a new one, send commands and set or cancel
timers. It decides only: ``react`` collects what it decided, and the write store commits it all,
with the record that the event was handled, in one transaction (G13). A handler that raises
commits nothing. Commands sent carry ids derived from the instance, the cause (the event, or the
timer's firing) and their rank, so sending them twice is one command (G2). A timer set again
replaces the one of that name; a timer is gone once it fired or was cancelled, and a timer
cancelled or replaced never fires.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel

from cqrskit.domain.model import Command, Event

_IDS = uuid.UUID("6b1f0d0e-8d0c-4a53-9b31-2a6e0c1f7a21")  # the namespace of derived ids
COMMAND_ID_PREFIX = "pm:"  # the ids of commands process managers send; refused from anyone else
EventHandler = Callable[[Any, Any, "Reaction"], Any]
TimerHandler = Callable[[Any, "Reaction"], Any]
Key = Callable[[Any], str]


def derived_id(*parts: str) -> str:
    """A UUID (version 5) from ``parts``: the same parts give the same id in every process."""
    return str(uuid.uuid5(_IDS, "\n".join(parts)))


@dataclass(frozen=True)
class SentCommand:
    """A command a reaction sends: its derived ``command_id``, ``type``, ``aggregate_id``, ``payload``."""

    command_id: str
    type: str
    aggregate_id: str
    payload: dict[str, Any]


@dataclass
class Reaction:
    """What one handler sees (``key``, ``now``, ``state``) and what it decided (``sent``,
    ``timers``: name -> (due, timer id) set, ``cancelled``: names cancelled)."""

    manager: str
    key: str
    cause: str  # the event id, or the firing timer's id
    now: datetime
    state: Any
    sent: list[SentCommand] = field(default_factory=list)
    timers: dict[str, tuple[datetime, str]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    known_timers: frozenset[str] = frozenset()

    def send(self, command: Command, aggregate_id: str) -> str:
        """Send ``command`` to the aggregate ``aggregate_id``; returns its derived command id."""
        if not isinstance(command, Command) or not hasattr(type(command), "type"):
            raise TypeError(f"send takes a Command instance, got {type(command).__name__}")
        command_id = COMMAND_ID_PREFIX + derived_id(self.manager, self.key, self.cause, str(len(self.sent)))
        self.sent.append(SentCommand(command_id, type(command).type, aggregate_id, command.model_dump(mode="json")))
        return command_id

    def set_timer(self, name: str, *, at: datetime | None = None, after: timedelta | None = None) -> datetime:
        """Set (or replace) the timer ``name`` of this instance, due ``at`` a time or ``after`` a
        delay from now (exactly one of them); returns when it is due."""
        if (at is None) == (after is None):
            raise ValueError("set_timer takes exactly one of at= or after=")
        if name not in self.known_timers:
            raise ValueError(f"{self.manager}: no handler for timer {name!r} (declare one with @manager.timer)")
        due = at if at is not None else self.now + after  # type: ignore[operator]
        if due.tzinfo is None:
            raise ValueError("set_timer: at= must be timezone-aware (UTC)")
        self.cancelled.discard(name)
        self.timers[name] = (due, derived_id(self.manager, self.key, name, self.cause))
        return due

    def cancel_timer(self, name: str) -> None:
        """Cancel the timer ``name`` of this instance (nothing happens when none is set)."""
        self.timers.pop(name, None)
        self.cancelled.add(name)


@dataclass(frozen=True)
class _On:
    handler: EventHandler
    key: Key | None


class ProcessManager:
    """A workflow's declaration (see the module docstring). ``State``: a pydantic model whose
    defaults are the state of an instance that has seen nothing yet. Raises ValueError when one
    event type or timer name gets two handlers."""

    def __init__(self, name: str, State: type[BaseModel]) -> None:
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"process manager name {name!r}: letters, digits, '-', '_' and '.' only")
        self.name = name
        self.State = State
        self.handlers: dict[str, _On] = {}
        self.timer_handlers: dict[str, TimerHandler] = {}

    def on(self, event_type: type[Event], *, key: Key | None = None) -> Callable[[EventHandler], EventHandler]:
        """Decorator: ``handler(event, state, react)`` for ``event_type``; ``key(event)`` names the
        instance (default: the id of the aggregate the event happened to)."""

        def register(handler: EventHandler) -> EventHandler:
            if event_type.type in self.handlers:
                raise ValueError(f"{self.name}: {event_type.type} has a handler already")
            self.handlers[event_type.type] = _On(handler, key)
            return handler

        return register

    def timer(self, name: str) -> Callable[[TimerHandler], TimerHandler]:
        """Decorator: ``handler(state, react)`` run when the timer ``name`` of an instance is due."""

        def register(handler: TimerHandler) -> TimerHandler:
            if name in self.timer_handlers:
                raise ValueError(f"{self.name}: timer {name!r} has a handler already")
            self.timer_handlers[name] = handler
            return handler

        return register

    @property
    def event_types(self) -> frozenset[str]:
        return frozenset(self.handlers)

    def key_of(self, event: Event, aggregate_id: str) -> str:
        """The key of the instance ``event`` (of the aggregate ``aggregate_id``) belongs to."""
        chosen = self.handlers[event.type].key
        key = aggregate_id if chosen is None else chosen(event)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.name}: the key of {event.type} must be a non-empty str, got {key!r}")
        return key

    def initial(self) -> BaseModel:
        return self.State()

    def react(self, event: Event, event_id: str, key: str, state: BaseModel, now: datetime) -> Reaction:
        """Run the handler of ``event`` on a copy of ``state``; what it decided (raises what it raises)."""
        reaction = Reaction(self.name, key, event_id, now, state.model_copy(deep=True),
                            known_timers=frozenset(self.timer_handlers))
        self._settle(reaction, self.handlers[event.type].handler(event, reaction.state, reaction))
        return reaction

    def fire(self, name: str, timer_id: str, key: str, state: BaseModel, now: datetime) -> Reaction:
        """Run the handler of the timer ``name`` (``timer_id``: the firing's identity)."""
        reaction = Reaction(self.name, key, timer_id, now, state.model_copy(deep=True),
                            known_timers=frozenset(self.timer_handlers))
        reaction.cancelled.add(name)  # fired: gone, unless the handler sets it again
        self._settle(reaction, self.timer_handlers[name](reaction.state, reaction))
        return reaction

    def _settle(self, reaction: Reaction, returned: Any) -> None:
        if returned is not None:
            if not isinstance(returned, self.State):
                raise TypeError(f"{self.name}: a handler returns None or a {self.State.__name__}, "
                                f"got {type(returned).__name__}")
            reaction.state = returned


class ProcessScenario:
    """Given/when/then for one process manager, in memory (no database, no broker, no sleep)::

        scenario = ProcessScenario(payments, now=T0)
        scenario.given("o1", OrderPlaced(...)).then_timers("o1", payment=T0 + timedelta(minutes=30))
        scenario.advance(timedelta(minutes=30)).then_sent(("CancelUnpaidOrder", "o1", {}))

    ``given(aggregate_id, *events)`` hands events of that aggregate to their handlers in order;
    ``advance`` moves the clock and fires every timer then due, oldest first; ``then_sent``
    asserts the commands sent since the last ``then_sent`` as (type, aggregate id, payload);
    ``then_timers`` the timers an instance has pending, by name."""

    def __init__(self, manager: ProcessManager, now: datetime) -> None:
        self.manager, self.now = manager, now
        self.states: dict[str, BaseModel] = {}
        self.timers: dict[tuple[str, str], tuple[datetime, str]] = {}
        self.sent: list[SentCommand] = []
        self._events = 0

    def given(self, aggregate_id: str, *events: Event) -> ProcessScenario:
        for event in events:
            if event.type not in self.manager.handlers:
                continue
            self._events += 1
            key = self.manager.key_of(event, aggregate_id)
            self._apply(self.manager.react(event, f"event-{self._events}", key, self.state(key), self.now))
        return self

    def advance(self, delay: timedelta) -> ProcessScenario:
        self.now += delay
        while due := sorted((at, key, name, tid) for (key, name), (at, tid) in self.timers.items() if at <= self.now):
            at, key, name, timer_id = due[0]
            del self.timers[(key, name)]
            self._apply(self.manager.fire(name, timer_id, key, self.state(key), self.now))
        return self

    def state(self, key: str) -> BaseModel:
        return self.states.get(key) or self.manager.initial()

    def then_sent(self, *expected: tuple[str, str, dict[str, Any]]) -> list[SentCommand]:
        sent, self.sent = self.sent, []
        got = [(c.type, c.aggregate_id, c.payload) for c in sent]
        assert got == list(expected), f"{self.manager.name} sent {got}, expected {list(expected)}"
        return sent

    def then_timers(self, key: str, **expected: datetime) -> None:
        got = {name: at for (k, name), (at, _) in self.timers.items() if k == key}
        assert got == expected, f"{self.manager.name} {key!r} has timers {got}, expected {expected}"

    def _apply(self, reaction: Reaction) -> None:
        self.states[reaction.key] = reaction.state
        self.sent.extend(reaction.sent)
        for name in reaction.cancelled:
            self.timers.pop((reaction.key, name), None)
        for name, timer in reaction.timers.items():
            self.timers[(reaction.key, name)] = timer
