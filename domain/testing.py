"""An in-memory implementation of the handler port, and given/when/then (``Scenario``), for unit
tests of a domain's handlers.

It is a real implementation of ``HandlerContext`` (aggregates are stored as snapshots and
versions, claims as a dict), not a mock; ``commit`` behaves like the write store's unit of work
minus durability: it raises ``ConcurrencyConflict`` when a stream moved since it was loaded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

from cqrskit.domain.model import Aggregate, Event, RuleViolation, restore, stream_id
from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.registry import Registry

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


class InMemoryStore:
    """Streams as lists of events plus unique claims; shared by successive contexts."""

    def __init__(self) -> None:
        self.streams: dict[str, list[Event]] = {}
        self.claims: dict[tuple[str, str], str] = {}

    def context(self, clock: datetime | None = None) -> InMemoryContext:
        return InMemoryContext(self, clock)

    def execute(self, registry: Registry, name: str, aggregate_id: str, payload: dict[str, Any]) -> list[Event]:
        """Decide one command and commit it; returns the new events. Raises RuleViolation."""
        command = registry.command_type(name).model_validate(payload)
        ctx = self.context()
        registry.handler(name)(command, aggregate_id, ctx)
        return ctx.commit()


class InMemoryContext:
    def __init__(self, store: InMemoryStore, clock: datetime | None = None) -> None:
        self.store = store
        self.loaded: dict[str, Aggregate[Any]] = {}
        self.claimed: dict[tuple[str, str], str | None] = {}
        self.clock = clock or datetime.now(UTC)

    def load(self, cls: type[A], aggregate_id: str) -> A:
        sid = stream_id(cls.stream_type, aggregate_id)
        if sid in self.loaded:
            return self.loaded[sid]  # type: ignore[return-value]
        events = list(self.store.streams.get(sid, []))  # as of now, whatever is appended meanwhile
        aggregate = restore(cls, aggregate_id, len(events), None, None, lambda: events)
        self.loaded[sid] = aggregate
        return aggregate

    def owner_of(self, scope: str, key: str) -> str | None:
        if (scope, key) in self.claimed:
            return self.claimed[(scope, key)]
        return self.store.claims.get((scope, key))

    def claim(self, scope: str, key: str, owner: str) -> None:
        if self.owner_of(scope, key) not in (None, owner):
            raise RuleViolation(f"{scope} {key!r} is already taken")
        self.claimed[(scope, key)] = owner

    def release(self, scope: str, key: str, owner: str) -> None:
        if self.owner_of(scope, key) == owner:
            self.claimed[(scope, key)] = None

    def now(self) -> datetime:
        return self.clock

    def commit(self) -> list[Event]:
        """Append every loaded aggregate's pending events if no stream moved; apply claims."""
        for sid, aggregate in self.loaded.items():
            if aggregate.pending and len(self.store.streams.get(sid, [])) != aggregate.version:
                raise ConcurrencyConflict(sid)
        for key, owner in self.claimed.items():
            if owner is not None and self.store.claims.get(key, owner) != owner:
                raise ConcurrencyConflict(f"claim {key} taken meanwhile")
        new: list[tuple[int, Event]] = []
        for sid, aggregate in self.loaded.items():
            self.store.streams.setdefault(sid, []).extend(aggregate.pending)
            new.extend(aggregate.pending_in_order())
        for key, owner in self.claimed.items():
            if owner is None:
                self.store.claims.pop(key, None)
            else:
                self.store.claims[key] = owner
        return [event for _, event in sorted(new, key=lambda item: item[0])]


class Scenario:
    """Given/when/then for a domain's handlers, on the in-memory store (no database, no broker):

        Scenario(registry).given(Room, "r1", RoomAdded(...)) \\
            .when("BookRoom", "b1", {...}).then(RoomBooked(...))

    ``given`` puts events on a stream (claims are not derived from events: to set up a unique
    claim, ``given_command`` runs a command that takes it); ``when`` decides one command at
    ``now``; the result's ``then``, ``then_rejected`` and ``then_nothing`` assert with a clear
    message. A payload that fails validation raises pydantic's ValidationError from ``when``."""

    def __init__(self, registry: Registry, now: datetime | None = None) -> None:
        self.registry = registry
        self.store = InMemoryStore()
        self.now = now

    def given(self, aggregate: type[Aggregate[Any]], aggregate_id: str, *events: Event) -> Scenario:
        sid = aggregate(aggregate_id).stream_id
        self.store.streams.setdefault(sid, []).extend(events)
        return self

    def given_command(self, name: str, aggregate_id: str, payload: dict[str, Any]) -> Scenario:
        """Run a command that must succeed (its events and claims become the history)."""
        self.when(name, aggregate_id, payload).then_succeeded()
        return self

    def when(self, name: str, aggregate_id: str, payload: dict[str, Any]) -> Decision:
        command = self.registry.command_type(name).model_validate(payload)
        ctx = self.store.context(self.now)
        try:
            self.registry.handler(name)(command, aggregate_id, ctx)
        except RuleViolation as exc:
            return Decision(name, None, exc.reason)
        return Decision(name, ctx.commit(), None)


class Decision:
    """What a command decided: new ``events``, or a ``rejection`` reason."""

    def __init__(self, name: str, events: list[Event] | None, rejection: str | None) -> None:
        self.name, self.events, self.rejection = name, events, rejection

    def then(self, *expected: Event) -> list[Event]:
        """Assert the command recorded exactly ``expected``, in order."""
        events = self.then_succeeded()
        assert events == list(expected), f"{self.name} recorded {events}, expected {list(expected)}"
        return events

    def then_succeeded(self) -> list[Event]:
        assert self.events is not None, f"{self.name} was rejected: {self.rejection}"
        return self.events

    def then_rejected(self, containing: str = "") -> str:
        """Assert the command was rejected, its reason containing ``containing``."""
        assert self.rejection is not None, f"{self.name} was not rejected: it recorded {self.events}"
        assert containing in self.rejection, f"{self.name} was rejected with {self.rejection!r}, " \
                                             f"not a reason containing {containing!r}"
        return self.rejection

    def then_nothing(self) -> None:
        """Assert the command succeeded and recorded nothing (an idempotent repeat)."""
        assert self.then_succeeded() == [], f"{self.name} recorded {self.events}, expected nothing"
