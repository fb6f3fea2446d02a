"""The write-store side of process managers (G13): instances, handled events, the command
outbox and timers, on PostgreSQL and SQLite (SQLAlchemy Core).

Contracts:
- ``react`` commits, in ONE transaction, the record that the manager handled the event (its
  primary key is the guard: a redelivered event writes nothing and returns False), the
  instance's new state (moved from the version it was read at, else ``ConcurrencyConflict``),
  the commands sent (outbox rows keyed by their derived ids: inserting one twice is one) and the
  timer changes. A handler that raises commits nothing.
- ``fire_due`` takes the timers due at ``now`` (a batch, in one transaction) and, for each:
  deletes the timer row (only the very timer that was taken: one replaced meanwhile is not deleted), runs
  its handler, and commits its state, commands and timers. Fenced: on PostgreSQL the rows are
  taken ``FOR UPDATE SKIP LOCKED``, so two processes never take one timer; on SQLite the
  transaction takes the single write lock first (``BEGIN IMMEDIATE``), so the second process
  finds the row gone. A process killed mid-way rolls back: the timer is still there, and fires
  once, later. A cancelled timer is deleted, so it never fires.
- ``take_unpublished`` hands out outbox rows not yet published (``SKIP LOCKED`` on PostgreSQL)
  and marks them published in the same transaction once the block returns: a crash before that
  publishes them again (same command ids: the command side's dedup makes that one command, G2).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy import Connection, Engine

from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.process import ProcessManager, Reaction
from cqrskit.domain.registry import Registry
from cqrskit.infra.db import upsert_insert
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.schema import events, process_handled, process_instances, process_outbox, process_timers
from cqrskit.infra.utc import as_utc
from cqrskit.infra.write_store.port import StoredEvent

OVERDUE_SECONDS = 5.0


@dataclass(frozen=True)
class Fired:
    """A timer that fired: its manager, instance and name, when it was due, how late it fired (s)."""

    manager: str
    key: str
    name: str
    due_at: datetime
    lateness: float
    commands: int


@dataclass(frozen=True)
class OutboxCommand:
    """A command a reaction sent, as its envelope (derived id, correlation and causation)."""

    envelope: CommandEnvelope
    manager: str


class ReactionStore:
    """The reactions of ``managers`` on ``engine``'s write store (see the module docstring)."""

    def __init__(self, engine: Engine, registry: Registry, managers: Sequence[ProcessManager]) -> None:
        self.engine = engine
        self.registry = registry
        self.managers = {m.name: m for m in managers}
        self.postgres = engine.dialect.name == "postgresql"

    def handles(self, event_type: str) -> list[ProcessManager]:
        return [m for m in self.managers.values() if event_type in m.handlers]

    # -- reacting to an event ---------------------------------------------------------------
    def instance_key(self, manager: ProcessManager, stored: StoredEvent) -> str:
        """The key of the instance of ``manager`` that ``stored`` belongs to."""
        event = self.registry.decode_event(stored.type, stored.schema_version, stored.data)
        return manager.key_of(event, stored.stream_id.partition(":")[2])

    def react(self, manager: ProcessManager, stored: StoredEvent, now: datetime | None = None) -> bool:
        """``manager``'s reaction to ``stored``, committed with its handled record. False when
        that event was handled already (nothing written). Raises ConcurrencyConflict (the
        instance moved meanwhile: react again) and whatever the handler raises (nothing written)."""
        now = now or datetime.now(UTC)
        event = self.registry.decode_event(stored.type, stored.schema_version, stored.data)
        key = manager.key_of(event, stored.stream_id.partition(":")[2])  # as instance_key says
        correlation = (stored.metadata or {}).get("correlation_id")
        with self._begin() as conn:
            if not self._mark_handled(conn, manager.name, stored.event_id, now):
                return False
            state, version = self._load(conn, manager, key)
            reaction = manager.react(event, stored.event_id, key, state, now)
            self._commit(conn, reaction, version, correlation)
        return True

    def handled(self, manager: str, event_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.literal(1)).where(
                process_handled.c.manager == manager, process_handled.c.event_id == event_id)).first() is not None

    # -- timers -----------------------------------------------------------------------------
    def fire_due(self, now: datetime | None = None, limit: int = 100) -> list[Fired]:
        """Fire the timers due at ``now`` (at most ``limit``, oldest first) in one transaction
        (see the module docstring): each timer's row deleted and its handler's effects written,
        all committed together. When a handler raises, that transaction is rolled back and the
        timers are fired one transaction each: those before the failing one commit, it stays (to
        be retried later) and its error propagates."""
        now = now or datetime.now(UTC)
        try:
            with self._begin() as conn:
                return [self._fire_row(conn, row, now) for row in conn.execute(self._due(now, limit)).all()]
        except ConcurrencyConflict:
            raise
        except Exception:  # a handler's failure: find it alone, keep the others
            fired: list[Fired] = []
            while len(fired) < limit and (one := self._fire_one(now)) is not None:
                fired.append(one)
            return fired

    def _due(self, now: datetime, limit: int) -> Any:
        query = (sa.select(process_timers).where(process_timers.c.due_at <= now,
                                                 process_timers.c.manager.in_(list(self.managers)))
                 .order_by(process_timers.c.due_at).limit(limit))
        return query.with_for_update(skip_locked=True) if self.postgres else query

    def _fire_one(self, now: datetime) -> Fired | None:
        with self._begin() as conn:
            row = conn.execute(self._due(now, 1)).first()
            return None if row is None else self._fire_row(conn, row, now)

    def _fire_row(self, conn: Connection, row: Any, now: datetime) -> Fired:
        manager = self.managers[row.manager]
        conn.execute(process_timers.delete().where(*_timer_key(row), process_timers.c.timer_id == row.timer_id))
        state, version = self._load(conn, manager, row.instance_key)
        reaction = manager.fire(row.name, row.timer_id, row.instance_key, state, now)
        self._commit(conn, reaction, version, row.correlation_id)
        due = as_utc(row.due_at)
        return Fired(row.manager, row.instance_key, row.name, due, max(0.0, (now - due).total_seconds()),
                     len(reaction.sent))

    def timers(self, manager: str, key: str) -> dict[str, datetime]:
        """The pending timers of one instance, by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(process_timers.c.name, process_timers.c.due_at).where(
                process_timers.c.manager == manager, process_timers.c.instance_key == key))
            return {name: as_utc(due) for name, due in rows}

    def state(self, manager: str, key: str) -> tuple[Any, int]:
        """An instance's state and version (its manager's initial state and 0 when it has none)."""
        with self.engine.connect() as conn:
            return self._load(conn, self.managers[manager], key)

    def events_after(self, position: int) -> int:
        """Committed events after ``position`` (a consumer's lag)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).where(events.c.position > position)).scalar_one()

    # -- the outbox -------------------------------------------------------------------------
    @contextmanager
    def take_unpublished(self, limit: int = 500) -> Iterator[list[OutboxCommand]]:
        """Outbox commands not yet published, oldest first; marked published when the block
        returns (in the transaction that took them: a failure or crash leaves them unpublished)."""
        with self._begin() as conn:
            query = (sa.select(process_outbox).where(process_outbox.c.published_at.is_(None))
                     .order_by(process_outbox.c.created_at, process_outbox.c.command_id).limit(limit))
            if self.postgres:
                query = query.with_for_update(skip_locked=True)
            rows = list(conn.execute(query))
            yield [OutboxCommand(_envelope(row), row.manager) for row in rows]
            if rows:
                conn.execute(process_outbox.update().where(process_outbox.c.command_id.in_([r.command_id for r in rows]))
                             .values(published_at=datetime.now(UTC)))

    def sent_internally(self, envelope: CommandEnvelope) -> bool:
        """Whether a process manager's reaction sent exactly this command (its id, type, aggregate
        and payload are in the outbox): the one way an internal command is admitted."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(process_outbox.c.type, process_outbox.c.aggregate_id, process_outbox.c.payload)
                               .where(process_outbox.c.command_id == envelope.command_id)).first()
        return row is not None and (row.type, row.aggregate_id, row.payload) == (
            envelope.type, envelope.aggregate_id, envelope.payload)

    # -- one reaction's writes ----------------------------------------------------------------
    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if not self.postgres:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")  # the single writer, taken first
            with conn.begin():
                yield conn

    def _mark_handled(self, conn: Connection, manager: str, event_id: str, now: datetime) -> bool:
        insert = (upsert_insert(conn, process_handled).values(manager=manager, event_id=event_id, handled_at=now)
                  .on_conflict_do_nothing(index_elements=["manager", "event_id"]).returning(process_handled.c.event_id))
        return conn.execute(insert).first() is not None

    def _load(self, conn: Connection, manager: ProcessManager, key: str) -> tuple[Any, int]:
        row = conn.execute(sa.select(process_instances.c.state, process_instances.c.version).where(
            process_instances.c.manager == manager.name, process_instances.c.instance_key == key)).first()
        if row is None:
            return manager.initial(), 0
        return manager.State.model_validate(row.state), row.version

    def _commit(self, conn: Connection, reaction: Reaction, version: int, correlation: str | None) -> None:
        self._save_state(conn, reaction, version)
        if reaction.sent:
            rows = [{"command_id": c.command_id, "manager": reaction.manager, "instance_key": reaction.key,
                     "type": c.type, "aggregate_id": c.aggregate_id, "payload": c.payload,
                     "correlation_id": correlation or reaction.cause, "causation_id": reaction.cause,
                     "created_at": reaction.now, "published_at": None} for c in reaction.sent]
            conn.execute(upsert_insert(conn, process_outbox).on_conflict_do_nothing(index_elements=["command_id"]), rows)
        for name in reaction.cancelled - set(reaction.timers):
            conn.execute(process_timers.delete().where(process_timers.c.manager == reaction.manager,
                                                       process_timers.c.instance_key == reaction.key,
                                                       process_timers.c.name == name))
        for name, (due, timer_id) in reaction.timers.items():
            insert = upsert_insert(conn, process_timers).values(
                manager=reaction.manager, instance_key=reaction.key, name=name, timer_id=timer_id, due_at=due,
                set_at=reaction.now, correlation_id=correlation)
            conn.execute(insert.on_conflict_do_update(
                index_elements=["manager", "instance_key", "name"],
                set_={c: insert.excluded[c] for c in ("timer_id", "due_at", "set_at", "correlation_id")}))

    def _save_state(self, conn: Connection, reaction: Reaction, version: int) -> None:
        values = {"state": reaction.state.model_dump(mode="json"), "version": version + 1, "updated_at": reaction.now}
        if version == 0:
            insert = (upsert_insert(conn, process_instances)
                      .values(manager=reaction.manager, instance_key=reaction.key, **values)
                      .on_conflict_do_nothing(index_elements=["manager", "instance_key"])
                      .returning(process_instances.c.version))
            moved = conn.execute(insert).first() is not None
        else:
            moved = conn.execute(process_instances.update().where(
                process_instances.c.manager == reaction.manager, process_instances.c.instance_key == reaction.key,
                process_instances.c.version == version).values(values)).rowcount == 1
        if not moved:
            raise ConcurrencyConflict(f"process {reaction.manager} instance {reaction.key} moved past version {version}")


class ProcessManagersState(BaseModel):
    """The process managers at one moment (a row of ``cqrskit status``)."""

    instances: int = Field(description="Process-manager instances with a state.")
    timers_pending: int = Field(description="Timers set and not fired nor cancelled.")
    timers_overdue: int = Field(description="Timers due more than 5 s ago and not fired (a process-managers "
                                "process is missing or behind).")
    oldest_overdue_seconds: float = Field(description="How late the most overdue timer is (0.0: none).")
    outbox_unpublished: int = Field(description="Commands sent and not yet confirmed by the broker.")


def process_manager_state(conn: Connection, now: datetime | None = None) -> ProcessManagersState:
    """Counts of the process managers' tables, in the caller's connection."""
    now = now or datetime.now(UTC)
    count = sa.func.count()
    late = now - timedelta(seconds=OVERDUE_SECONDS)
    pending, overdue, oldest = conn.execute(sa.select(
        count, sa.func.count().filter(process_timers.c.due_at < late), sa.func.min(process_timers.c.due_at))).one()
    return ProcessManagersState(
        instances=conn.execute(sa.select(count).select_from(process_instances)).scalar_one(),
        timers_pending=pending, timers_overdue=overdue,
        oldest_overdue_seconds=round(max(0.0, (now - as_utc(oldest)).total_seconds()), 1) if overdue else 0.0,
        outbox_unpublished=conn.execute(sa.select(count).where(process_outbox.c.published_at.is_(None))).scalar_one())


def _timer_key(row: Any) -> tuple[Any, ...]:
    return (process_timers.c.manager == row.manager, process_timers.c.instance_key == row.instance_key,
            process_timers.c.name == row.name)


def _envelope(row: Any) -> CommandEnvelope:
    return CommandEnvelope.model_validate({
        "command_id": row.command_id, "type": row.type, "aggregate_id": row.aggregate_id, "payload": row.payload,
        "metadata": {"correlation_id": row.correlation_id, "causation_id": row.causation_id,
                     "issued_at": as_utc(row.created_at).isoformat(), "issuer": f"process-manager:{row.manager}"}})
