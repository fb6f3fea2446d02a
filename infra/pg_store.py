"""The event store's hot path on PostgreSQL: psycopg directly, each statement built once.

A ``PgTransaction`` is one PostgreSQL transaction on a connection checked out of the engine's
pool, run in pipeline mode (BEGIN travels with the first read; a write travels with the next
read). It hands out one ``PgUnitOfWork`` per command (``unit()``); a unit implements the domain's
``HandlerContext``, and its ``commit`` writes the command's streams, events, claims and outcome
in ONE statement (data-modifying CTEs, ``cqrskit.infra.pg_sql``).

Two modes:
- ``EventStore.unit_of_work`` (``locking=False, deferred=False``): optimistic, one command;
  ``commit`` waits for its write's result; COMMIT comes when the block ends (the caller may
  still raise and roll back). A stream moved since it was loaded fails as a conflict.
- group commit (``locking=True, deferred=True``): many commands. Every stream a command reads,
  and every claim it takes or gives up, is locked first (a transaction-level advisory lock on
  its key; see ``prefetch`` for how waits stay free of deadlocks); a busy lock found later
  raises ``LockBusy``: the command is put off, having written nothing. What a batch read or
  wrote is reused by its later commands. Writes are checked before COMMIT; the optimistic
  checks stay underneath (stream versions, unique keys): correctness never rests on locks (G4).
  A wait is bounded when the store has ``Waits`` (the command worker's): a lock still held
  after ``lock_timeout`` fails the transaction as a conflict (retried), and the server ends a
  transaction left idle (a frozen worker's) after ``idle_in_transaction_session_timeout``, so
  that its locks never hold the others up for longer.

Raised: ``DuplicateCommand`` (the outcome's primary key is taken: the command ran before;
nothing was written), ``ConcurrencyConflict`` (a stream moved, a stream or claim was created
concurrently, a lock wait ran out: the transaction must be rolled back). psycopg's errors
otherwise.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from cqrskit.domain.model import Aggregate, RuleViolation, stream_id
from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.registry import Registry
from cqrskit.infra.outcomes import Outcome
from cqrskit.infra.pg_rows import lock_key, outcome_json, q, restored, snapshot_json
from cqrskit.infra.write_store.port import DuplicateCommand
from cqrskit.infra.pg_sql import (
    INSERT_OUTCOME, LOAD, LOAD_MANY, LOCK, LOCKS, OUTCOME_COLUMNS, OWNER, OWNERS, SELECT_OUTCOME, TRY_LOCK,
    TRY_LOCKS, WITH_OUTCOME, WITHOUT_OUTCOME, WRITE,
)

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


class LockBusy(Exception):
    """Another transaction holds the lock of ``key``; the command wrote nothing and is put off."""

    def __init__(self, key: int) -> None:
        super().__init__(f"advisory lock {key} is busy")
        self.key = key


Follow = Callable[[], tuple[list[tuple[int, str]], list[tuple[int, str, str, str | None]]]]
"""More (streams, claims) to read, once a batch's first round trip is read (``prefetch``)."""


class PgStatements:
    """The write statements, with the events' sequence resolved once per store."""

    def __init__(self, sequence: str) -> None:
        positions = (f"SELECT n, nextval('{sequence}') AS pos "
                     "FROM generate_series(1, (SELECT jsonb_array_length(doc -> 'e') FROM d)) AS n")
        self.write = {outcome: WRITE.format(positions=positions,
                                             outcome=WITH_OUTCOME if outcome else WITHOUT_OUTCOME)
                      for outcome in (True, False)}


class PgTransaction:
    """One PostgreSQL transaction on ``conn``, in pipeline mode: a statement whose result is not
    needed yet (BEGIN, a lock wait, a command's write when ``deferred``, COMMIT) travels with the
    next one whose result is, so a batch costs one round trip per read it makes, plus two to
    end: its writes' results, then COMMIT. A deferred write is checked after the commit
    (``PgUnitOfWork.result``): a stream that moved under it fails its event insert (the unique
    stream version), which aborts the transaction before COMMIT. Unique violations, deadlocks,
    serialization failures and lock waits that ran out raise ConcurrencyConflict, wherever they surface."""

    def __init__(self, conn: psycopg.Connection, registry: Registry, statements: PgStatements,
                 now: datetime, *, locking: bool, deferred: bool,
                 holders: dict[tuple[str, str], str] | None = None) -> None:
        self.conn, self.registry, self.statements = conn, registry, statements
        # Claims' holders as a batch last read them (the store's): a hint for locks, never a decision.
        self.holders = {} if holders is None else holders
        self.clock, self.locking, self.deferred = now, locking, deferred
        self.wrote = self.failed = False
        self.unsynced = False  # a write was sent whose result was not read yet
        self.held: set[int] = set()
        self.refused: set[int] = set()
        self.busy: set[int] = set()
        self.pipeline: psycopg.Pipeline | None = None  # set by the store while the transaction runs
        self.cache: dict[str, tuple[Any, ...] | None] = {}  # stream rows, as the batch left them
        self.claims: dict[tuple[str, str], str | None] = {}
        self.writes: list[PgUnitOfWork] = []

    def unit(self) -> PgUnitOfWork:
        return PgUnitOfWork(self)

    def lock(self, key: int) -> None:
        """Wait for the lock of ``key`` (call it only while holding none: see the module docstring)."""
        if key not in self.held:
            self.send(LOCK, (key,))
            self.held.add(key)

    def refuse(self, keys: list[int]) -> None:
        """Put off, for the rest of this transaction, every command that touches ``keys`` (those of
        a command put off), so that none overtakes it."""
        self.refused.update(keys)

    def prefetch(self, streams: list[tuple[int, str]], claims: list[tuple[int, str, str, str | None]] = (),  # type: ignore[assignment]
                 first: tuple[int, ...] = (), after: Follow | None = None) -> None:
        """Lock and read, in one round trip, the streams ``(key, stream id)`` and the claims
        ``(key, scope, claim key, holder's stream type)`` that a batch's commands address or
        declared (``cqrskit.domain.reads``), and the lock keys ``first`` (one a command put off
        found busy): the locks first, then the reads in statements of their own (their snapshots
        are taken once the locks are held, so they see every commit before them). ``after``,
        called once those are read (``self.cache``), returns more streams and claims: reads that
        follow from what the first round trip read; they come in the second one.

        A transaction that holds no lock yet WAITS for these, in ascending key order, in one
        statement: every transaction that waits does so only there, only holding locks of lower
        keys, so waits never form a cycle, and batches that share aggregates queue instead of
        putting their commands off. Any lock after that is only tried (a busy one puts its
        command off). The streams of claims' holders come in the same round trip when the
        holder is known from an earlier batch (``holders``), else in a second one, tried."""
        if not self.locking:
            return
        claims = [c for c in dict.fromkeys(claims) if c[0] not in self.refused and (c[1], c[2]) not in self.claims]
        hinted = []
        for _, scope, key, holder_type in claims:
            holder = self.holders.get((scope, key))
            if holder is not None and holder_type is not None:
                sid = stream_id(holder_type, holder)
                hinted.append((lock_key("s", sid), sid))
        owners = self._prefetch([*streams, *hinted], claims, first)
        more, more_claims = after() if after is not None else ([], [])
        more_claims = [c for c in dict.fromkeys(more_claims)
                       if c[0] not in self.refused and (c[1], c[2]) not in self.claims]
        if owners or more or more_claims:
            self._prefetch([*owners, *more], more_claims, ())

    def _prefetch(self, streams: list[tuple[int, str]], claims: list[tuple[int, str, str, str | None]],
                  first: tuple[int, ...]) -> list[tuple[int, str]]:
        streams = [(k, sid) for k, sid in dict.fromkeys(streams) if k not in self.refused and sid not in self.cache]
        keys = [k for k in dict.fromkeys([*first, *(k for k, _ in streams), *(c[0] for c in claims)])
                if k not in self.held]
        if not streams and not claims and not keys:
            return []
        wait = bool(keys) and not self.held and not self.wrote
        got = self.send(LOCKS if wait else TRY_LOCKS, (sorted(keys) if wait else keys,)) if keys else None
        rows = self.send(LOAD_MANY, ([sid for _, sid in streams],)) if streams else None
        held = self.send(OWNERS, ([c[1] for c in claims], [c[2] for c in claims])) if claims else None
        if got is None:
            acquired: set[int] = set()
        elif wait:
            self.rows(got)
            acquired = set(keys)
        else:
            acquired = {key for key, ok in self.rows(got) if ok}
        self.busy.update(k for k in keys if k not in acquired)
        self.held.update(acquired)
        found = {row[0]: row[1:] for row in self.rows(rows)} if rows is not None else {}
        for key, sid in streams:
            if key in self.held:
                self.cache[sid] = found.get(sid)
        holders = {(scope, k): owner for scope, k, owner in self.rows(held)} if held is not None else {}
        owners = []
        for key, scope, claim_key, owner_type in claims:
            holder = holders.get((scope, claim_key))
            if holder is not None:
                if len(self.holders) > 100_000:
                    self.holders.clear()
                self.holders[(scope, claim_key)] = holder
            if key not in self.held:
                continue
            self.claims[(scope, claim_key)] = holder
            if holder is not None and owner_type is not None:
                sid = stream_id(owner_type, holder)
                owners.append((lock_key("s", sid), sid))
        return owners

    def fetch(self, sql: str, key: int, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """One row read by ``sql`` under the lock of ``key`` (locking mode), or plainly."""
        if key in self.refused or key in self.busy:
            raise LockBusy(key)
        if not self.locking or key in self.held:
            return self.one(sql, params)
        if not self.held and not self.wrote:
            self.lock(key)
            return self.one(sql, params)
        got = self.send(TRY_LOCK, (key,))
        row = self.one(sql, params)
        if not self.row(got)[0]:  # type: ignore[index]
            self.busy.add(key)
            raise LockBusy(key)
        self.held.add(key)
        return row

    def send(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        """Queue one statement; its result is read later (or never)."""
        return self.conn.execute(sql, params)

    def one(self, sql: str, params: Any = None) -> tuple[Any, ...] | None:
        return self.row(self.send(sql, params))

    def all(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.rows(self.send(sql, params))

    def rows(self, cursor: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
        try:
            return cursor.fetchall()
        except psycopg.Error as exc:
            raise self._failed(exc) from exc

    def row(self, cursor: psycopg.Cursor[Any]) -> tuple[Any, ...] | None:
        try:
            return cursor.fetchone()
        except psycopg.Error as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: psycopg.Error) -> Exception:
        """The transaction is lost (it can only be rolled back); what to raise for ``exc``."""
        self.failed = True
        if isinstance(exc, (pg_errors.UniqueViolation, pg_errors.TransactionRollback, pg_errors.LockNotAvailable)):
            return ConcurrencyConflict(f"postgresql: {exc}")
        return exc

    def finish(self) -> None:
        """Wait until every queued statement has run, then queue COMMIT (sent as the pipeline
        ends). In group commit, COMMIT never travels with the writes: a worker that dies while
        its writes wait (on a row lock, say) must leave a transaction that the server rolls back,
        so that the batch's messages come back to a batch that decides them again."""
        if self.unsynced and self.pipeline is not None:
            try:
                self.pipeline.sync()
            except psycopg.Error as exc:
                raise self._failed(exc) from exc
        for unit in self.writes:
            unit.result()
        self.send("COMMIT")

    def record_outcome(self, outcome: Outcome) -> psycopg.Cursor[Any]:
        """Queue the insert of ``outcome`` alone (rejected...); its cursor's row is None after
        the commit when the command id had an outcome already."""
        values = outcome.row()
        values["errors"] = None if outcome.errors is None else json.dumps(outcome.errors)
        values["status"] = outcome.status.value
        self.wrote = self.unsynced = True
        return self.send(INSERT_OUTCOME, [values[c] for c in OUTCOME_COLUMNS])

    def stored_outcome(self, command_id: str) -> Outcome | None:
        cursor = self.send(SELECT_OUTCOME, (command_id,))
        row = self.row(cursor)
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
        self.duplicate = False
        self.positions: list[int] | None = None
        self.rows: dict[str, tuple[Any, ...] | None] = {}  # each stream as loaded, then as written
        self.snapshots: dict[str, str] = {}
        self.counts = (0, 0)
        self.write: psycopg.Cursor[Any] | None = None

    # -- HandlerContext ---------------------------------------------------------------------
    def load(self, cls: type[A], aggregate_id: str) -> A:
        sid = stream_id(cls.stream_type, aggregate_id)
        if sid in self.loaded:
            return self.loaded[sid]  # type: ignore[return-value]
        key = lock_key("s", sid)
        self.keys.append(key)
        tx = self.tx
        if sid in tx.cache and key not in tx.refused and key in tx.held:
            row = tx.cache[sid]  # read ahead, or as an earlier command of the batch left it
        else:
            row = tx.fetch(LOAD, key, (sid,))
        self.rows[sid] = row
        aggregate = restored(cls, aggregate_id, row, self.tx)
        self.loaded[sid] = aggregate
        return aggregate  # type: ignore[return-value]

    def owner_of(self, scope: str, key: str) -> str | None:
        """A claim's holder: read without a lock (a claim that changes meanwhile fails the
        commit on the claims' unique key); ``claim`` and ``release`` lock it first."""
        return self._holder(scope, key, locked=False)

    def _holder(self, scope: str, key: str, *, locked: bool) -> str | None:
        if (scope, key) in self.taken:
            return self.taken[(scope, key)]
        if (scope, key) in self.released:
            return None
        tx, lock = self.tx, lock_key("c", scope, key)
        if locked and tx.locking:
            self.keys.append(lock)
        if (scope, key) in tx.claims and (lock in tx.held or not (locked and tx.locking)):
            return tx.claims[(scope, key)]
        if locked:
            row = tx.fetch(OWNER, lock, (scope, key))
        else:
            row = tx.one(OWNER, (scope, key))
        tx.claims[(scope, key)] = owner = None if row is None else row[0]
        return owner

    def claim(self, scope: str, key: str, owner: str) -> None:
        if self.released.get((scope, key)) == owner:
            del self.released[(scope, key)]  # given up and taken back in one command
            return
        holder = self._holder(scope, key, locked=True)
        if holder == owner:
            return
        if holder is not None:
            raise RuleViolation(f"{scope} {key!r} is already taken")
        self.taken[(scope, key)] = owner

    def release(self, scope: str, key: str, owner: str) -> None:
        if self._holder(scope, key, locked=True) == owner:
            self.taken.pop((scope, key), None)
            self.released[(scope, key)] = owner

    def now(self) -> datetime:
        return self.tx.clock

    # -- commit -----------------------------------------------------------------------------
    def commit(self, metadata: dict[str, Any], outcome: Outcome | None = None) -> list[int]:
        """Write every pending event, stream move, claim and ``outcome`` in one statement; the
        positions of the new events, in order. Raises DuplicateCommand, ConcurrencyConflict. In a
        deferred transaction the write is only queued and [] returned: ``result`` tells, after
        the commit, the positions and whether it was a duplicate."""
        tx = self.tx
        tx.wrote = tx.unsynced = True
        self.write = tx.send(tx.statements.write[outcome is not None], (self._doc(metadata, outcome),))
        for sid, aggregate in self.loaded.items():
            aggregate.version += len(aggregate.pending)
            if aggregate.pending:  # what a later command of the batch loads, without a read
                self.rows[sid] = (aggregate.version, self.snapshots[sid], aggregate.snapshot_version())
            aggregate.pending.clear()
        if tx.deferred:
            tx.cache.update(self.rows)
            tx.claims.update(self.taken)
            tx.claims.update(dict.fromkeys(self.released))
            tx.writes.append(self)
            return []
        positions = self.result()
        tx.unsynced = False
        if self.duplicate:
            raise DuplicateCommand("the command has an outcome already")
        return positions

    def result(self) -> list[int]:
        """The positions of the write once it ran (sets ``duplicate`` when it wrote nothing).
        Raises ConcurrencyConflict when a stream was not where the command found it (moved by
        another transaction, or by a duplicate earlier in the batch that wrote nothing)."""
        if self.positions is None:
            ok, moved, created, positions = self.tx.row(self.write)  # type: ignore[arg-type,misc]
            self.duplicate = not ok
            if ok and (moved, created) != self.counts:
                raise ConcurrencyConflict("a stream moved past the version it was loaded at")
            self.positions = list(positions or [])
        return self.positions

    def _doc(self, metadata: dict[str, Any], outcome: Outcome | None) -> str:
        """The statement's one parameter: everything to write as ONE JSON document (new streams
        ``n``, moved streams ``m``, events ``e``, released ``r`` and taken ``c`` claims, the
        events' metadata ``meta``, the time ``now`` and the outcome ``o``), built as text around
        the JSON that pydantic already produced."""
        new, moved, events = [], [], []
        # Streams in one global order (by id): two transactions touching the same rows lock them
        # in the same order.
        for sid, agg in sorted(self.loaded.items()):
            if not agg.pending:
                continue
            version, quoted = agg.version, q(sid)
            self.snapshots[sid] = snapshot = snapshot_json(agg)
            head = f'{{"sid":{quoted},"v":{version + len(agg.pending)},"sv":{agg.snapshot_version()},' \
                   f'"state":{snapshot}'
            if version == 0:
                new.append(f'{head},"t":{q(agg.stream_type)},"aid":{q(agg.id)}}}')
            else:
                moved.append(f'{head},"f":{version}}}')
            for offset, (stamp, event) in enumerate(agg.pending_in_order(), start=1):  # positions: recording order
                events.append((stamp, f'{{"id":"{uuid.uuid4()}","sid":{quoted},"t":{q(agg.stream_type)},'
                                      f'"v":{version + offset},"et":{q(event.type)},"sv":{event.schema_version},'
                                      f'"data":{event.model_dump_json()}}}'))
        claims = lambda held: ",".join(  # noqa: E731
            f'{{"s":{q(s)},"k":{q(k)},"o":{q(o)}}}' for (s, k), o in held.items())
        self.counts = (len(moved), len(new))
        return (f'{{"n":[{",".join(new)}],"m":[{",".join(moved)}],"e":[{",".join(e for _, e in sorted(events, key=lambda item: item[0]))}],'
                f'"r":[{claims(self.released)}],"c":[{claims(self.taken)}],"meta":{json.dumps(metadata)},'
                f'"now":"{self.tx.clock.isoformat()}","o":{"null" if outcome is None else outcome_json(outcome)}}}')
