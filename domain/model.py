"""The domain-agnostic core of the write model: events, commands, aggregates and rule errors.

Pure Python: nothing here knows about databases, brokers or search. A user's own domain uses
these types exactly as the example apps (the `examples/` folder of the repository) do.
"""

from __future__ import annotations

import functools
import itertools
import json
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class RuleViolation(Exception):
    """A business rule refused the command. Final: the command is recorded ``rejected``, never retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_RECORDING = itertools.count(1)  # the order of ``Aggregate.record`` calls (next() is atomic in CPython)


class UnregisteredEvent(TypeError):
    """An event of a type no registry knows was recorded: a programming error, raised where the
    handler records it (in a worker, a Scenario and the Harness alike), never stored."""


class Event(BaseModel):
    """A fact that happened to one aggregate. Subclasses set ``type`` and, when their shape
    changes, bump ``schema_version`` and register an upcaster for the older shapes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: ClassVar[str]
    schema_version: ClassVar[int] = 1


class Command(BaseModel):
    """The payload of a command. ``aggregate`` names the aggregate type its envelope's
    ``aggregate_id`` refers to. Unknown fields are refused (G10)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)
    type: ClassVar[str]
    aggregate: ClassVar[type[Aggregate[Any]]]


S = TypeVar("S", bound=BaseModel)


class Aggregate(Generic[S]):
    """A consistency boundary: a stream of events folded into a state.

    Subclasses set ``stream_type`` and ``State`` (a pydantic model with defaults for a stream
    that does not exist yet) and implement ``apply``. Decisions call ``record`` with new events;
    the unit of work appends the pending events with the version the aggregate was loaded at,
    so two concurrent decisions on one aggregate can never both commit (G4).
    Snapshots cannot go stale: each is stored with ``snapshot_version()``, which combines
    ``state_version`` with a fingerprint of ``State``'s shape (its JSON Schema), and one taken
    under another shape is ignored: the aggregate is folded again from its events and the new
    snapshot written with its next event. A field added to ``State`` therefore needs no bump;
    bump ``state_version`` (1..2047) when ``apply`` changes meaning with the same shape.
    """

    stream_type: ClassVar[str]
    State: ClassVar[type[BaseModel]]
    state_version: ClassVar[int] = 1

    def __init__(self, aggregate_id: str, version: int = 0, state: S | None = None) -> None:
        self.id = aggregate_id
        self.version = version
        self.state: S = state if state is not None else self.State()  # type: ignore[assignment]
        self.pending: list[Event] = []
        self._stamps: list[int] = []  # one per pending event: the order ``record`` saw them in

    @property
    def exists(self) -> bool:
        return self.version > 0 or bool(self.pending)

    @property
    def stream_id(self) -> str:
        return stream_id(self.stream_type, self.id)

    def apply(self, event: Event) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self, event: Event) -> None:
        """Apply a new event and keep it for the unit of work to append. Raises UnregisteredEvent
        when the event's type was never registered (``Registry.event``)."""
        if not type(event).__dict__.get("__cqrskit_registered__", False):  # a subclass registers itself
            raise UnregisteredEvent(f"{type(event).__name__} (type {getattr(event, 'type', '?')!r}) is not a "
                                    f"registered event type: decorate it with @registry.event")
        self.apply(event)
        del self._stamps[: max(0, len(self._stamps) - len(self.pending))]  # a store cleared ``pending``
        self.pending.append(event)
        self._stamps.append(next(_RECORDING))

    def pending_in_order(self) -> list[tuple[int, Event]]:
        """The pending events, each with a stamp giving the place of each event among all those recorded in this process:
        a unit of work sorts the events of all its aggregates by it, so that one command's events
        keep the order its handler recorded them in, across aggregates."""
        return list(zip(self._stamps[len(self._stamps) - len(self.pending):], self.pending, strict=True))

    def replay(self, events: list[Event], version: int) -> None:
        """Fold stored events into the state (loading); ``version`` is the last one's version."""
        for event in events:
            self.apply(event)
        self.version = version

    def require(self, condition: bool, reason: str) -> None:
        """Raise RuleViolation(reason) unless condition holds."""
        if not condition:
            raise RuleViolation(reason)

    @classmethod
    def snapshot_version(cls) -> int:
        """What a stored snapshot must have been taken under to be trusted: ``state_version``
        in the high bits, a 20-bit fingerprint of ``State``'s JSON Schema in the low ones (a
        positive 32-bit integer). Raises ValueError for a ``state_version`` outside 1..2047."""
        return _snapshot_version(cls)

    def snapshot(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    @classmethod
    def restore(cls, aggregate_id: str, version: int, snapshot: dict[str, Any]) -> Aggregate[Any]:
        return cls(aggregate_id, version, cls.State.model_validate(snapshot))


A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


def restore(cls: type[A], aggregate_id: str, version: int, snapshot: dict[str, Any] | str | None,
            state_version: int | None, history: Callable[[], list[Event]]) -> A:
    """An aggregate as its stream left it, the one way every store loads one: at ``version``
    (0: no stream yet, the default state), from its ``snapshot`` when that was taken at the
    class's ``state_version``, else by folding the events that ``history()`` returns (called
    only then: reading them costs). A snapshot read as JSON text is parsed once, by pydantic,
    unless the class overrides ``Aggregate.restore``."""
    if version == 0:
        return cls(aggregate_id)
    if snapshot is not None and state_version == cls.snapshot_version():
        if isinstance(snapshot, str):
            if cls.restore.__func__ is Aggregate.restore.__func__:  # type: ignore[attr-defined]
                return cls(aggregate_id, version, cls.State.model_validate_json(snapshot))
            snapshot = json.loads(snapshot)
        return cls.restore(aggregate_id, version, snapshot)  # type: ignore[arg-type,return-value]
    aggregate = cls(aggregate_id)
    aggregate.replay(history(), version)
    return aggregate


@functools.cache
def _snapshot_version(cls: type[Aggregate[Any]]) -> int:
    if not isinstance(cls.state_version, int) or not 1 <= cls.state_version <= 2047:
        raise ValueError(f"{cls.__name__}.state_version must be an int in 1..2047, got {cls.state_version!r}")
    shape = json.dumps(cls.State.model_json_schema(), sort_keys=True, separators=(",", ":"))
    return (cls.state_version << 20) | (zlib.crc32(shape.encode()) & 0xFFFFF)


def stream_id(stream_type: str, aggregate_id: str) -> str:
    """The write store's identity of an aggregate's stream: ``<stream_type>:<aggregate_id>``."""
    return f"{stream_type}:{aggregate_id}"
