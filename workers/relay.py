"""The event relay: every committed event, out of the write store, onto the events exchange and to
the indexer workers, at least once (G5).

Reading order. PostgreSQL hands out ``position`` when a row is inserted, not when its transaction
commits, so positions become visible out of order: reading ``position > checkpoint`` skips an event
whose transaction commits after a later position was relayed (the sequence-gap problem of Marten
and Eventuous). Every event row therefore carries ``tx_id``, the id of the transaction that wrote
it, and the relay reads::

    WHERE (tx_id, position) > (:checkpoint_tx, :checkpoint_position)
      AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY tx_id, position

``xmin`` is the oldest transaction still running: every transaction older than it has committed or
rolled back, so its rows are final, and any transaction that commits later has an id >= that xmin,
hence greater than every ``tx_id`` relayed so far. The checkpoint ``(tx_id, position)`` thus never
passes an event that is yet to appear. The price: one long write transaction anywhere in the
cluster holds the relay back until it ends. SQLite has a single writer that commits in position
order, so there the relay reads ``position > checkpoint`` and treats ``tx_id`` as 0.

One batch: read up to ``relay_batch_size`` events, publish them to the exchange and feed them to
the indexer at the same time (each outlet streams its messages with windowed confirms, and the two
confirm rounds overlap), then advance the checkpoint in a transaction that first renews our lease
row (fencing: a relay that lost its lease cannot move the checkpoint). A crash anywhere before that
commit publishes the batch again: consumers deduplicate by ``event_id``. While one batch is out for
its confirms and its checkpoint (a thread of its own), the next one is read; it is handed over only
once the one before is checkpointed, and dropped when that one fails (reading starts again at the
checkpoint).

One active relay: the ``leases`` row ``relay`` names a holder until ``expires_at`` (the database's
clock on PostgreSQL, so the clocks of the relays' hosts do not matter). The holder renews it every
third of ``relay_lease_seconds``; a standby polls and takes it once it has expired.

Pacing (``cqrskit.workers.pacing``): after a full batch the relay reads again at once (a backlog).
While events came in the last 2 s it reads every ``relay_linger_ms`` (sooner when the batch would
fill up before: the rate is measured), so that each batch, its confirm rounds, its checkpoint and
the indexer windows and bulk requests it feeds carry what committed meanwhile instead of one command
each (0: every 25 ms, 50 ms on SQLite); every 20 ms while a committed event is held back by an older
running transaction; and once it found nothing for 2 s its polls back off (x1.5 each) to
``relay_idle_poll_ms``, so that an idle relay costs next to nothing.
It does not LISTEN: a NOTIFY at commit takes a database-wide lock until the commit is flushed, which
serialises every command's commit (measured: 16 connections fell from 4,106 to 1,256 tx/s).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import sqlalchemy as sa
import structlog
from sqlalchemy import Connection, Engine

from cqrskit.infra.db import upsert_insert
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.schema import events, leases, relay_checkpoints
from cqrskit.infra.tracing_hooks import in_current_context, relaying
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import StoredEvent
from cqrskit.infra.utc import as_utc
from cqrskit.workers.pacing import Arrivals, IdleBackoff
from cqrskit.workers.relay_outlet import EventsNotConfirmed, RabbitmqOutlet

log = structlog.get_logger("cqrskit.relay")
NAME = "relay"  # the relay's checkpoint row and lease row
SQLITE_POLL = 0.05
POSTGRES_POLL = 0.025
HELD_BACK_POLL = 0.02
SLOW_POLL = 1.0


class LeaseLost(Exception):
    """Another relay took the lease: the batch in hand was published but not checkpointed."""


class Lag(NamedTuple):
    events: int  # committed events not yet relayed
    oldest_age: float  # seconds since the oldest of them was recorded (0.0 when none)


class EventRelay:
    """Relays events from ``engine``'s write store in batches; see the module docstring.

    ``publish_events`` must return only once every message is durably accepted (raise otherwise);
    ``feed_indexer`` likewise for the batch as JSON-ready dicts. ``None`` skips that outlet."""

    def __init__(self, settings: Settings, engine: Engine,
                 publish_events: Callable[[list[EventMessage]], None] | None,
                 feed_indexer: Callable[[list[dict[str, Any]]], None] | None, holder: str) -> None:
        self.engine = engine
        self.batch_size = settings.relay_batch_size
        self.publish_events = publish_events
        self.feed_indexer = feed_indexer
        self.holder = holder
        self.postgres = engine.dialect.name == "postgresql"
        self.lease = Lease(engine, holder, settings.relay_lease_seconds)
        self.linger = settings.relay_linger_ms / 1000
        self.arrivals = Arrivals()  # events read per second lately
        first = POSTGRES_POLL if self.postgres else SQLITE_POLL
        self.idle = IdleBackoff(first, max(first, settings.relay_idle_poll_ms / 1000))
        self.closers: list[Callable[[], None]] = []
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-outlet")
        self._confirming = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-confirm")
        self.closers += [self._beside.shutdown, self._confirming.shutdown]
        self._in_flight: Future[None] | None = None  # the batch being published and checkpointed
        self._cursor: tuple[int, int] | None = None  # past the batch in flight; None: the checkpoint
        self._quiet = False  # the last read found nothing at all

    @classmethod
    def for_rabbitmq(cls, settings: Settings, engine: Engine, holder: str | None = None) -> EventRelay:
        """A relay publishing to ``settings.events_exchange`` and enqueueing indexer batches on
        ``settings.indexer_queue`` (both declared on first use)."""
        outlet = RabbitmqOutlet(settings)
        relay = cls(settings, engine, outlet.publish_events, outlet.feed_indexer, holder or default_holder())
        relay.closers.append(outlet.close)
        return relay

    def relay_once(self) -> int:
        """Relay one batch; returns how many events were relayed and checkpointed (0 when another
        relay holds the lease). Raises LeaseLost, EventsNotConfirmed and infrastructure errors; the
        checkpoint then stays where it was, so the events are published again later."""
        self._settle()
        if not self.lease.hold():
            return 0
        return self._relay_batch()[0]

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set. Never raises on a transient failure (database or broker
        down): logs it and retries with backoff. Gives the lease up on the way out."""
        log.info("relay.started", holder=self.holder, batch_size=self.batch_size)
        failures = 0
        try:
            while not stop.is_set():
                try:
                    timeout = self._cycle()
                    failures = 0
                except Exception as exc:  # the relay must outlive every outage: retry, never die
                    failures += 1
                    timeout = min(0.25 * 2 ** (failures - 1), 10.0)
                    log.warning("relay.error", error=repr(exc)[:500], retry_in=timeout,
                                failures=failures, exc_info=failures == 1)
                    stop.wait(timeout)
                    continue
                if timeout > 0:
                    stop.wait(timeout)
        finally:
            try:
                self._settle()
            except Exception as exc:  # its events are published again by whoever relays next
                log.warning("relay.error", error=repr(exc)[:500], retry_in=None, failures=failures + 1)
            self.lease.release()
            log.info("relay.stopped", holder=self.holder)

    def lag(self) -> Lag:
        return relay_lag(self.engine)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()

    def _cycle(self) -> float:
        """One step of ``run``: returns how long to wait for new events (0: go on at once)."""
        if not self.lease.hold():
            self._settle(reraise=False)
            return min(SLOW_POLL, self.lease.seconds / 3)
        try:
            count, held_back = self._overlapped()
        except LeaseLost:
            return 0.0
        return max(0.0, min(self._pace(count, held_back), self.lease.until_renewal()))

    def _pace(self, count: int, held_back: bool) -> float:
        """How long to wait before the next read, after one that found ``count`` events."""
        if count:
            self.arrivals.note(count)
            self.idle.reset()
        if count >= self.batch_size:
            return 0.0
        if held_back:
            return HELD_BACK_POLL
        pace = self.idle.next()  # the first poll interval while events came lately, then backing off
        if pace > self.idle.first or not self.linger:
            return pace
        rate = self.arrivals.rate()  # events come: the next batch as full as the bound allows
        return min(self.linger, self.batch_size / rate) if rate else self.linger

    def _overlapped(self) -> tuple[int, bool]:
        """Read the next batch while the one before is being published and checkpointed, then hand
        it over once that one is done. Only one batch is in flight, so the checkpoint moves in
        order; when it fails, the batch read meanwhile is dropped and reading starts again at the
        checkpoint (its events are published again: consumers deduplicate)."""
        batch, held_back = self._read(self._cursor)
        self._settle()
        if batch:
            self._cursor = (batch[-1].tx_id or 0, batch[-1].position)
            self._in_flight = self._confirming.submit(self._publish, batch)
        return len(batch), held_back

    def _settle(self, reraise: bool = True) -> None:
        """Wait for the batch in flight; on its failure forget the cursor, and raise unless told not to."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        try:
            in_flight.result()
        except BaseException:
            self._cursor = None
            if reraise:
                raise

    def _relay_batch(self) -> tuple[int, bool]:
        """Read, publish, feed, checkpoint, one after the other. Returns (events relayed, whether
        committed events are held back behind a running transaction)."""
        self._cursor = None
        batch, held_back = self._read(None)
        if batch:
            self._publish(batch)
        return len(batch), held_back

    @relaying  # a span in the trace of the commands that wrote the batch
    def _publish(self, batch: list[StoredEvent]) -> None:
        started = time.monotonic()
        messages = [EventMessage.from_stored(event) for event in batch]
        self._send(messages)
        self._advance(batch[-1])
        command_ids = list(dict.fromkeys(m.command_id for m in messages if m.command_id))
        log.info("relay.published", count=len(batch), first_position=batch[0].position,
                 last_position=batch[-1].position, command_ids=command_ids,
                 ms=round((time.monotonic() - started) * 1000, 1))

    def _read(self, after: tuple[int, int] | None) -> tuple[list[StoredEvent], bool]:
        """The batch after ``after`` (None: the checkpoint), and whether events are held back."""
        # each statement on its own (no BEGIN, no ROLLBACK at return): as in a READ COMMITTED
        # transaction, every one sees the commits made before it; a poll is one round trip
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            checkpoint = read_checkpoint(conn) if after is None else after
            if self._quiet and self.postgres and not _any_after(conn, checkpoint):
                return [], False  # at rest: one index probe, neither a batch nor held-back events
            batch = read_batch(conn, checkpoint, self.batch_size)
            held_back = not batch and self.postgres and _held_back(conn, checkpoint)
        self._quiet = not batch and not held_back
        return batch, held_back

    def _send(self, messages: list[EventMessage]) -> None:
        """Both outlets at once; returns when both returned, raises what either raised."""
        feed = None
        if self.feed_indexer is not None:
            feed = self._beside.submit(in_current_context(self.feed_indexer),  # the relay's span goes along
                                       [m.model_dump(mode="json") for m in messages])
        try:
            if self.publish_events is not None:
                self.publish_events(messages)
        finally:
            if feed is not None:
                feed.result()

    def _advance(self, last: StoredEvent) -> None:
        with self.engine.begin() as conn:
            self.lease.fence(conn)
            write_checkpoint(conn, NAME, last.tx_id or 0, last.position)


class Lease:
    """The ``leases`` row that makes one relay active. ``hold`` acquires or renews it (at most
    every third of its duration); ``fence`` renews it inside a write transaction or raises LeaseLost."""

    def __init__(self, engine: Engine, holder: str, seconds: float) -> None:
        self.engine, self.holder, self.seconds = engine, holder, seconds
        self.held = False
        self.renew_at = 0.0
        self.lock = threading.Lock()  # hold (the relay's loop) and fence (its confirming thread)
        self.other: str | None = None  # the holder we last saw while on standby

    def hold(self) -> bool:
        if self.held and time.monotonic() < self.renew_at:
            return True
        with self.lock, self.engine.begin() as conn:
            now, expires = self._clock(conn)
            insert = upsert_insert(conn, leases).values(name=NAME, holder=self.holder, expires_at=expires)
            upsert = insert.on_conflict_do_update(
                index_elements=[leases.c.name],
                set_={"holder": insert.excluded.holder, "expires_at": insert.excluded.expires_at},
                where=sa.or_(leases.c.holder == self.holder, leases.c.expires_at < now),
            ).returning(leases.c.holder)
            got = conn.execute(upsert).first() is not None
            other = None if got else conn.execute(sa.select(leases.c.holder).where(leases.c.name == NAME)).scalar()
        self._note(got, other)
        return got

    def fence(self, conn: Connection) -> None:
        with self.lock:
            self._fence(conn)

    def _fence(self, conn: Connection) -> None:
        now, expires = self._clock(conn)
        renewed = conn.execute(
            leases.update()
            .where(leases.c.name == NAME, leases.c.holder == self.holder, leases.c.expires_at > now)
            .values(expires_at=expires).returning(leases.c.holder)
        ).first()
        if renewed is None:
            self._note(False, None)
            raise LeaseLost(f"relay {self.holder} no longer holds the lease")
        self.renew_at = time.monotonic() + self.seconds / 3

    def release(self) -> None:
        """Let a standby take over at once (best effort: an unreleased lease simply expires)."""
        if not self.held:
            return
        self.held = False
        try:
            with self.engine.begin() as conn:
                now, _ = self._clock(conn)
                conn.execute(leases.update().where(leases.c.name == NAME, leases.c.holder == self.holder)
                             .values(expires_at=now))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("relay.lease_release_failed", error=repr(exc)[:300])

    def until_renewal(self) -> float:
        return self.renew_at - time.monotonic()

    def _note(self, got: bool, other: str | None) -> None:
        if got:
            self.renew_at = time.monotonic() + self.seconds / 3
            if not self.held:
                log.info("relay.lease_acquired", holder=self.holder, lease_seconds=self.seconds)
        elif self.held:
            log.warning("relay.lease_lost", holder=self.holder)
        elif other != self.other:
            log.info("relay.standby", holder=self.holder, active=other)
        self.held, self.other = got, other

    def _clock(self, conn: Connection) -> tuple[Any, Any]:
        """(now, now + lease): the database's clock on PostgreSQL, UTC here on SQLite."""
        if conn.dialect.name == "postgresql":
            return sa.func.now(), sa.func.now() + timedelta(seconds=self.seconds)
        now = datetime.now(UTC)
        return now, now + timedelta(seconds=self.seconds)


# -- reading the write store -----------------------------------------------------------------
def read_checkpoint(conn: Connection, name: str = NAME) -> tuple[int, int]:
    """The checkpoint row ``name`` (the relay's; the process managers' partitions keep theirs here too)."""
    row = conn.execute(sa.select(relay_checkpoints.c.tx_id, relay_checkpoints.c.position)
                       .where(relay_checkpoints.c.name == name)).first()
    return (0, 0) if row is None else (row.tx_id, row.position)


def write_checkpoint(conn: Connection, name: str, tx_id: int, position: int) -> None:
    """Move the checkpoint row ``name``: the relay's (fenced by its lease first), a process-managers partition's."""
    insert = upsert_insert(conn, relay_checkpoints).values(name=name, tx_id=tx_id, position=position,
                                                           updated_at=datetime.now(UTC))
    conn.execute(insert.on_conflict_do_update(index_elements=[relay_checkpoints.c.name],
                                              set_={c: insert.excluded[c] for c in ("tx_id", "position", "updated_at")}))


def read_batch(conn: Connection, checkpoint: tuple[int, int], limit: int) -> list[StoredEvent]:
    """The next ``limit`` final events after ``checkpoint``, in relay order (module docstring)."""
    if conn.dialect.name == "postgresql":
        rows = conn.execute(_PG_BATCH, {"tx": checkpoint[0], "pos": checkpoint[1], "limit": limit})
    else:
        rows = conn.execute(sa.select(events).where(_after(conn, checkpoint)).order_by(events.c.position).limit(limit))
    return [StoredEvent(**{**row._mapping, "recorded_at": as_utc(row.recorded_at)}) for row in rows]


def relay_lag(engine: Engine) -> Lag:
    """How far the relay is behind: committed events after the checkpoint, and the age of the oldest."""
    with engine.connect() as conn:
        checkpoint = read_checkpoint(conn)
        count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(events.c.recorded_at)).where(_after(conn, checkpoint))
        ).one()
    if not count:
        return Lag(0, 0.0)
    return Lag(count, max(0.0, (datetime.now(UTC) - as_utc(oldest)).total_seconds()))


_XMIN = sa.literal_column("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
# the relay's statements on PostgreSQL, built once (a poll then costs a third of the CPU it did)
_PG_AFTER = sa.tuple_(events.c.tx_id, events.c.position) > sa.tuple_(
    sa.bindparam("tx", type_=sa.BigInteger), sa.bindparam("pos", type_=sa.BigInteger))
_PG_BATCH = (sa.select(events).where(_PG_AFTER, events.c.tx_id < _XMIN)
             .order_by(events.c.tx_id, events.c.position).limit(sa.bindparam("limit", type_=sa.Integer)))
# probes as ORDER BY the index LIMIT 1, never EXISTS: once psycopg prepares a statement the server
# may plan it generically, and a generic EXISTS over "(tx_id, position) > ($1, $2)" is a sequential
# scan of the whole table (4 ms at 20,000 events, every poll); this form is an index-only scan
_ORDER = (events.c.tx_id, events.c.position)
_PG_ANY = sa.select(sa.literal(1)).where(_PG_AFTER).order_by(*_ORDER).limit(1)
_PG_HELD_BACK = sa.select(sa.literal(1)).where(_PG_AFTER, events.c.tx_id >= _XMIN).order_by(*_ORDER).limit(1)


def _after(conn: Connection, checkpoint: tuple[int, int]) -> sa.ColumnElement[bool]:
    if conn.dialect.name == "postgresql":
        return sa.tuple_(events.c.tx_id, events.c.position) > sa.tuple_(*checkpoint)
    return events.c.position > checkpoint[1]


def _any_after(conn: Connection, checkpoint: tuple[int, int]) -> bool:
    """Whether any row after ``checkpoint`` is visible (PostgreSQL): without one there is neither a
    batch to read nor an event held back."""
    return conn.execute(_PG_ANY, {"tx": checkpoint[0], "pos": checkpoint[1]}).first() is not None


def _held_back(conn: Connection, checkpoint: tuple[int, int]) -> bool:
    """Whether committed events wait behind an older running transaction (which may roll back
    without a notification). PostgreSQL only."""
    return conn.execute(_PG_HELD_BACK, {"tx": checkpoint[0], "pos": checkpoint[1]}).first() is not None


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
