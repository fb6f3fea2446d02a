"""The write-store port: what the command side asks of a write store, and nothing of how.

A command is decided through ``WriteStore.decide``: the store opens the transaction(s), hands
each ``Decision`` a unit of work (the domain's ``HandlerContext`` plus ``commit``), records a
refusal as ``rejected``, turns a duplicate delivery into the stored outcome marked
``duplicate``, and returns each command's outcome once it is committed (G1, G2). A store that
``batches`` decides the decisions of one call in ONE transaction, in order, each seeing the
effects of those before it; it may put a decision off (None in its place; ``wait_for`` then
says what the next attempt waits for first). A store that does not batch is given one decision
at a time.

Raised by ``decide``: ``ConcurrencyConflict`` (nothing committed: decide again), infrastructure
errors otherwise (let the broker's retries see them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cqrskit.domain.model import Aggregate, RuleViolation
from cqrskit.domain.ports import ConcurrencyConflict, HandlerContext
from cqrskit.domain.reads import Read
from cqrskit.infra.outcomes import Outcome


class DuplicateCommand(ConcurrencyConflict):
    """The command id already has an outcome: this delivery is a duplicate and wrote nothing."""


@dataclass(frozen=True)
class StoredEvent:
    """An event as the write store holds it: its global ``position`` (increasing in commit
    order), its stream and version, its stored form (``type``, ``schema_version``, ``data``)."""

    position: int
    event_id: str
    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: datetime
    tx_id: int | None = None


class UnitOfWork(HandlerContext, Protocol):
    """A handler's context inside one write transaction, and the commit of what it decided."""

    def commit(self, metadata: dict[str, Any], outcome: Outcome | None = None) -> list[int]:
        """Append the pending events with ``metadata``, move the streams, apply the claims and
        record ``outcome``, in the unit's transaction; the new events' positions (a batching
        store may return [] and fill ``outcome.positions`` after its commit). Raises
        ``DuplicateCommand`` (the command id has an outcome), ``ConcurrencyConflict``."""
        ...


@dataclass(eq=False)
class Decision:
    """One command to decide: the aggregate it addresses, what its handler declared it will read
    (hints, ``cqrskit.domain.reads``), ``decide`` (the handler's run: it commits the unit and
    returns the outcome, or raises ``RuleViolation``) and ``rejected`` (the outcome of a refusal,
    from its reason)."""

    command_id: str
    aggregate: type[Aggregate[Any]]
    aggregate_id: str
    reads: Sequence[Read]
    decide: Callable[[UnitOfWork], Outcome]
    rejected: Callable[[str], Outcome]
    wait_for: Any = None  # opaque: what the store found busy when it put this decision off


class WriteStore(Protocol):
    """The write store as the command side sees it (see the module docstring)."""

    @property
    def batches(self) -> bool:
        """Whether ``decide`` takes many decisions in one transaction (group commit)."""
        ...

    def decide(self, decisions: Sequence[Decision]) -> list[Outcome | None]: ...

    def unit_of_work(self, now: datetime | None = None, *, serialize: bool = False
                     ) -> AbstractContextManager[UnitOfWork]:
        """One write transaction (committed when the block ends normally); ``serialize``: take
        the store's write lock up front, where it has one (writers queue instead of conflicting)."""
        ...

    def record_outcome(self, outcome: Outcome) -> Outcome:
        """Record an outcome alone (invalid, dead); the first one of a command id wins: returns the
        stored one, marked ``duplicate``, when another was there first."""
        ...

    def outcome(self, command_id: str) -> Outcome | None: ...

    def count_outcomes(self, command_ids: Sequence[str]) -> int:
        """How many of ``command_ids`` have an outcome."""
        ...

    def delete_dead_outcome(self, command_id: str) -> Outcome | None: ...

    def read_stream(self, sid: str, after_version: int = 0) -> list[StoredEvent]: ...

    def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]: ...

    def stream_versions(self, positions: list[int]) -> tuple[tuple[str, int], ...]: ...

    def last_position(self) -> int: ...

    def close(self) -> None:
        """Release the store's connections (it may not be used afterwards)."""
        ...


def decide_alone(store: WriteStore, decision: Decision) -> Outcome:
    """``decision`` in a transaction of its own (a store that does not batch): its outcome, the
    recorded refusal, or the stored outcome marked ``duplicate``. Raises ConcurrencyConflict."""
    try:
        with store.unit_of_work(serialize=True) as uow:
            return decision.decide(uow)
    except RuleViolation as exc:
        return store.record_outcome(decision.rejected(exc.reason))
    except DuplicateCommand:
        stored = store.outcome(decision.command_id)
        if stored is None:  # pragma: no cover - the guard saw it a moment ago
            raise
        return stored.as_duplicate()

