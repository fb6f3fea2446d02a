"""The event store (PostgreSQL or SQLite) and its unit of work.

``EventStore.unit_of_work()`` opens ONE transaction and yields a unit of work that implements
the domain's ``HandlerContext``: aggregates are loaded from their snapshot row (falling back to
folding events), decisions record events on them, and ``commit`` appends every pending event
with the version its aggregate was loaded at, moves each stream's version and snapshot, writes
the unique claims and the command outcome, all in that one transaction. On PostgreSQL that unit
is ``cqrskit.infra.pg_store``'s (psycopg directly, one write statement per command), and
``EventStore.transaction()`` gives group commit its many-commands transaction; on SQLite it is
``UnitOfWork`` here (SQLAlchemy Core, statements built once).

Raised: ``ConcurrencyConflict`` when another transaction moved a stream or took a claim first
(retry the whole command), its subclass ``DuplicateCommand`` when the command id already has an
outcome (the outcome's primary key is the guard: nothing was written); the drivers'
``OperationalError`` and friends for infrastructure failures (let the broker's retries see them).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from cqrskit.domain.model import Aggregate, RuleViolation, restore, stream_id
from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.registry import Registry
from cqrskit.infra.db import is_postgres, upsert_insert
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.pg_store import PgTransaction
from cqrskit.infra.schema import command_outcomes, events, streams, unique_claims
from cqrskit.infra.write_store.pg_batch import decide_batch
from cqrskit.infra.write_store.port import Decision, DuplicateCommand, StoredEvent, UnitOfWork as WriteUnit, decide_alone
from cqrskit.infra.write_store.postgres import PgSessions, Waits

__all__ = ["ConcurrencyConflict", "DuplicateCommand", "EventStore", "StoredEvent", "UnitOfWork", "Waits", "read_outcome"]

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


@dataclass
class _Claims:
    taken: dict[tuple[str, str], str] = field(default_factory=dict)
    released: dict[tuple[str, str], str] = field(default_factory=dict)


class EventStore:
    def __init__(self, engine: Engine, registry: Registry, *, waits: Waits | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.waits = waits
        self._pg = PgSessions(engine, registry, waits) if is_postgres(engine) else None

    @property
    def batches(self) -> bool:
        """Whether ``decide`` takes many commands in one transaction: on PostgreSQL (group commit)."""
        return self._pg is not None

    def decide(self, decisions: Sequence[Decision]) -> list[Outcome | None]:
        """The write-store port's ``decide`` (``cqrskit.infra.write_store.port``): on PostgreSQL
        the decisions in one transaction (``cqrskit.infra.write_store.pg_batch``); on SQLite
        each in its own, which takes the write lock up front (writers queue instead of
        conflicting on a stale snapshot)."""
        if self._pg is not None:
            return decide_batch(self, decisions)
        return [decide_alone(self, decision) for decision in decisions]

    @contextmanager
    def unit_of_work(self, now: datetime | None = None, *, serialize: bool = False) -> Iterator[WriteUnit]:
        """One write transaction: committed when the block ends normally, rolled back when it
        raises. ``serialize``: on SQLite, take the write lock up front (writers queue instead of
        conflicting on a stale snapshot); no effect on PostgreSQL."""
        if self._pg is not None:
            with self._pg.transaction(now, locking=False, deferred=False) as tx:
                yield tx.unit()
            return
        with self.engine.connect() as conn:
            if serialize:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield UnitOfWork(self, conn, now or datetime.now(UTC))

    def transaction(self, now: datetime | None = None, *, locking: bool = True, deferred: bool = True
                    ) -> AbstractContextManager[PgTransaction]:
        """PostgreSQL only: one transaction for many units of work (group commit); see
        ``cqrskit.infra.write_store.postgres``."""
        assert self._pg is not None, "group-commit transactions are PostgreSQL's"
        return self._pg.transaction(now, locking=locking, deferred=deferred)

    def outcome(self, command_id: str) -> Outcome | None:
        with self.engine.connect() as conn:
            return read_outcome(conn, command_id)

    def record_outcome(self, outcome: Outcome) -> Outcome:
        """Record an outcome on its own (invalid, rejected, dead). The first outcome of a command
        id wins: returns the stored one, marked ``duplicate`` when another was there first.
        Inserts before reading, so that on SQLite the write lock is taken first."""
        with self.engine.begin() as conn:
            insert = (
                upsert_insert(conn, command_outcomes)
                .values(outcome.row())
                .on_conflict_do_nothing(index_elements=["command_id"])
                .returning(command_outcomes.c.command_id)
            )
            if conn.execute(insert).first() is not None:
                return outcome
            stored = read_outcome(conn, outcome.command_id)
        return (stored or outcome).as_duplicate()

    def count_outcomes(self, command_ids: Sequence[str]) -> int:
        """How many of ``command_ids`` have an outcome (read 500 at a time)."""
        total = 0
        with self.engine.connect() as conn:
            for start in range(0, len(command_ids), 500):
                chunk = list(command_ids[start : start + 500])
                query = sa.select(sa.func.count()).where(command_outcomes.c.command_id.in_(chunk))
                total += conn.execute(query).scalar_one()
        return total

    def delete_dead_outcome(self, command_id: str) -> Outcome | None:
        """Delete the outcome of ``command_id`` if it is ``dead`` (so that the command can run
        again); returns the deleted outcome, or None when there was no dead one."""
        with self.engine.begin() as conn:
            row = conn.execute(command_outcomes.delete().where(
                command_outcomes.c.command_id == command_id, command_outcomes.c.status == Status.dead.value)
                .returning(*command_outcomes.c)).first()
        return None if row is None else Outcome.from_row(row._mapping)

    def read_stream(self, sid: str, after_version: int = 0) -> list[StoredEvent]:
        with self.engine.connect() as conn:
            return _read_stream(conn, sid, after_version)

    def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events in position order after ``after_position`` (at most ``limit``)."""
        query = (
            sa.select(events).where(events.c.position > after_position).order_by(events.c.position).limit(limit)
        )
        with self.engine.connect() as conn:
            return [StoredEvent(**row._mapping) for row in conn.execute(query)]

    def stream_versions(self, positions: list[int]) -> tuple[tuple[str, int], ...]:
        """The newest version of every stream among the events at ``positions`` (what a
        consistency token names), by stream id."""
        with self.engine.connect() as conn:
            return stream_versions(conn, positions)

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def last_position(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.position), 0))).scalar_one()


def stream_versions(conn: Connection, positions: list[int]) -> tuple[tuple[str, int], ...]:
    """``EventStore.stream_versions`` on a connection the caller holds (one query on the events)."""
    if not positions:
        return ()
    query = (sa.select(events.c.stream_id, sa.func.max(events.c.version))
             .where(events.c.position.in_(positions)).group_by(events.c.stream_id).order_by(events.c.stream_id))
    return tuple((sid, version) for sid, version in conn.execute(query))


class UnitOfWork:
    """The handler context of one command, inside one transaction (see module docstring)."""

    def __init__(self, store: EventStore, conn: Connection, now: datetime) -> None:
        self.store = store
        self.conn = conn
        self.clock = now
        self.loaded: dict[str, Aggregate[Any]] = {}
        self.claims = _Claims()

    # -- HandlerContext ---------------------------------------------------------------------
    def load(self, cls: type[A], aggregate_id: str) -> A:
        sid = stream_id(cls.stream_type, aggregate_id)
        if sid in self.loaded:
            return self.loaded[sid]  # type: ignore[return-value]
        row = self.conn.execute(
            sa.select(streams.c.version, streams.c.state, streams.c.state_version).where(streams.c.stream_id == sid)
        ).first()
        version, state, state_version = (0, None, None) if row is None else row
        decode = self.store.registry.decode_event
        aggregate = restore(cls, aggregate_id, version, state, state_version, lambda: [
            decode(e.type, e.schema_version, e.data) for e in _read_stream(self.conn, sid, 0)])
        self.loaded[sid] = aggregate
        return aggregate

    def owner_of(self, scope: str, key: str) -> str | None:
        if (scope, key) in self.claims.taken:
            return self.claims.taken[(scope, key)]
        if (scope, key) in self.claims.released:
            return None
        return self.conn.execute(
            sa.select(unique_claims.c.owner).where(unique_claims.c.scope == scope, unique_claims.c.key == key)
        ).scalar_one_or_none()

    def claim(self, scope: str, key: str, owner: str) -> None:
        if self.claims.released.get((scope, key)) == owner:
            del self.claims.released[(scope, key)]  # given up and taken back in one command
            return
        holder = self.owner_of(scope, key)
        if holder == owner:
            return
        if holder is not None:
            raise RuleViolation(f"{scope} {key!r} is already taken")
        self.claims.taken[(scope, key)] = owner

    def release(self, scope: str, key: str, owner: str) -> None:
        if self.owner_of(scope, key) == owner:
            self.claims.taken.pop((scope, key), None)
            self.claims.released[(scope, key)] = owner

    def now(self) -> datetime:
        return self.clock

    # -- commit -----------------------------------------------------------------------------
    def commit(self, metadata: dict[str, Any], outcome: Outcome | None = None) -> list[int]:
        """Append all pending events, move the streams, apply claims, record ``outcome``.
        Returns the positions of the new events in order. Raises ConcurrencyConflict."""
        try:  # no savepoint: a failure here aborts the whole unit of work, which is then retried
            positions = self._append_all(metadata)
            self._write_claims()
            if outcome is not None and self.conn.execute(_insert_outcome(self.conn), outcome.row(positions=positions)
                                                         ).first() is None:
                raise DuplicateCommand(f"command {outcome.command_id} has an outcome already")
        except IntegrityError as exc:
            raise ConcurrencyConflict(str(exc.orig)) from exc
        except OperationalError as exc:
            if _is_conflict(self.conn, exc):
                raise ConcurrencyConflict(f"{self.conn.dialect.name}: {exc.orig}") from exc
            raise
        for aggregate in self.loaded.values():
            aggregate.version += len(aggregate.pending)
            aggregate.pending.clear()
        return positions

    def _append_all(self, metadata: dict[str, Any]) -> list[int]:
        stamped: list[tuple[int, dict[str, Any]]] = []
        # Streams are moved in one global order (by id), so that two commands touching the same
        # streams lock their rows in the same order: they conflict, never deadlock. The events
        # take their positions in the order the handler recorded them, across aggregates.
        for sid, aggregate in sorted(self.loaded.items()):
            if not aggregate.pending:
                continue
            self._move_stream(sid, aggregate)
            for offset, (stamp, event) in enumerate(aggregate.pending_in_order(), start=1):
                stamped.append((stamp, self._event_row(sid, aggregate, aggregate.version + offset, event, metadata)))
        if not stamped:
            return []
        rows = [row for _, row in sorted(stamped, key=lambda item: item[0])]
        result = self.conn.execute(events.insert().returning(events.c.position, sort_by_parameter_order=True), rows)
        return [row.position for row in result]

    def _event_row(self, sid: str, agg: Aggregate[Any], version: int, event: Any, metadata: dict[str, Any]) -> dict[str, Any]:
        return {
            "event_id": str(uuid.uuid4()),
            "stream_id": sid,
            "stream_type": agg.stream_type,
            "version": version,
            "type": event.type,
            "schema_version": event.schema_version,
            "data": event.model_dump(mode="json"),
            "metadata": metadata,
            "recorded_at": self.clock,
        }

    def _move_stream(self, sid: str, aggregate: Aggregate[Any]) -> None:
        new_version = aggregate.version + len(aggregate.pending)
        values = {
            "version": new_version,
            "state": aggregate.snapshot(),
            "state_version": aggregate.snapshot_version(),
            "updated_at": self.clock,
        }
        if aggregate.version == 0:
            self.conn.execute(
                streams.insert(),
                {"stream_id": sid, "stream_type": aggregate.stream_type, "aggregate_id": aggregate.id, **values},
            )
            return
        moved = self.conn.execute(
            streams.update().where(streams.c.stream_id == sid, streams.c.version == aggregate.version).values(values)
        )
        if moved.rowcount != 1:
            raise ConcurrencyConflict(f"stream {sid} moved past version {aggregate.version}")

    def _write_claims(self) -> None:
        for (scope, key), owner in self.claims.released.items():
            self.conn.execute(
                unique_claims.delete().where(
                    unique_claims.c.scope == scope, unique_claims.c.key == key, unique_claims.c.owner == owner
                )
            )
        if self.claims.taken:
            self.conn.execute(
                unique_claims.insert(),
                [{"scope": s, "key": k, "owner": o} for (s, k), o in self.claims.taken.items()],
            )


def _insert_outcome(conn: Connection) -> Any:
    """The outcome insert: its primary key is the dedup guard (a duplicate inserts nothing)."""
    return (upsert_insert(conn, command_outcomes).on_conflict_do_nothing(index_elements=["command_id"])
            .returning(command_outcomes.c.command_id))


def _is_conflict(conn: Connection, exc: OperationalError) -> bool:
    """A failure that deciding again resolves: SQLite's stale snapshot, PostgreSQL's deadlock or
    serialization failure (SQLSTATE class 40)."""
    if conn.dialect.name == "sqlite":
        return "locked" in str(exc.orig)
    return str(getattr(exc.orig, "sqlstate", "") or "").startswith("40")


def read_outcome(conn: Connection, command_id: str) -> Outcome | None:
    row = conn.execute(sa.select(command_outcomes).where(command_outcomes.c.command_id == command_id)).first()
    return None if row is None else Outcome.from_row(row._mapping)


def _read_stream(conn: Connection, sid: str, after_version: int) -> list[StoredEvent]:
    query = (
        sa.select(events)
        .where(events.c.stream_id == sid, events.c.version > after_version)
        .order_by(events.c.version)
    )
    return [StoredEvent(**row._mapping) for row in conn.execute(query)]
