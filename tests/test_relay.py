"""The event relay on real PostgreSQL and RabbitMQ (and SQLite): every committed event reaches the
events exchange at least once, none skipped when transactions commit out of position order (G5),
through SIGKILLs, with one active relay by lease, within tens of milliseconds of its commit; and the
indexer is fed the same batches. What reaches the exchange is observed as another system would:
a queue of our own bound with ``#``, drained with plain pika."""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy import Engine, make_url

from cqrskit.examples.shop.domain import registry
from cqrskit.examples.shop.customers import Customer
from cqrskit.infra.db import make_engine
from cqrskit.infra.event_wire import EventMessage, event_message_schema_text
from cqrskit.infra.schema import events, leases, relay_checkpoints, unique_claims
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore, UnitOfWork
from tests.processes import PROJECT, WorkerProcess, worker_env
from cqrskit.workers.relay import EventRelay, LeaseLost, relay_lag

DOCS = Path(__file__).resolve().parents[1] / "docs"
RELAY_PROGRAM = ("from cqrskit.infra.settings import load_settings; from cqrskit.infra.logs import configure_logging; "
                 "from cqrskit.app.bootstrap import run_relay; s = load_settings(); configure_logging(s); run_relay(s)")


# -- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture
def relay_settings(amqp_settings: Settings) -> Iterator[Settings]:
    """``amqp_settings`` with this test's own events exchange and indexer queue, deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    settings = amqp_settings.model_copy(update={"events_exchange": f"test.{tag}.events",
                                                "indexer_queue": f"test.{tag}.indexer"})
    yield settings
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    channel = connection.channel()
    for suffix in ("", ".DQ", ".XQ"):
        channel.queue_delete(settings.indexer_queue + suffix)
    channel.exchange_delete(settings.events_exchange)
    connection.close()


class Tap:
    """A queue bound to the events exchange with ``#``: what another system would receive."""

    def __init__(self, settings: Settings) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=500)
        self.channel.exchange_declare(settings.events_exchange, exchange_type="topic", durable=True)
        self.queue = f"{settings.events_exchange}.tap"
        self.channel.queue_declare(self.queue)
        self.channel.queue_bind(self.queue, settings.events_exchange, routing_key="#")
        self.received: list[dict[str, Any]] = []

    def drain(self, wait: float = 0.05, limit: int | None = None) -> list[dict[str, Any]]:
        """Take every message that arrives until none came for ``wait`` seconds. Acks each one it
        takes: messages delivered to the client but not yet taken go back to the queue on cancel."""
        taken = []
        for method, properties, body in self.channel.consume(self.queue, inactivity_timeout=wait):
            if method is None:
                break
            message = json.loads(body)
            assert properties.message_id == message["event_id"] and properties.delivery_mode == 2
            assert properties.content_type == "application/json"
            assert method.routing_key == f"{message['stream_type']}.{message['type']}"
            taken.append(message)
            self.channel.basic_ack(method.delivery_tag)
            if len(taken) == limit:
                break
        self.channel.cancel()
        self.received += taken
        return taken

    def wait_for(self, event_ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not event_ids <= self.ids():
            assert time.monotonic() < deadline, f"{len(event_ids - self.ids())} events not published in {timeout}s"
            self.drain(0.2)

    def ids(self) -> set[str]:
        return {m["event_id"] for m in self.received}

    def close(self) -> None:
        self.channel.queue_delete(self.queue)
        self.connection.close()


@pytest.fixture
def tap(relay_settings: Settings) -> Iterator[Tap]:
    queue = Tap(relay_settings)
    yield queue
    queue.close()


@pytest.fixture
def engine(relay_settings: Settings) -> Iterator[Engine]:
    made = make_engine(relay_settings.database_url, pool_size=4)
    yield made
    made.dispose()


def register(store: EventStore, count: int, per_transaction: int = 1, uow: UnitOfWork | None = None) -> list[str]:
    """Register ``count`` customers (one event each); returns the command ids."""
    command_ids = []
    for start in range(0, count, per_transaction):
        command_id = f"cmd-{uuid.uuid4().hex[:12]}"
        if uow is not None:
            _register_in(uow, command_id, min(per_transaction, count - start))
            command_ids.append(command_id)
            continue
        with store.unit_of_work() as fresh:
            _register_in(fresh, command_id, min(per_transaction, count - start))
        command_ids.append(command_id)
    return command_ids


def _register_in(uow: UnitOfWork, command_id: str, count: int) -> None:
    for _ in range(count):
        customer_id = f"c-{uuid.uuid4().hex[:12]}"
        uow.load(Customer, customer_id).register("Ann", f"{customer_id}@example.com")
    uow.commit({"command_id": command_id, "correlation_id": command_id, "causation_id": command_id})


def stored_ids(engine: Engine, command_ids: list[str] | None = None) -> set[str]:
    query = sa.select(events.c.event_id)
    if command_ids is not None:
        query = query.where(events.c.metadata["command_id"].as_string().in_(command_ids))
    with engine.connect() as conn:
        return set(conn.execute(query).scalars())


def relay_until(relay: EventRelay, total: int, timeout: float = 30.0) -> None:
    """Call ``relay_once`` until ``total`` events went out. A write transaction anywhere on the
    PostgreSQL server (another test's, in another database) holds the snapshot's xmin, and so the
    relay, back while it runs: tests wait for what the relay must do, never count on one call."""
    deadline, done = time.monotonic() + timeout, 0
    while done < total:
        assert time.monotonic() < deadline, f"relayed {done} of {total} in {timeout}s"
        done += relay.relay_once()
        time.sleep(0.01)


def relay_until_raises(relay: EventRelay, error: type[Exception], timeout: float = 30.0) -> Exception:
    """``relay_once`` until it raises ``error`` (see ``relay_until`` on why one call may relay nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            assert relay.relay_once() == 0, f"relayed a batch instead of raising {error.__name__}"
        except error as exc:
            return exc
        time.sleep(0.01)
    raise AssertionError(f"relay_once did not raise {error.__name__} in {timeout}s")


def checkpoint(engine: Engine) -> tuple[int, int] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(relay_checkpoints.c.tx_id, relay_checkpoints.c.position)).first()
    return None if row is None else tuple(row)  # type: ignore[return-value]


# -- G5: out-of-order commits ------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_an_open_transaction_holds_later_commits_back_and_nothing_is_skipped(
        relay_settings: Settings, engine: Engine, tap: Tap) -> None:
    store = EventStore(engine, registry)
    relay = EventRelay.for_rabbitmq(relay_settings, engine, holder="test")
    try:
        register(store, 2)
        relay_until(relay, 2)
        tap.wait_for(stored_ids(engine), timeout=30)
        with store.unit_of_work() as a:  # A takes positions 3-5 and stays open...
            register(store, 3, per_transaction=3, uow=a)
            register(store, 2)  # ...while B takes 6-7 and commits
            assert relay.relay_once() == 0, "B was relayed while A, with lower positions, was still open"
            assert tap.drain() == []
            assert relay.lag().events == 2  # B is committed, not yet relayed
        relay_until(relay, 5)
        tap.drain()
        assert sorted(m["event_id"] for m in tap.received) == sorted(stored_ids(engine))  # each exactly once
        assert [m["position"] for m in tap.received] == [1, 2, 3, 4, 5, 6, 7]
        assert relay.lag().events == 0
    finally:
        relay.close()


@pytest.mark.timeout(60)
def test_a_transaction_with_an_older_id_but_later_positions_is_not_skipped(
        relay_settings: Settings, engine: Engine, tap: Tap) -> None:
    """B writes first (so it has the older transaction id), A appends and commits, then B appends
    and commits: B's events have the older tx_id but the higher positions."""
    store = EventStore(engine, registry)
    relay = EventRelay.for_rabbitmq(relay_settings, engine, holder="test")
    try:
        with engine.connect() as b_conn:
            b_tx = b_conn.begin()
            b_conn.execute(unique_claims.insert().values(scope="test", key="b", owner="b"))
            a_commands = register(store, 3, per_transaction=3)
            assert relay.relay_once() == 0, "A was relayed while the older transaction B was open"
            b_commands = register(store, 2, per_transaction=2, uow=UnitOfWork(store, b_conn, datetime.now(UTC)))
            b_tx.commit()
        relay_until(relay, 5)
        tap.drain()
        positions = [m["position"] for m in tap.received]
        assert positions == [4, 5, 1, 2, 3], "relay order is (tx_id, position): B's older transaction first"
        assert sorted(m["event_id"] for m in tap.received) == sorted(stored_ids(engine))
        assert {m["command_id"] for m in tap.received} == set(a_commands + b_commands)
    finally:
        relay.close()


@pytest.mark.timeout(60)
def test_a_failure_after_publishing_publishes_the_batch_again(
        relay_settings: Settings, engine: Engine, tap: Tap) -> None:
    """Publish confirmed, then the indexer feed fails: the checkpoint stays, the batch goes out again."""
    relay = EventRelay.for_rabbitmq(relay_settings, engine, holder="test")
    feed = relay.feed_indexer
    calls: list[int] = []

    def failing_once(batch: list[dict[str, Any]]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise ConnectionError("indexer queue unreachable")
        feed(batch)  # type: ignore[misc]

    relay.feed_indexer = failing_once
    try:
        register(EventStore(engine, registry), 3)
        relay_until_raises(relay, ConnectionError)
        assert checkpoint(engine) is None
        relay_until(relay, 3)
        tap.drain()
        assert len(tap.ids()) == 3 and len(tap.received) == 3 + calls[0]  # the failed batch went out twice
        assert checkpoint(engine)[1] == 3  # type: ignore[index]
    finally:
        relay.close()


# -- SQLite ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_on_sqlite_every_event_is_relayed_in_position_order(relay_settings: Settings, sqlite_url: str,
                                                            tap: Tap) -> None:
    settings = relay_settings.model_copy(update={"database_url": sqlite_url, "relay_batch_size": 7})
    engine = make_engine(sqlite_url)
    relay = EventRelay.for_rabbitmq(settings, engine, holder="test")
    try:
        register(EventStore(engine, registry), 30, per_transaction=3)
        assert relay.lag().events == 30 and relay.lag().oldest_age >= 0
        relay_until(relay, 30)
        tap.drain()
        assert [m["position"] for m in tap.received] == list(range(1, 31))
        assert {m["event_id"] for m in tap.received} == stored_ids(engine)
        assert relay.lag().events == 0 and checkpoint(engine) == (0, 30)
    finally:
        relay.close()
        engine.dispose()


@pytest.mark.timeout(30)
def test_embedded_relay_feeds_the_indexer_in_position_order_without_a_broker(sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, relay_batch_size=4)
    engine = make_engine(sqlite_url)
    batches: list[list[dict[str, Any]]] = []
    relay = EventRelay(settings, engine, publish_events=None, feed_indexer=batches.append, holder="embedded")
    try:
        register(EventStore(engine, registry), 10)
        assert [relay.relay_once() for _ in range(4)] == [4, 4, 2, 0]
        assert [[e["position"] for e in b] for b in batches] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
        EventMessage.model_validate(batches[0][0])
    finally:
        relay.close()
        engine.dispose()


# -- the lease, in process ---------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_one_relay_holds_the_lease_and_a_fenced_out_relay_cannot_move_the_checkpoint(
        relay_settings: Settings, engine: Engine, tap: Tap) -> None:
    first = EventRelay.for_rabbitmq(relay_settings, engine, holder="first")
    second = EventRelay.for_rabbitmq(relay_settings, engine, holder="second")
    try:
        register(EventStore(engine, registry), 2)
        relay_until(first, 2)
        register(EventStore(engine, registry), 2)
        assert second.relay_once() == 0, "a standby relayed while the lease was held"
        with engine.begin() as conn:  # first stalls past its lease (but believes it holds it)...
            conn.execute(sa.text("UPDATE leases SET expires_at = now() - interval '1 second'"))
        first.lease.renew_at = time.monotonic() + 60
        assert second.lease.hold()  # ...and second takes over
        relay_until_raises(first, LeaseLost)  # believes it holds the lease: publishes, cannot checkpoint
        assert checkpoint(engine)[1] == 2  # type: ignore[index]
        relay_until(second, 2)
        assert checkpoint(engine)[1] == 4 and first.relay_once() == 0  # type: ignore[index]
        tap.drain()
        assert tap.ids() == stored_ids(engine)
    finally:
        first.close()
        second.close()


# -- relay processes: SIGKILL and takeover --------------------------------------------------------
class Relays:
    """``run_relay`` subprocesses (JSON logs), each SIGKILLed at the end of the test."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.env = worker_env(settings, CQRSKIT_EVENTS_EXCHANGE=settings.events_exchange,
                              CQRSKIT_INDEXER_QUEUE=settings.indexer_queue)
        self.directory = directory
        self.started: list[WorkerProcess] = []

    def start(self, lease_seconds: float = 2.0) -> WorkerProcess:
        log_path = self.directory / f"relay-{len(self.started)}.log"
        env = {**self.env, "CQRSKIT_RELAY_LEASE_SECONDS": str(lease_seconds)}
        with log_path.open("wb") as log:
            popen = subprocess.Popen([sys.executable, "-c", RELAY_PROGRAM], cwd=PROJECT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        process = WorkerProcess(popen, log_path)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def relays(relay_settings: Settings, tmp_path: Path) -> Iterator[Relays]:
    started = Relays(relay_settings, tmp_path)
    yield started
    started.kill_all()


def lease_holder(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(leases.c.holder)).scalar()


def acquired(process: WorkerProcess, timeout: float = 30.0) -> str:
    """The holder name of ``process`` once it has taken the lease."""
    return process.wait_for_log(lambda r: r["event"] == "relay.lease_acquired", timeout=timeout)[0]["holder"]


def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def published_command_ids(process: WorkerProcess) -> set[str]:
    return {c for r in process.log_records() if r["event"] == "relay.published" for c in r["command_ids"]}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_events_committed_around_a_sigkill_are_published_after_restart(
        relays: Relays, engine: Engine, tap: Tap) -> None:
    store = EventStore(engine, registry)
    acquired(relays.start())
    register(store, 1)
    relays.started[-1].kill()  # right after a commit
    acquired(relays.start())
    tap.wait_for(stored_ids(engine), timeout=30)

    restarted = threading.Event()

    def stream() -> None:  # 2,000 events or more: the stream goes on until the relay was restarted
        written = 0
        while not restarted.is_set() or written < 2000:
            register(store, 5, per_transaction=5)
            written += 5

    writer = threading.Thread(target=stream)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while len(tap.received) < 200:  # mid-stream
            assert time.monotonic() < deadline, f"the relay published {len(tap.received)} events in 30s"
            tap.drain(0.02, limit=20)
        relays.started[-1].kill()
        relays.start()
    finally:
        restarted.set()
        writer.join()
    everything = stored_ids(engine)
    assert len(everything) >= 2000
    tap.wait_for(everything, timeout=30)
    assert tap.ids() == everything


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_standby_relay_takes_over_within_seconds_of_a_sigkill(
        relays: Relays, engine: Engine, tap: Tap) -> None:
    store = EventStore(engine, registry)
    active = relays.start()
    active_holder = acquired(active)
    standby = relays.start()
    standby.wait_for_log(lambda r: r["event"] == "relay.standby" and r["active"] == active_holder)
    assert lease_holder(engine) == active_holder

    before = register(store, 5)
    tap.wait_for(stored_ids(engine), timeout=30)
    eventually(lambda: published_command_ids(active) == set(before), "command ids in relay.published (G12)")
    assert published_command_ids(standby) == set()

    active.kill()
    killed_at = time.monotonic()
    after = register(store, 5)
    holder = acquired(standby, timeout=2 + 10)
    takeover = time.monotonic() - killed_at
    assert takeover < 2 + 3, f"the standby took the lease {takeover:.1f}s after the kill (lease: 2 s)"
    assert lease_holder(engine) == holder
    tap.wait_for(stored_ids(engine), timeout=30)
    eventually(lambda: published_command_ids(standby) >= set(after), "the standby's relay.published lines")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigterm_stops_the_relay_and_hands_the_lease_over_at_once(relays: Relays, engine: Engine) -> None:
    """With a 30 s lease, the standby can only take over this fast if the lease was given up."""
    active = relays.start(lease_seconds=30)
    acquired(active)
    standby = relays.start(lease_seconds=30)
    standby.wait_for_log(lambda r: r["event"] == "relay.standby")
    active.popen.send_signal(signal.SIGTERM)
    assert active.popen.wait(timeout=5) == 0
    assert any(r["event"] == "relay.stopped" for r in active.log_records())
    holder = acquired(standby, timeout=5)
    assert lease_holder(engine) == holder


# -- outages ----------------------------------------------------------------------------------
class Proxy:
    """A TCP forwarder to RabbitMQ that can be cut (every connection dropped, new ones refused)
    and restored on the same port: a broker outage that the other tests on this machine don't see."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        probe = socket.create_server(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        for sock in [listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            except OSError:
                pass
            sock.close()  # type: ignore[union-attr]
        self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def through(proxy_of: str, settings: Settings) -> tuple[Proxy, Settings]:
    """A proxy to the broker or the database of ``settings``, and settings that use it."""
    if proxy_of == "broker":
        url = pika.URLParameters(settings.broker_url)
        proxy = Proxy((url.host, url.port))
        return proxy, settings.model_copy(update={"broker_url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"})
    url = make_url(settings.database_url)
    proxy = Proxy((url.host, url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    return proxy, settings.model_copy(update={"database_url": proxied})


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("outage", ["broker", "database"])
def test_the_relay_outlives_an_outage_and_publishes_what_was_committed_during_it(
        outage: str, relay_settings: Settings, engine: Engine, tap: Tap) -> None:
    proxy, settings = through(outage, relay_settings)
    relay_engine = make_engine(settings.database_url, pool_size=2)
    store = EventStore(engine, registry)  # the writers keep their own way to the database
    relay = EventRelay.for_rabbitmq(settings, relay_engine, holder="test")
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, args=(stop,))
    with structlog.testing.capture_logs() as logs:
        runner.start()
        try:
            register(store, 3)
            tap.wait_for(stored_ids(engine), timeout=30)
            proxy.down()
            register(store, 3)
            eventually(lambda: any(r["event"] == "relay.error" for r in logs), f"relay.error during the {outage} outage")
            assert runner.is_alive()
            proxy.up()
            tap.wait_for(stored_ids(engine), timeout=45)
        finally:
            stop.set()
            runner.join(timeout=15)
            relay.close()
            proxy.down()
            relay_engine.dispose()
    assert not runner.is_alive()
    assert relay_lag(engine).events == 0


# -- latency and the indexer feed ----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_an_event_is_on_the_exchange_within_tens_of_milliseconds_of_its_commit(
        relay_settings: Settings, engine: Engine, tap: Tap) -> None:
    store = EventStore(engine, registry)
    relay = EventRelay.for_rabbitmq(relay_settings, engine, holder="test")
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, args=(stop,))
    runner.start()
    latencies = []
    try:
        register(store, 1)  # warm up: connections, declarations
        tap.wait_for(stored_ids(engine), timeout=30)
        arrivals = tap.channel.consume(tap.queue, inactivity_timeout=5)
        for _ in range(20):
            register(store, 1)
            committed = time.monotonic()
            method, _props, _body = next(arrivals)
            assert method is not None, "no event within 5 s of its commit"
            latencies.append(time.monotonic() - committed)
            tap.channel.basic_ack(method.delivery_tag)
        tap.channel.cancel()
    finally:
        stop.set()
        runner.join(timeout=10)
        relay.close()
    median = statistics.median(latencies)
    print(f"commit-to-exchange latency: median {median * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert median < 0.3, f"median commit-to-exchange latency {median * 1000:.0f} ms"


@pytest.mark.timeout(60)
def test_the_indexer_queue_gets_one_dramatiq_message_per_batch(relay_settings: Settings, engine: Engine) -> None:
    settings = relay_settings.model_copy(update={"relay_batch_size": 4})
    relay = EventRelay.for_rabbitmq(settings, engine, holder="test")
    try:
        commands = register(EventStore(engine, registry), 6)
        relay_until(relay, 6)
    finally:
        relay.close()
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        bodies = []
        while (got := channel.basic_get(settings.indexer_queue, auto_ack=True))[0] is not None:
            bodies.append(json.loads(got[2]))
    finally:
        connection.close()
    assert {(b["actor_name"], b["queue_name"]) for b in bodies} == {("index_events", settings.indexer_queue)}
    batches = [b["args"][0] for b in bodies]
    assert all(0 < len(batch) <= 4 for batch in batches) and len(batches) >= 2  # one message per batch
    assert [e["position"] for batch in batches for e in batch] == [1, 2, 3, 4, 5, 6]
    assert [EventMessage.model_validate(e).command_id for batch in batches for e in batch] == commands


def test_event_message_schema_file_equals_the_model() -> None:
    assert (DOCS / "event-message.schema.json").read_text() == event_message_schema_text(), (
        "docs/event-message.schema.json is stale: regenerate it from cqrskit.infra.event_wire.event_message_schema_text()"
    )


# -- G5: batch N+1 is read while batch N is confirmed --------------------------------------------
class Overlapping(EventRelay):
    """A relay that counts the reads made while a batch was out for confirms, and checks
    at every checkpoint that every event up to it was published (G5)."""

    def __init__(self, settings: Settings, engine: Engine, publish: Callable[[list[EventMessage]], None]) -> None:
        super().__init__(settings, engine, publish, None, holder="test")
        self.reads_during_publish = 0
        self.published: set[int] = set()
        self.checkpoints: list[int] = []

    def _read(self, after: tuple[int, int] | None) -> Any:
        in_flight = self._in_flight
        self.reads_during_publish += in_flight is not None and not in_flight.done()
        return super()._read(after)

    def _advance(self, last: Any) -> None:
        with self.engine.connect() as conn:
            upto = set(conn.execute(sa.select(events.c.position).where(events.c.position <= last.position)).scalars())
        assert upto <= self.published, f"checkpoint to {last.position} passes unpublished {sorted(upto - self.published)}"
        self.checkpoints.append(last.position)
        super()._advance(last)


def run_in_thread(relay: EventRelay) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def run_until_checkpoint(relay: EventRelay, engine: Engine, position: int) -> None:
    """Run ``relay`` in a thread until its checkpoint reaches ``position``; then stop and close it."""
    stop, thread = run_in_thread(relay)
    try:
        wait_for(lambda: checkpoint(engine) is not None and checkpoint(engine)[1] == position, 30)  # type: ignore[index]
    finally:
        stop.set()
        thread.join(timeout=10)
        relay.close()


@pytest.mark.timeout(60)
def test_the_next_batch_is_read_while_one_is_being_confirmed(relay_settings: Settings, engine: Engine) -> None:
    """G5 with overlapped batches: reads happen while a batch is out for confirms, every event is
    published once, in relay order, and the checkpoint never passes an event not yet confirmed."""
    settings = relay_settings.model_copy(update={"relay_batch_size": 4, "relay_linger_ms": 0})
    got: list[int] = []

    def slow_confirms(messages: list[EventMessage]) -> None:
        time.sleep(0.1)  # a confirm round that takes its time
        got.extend(m.position for m in messages)
        relay.published.update(m.position for m in messages)

    relay = Overlapping(settings, engine, slow_confirms)
    register(EventStore(engine, registry), 20)
    run_until_checkpoint(relay, engine, 20)
    assert got == list(range(1, 21))
    assert relay.reads_during_publish >= 3
    assert relay.checkpoints == sorted(relay.checkpoints)


@pytest.mark.timeout(60)
def test_a_failed_batch_drops_the_batch_read_meanwhile_and_publishes_both_again(
        relay_settings: Settings, engine: Engine) -> None:
    """G5: batch 2 is not confirmed while batch 3 was already read; batch 3 is not published
    before batch 2, both go out again from the checkpoint, and nothing is skipped."""
    settings = relay_settings.model_copy(update={"relay_batch_size": 4, "relay_linger_ms": 0})
    got: list[list[int]] = []

    def second_fails(messages: list[EventMessage]) -> None:
        time.sleep(0.05)
        got.append([m.position for m in messages])
        if len(got) == 2:
            raise ConnectionError("not confirmed")
        relay.published.update(m.position for m in messages)

    relay = Overlapping(settings, engine, second_fails)
    register(EventStore(engine, registry), 12)
    run_until_checkpoint(relay, engine, 12)
    assert got[:3] == [[1, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 8]]
    assert got[3:] == [[9, 10, 11, 12]]
    assert relay.published == set(range(1, 13))


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
