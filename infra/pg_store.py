"""The event store's hot path on PostgreSQL: psycopg directly, each statement built once.

A ``PgTransaction`` is one PostgreSQL transaction on a connection checked out of the engine's
pool (in autocommit mode: the transaction is begun by hand, pipelined with its first statement).
It hands out one ``PgUnitOfWork`` per command (``unit()``); a unit implements the domain's
``HandlerContext``, and its ``commit`` writes the command's streams, events, claims and outcome
in ONE statement (data-modifying CTEs): one round trip per command.

Two modes:
- ``locking=False`` (``EventStore.unit_of_work``): optimistic. Reads before the first write run
  outside the transaction (under READ COMMITTED a read sees the same either way), a stream moved
  by someone else since it was loaded fails the commit as a ``ConcurrencyConflict``.
- ``locking=True`` (group commit): every stream and claim a command reads is locked first with a
  transaction-level advisory lock on its key, so commands on one aggregate queue instead of
  conflicting. To stay free of deadlocks, only a transaction that holds no lock yet waits for
  one (``pg_advisory_xact_lock``); any later lock is only tried (``pg_try_advisory_xact_lock``)
  and a busy one raises ``LockBusy``: the command is put off to a later transaction, having
  written nothing. The optimistic checks stay underneath (stream versions, unique keys), so
  correctness never rests on the locks alone (G4).

Raised by ``commit``: ``DuplicateCommand`` (the outcome's primary key is taken: the command ran
before; nothing was written), ``ConcurrencyConflict`` (a stream moved, a stream or claim was
created concurrently: the transaction must be rolled back). psycopg's errors otherwise.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from pydantic import BaseModel

from cqrskit.domain.model import Aggregate, RuleViolation, stream_id
from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.registry import Registry
from cqrskit.infra.outcomes import Outcome

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


class DuplicateCommand(ConcurrencyConflict):
    """The command id already has an outcome: this delivery is a duplicate and wrote nothing."""


class LockBusy(Exception):
    """Another transaction holds the lock of ``key``; the command wrote nothing and is put off."""

    def __init__(self, key: int) -> None:
        super().__init__(f"advisory lock {key} is busy")
        self.key = key


LOAD = "SELECT version, state::text, state_version FROM streams WHERE stream_id = %s"
TRY_LOAD = ("SELECT pg_try_advisory_xact_lock(%s), s.version, s.state::text, s.state_version "
            "FROM (VALUES (1)) AS one(x) LEFT JOIN streams AS s ON s.stream_id = %s")
OWNER = "SELECT owner FROM unique_claims WHERE scope = %s AND key = %s"
TRY_OWNER = ("SELECT pg_try_advisory_xact_lock(%s), c.owner FROM (VALUES (1)) AS one(x) "
             "LEFT JOIN unique_claims AS c ON c.scope = %s AND c.key = %s")
LOCK = "SELECT pg_advisory_xact_lock(%s)"
READ_EVENTS = ("SELECT type, schema_version, data FROM events WHERE stream_id = %s AND version > %s "
               "ORDER BY version")
OUTCOME_COLUMNS = ("command_id", "status", "type", "aggregate_id", "reason", "errors", "aggregate_version",
                   "correlation_id", "causation_id", "recorded_at")
INSERT_OUTCOME = (
    "INSERT INTO command_outcomes (command_id, status, type, aggregate_id, reason, errors, aggregate_version, "
    "correlation_id, causation_id, recorded_at, positions) "
    "VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, '[]'::jsonb) "
    "ON CONFLICT (command_id) DO NOTHING RETURNING 1"
)
SELECT_OUTCOME = "SELECT * FROM command_outcomes WHERE command_id = %s"

# One command's whole write. ``go`` gates every write on the outcome's insert (no outcome given:
# always true), so a duplicate writes nothing. Positions are drawn first, so that the outcome
# can carry them.
_WRITE = """
WITH p AS MATERIALIZED (
    SELECT n, nextval('{sequence}') AS pos FROM generate_series(1, %(n_events)s::int) AS n),
{outcome},
sn AS (
    INSERT INTO streams (stream_id, stream_type, aggregate_id, version, state, state_version, updated_at)
    SELECT u.sid, u.stype, u.aid, u.version, u.state::jsonb, u.sv, %(now)s
    FROM unnest(%(n_sid)s::text[], %(n_type)s::text[], %(n_aid)s::text[], %(n_ver)s::int[],
                %(n_state)s::text[], %(n_sv)s::int[]) AS u(sid, stype, aid, version, state, sv)
    WHERE (SELECT ok FROM go)
    RETURNING 1),
sm AS (
    UPDATE streams AS s SET version = u.version, state = u.state::jsonb, state_version = u.sv, updated_at = %(now)s
    FROM unnest(%(m_sid)s::text[], %(m_from)s::int[], %(m_ver)s::int[], %(m_state)s::text[], %(m_sv)s::int[])
        AS u(sid, from_version, version, state, sv)
    WHERE s.stream_id = u.sid AND s.version = u.from_version AND (SELECT ok FROM go)
    RETURNING 1),
ev AS (
    INSERT INTO events (position, event_id, stream_id, stream_type, version, type, schema_version, data,
                        metadata, recorded_at)
    SELECT p.pos, u.eid, u.sid, u.stype, u.version, u.type, u.sv, u.data::jsonb, %(meta)s::jsonb, %(now)s
    FROM unnest(%(e_id)s::text[], %(e_sid)s::text[], %(e_type)s::text[], %(e_ver)s::int[], %(e_etype)s::text[],
                %(e_sv)s::int[], %(e_data)s::text[]) WITH ORDINALITY AS u(eid, sid, stype, version, type, sv, data, n)
    JOIN p USING (n)
    WHERE (SELECT ok FROM go)
    RETURNING 1),
cd AS (
    DELETE FROM unique_claims AS c
    USING unnest(%(d_scope)s::text[], %(d_key)s::text[], %(d_owner)s::text[]) AS u(scope, key, owner)
    WHERE c.scope = u.scope AND c.key = u.key AND c.owner = u.owner AND (SELECT ok FROM go)
    RETURNING 1),
ci AS (
    INSERT INTO unique_claims (scope, key, owner)
    SELECT * FROM unnest(%(c_scope)s::text[], %(c_key)s::text[], %(c_owner)s::text[])
    WHERE (SELECT ok FROM go)
    RETURNING 1)
SELECT (SELECT ok FROM go), (SELECT count(*) FROM sm), (SELECT count(*) FROM sn),
       (SELECT array_agg(pos ORDER BY n) FROM p)
"""
_WITH_OUTCOME = """o AS (
    INSERT INTO command_outcomes (command_id, status, type, aggregate_id, reason, errors, aggregate_version,
                                  correlation_id, causation_id, recorded_at, positions)
    VALUES (%(o_id)s, %(o_status)s, %(o_type)s, %(o_aid)s, %(o_reason)s, %(o_errors)s::jsonb, %(o_version)s,
            %(o_corr)s, %(o_cause)s, %(o_at)s, (SELECT coalesce(jsonb_agg(pos ORDER BY n), '[]'::jsonb) FROM p))
    ON CONFLICT (command_id) DO NOTHING
    RETURNING 1),
go AS (SELECT EXISTS (SELECT FROM o) AS ok)"""
_WITHOUT_OUTCOME = "go AS (SELECT true AS ok)"


def lock_key(kind: str, *parts: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same in every process)."""
    digest = hashlib.blake2b("\x00".join((kind, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PgStatements:
    """The write statement with the events' sequence resolved once per store."""

    def __init__(self, sequence: str) -> None:
        self.with_outcome = _WRITE.format(sequence=sequence, outcome=_WITH_OUTCOME)
        self.without_outcome = _WRITE.format(sequence=sequence, outcome=_WITHOUT_OUTCOME)


class PgTransaction:
    """One PostgreSQL transaction on ``conn`` (autocommit mode; begun with its first write or lock)."""

    def __init__(self, conn: psycopg.Connection, registry: Registry, statements: PgStatements,
                 now: datetime, *, locking: bool) -> None:
        self.conn, self.registry, self.statements = conn, registry, statements
        self.clock, self.locking = now, locking
        self.begun = self.wrote = False
        self.held: set[int] = set()
        self.refused: set[int] = set()

    def unit(self) -> PgUnitOfWork:
        return PgUnitOfWork(self)

    def lock(self, key: int) -> None:
        """Wait for the lock of ``key`` (call it only while holding none: see the module docstring)."""
        if key not in self.held:
            self.execute(LOCK, (key,), begin=True)
            self.held.add(key)

    def refuse(self, keys: list[int]) -> None:
        """Put off, for the rest of this transaction, every command that touches ``keys`` (those of
        a command put off), so that none overtakes it."""
        self.refused.update(keys)

    def fetch(self, locked: str, plain: str, key: int, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """A read under the lock of ``key`` (locking mode), or a plain read."""
        if key in self.refused:
            raise LockBusy(key)
        if not self.locking or key in self.held:
            return self.execute(plain, params).fetchone()
        if not self.held and not self.wrote:
            self.lock(key)
            return self.execute(plain, params).fetchone()
        row = self.execute(locked, (key, *params), begin=True).fetchone()
        if not row[0]:  # type: ignore[index]
            raise LockBusy(key)
        self.held.add(key)
        return None if all(v is None for v in row[1:]) else row[1:]  # type: ignore[index]

    def execute(self, sql: str, params: Any = None, *, begin: bool = False) -> psycopg.Cursor[Any]:
        """Run one statement (``begin``: inside the transaction, beginning it if need be).
        Unique violations, deadlocks and serialization failures raise ConcurrencyConflict."""
        try:
            if self.begun or not begin:
                return self.conn.execute(sql, params)
            with self.conn.pipeline():
                self.conn.execute("BEGIN")
                self.begun = True
                cursor = self.conn.execute(sql, params)
            return cursor
        except (pg_errors.UniqueViolation, pg_errors.TransactionRollback) as exc:
            raise ConcurrencyConflict(f"postgresql: {exc}") from exc

    def commit(self) -> None:
        if self.begun:
            self.conn.execute("COMMIT")
            self.begun = False

    def rollback(self) -> None:
        if self.begun:
            self.begun = False
            self.conn.execute("ROLLBACK")

    def record_outcome(self, outcome: Outcome) -> Outcome | None:
        """Insert ``outcome`` alone (rejected, invalid...); None when the command id has one already."""
        values = outcome.row()
        values["errors"] = None if outcome.errors is None else json.dumps(outcome.errors)
        values["status"] = outcome.status.value
        self.wrote = True
        row = self.execute(INSERT_OUTCOME, [values[c] for c in OUTCOME_COLUMNS], begin=True).fetchone()
        return outcome if row is not None else None

    def stored_outcome(self, command_id: str) -> Outcome | None:
        cursor = self.execute(SELECT_OUTCOME, (command_id,))
        row = cursor.fetchone()
        if row is None:
            return None
        return Outcome.from_row(dict(zip([c.name for c in cursor.description or ()], row)))


class PgUnitOfWork:
    """The handler context of one command inside a ``PgTransaction`` (see the module docstring)."""

    def __init__(self, tx: PgTransaction) -> None:
        self.tx = tx
        self.loaded: dict[str, Aggregate[Any]] = {}
        self.keys: list[int] = []  # the lock keys of everything this command read
        self.taken: dict[tuple[str, str], str] = {}
        self.released: dict[tuple[str, str], str] = {}

    # -- HandlerContext ---------------------------------------------------------------------
    def load(self, cls: type[A], aggregate_id: str) -> A:
        sid = stream_id(cls.stream_type, aggregate_id)
        if sid in self.loaded:
            return self.loaded[sid]  # type: ignore[return-value]
        key = lock_key("s", sid)
        self.keys.append(key)
        row = self.tx.fetch(TRY_LOAD, LOAD, key, (sid,))
        if row is None:
            aggregate = cls(aggregate_id)
        else:
            aggregate = _restore(cls, aggregate_id, row, self)
        self.loaded[sid] = aggregate
        return aggregate  # type: ignore[return-value]

    def owner_of(self, scope: str, key: str) -> str | None:
        if (scope, key) in self.taken:
            return self.taken[(scope, key)]
        if (scope, key) in self.released:
            return None
        lock = lock_key("c", scope, key)
        self.keys.append(lock)
        row = self.tx.fetch(TRY_OWNER, OWNER, lock, (scope, key))
        return None if row is None else row[0]

    def claim(self, scope: str, key: str, owner: str) -> None:
        if self.released.get((scope, key)) == owner:
            del self.released[(scope, key)]  # given up and taken back in one command
            return
        holder = self.owner_of(scope, key)
        if holder == owner:
            return
        if holder is not None:
            raise RuleViolation(f"{scope} {key!r} is already taken")
        self.taken[(scope, key)] = owner

    def release(self, scope: str, key: str, owner: str) -> None:
        if self.owner_of(scope, key) == owner:
            self.taken.pop((scope, key), None)
            self.released[(scope, key)] = owner

    def now(self) -> datetime:
        return self.tx.clock

    # -- commit -----------------------------------------------------------------------------
    def commit(self, metadata: dict[str, Any], outcome: Outcome | None = None) -> list[int]:
        """Write every pending event, stream move, claim and ``outcome`` in one statement; the
        positions of the new events, in order. Raises DuplicateCommand, ConcurrencyConflict."""
        params = self._params(metadata)
        if outcome is not None:
            params.update(_outcome_params(outcome))
        sql = self.tx.statements.with_outcome if outcome is not None else self.tx.statements.without_outcome
        self.tx.wrote = True
        ok, moved, created, positions = self.tx.execute(sql, params, begin=True).fetchone()  # type: ignore[misc]
        if not ok:
            raise DuplicateCommand(f"command {outcome.command_id if outcome else '?'} has an outcome already")
        if moved != len(params["m_sid"]) or created != len(params["n_sid"]):
            raise ConcurrencyConflict("a stream moved past the version it was loaded at")
        for aggregate in self.loaded.values():
            aggregate.version += len(aggregate.pending)
            aggregate.pending.clear()
        return list(positions or [])

    def _params(self, metadata: dict[str, Any]) -> dict[str, Any]:
        p: dict[str, Any] = {k: [] for k in ("n_sid", "n_type", "n_aid", "n_ver", "n_state", "n_sv", "m_sid",
                                              "m_from", "m_ver", "m_state", "m_sv", "e_id", "e_sid", "e_type",
                                              "e_ver", "e_etype", "e_sv", "e_data")}
        # Streams in one global order (by id): two transactions touching the same rows lock them
        # in the same order.
        for sid, agg in sorted(self.loaded.items()):
            if not agg.pending:
                continue
            new_version, state = agg.version + len(agg.pending), _snapshot_json(agg)
            if agg.version == 0:
                _append(p, n_sid=sid, n_type=agg.stream_type, n_aid=agg.id, n_ver=new_version, n_state=state,
                        n_sv=agg.state_version)
            else:
                _append(p, m_sid=sid, m_from=agg.version, m_ver=new_version, m_state=state, m_sv=agg.state_version)
            for offset, event in enumerate(agg.pending, start=1):
                _append(p, e_id=str(uuid.uuid4()), e_sid=sid, e_type=agg.stream_type, e_ver=agg.version + offset,
                        e_etype=event.type, e_sv=event.schema_version, e_data=event.model_dump_json())
        p.update(n_events=len(p["e_id"]), meta=json.dumps(metadata), now=self.tx.clock,
                 d_scope=[s for s, _ in self.released], d_key=[k for _, k in self.released],
                 d_owner=list(self.released.values()), c_scope=[s for s, _ in self.taken],
                 c_key=[k for _, k in self.taken], c_owner=list(self.taken.values()))
        return p


def _append(params: dict[str, list[Any]], **values: Any) -> None:
    for name, value in values.items():
        params[name].append(value)


def _outcome_params(outcome: Outcome) -> dict[str, Any]:
    return {"o_id": outcome.command_id, "o_status": outcome.status.value, "o_type": outcome.type,
            "o_aid": outcome.aggregate_id, "o_reason": outcome.reason,
            "o_errors": None if outcome.errors is None else json.dumps(outcome.errors),
            "o_version": outcome.aggregate_version, "o_corr": outcome.correlation_id,
            "o_cause": outcome.causation_id, "o_at": outcome.recorded_at}


def _snapshot_json(aggregate: Aggregate[Any]) -> str:
    if type(aggregate).snapshot is Aggregate.snapshot:
        return aggregate.state.model_dump_json()
    return json.dumps(aggregate.snapshot())


def _restore(cls: type[A], aggregate_id: str, row: tuple[Any, ...], uow: PgUnitOfWork) -> A:
    version, state, state_version = row
    if state is not None and state_version == cls.state_version:
        if cls.restore.__func__ is Aggregate.restore.__func__:  # type: ignore[attr-defined]
            model: BaseModel = cls.State.model_validate_json(state)
            return cls(aggregate_id, version, model)
        return cls.restore(aggregate_id, version, json.loads(state))  # type: ignore[return-value]
    aggregate = cls(aggregate_id)
    sid = stream_id(cls.stream_type, aggregate_id)
    stored = uow.tx.execute(READ_EVENTS, (sid, 0)).fetchall()
    aggregate.replay([uow.tx.registry.decode_event(t, v, d) for t, v, d in stored], version)
    return aggregate
