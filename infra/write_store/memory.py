"""The write store in memory: the domain's ``InMemoryStore`` (streams of events, unique claims)
grown to the whole write-store port, so that the executor and an app's tests can run without a
database. Not durable; thread-safe (one lock around every commit and outcome); one decision at
a time (``batches`` is False). The store contract (tests/test_event_store_contract.py) runs
unchanged against it, PostgreSQL and SQLite.

Raised by ``commit``: ``ConcurrencyConflict`` when a stream moved since it was loaded or a claim
was taken meanwhile, ``DuplicateCommand`` when the command id has an outcome (nothing written).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

from cqrskit.domain.model import Aggregate, Event
from cqrskit.domain.registry import Registry
from cqrskit.domain.testing import InMemoryContext, InMemoryStore
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.write_store.port import Decision, DuplicateCommand, StoredEvent, decide_alone


class MemoryStore(InMemoryStore):
    """The write-store port in memory (see the module docstring)."""

    batches = False

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry
        self.events: list[StoredEvent] = []
        self.outcomes: dict[str, Outcome] = {}
        self.lock = threading.RLock()

    def decide(self, decisions: Sequence[Decision]) -> list[Outcome | None]:
        return [decide_alone(self, decision) for decision in decisions]

    @contextmanager
    def unit_of_work(self, now: datetime | None = None, *, serialize: bool = False) -> Iterator[MemoryUnit]:
        with self.lock if serialize else nullcontext():
            yield MemoryUnit(self, now or datetime.now(UTC))

    def record_outcome(self, outcome: Outcome) -> Outcome:
        with self.lock:
            stored = self.outcomes.setdefault(outcome.command_id, outcome)
        return outcome if stored is outcome else stored.as_duplicate()

    def outcome(self, command_id: str) -> Outcome | None:
        return self.outcomes.get(command_id)

    def count_outcomes(self, command_ids: Sequence[str]) -> int:
        return sum(1 for command_id in command_ids if command_id in self.outcomes)

    def delete_dead_outcome(self, command_id: str) -> Outcome | None:
        with self.lock:
            if command_id in self.outcomes and self.outcomes[command_id].status is Status.dead:
                return self.outcomes.pop(command_id)
        return None

    def read_stream(self, sid: str, after_version: int = 0) -> list[StoredEvent]:
        return [e for e in list(self.events) if e.stream_id == sid and e.version > after_version]

    def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        return [e for e in list(self.events) if e.position > after_position][:limit]

    def stream_versions(self, positions: list[int]) -> tuple[tuple[str, int], ...]:
        wanted, newest = set(positions), {}
        for event in list(self.events):
            if event.position in wanted:
                newest[event.stream_id] = max(newest.get(event.stream_id, 0), event.version)
        return tuple(sorted(newest.items()))

    def close(self) -> None:
        pass

    def last_position(self) -> int:
        return self.events[-1].position if self.events else 0

    def append(self, sid: str, aggregate: Aggregate[Any], pending: list[Event], metadata: dict[str, Any],
               now: datetime, start: int = 1) -> list[int]:
        """Record ``pending`` (already appended to the stream) as stored events, the first at the
        aggregate's version + ``start``; their positions."""
        positions = []
        for offset, event in enumerate(pending, start=start):
            position = self.last_position() + 1
            self.events.append(StoredEvent(
                position=position, event_id=str(uuid.uuid4()), stream_id=sid, stream_type=aggregate.stream_type,
                version=aggregate.version + offset, type=event.type, schema_version=event.schema_version,
                data=event.model_dump(mode="json"), metadata=dict(metadata), recorded_at=now))
            positions.append(position)
        return positions


class MemoryUnit(InMemoryContext):
    """One command's unit of work on a ``MemoryStore``: the domain's ``InMemoryContext`` plus the
    port's ``commit`` (events with positions and metadata, the outcome as the dedup record)."""

    store: MemoryStore

    def commit(self, metadata: dict[str, Any] | None = None, outcome: Outcome | None = None) -> list[int]:  # type: ignore[override]
        """Everything or nothing: the conflict checks first, then the events, claims and outcome."""
        with self.store.lock:
            if outcome is not None and outcome.command_id in self.store.outcomes:
                raise DuplicateCommand(f"command {outcome.command_id} has an outcome already")
            pending = [(sid, agg, list(agg.pending)) for sid, agg in sorted(self.loaded.items()) if agg.pending]
            super().commit()  # raises ConcurrencyConflict before it changes anything
            in_order = sorted((stamp, offset, sid, agg) for sid, agg, _ in pending  # as the handler recorded them
                              for offset, (stamp, _) in enumerate(agg.pending_in_order(), start=1))
            positions = [p for _, offset, sid, agg in in_order
                         for p in self.store.append(sid, agg, [agg.pending[offset - 1]], metadata or {}, self.clock,
                                                    start=offset)]
            if outcome is not None:
                self.store.outcomes[outcome.command_id] = outcome.model_copy(update={"positions": positions})
        for _, aggregate, events in pending:
            aggregate.version += len(events)
            aggregate.pending.clear()
        return positions
