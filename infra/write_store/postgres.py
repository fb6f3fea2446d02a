"""PostgreSQL sessions of the write store: pooled connections lent as psycopg's own (with the
command workers' lock and idle waits), and the group-commit transaction on them
(``cqrskit.infra.pg_store.PgTransaction``, pipeline mode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import errors as psycopg_errors
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine

from cqrskit.domain.registry import Registry
from cqrskit.infra.pg_store import PgStatements, PgTransaction


@dataclass(frozen=True)
class Waits:
    """PostgreSQL: how long a transaction of this store may wait and stay idle, in seconds (0:
    no limit). ``lock``: a transaction waiting this long for a lock (an aggregate another
    transaction holds) gives up with ConcurrencyConflict and is retried. ``idle``: the server
    ends a session that sat idle this long inside a transaction (a frozen or stalled worker),
    rolling it back and releasing its locks; its commands are decided again."""

    lock: float = 0.0
    idle: float = 0.0

    def settings(self) -> tuple[str, str]:
        return f"{round(self.lock * 1000)}ms", f"{round(self.idle * 1000)}ms"


class PgSessions:
    """Transactions of one store on PostgreSQL, on connections of ``engine``'s pool."""

    def __init__(self, engine: Engine, registry: Registry, waits: Waits | None) -> None:
        self.engine, self.registry, self.waits = engine, registry, waits
        self._statements: PgStatements | None = None
        self._holders: dict[tuple[str, str], str] = {}  # claims' holders as last read: a lock hint

    @contextmanager
    def transaction(self, now: datetime | None = None, *, locking: bool = True, deferred: bool = True
                    ) -> Iterator[PgTransaction]:
        """One transaction for many units of work (group commit), committed when the block ends
        normally, rolled back when it raises. See ``cqrskit.infra.pg_store``."""
        with self.psycopg_connection() as conn:
            tx = PgTransaction(conn, self.registry, self.statements(conn), now or datetime.now(UTC),
                               locking=locking, deferred=deferred, holders=self._holders)
            try:
                with conn.pipeline() as pipeline:
                    tx.pipeline = pipeline
                    tx.send("BEGIN")
                    yield tx
                    if tx.failed:  # a statement failed and its error was handled: roll back
                        _drain(pipeline)
                    else:
                        tx.finish()
                if tx.failed:
                    conn.execute("ROLLBACK")
            except BaseException:
                if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def psycopg_connection(self) -> Iterator[Any]:
        """A pooled connection as psycopg's own, in autocommit mode while it is lent out."""
        fairy = self.engine.raw_connection()
        conn = fairy.driver_connection
        try:
            conn.autocommit = True
            if self.waits is not None and fairy.info.get("cqrskit.waits") != self.waits:
                conn.execute("SELECT set_config('lock_timeout', %s, false), "
                             "set_config('idle_in_transaction_session_timeout', %s, false)", self.waits.settings())
                fairy.info["cqrskit.waits"] = self.waits  # once per connection: session settings
            yield conn
        except psycopg_errors.OperationalError:
            fairy.invalidate()
            raise
        finally:
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                conn.autocommit = False
            elif fairy.is_valid:
                fairy.invalidate()
            fairy.close()

    def statements(self, conn: Any) -> PgStatements:
        if self._statements is None:
            sequence = conn.execute("SELECT pg_get_serial_sequence('events', 'position')").fetchone()[0]
            self._statements = PgStatements(sequence)
        return self._statements


def _drain(pipeline: Any) -> None:
    """Sync a pipeline whose transaction failed (the failure was raised already)."""
    try:
        pipeline.sync()
    except psycopg_errors.Error:
        pass
