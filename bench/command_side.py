"""Command-side benchmark: every cqrskit figure beside the raw limit it should approach.

    .venv/bin/python -m bench.command_side [--commands 20000] [--processes 2] [--threads 64] [--smoke]

Rows (docs/benchmarks.md says why each limit is the fair one):
- command execution: the shop mix drained by ``dramatiq cqrskit.app.processes:command_worker`` processes, queue full first,
  beside raw PostgreSQL one-row transactions at the same concurrency (P x T connections);
- producer: ``AmqpPublisher.publish_many`` / ``CommandProducer.send_many`` beside raw pika with
  1,000 confirms in flight (and raw pika with one confirm each, for reference);
- event store: ``EventStore.unit_of_work`` appends (single client) beside pyeventsourcing's
  PostgreSQL Application on the same server;
- tracing: worker CPU per command with tracing on (100 % sampled, exported over OTLP) beside
  tracing off, interleaved in this run (``bench.tracing_cost``).

Every figure is the median of ``--runs`` runs after a warm-up, all measured in this one run. It
makes its own databases, exchanges and queues and removes them afterwards.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import os
import platform
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING

import pika
import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import make_url

from bench.floor import ServiceCpu, wait_until_empty
from bench.tracing_cost import TRACING_CPU, TRACING_OFF

if TYPE_CHECKING:
    from cqrskit.infra.settings import Settings

ADMIN_URL = os.environ.get("CQRSKIT_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("CQRSKIT_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")

EXECUTION = "command execution (shop mix, worker processes)"
WORKER_CPU = "worker CPU per command (shop mix)"
FLOOR = "command execution vs Dramatiq alone (no-op actor)"
FLOOR_CPU = "worker CPU per command vs Dramatiq alone"
HOT = "hot aggregate: orders and restocks of one product"
SCALING = "scaling: registrations, {} worker process(es)"
SCALES = (1, 2, 4)
PUBLISH_QUORUM = "producer: AmqpPublisher.publish_many -> quorum queue"
PUBLISH_CLASSIC = "producer: AmqpPublisher.publish_many -> classic queue"
SEND_MANY = "producer: CommandProducer.send_many -> quorum queue"
PUBLISH_EACH = "producer: raw pika, one confirm each (reference)"
APPEND_NEW = "event store: append to new streams"
APPEND_EXISTING = "event store: append to existing streams"
APPEND_RAW = "event store: new streams vs raw (reference)"
ROWS = (EXECUTION, WORKER_CPU, FLOOR, FLOOR_CPU, HOT, *(SCALING.format(p) for p in SCALES), PUBLISH_QUORUM, PUBLISH_CLASSIC, SEND_MANY, PUBLISH_EACH,
        APPEND_NEW, APPEND_EXISTING, APPEND_RAW, TRACING_CPU, TRACING_OFF)


@dataclass(frozen=True)
class Sizes:
    commands: int  # roughly: the shop mix's total
    publishes: int
    publishes_each: int
    appends: int
    runs: int
    raw_seconds: float

    @classmethod
    def of(cls, args: argparse.Namespace) -> Sizes:
        if args.smoke:
            return cls(commands=300, publishes=1000, publishes_each=200, appends=500, runs=1, raw_seconds=0.5)
        return cls(args.commands, args.publishes, min(2000, args.publishes), args.appends, args.runs, 3.0)


@dataclass
class Row:
    name: str
    ours: float | None  # per second
    limit_name: str
    limit: float
    target: float | None = None  # the ratio ours/limit we aim at
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.ours is None else self.ours / self.limit


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def interleaved(runs: int, measures: dict[str, Callable[[], float]]) -> dict[str, float]:
    """The median of each measure over ``runs`` rounds, each round running every measure once,
    so that a noisy moment on the machine hits all of them alike; the order rotates from round
    to round, so that none always runs after the same one (a quorum queue, for one, is still
    cleaning up after the previous run's purge)."""
    seen: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for round_ in range(runs):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            seen[name].append(measures[name]())
    return {name: statistics.median(values) for name, values in seen.items()}


# -- services, databases, topology ----------------------------------------------------------
def dsn(url: str) -> str:
    """A libpq DSN for a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def bench_database(tag: str) -> Iterator[str]:
    """A fresh, migrated database (SQLAlchemy URL), dropped afterwards."""
    from cqrskit.infra.db import make_engine
    from cqrskit.infra.migrate import upgrade

    name = f"cqrskit_bench_{tag}"
    with psycopg.connect(dsn(ADMIN_URL), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with psycopg.connect(dsn(ADMIN_URL), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def amqp_channel() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


def machine_facts() -> dict[str, str]:
    from cqrskit.infra.migrate import head_revision

    with psycopg.connect(dsn(ADMIN_URL)) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    rabbit = connection._impl.server_properties["version"]  # what the broker says it is
    connection.close()
    packages = ("sqlalchemy", "psycopg", "pika", "dramatiq", "eventsourcing")
    libs = ", ".join(f"{p} {version(p)}" for p in packages)
    return {
        "cores": str(os.cpu_count()),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "PostgreSQL": f"{pg} (synchronous_commit={sync})",
        "RabbitMQ": rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit),
        "Python": platform.python_version(),
        "write-store schema": str(head_revision()),
        "libraries": libs,
    }


# -- 1. command execution -------------------------------------------------------------------
def shop_phases(commands: int) -> list[tuple[str, list]]:  # type: ignore[type-arg]
    """ShopLoad phases sized so that their total is close to ``commands``."""
    from cqrskit.examples.shop.load import ShopLoad

    size = max(50, int(commands / 1.3))
    for _ in range(3):
        phases = ShopLoad(size=size, seed=7).phases()
        total = sum(len(envelopes) for _, envelopes in phases)
        if abs(total - commands) <= commands * 0.02:
            break
        size = max(50, int(size * commands / total))
    return phases


@dataclass(frozen=True)
class Workers:
    """How a phase's worker processes start: ``dramatiq cqrskit.app.processes:command_worker``, P x T, optionally under py-spy
    (collapsed stacks of every process, one file per phase, in ``py_spy_dir``)."""

    settings: Settings
    processes: int
    threads: int
    py_spy_dir: str | None = None
    target: str = "cqrskit.app.processes:command_worker"  # bench.floor:noop_worker for Dramatiq's floor
    extra_env: tuple[tuple[str, str], ...] = ()  # e.g. the OTEL_* variables of bench.tracing_cost

    def command(self, phase: str) -> list[str]:
        queue = self.settings.commands_queue
        args = [sys.executable, "-m", "dramatiq", self.target, "--processes", str(self.processes),
                "--threads", str(self.threads), "--queues", queue, f"{queue}.DQ"]
        if self.py_spy_dir is None:
            return args
        out = os.path.join(self.py_spy_dir, f"{phase}.txt")
        return [py_spy(), "record", "--subprocesses", "--nonblocking", "--format", "raw", "-o", out, "--",
                *args]

    def env(self) -> dict[str, str]:
        s = self.settings
        untraced = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # tracing: extra_env only
        return {**untraced, "CQRSKIT_DATABASE_URL": s.database_url, "CQRSKIT_BROKER_URL": s.broker_url,
                "CQRSKIT_COMMANDS_EXCHANGE": s.commands_exchange, "CQRSKIT_COMMANDS_QUEUE": s.commands_queue,
                "CQRSKIT_QUEUE_TYPE": s.queue_type.value, "CQRSKIT_LOG_LEVEL": "WARNING", **dict(self.extra_env)}

    def stop(self, process: subprocess.Popen) -> None:  # type: ignore[type-arg]
        """SIGTERM to the dramatiq master (SIGINT to our own session under py-spy, so that it writes
        its profile); SIGKILL to the session after 30 s."""
        if process.poll() is None:
            if self.py_spy_dir is None:
                process.send_signal(signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # our own session: these workers only
            process.wait()


def py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if found is None:
        raise SystemExit("--py-spy needs py-spy: .venv/bin/pip install py-spy")
    return found


def measure_execution(sizes: Sizes, workers: Callable[..., Workers], console: Console) -> list[Row]:
    from cqrskit.infra.settings import Settings

    tag = uuid.uuid4().hex[:10]
    phases = shop_phases(sizes.commands)
    with bench_database(f"cmd_{tag}") as url:
        settings = Settings(database_url=url, broker_url=AMQP_URL, log_level="WARNING",
                            commands_exchange=f"bench.{tag}.commands", commands_queue=f"bench.{tag}.commands")
        pool = workers(settings)
        services = ServiceCpu(make_url(url).database or "")
        try:
            declare_commands(settings)
            drained, boot, cpu = drain_phases(pool, phases, console, services)
            expected = sum(len(envelopes) for _, envelopes in phases)
            floor_rate, floor_cpu = measure_floor(pool, phases, console)
            hot, expected = measure_hot(pool, sizes, expected, console)
            connections = raw_connections(pool.processes, pool.threads)
            raw_pg_rate(url, connections, 0.3)  # warm-up
            raw = median_of(sizes.runs, lambda: raw_pg_rate(url, connections, sizes.raw_seconds))
            raw_hot = median_of(sizes.runs, lambda: raw_pg_rate(url, connections, sizes.raw_seconds, hot=True))
            statuses = outcome_statuses(url)  # after the raw runs: the statistics are flushed by then
            scaling = measure_scaling(pool, workers, sizes, expected, console)
        finally:
            delete_commands(settings)
    total = sum(len(envelopes) for _, envelopes in phases)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    note = (f"{total} commands, P={pool.processes} T={pool.threads}; {counts}; "
            f"worker boot {boot:.1f} s/phase excluded")
    limit = f"PostgreSQL one-row tx, {connections} connections"
    budget = 1 / 0.0006
    pg, mq = (services.seconds[k] / total for k in ("postgres", "rabbitmq"))
    cores = os.cpu_count() or 1
    spent = cpu + pg + mq
    return [Row(EXECUTION, total / drained, limit, raw, 0.6,
                f"{note}. CPU per command in the drains: workers {cpu * 1000:.2f} ms, PostgreSQL {pg * 1000:.2f} ms "
                f"(this database's backends and the WAL/checkpoint writers), RabbitMQ {mq * 1000:.2f} ms (the "
                f"whole broker) = {spent * 1000:.2f} ms: {cores} cores allow {cores / spent:,.0f}/s at that cost"),
            Row(WORKER_CPU, 1 / cpu, "budget: 0.6 ms of worker CPU per command", budget, 1.0,
                f"{cpu * 1000:.2f} ms per command (getrusage of the reaped workers, start-up excluded); "
                "as commands per worker CPU-second"),
            Row(FLOOR, total / drained, "the same workers, actor replaced by a no-op", floor_rate, None,
                f"the same {total} messages; Dramatiq with pika on cqrskit's broker and middleware, nothing decided"),
            Row(FLOOR_CPU, 1 / cpu, "the same workers, actor replaced by a no-op: messages per worker CPU-s",
                1 / floor_cpu, None, f"{cpu * 1000:.2f} ms vs {floor_cpu * 1000:.2f} ms of worker CPU per message: "
                f"cqrskit's own part is {(cpu - floor_cpu) * 1000:.2f} ms"),
            Row(HOT, hot[0], f"PostgreSQL one-row UPDATE of ONE row + COMMIT, {connections} connections", raw_hot,
                None, hot[1]),
            *scaling]


def measure_tracing_cost(sizes: Sizes, workers: Callable[..., Workers], console: Console) -> list[Row]:
    """Worker CPU per command with tracing on (100 % sampled) and off, same run (bench.tracing_cost)."""
    from bench.tracing_cost import measure_tracing
    from cqrskit.infra.settings import Settings

    tag = uuid.uuid4().hex[:10]
    with bench_database(f"trc_{tag}") as url:
        settings = Settings(database_url=url, broker_url=AMQP_URL, log_level="WARNING",
                            commands_exchange=f"bench.{tag}.commands", commands_queue=f"bench.{tag}.commands")
        pool = workers(settings)
        try:
            declare_commands(settings)
            return measure_tracing(pool, max(100, sizes.commands // 4), max(sizes.runs, 2), drain_once, boot_cpu,
                                   children_cpu, console, Row)
        finally:
            delete_commands(settings)


HOT_COMMANDS = 2000


def measure_hot(pool: Workers, sizes: Sizes, expected: int, console: Console) -> tuple[tuple[float, str], int]:
    """Orders (one line, one unit) and restocks of ONE product, drained like the mix. Returns
    (rate, note) and the outcomes expected so far."""
    from cqrskit.producers.commands import CommandProducer, new_command

    count = min(HOT_COMMANDS, max(100, sizes.commands // 10))
    hot_id, tag = f"hot-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    setup = [new_command("AddProduct", hot_id, {"sku": f"SKU-{hot_id.upper()}", "name": "Hot", "price_cents": 100,
                                                "stock": 10 * count}),
             new_command("RegisterCustomer", f"{tag}-buyer", {"name": "Buyer", "email": f"{tag}@example.com"})]
    load = [new_command("RestockProduct", hot_id, {"quantity": 1}) if i % 5 == 4 else
            new_command("PlaceOrder", f"{tag}-o{i}", {"customer_id": f"{tag}-buyer",
                                                     "lines": [{"sku": f"SKU-{hot_id.upper()}", "quantity": 1}]})
            for i in range(count)]
    with CommandProducer.from_settings(pool.settings) as producer:
        for batch in (setup, load):
            producer.send_many(batch)
            expected += len(batch)
            _, started, finished = drain_once(pool, "hot", expected, len(batch))
    rate = len(load) / (finished - started)
    console.log(f"hot aggregate: {len(load)} commands drained in {finished - started:.2f} s ({rate:,.0f}/s)")
    return (rate, f"{len(load)} commands on one product (4 orders : 1 restock); the limit serialises on "
                  "one row as the product's stream does"), expected


def measure_scaling(pool: Workers, workers: Callable[..., Workers], sizes: Sizes, expected: int,
                    console: Console) -> list[Row]:
    """The same number of registrations drained by 1, 2 and 4 worker processes of T threads."""
    from cqrskit.producers.commands import CommandProducer, new_command

    count = max(200, sizes.commands // 8)
    rows = []
    with CommandProducer.from_settings(pool.settings) as producer:
        for processes in SCALES:
            scaled = workers(pool.settings, processes=processes)
            tag = uuid.uuid4().hex[:8]
            batch = [new_command("RegisterCustomer", f"{tag}-{i}", {"name": "Ada", "email": f"{tag}.{i}@example.com"})
                     for i in range(count)]
            producer.send_many(batch)
            expected += len(batch)
            _, started, finished = drain_once(scaled, f"scaling-{processes}", expected, len(batch))
            connections = raw_connections(processes, scaled.threads)
            raw = median_of(sizes.runs, lambda: raw_pg_rate(dsn_url(pool), connections, sizes.raw_seconds))
            rate = len(batch) / (finished - started)
            console.log(f"scaling P={processes}: {count} commands in {finished - started:.2f} s ({rate:,.0f}/s)")
            rows.append(Row(SCALING.format(processes), rate, f"PostgreSQL one-row tx, {connections} connections",
                            raw, None, f"{count} RegisterCustomer, T={scaled.threads}"))
    return rows


RAW_MAX_CONNECTIONS = 64  # PostgreSQL's default max_connections is 100


def raw_connections(processes: int, threads: int) -> int:
    """The raw limit's concurrency: one connection per worker thread, at most 64 (a command
    worker's threads share a few connections: group commit; the raw loop needs one each)."""
    return min(processes * threads, RAW_MAX_CONNECTIONS)


def dsn_url(pool: Workers) -> str:
    return pool.settings.database_url


def declare_commands(settings: Settings) -> None:
    from cqrskit.infra.broker import make_broker
    from cqrskit.infra.topology import declare_command_topology

    broker = make_broker(settings)
    declare_command_topology(broker, settings)
    broker.close()


def delete_commands(settings: Settings) -> None:
    with amqp_channel() as channel:
        queue = settings.commands_queue
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            channel.queue_delete(name)
        channel.exchange_delete(settings.commands_exchange)


def drain_phases(pool: Workers, phases: list,  # type: ignore[type-arg]
                 console: Console, services: ServiceCpu | None = None) -> tuple[float, float, float]:
    """Publish each phase, then drain it with fresh worker processes. Returns the summed drain
    time (first consumer up to the last outcome recorded), the mean boot time and the workers'
    CPU seconds per command (start-up and shutdown excluded)."""
    from cqrskit.producers.commands import CommandProducer

    drained, boots, expected = 0.0, [], 0
    idle = boot_cpu(pool)
    cpu_before = children_cpu()
    with CommandProducer.from_settings(pool.settings) as producer:
        for name, envelopes in phases:
            report = producer.send_many(envelopes)
            if report.failed:
                raise RuntimeError(f"{len(report.failed)} commands not confirmed: {report.failed[0]}")
            expected += len(envelopes)
            spawned, started, finished = drain_once(pool, name, expected, len(envelopes), services)
            drained += finished - started
            boots.append(started - spawned)
            console.log(f"{name}: {len(envelopes)} commands drained in {finished - started:.2f} s "
                        f"({len(envelopes) / (finished - started):,.0f}/s)")
    return drained, statistics.mean(boots), (children_cpu() - cpu_before - idle * len(phases)) / expected


def measure_floor(pool: Workers, phases: list, console: Console) -> tuple[float, float]:  # type: ignore[type-arg]
    """Dramatiq's floor: the mix's messages again, drained by the same P x T workers whose actor
    does nothing (``bench.floor:noop_worker``). Returns messages/s and worker CPU s per message."""
    from cqrskit.producers.commands import CommandProducer

    noop = dataclasses.replace(pool, target="bench.floor:noop_worker", py_spy_dir=None)
    envelopes = [envelope for _, batch in phases for envelope in batch]
    idle = boot_cpu(noop)
    before = children_cpu()
    with CommandProducer.from_settings(pool.settings) as producer:
        report = producer.send_many(envelopes)
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} messages not confirmed: {report.failed[0]}")
    _, started, finished = drain_once(noop, "floor", -1, len(envelopes))
    cpu = (children_cpu() - before - idle) / len(envelopes)
    rate = len(envelopes) / (finished - started)
    console.log(f"Dramatiq alone (no-op actor): {len(envelopes)} messages in {finished - started:.2f} s ({rate:,.0f}/s), "
                f"{cpu * 1000:.2f} ms of worker CPU each")
    return rate, cpu


def boot_cpu(pool: Workers) -> float:
    """CPU seconds the workers take to start and stop with nothing to do (subtracted per phase)."""
    before = children_cpu()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(pool.command("boot"), env=pool.env(), stdout=log, stderr=log,
                                   start_new_session=True)
        try:
            first_consumer(pool.settings.commands_queue, process)
        finally:
            pool.stop(process)
    return children_cpu() - before


def children_cpu() -> float:
    """CPU seconds (user + system) of the worker processes started so far and reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def drain_once(pool: Workers, phase: str, expected: int, size: int,
               services: ServiceCpu | None = None) -> tuple[float, float, float]:
    """Start workers on a full queue; wall-clock times of spawn, first consumer, last outcome
    (``expected`` outcomes; -1: the queue seen empty, for workers that record none). ``services``:
    what PostgreSQL and RabbitMQ spend in between is added to it."""
    with tempfile.TemporaryFile() as log:
        spawned = time.time()
        process = subprocess.Popen(pool.command(phase), env=pool.env(), stdout=log, stderr=log,
                                   start_new_session=True)
        try:
            started = first_consumer(pool.settings.commands_queue, process)
            if services is not None:
                services.start()
            if expected < 0:
                finished = wait_until_empty(pool.settings.commands_queue, amqp_channel, process, max(120.0, size / 20))
            else:
                finished = last_outcome(dsn(pool.settings.database_url), expected, timeout=max(120.0, size / 20))
            if services is not None:
                services.stop()
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        finally:
            pool.stop(process)
    return spawned, started, finished


def first_consumer(queue: str, workers: subprocess.Popen) -> float:  # type: ignore[type-arg]
    with amqp_channel() as channel:
        while workers.poll() is None:
            if channel.queue_declare(queue, passive=True).method.consumer_count > 0:
                return time.time()
            time.sleep(0.005)
    raise RuntimeError(f"workers exited with status {workers.returncode} before consuming")


def last_outcome(db: str, expected: int, timeout: float) -> float:
    """Wait until ``expected`` outcomes exist; the wall-clock time the last one was recorded."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db, autocommit=True) as conn:
        while time.monotonic() < deadline:
            query = "SELECT count(*), max(recorded_at) FROM command_outcomes"
            count, last = conn.execute(query).fetchone()  # type: ignore[misc]
            if count >= expected:
                return last.timestamp()
            time.sleep(0.1)
    raise TimeoutError(f"only {count} of {expected} outcomes after {timeout:.0f} s")


def outcome_statuses(url: str) -> Counter[str]:
    """Outcomes by status, and the deadlocks PostgreSQL detected in the database (as 'deadlocks')."""
    with psycopg.connect(dsn(url)) as conn:
        counts = Counter(dict(conn.execute("SELECT status, count(*) FROM command_outcomes GROUP BY status").fetchall()))
        deadlocks = conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
    counts["deadlocks"] = deadlocks[0] if deadlocks else 0
    return counts


def raw_pg_rate(url: str, connections: int, seconds: float, *, hot: bool = False) -> float:
    """One-row transactions per second: ``connections`` threads, each INSERT + COMMIT in a loop
    (``hot``: each UPDATE of the same one row + COMMIT)."""
    db = dsn(url)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_raw_rows (id bigserial PRIMARY KEY, body text NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS bench_hot_row (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO bench_hot_row VALUES (1, 0) ON CONFLICT DO NOTHING")
    statement, params = (("UPDATE bench_hot_row SET n = n + 1 WHERE id = 1", ()) if hot else
                         ("INSERT INTO bench_raw_rows (body) VALUES (%s)", ("x" * 200,)))
    counts = [0] * connections
    stop, ready = threading.Event(), threading.Barrier(connections + 1)

    def work(slot: int) -> None:
        with psycopg.connect(db) as conn:
            ready.wait()
            while not stop.is_set():
                conn.execute(statement, params)
                conn.commit()
                counts[slot] += 1

    pool = [threading.Thread(target=work, args=(slot,)) for slot in range(connections)]
    for thread in pool:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


# -- 2. producer ----------------------------------------------------------------------------
def measure_producer(sizes: Sizes) -> list[Row]:
    from cqrskit.producers.commands import outgoing

    envelopes = [e for _, phase in shop_phases(sizes.publishes) for e in phase][: sizes.publishes]
    tag = uuid.uuid4().hex[:10]
    return (measure_publishing(sizes, f"bench.{tag}.publish.quorum", "quorum", envelopes, outgoing)
            + measure_publishing(sizes, f"bench.{tag}.publish.classic", "classic", envelopes, outgoing))


def measure_publishing(sizes: Sizes, exchange: str, kind: str, envelopes: list,  # type: ignore[type-arg]
                       outgoing: Callable) -> list[Row]:  # type: ignore[type-arg]
    """The producer rows for one queue kind (send_many and one-confirm-each on quorum only)."""
    messages = [outgoing(e) for e in envelopes]
    with publish_target(exchange, kind) as purge:
        WindowedPika(exchange, messages[:200], 1000).run(purge)  # warm-up (publish_many warms itself)
        measures = {"ours": lambda: publish_many_rate(exchange, messages, purge),
                    "raw": lambda: WindowedPika(exchange, messages, 1000).run(purge)}
        if kind == "quorum":
            measures["send_many"] = lambda: send_many_rate(exchange, envelopes, purge)
            measures["each"] = lambda: one_each_rate(exchange, messages[: sizes.publishes_each], purge)
        rate = interleaved(sizes.runs, measures)
    limit = f"raw pika SelectConnection, 1,000 in flight ({kind})"
    note = f"{len(messages)} shop envelopes, {avg_bytes(messages)} B average"
    if kind == "classic":
        return [Row(PUBLISH_CLASSIC, rate["ours"], limit, rate["raw"], 0.8, note)]
    each = f"{sizes.publishes_each} messages; publish_many is {rate['ours'] / rate['each']:.1f}x this"
    return [Row(PUBLISH_QUORUM, rate["ours"], limit, rate["raw"], 0.8, note),
            Row(SEND_MANY, rate["send_many"], limit, rate["raw"], 0.8, "serialises the envelopes too"),
            Row(PUBLISH_EACH, None, "raw pika BlockingConnection, confirm per message", rate["each"], note=each)]


def avg_bytes(messages: Sequence) -> int:  # type: ignore[type-arg]
    return round(sum(len(m.body) for m in messages) / len(messages))


@contextmanager
def publish_target(exchange: str, kind: str) -> Iterator[Callable[[], None]]:
    """A topic exchange bound with ``#`` to one durable queue of ``kind``; yields ``purge``."""
    with amqp_channel() as channel:
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(exchange, durable=True, arguments={"x-queue-type": kind})
        channel.queue_bind(exchange, exchange, routing_key="#")
        def purge() -> None:
            channel.queue_purge(exchange)

        try:
            yield purge
        finally:
            channel.queue_delete(exchange)
            channel.exchange_delete(exchange)


def publish_many_rate(exchange: str, messages: Sequence, purge: Callable[[], None]) -> float:  # type: ignore[type-arg]
    from cqrskit.infra.amqp import AmqpPublisher

    with AmqpPublisher(AMQP_URL, exchange, window=1000) as publisher:
        publisher.publish_many(messages[:200])  # warm-up: connected, confirm channel open
        started = time.perf_counter()
        report = publisher.publish_many(messages)
        elapsed = time.perf_counter() - started
    purge()
    if report.failed or report.confirmed != len(messages):
        raise RuntimeError(f"publish_many: {report.confirmed} confirmed, {len(report.failed)} failed")
    return len(messages) / elapsed


def send_many_rate(exchange: str, envelopes: Sequence, purge: Callable[[], None]) -> float:  # type: ignore[type-arg]
    from cqrskit.infra.amqp import AmqpPublisher
    from cqrskit.producers.commands import CommandProducer

    with CommandProducer(AmqpPublisher(AMQP_URL, exchange, window=1000)) as producer:
        producer.send_many(envelopes[:200])
        started = time.perf_counter()
        report = producer.send_many(envelopes)
        elapsed = time.perf_counter() - started
    purge()
    if report.failed:
        raise RuntimeError(f"send_many: {len(report.failed)} failed")
    return len(envelopes) / elapsed


def properties(message) -> pika.BasicProperties:  # type: ignore[no-untyped-def]
    """The properties AmqpPublisher sets, so that raw pika sends the same frames."""
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=message.message_id)


class WindowedPika:
    """Raw pika (SelectConnection): publish with up to ``window`` unconfirmed messages in flight."""

    def __init__(self, exchange: str, messages: Sequence, window: int) -> None:  # type: ignore[type-arg]
        self.exchange, self.messages, self.window = exchange, messages, window
        self.sent = self.confirmed = self.low = 0
        self.unconfirmed: set[int] = set()
        self.failures = 0
        self.started = self.finished = 0.0

    def run(self, purge: Callable[[], None]) -> float:
        params = pika.URLParameters(AMQP_URL)
        self.connection = pika.SelectConnection(params, on_open_callback=self._on_open,
                                                on_open_error_callback=self._on_error)
        self.connection.ioloop.start()
        purge()
        if self.failures or self.confirmed != len(self.messages):
            raise RuntimeError(f"raw pika: {self.confirmed} confirmed, {self.failures} failed")
        return len(self.messages) / (self.finished - self.started)

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_error(self, _connection: pika.SelectConnection, error: Exception) -> None:
        self.connection.ioloop.stop()
        raise RuntimeError(f"raw pika could not connect: {error!r}")

    def _on_channel(self, channel) -> None:  # type: ignore[no-untyped-def]
        self.channel = channel
        channel.add_on_return_callback(lambda *_: setattr(self, "failures", self.failures + 1))
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_selected)

    def _on_selected(self, _frame) -> None:  # type: ignore[no-untyped-def]
        self.started = time.perf_counter()
        self._fill()

    def _fill(self) -> None:
        while self.sent < len(self.messages) and len(self.unconfirmed) < self.window:
            message = self.messages[self.sent]
            self.channel.basic_publish(self.exchange, message.routing_key, message.body, properties(message),
                                       mandatory=True)
            self.sent += 1
            self.unconfirmed.add(self.sent)

    def _on_confirm(self, frame) -> None:  # type: ignore[no-untyped-def]
        method = frame.method
        tags = range(self.low + 1, method.delivery_tag + 1) if method.multiple else (method.delivery_tag,)
        settled = [tag for tag in tags if tag in self.unconfirmed]
        self.unconfirmed.difference_update(settled)
        if method.multiple:
            self.low = max(self.low, method.delivery_tag)
        if not isinstance(method, pika.spec.Basic.Ack):
            self.failures += len(settled)
        self.confirmed += len(settled)
        if self.confirmed + self.failures >= len(self.messages):
            self.finished = time.perf_counter()
            self.connection.close()
            self.connection.ioloop.add_callback_threadsafe(self.connection.ioloop.stop)
        else:
            self._fill()


def one_each_rate(exchange: str, messages: Sequence, purge: Callable[[], None]) -> float:  # type: ignore[type-arg]
    with amqp_channel() as channel:
        channel.confirm_delivery()
        started = time.perf_counter()
        for message in messages:  # raises on a nack or a return
            channel.basic_publish(exchange, message.routing_key, message.body, properties(message), mandatory=True)
        elapsed = time.perf_counter() - started
    purge()
    return len(messages) / elapsed


# -- 3. event store appends -----------------------------------------------------------------
class Appends:
    """Single-client appends, one event per transaction: cqrskit's EventStore and pyeventsourcing."""

    def __init__(self, url: str) -> None:
        from cqrskit.examples.shop.domain import registry
        from cqrskit.infra.db import make_engine
        from cqrskit.infra.store import EventStore

        self.store = EventStore(make_engine(url, pool_size=2), registry)
        self.app = pyeventsourcing_app(url)
        self.ours_ids: list[str] = []
        self.their_ids: list[uuid.UUID] = []
        self.renames = 0

    def ours_new(self, count: int) -> float:
        from cqrskit.examples.shop.customers import Customer

        ids = [f"bench-{uuid.uuid4().hex}" for _ in range(count)]
        started = time.perf_counter()
        for aggregate_id in ids:
            with self.store.unit_of_work() as uow:
                uow.load(Customer, aggregate_id).register("Ada Lovelace", f"{aggregate_id}@example.com")
                uow.commit({"command_id": aggregate_id})
        self.ours_ids = ids[:500]
        return count / (time.perf_counter() - started)

    def ours_existing(self, count: int) -> float:
        from cqrskit.examples.shop.customers import Customer

        started = time.perf_counter()
        for i in range(count):
            self.renames += 1
            with self.store.unit_of_work() as uow:
                uow.load(Customer, self.ours_ids[i % len(self.ours_ids)]).rename(f"Ada {self.renames}")
                uow.commit({"command_id": f"rename-{self.renames}"})
        return count / (time.perf_counter() - started)

    def theirs_new(self, count: int) -> float:
        customer = pyeventsourcing_aggregate()
        started = time.perf_counter()
        ids = []
        for _ in range(count):
            new = customer("Ada Lovelace", f"{uuid.uuid4().hex}@example.com")
            self.app.save(new)
            ids.append(new.id)
        self.their_ids = ids[:500]
        return count / (time.perf_counter() - started)

    def theirs_existing(self, count: int) -> float:
        started = time.perf_counter()
        for i in range(count):
            self.renames += 1
            customer = self.app.repository.get(self.their_ids[i % len(self.their_ids)])
            customer.rename(f"Ada {self.renames}")
            self.app.save(customer)
        return count / (time.perf_counter() - started)

    def close(self) -> None:
        self.app.close()
        self.store.engine.dispose()


def pyeventsourcing_app(url: str):  # type: ignore[no-untyped-def]
    from eventsourcing.application import Application

    parts = make_url(url)
    env = {"PERSISTENCE_MODULE": "eventsourcing.postgres", "POSTGRES_DBNAME": parts.database,
           "POSTGRES_HOST": parts.host or "127.0.0.1", "POSTGRES_PORT": str(parts.port or 5432),
           "POSTGRES_USER": parts.username or "postgres", "POSTGRES_PASSWORD": parts.password or ""}
    return type("Customers", (Application,), {})(env=env)


@functools.cache
def pyeventsourcing_aggregate():  # type: ignore[no-untyped-def]
    """pyeventsourcing's counterpart of the shop's Customer (made on first use)."""
    from eventsourcing.domain import Aggregate, event

    class Customer(Aggregate):
        @event("Registered")
        def __init__(self, name: str, email: str) -> None:
            self.name, self.email = name, email

        @event("Renamed")
        def rename(self, name: str) -> None:
            self.name = name

    return Customer


def measure_appends(sizes: Sizes, profile: bool, console: Console) -> list[Row]:
    with bench_database(f"es_{uuid.uuid4().hex[:10]}") as url:
        appends = Appends(url)
        steps = (appends.ours_new, appends.ours_existing, appends.theirs_new, appends.theirs_existing)
        try:
            for step in steps:  # warm-up: connections, prepared statements, caches
                step(min(200, sizes.appends))
            raw_pg_rate(url, 1, 0.3)
            measures = {step.__name__: functools.partial(step, sizes.appends) for step in steps}
            measures["raw"] = lambda: raw_pg_rate(url, 1, sizes.raw_seconds)
            results = interleaved(sizes.runs, measures)
            raw = results["raw"]
            if profile:
                profile_appends(appends, console)
        finally:
            appends.close()
    note = f"{sizes.appends} appends, one event per transaction, single client"
    return [
        Row(APPEND_NEW, results["ours_new"], "pyeventsourcing 9.5 Application.save (new)",
            results["theirs_new"], 1.5, note),
        Row(APPEND_EXISTING, results["ours_existing"], "pyeventsourcing get + save (existing)",
            results["theirs_existing"], 1.5, "500 streams round-robin; pyeventsourcing replays, cqrskit reads the snapshot"),
        Row(APPEND_RAW, results["ours_new"], "PostgreSQL one-row tx, 1 connection", raw,
            note=f"pyeventsourcing reaches {results['theirs_new'] / raw:.2f}x of this"),
    ]


def profile_appends(appends: Appends, console: Console) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    appends.ours_new(2000)
    profiler.disable()
    console.rule("cProfile: EventStore appends to new streams (top 25 by own time)")
    stats = pstats.Stats(profiler, stream=console.file)
    stats.sort_stats("tottime").print_stats(25)


# -- the table ------------------------------------------------------------------------------
def table(rows: list[Row]) -> Table:
    out = Table(title="cqrskit command side vs raw limits (medians, per second)", show_lines=True)
    out.add_column("measurement", no_wrap=True)
    for column in ("cqrskit", "raw limit", "limit", "ratio", "target", "note"):
        out.add_column(column, justify="right" if column in ("cqrskit", "limit", "ratio", "target") else "left",
                       overflow="fold")
    for row in rows:
        ratio, met = row.ratio, row.ratio is not None and row.target is not None and row.ratio >= row.target
        verdict = "" if row.target is None else ("[green]met[/green]" if met else "[red]below[/red]")
        out.add_row(row.name, "—" if row.ours is None else f"{row.ours:,.0f}", row.limit_name, f"{row.limit:,.0f}",
                    "—" if ratio is None else f"{ratio:.2f}x",
                    "—" if row.target is None else f">= {row.target}x {verdict}", row.note)
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.command_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=20_000, help="size of the shop mix (about)")
    parser.add_argument("--processes", type=int, help="worker processes (default 2; 1 with --smoke)")
    parser.add_argument("--threads", type=int, help="threads per worker process (default 64; 2 with --smoke)")
    parser.add_argument("--publishes", type=int, default=20_000, help="messages per producer run")
    parser.add_argument("--appends", type=int, default=2_000, help="appends per event-store run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (the median is shown)")
    parser.add_argument("--smoke", action="store_true", help="everything at a tiny size (CI)")
    parser.add_argument("--only", choices=("execution", "producer", "appends", "tracing"), action="append",
                        help="measure only these sections (repeatable)")
    parser.add_argument("--profile", action="store_true", help="cProfile the event-store appends")
    parser.add_argument("--py-spy", metavar="DIR", help="record the worker processes with py-spy, a file per phase")
    args = parser.parse_args(argv)
    args.processes = args.processes or (1 if args.smoke else 2)
    args.threads = args.threads or (2 if args.smoke else 64)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import Settings

    args = parse(argv)
    sizes = Sizes.of(args)
    configure_logging(Settings(log_level="WARNING"))  # the table tells the story
    console = Console(width=None if sys.stdout.isatty() else 200)
    facts = machine_facts()
    console.print(" | ".join(f"[bold]{key}[/bold] {value}" for key, value in facts.items()))
    if os.getloadavg()[0] > 1.0:
        console.print("[yellow]the machine is busy (load average above 1): other processes share the cores, "
                      "PostgreSQL and its disk with this run, and the figures say so[/yellow]")
    sections = args.only or ["execution", "producer", "appends", "tracing"]
    rows: list[Row] = []
    started = time.perf_counter()
    if "execution" in sections:
        if args.py_spy:
            os.makedirs(args.py_spy, exist_ok=True)
        workers = functools.partial(Workers, processes=args.processes, threads=args.threads, py_spy_dir=args.py_spy)
        rows += measure_execution(sizes, workers, console)
    if "producer" in sections:
        rows += measure_producer(sizes)
    if "appends" in sections:
        rows += measure_appends(sizes, args.profile, console)
    if "tracing" in sections:
        workers = functools.partial(Workers, processes=args.processes, threads=args.threads)
        rows += measure_tracing_cost(sizes, workers, console)
    console.print(table(rows))
    console.print(f"measured in {time.perf_counter() - started:.0f} s; load average now "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
