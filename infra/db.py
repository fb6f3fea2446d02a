"""Engines for the write store, made at start-up (never at import).

SQLite (the embedded default) gets WAL and a busy timeout; a writer whose read snapshot went
stale fails with "database is locked" (SQLITE_BUSY_SNAPSHOT), which the event store reports as a
concurrency conflict; a connection with the execution option ``sqlite_begin="IMMEDIATE"`` takes
the write lock at BEGIN instead, so that writers queue rather than conflict. PostgreSQL gets a
pool sized for the worker threads and no ping on every checkout (a round trip per command): a
connection is pinged only when it sat idle in the pool for longer than ``IDLE_PING_SECONDS``
(the server or a proxy may have dropped it meanwhile); a connection lost mid-command fails that
command with an OperationalError, which the broker's retries see, and is dropped from the pool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url


def make_engine(url: str, *, pool_size: int = 8) -> Engine:
    """An engine for ``url`` (postgresql+psycopg://... or sqlite:///...)."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if sa_url.drivername == "postgresql":
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    engine = create_engine(sa_url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)
    event.listen(engine, "checkin", _on_checkin)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


IDLE_PING_SECONDS = 10.0


def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Ping a connection that sat in the pool for a while; a dead one is replaced (the pool
    retries the checkout on DisconnectionError)."""
    if time.monotonic() - record.info.get("checked_in", time.monotonic()) < IDLE_PING_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as error:
        raise exc.DisconnectionError(str(error)) from error


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # let SQLAlchemy's BEGIN below take effect
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', '')}".strip())

    return engine


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def upsert_insert(conn: Connection, table: sa.Table) -> Any:
    """An INSERT into ``table`` in the dialect of ``conn`` (PostgreSQL or SQLite), so that it can
    take ``on_conflict_do_update`` / ``on_conflict_do_nothing``: the one place that chooses."""
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)
