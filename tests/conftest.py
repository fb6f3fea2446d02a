"""Real services for the tests: PostgreSQL and RabbitMQ on this machine (started by .ci/run),
each test in its own database and its own exchange and queues, so tests never see each other.
A missing service fails the run (never a skip: a green run must mean the tests ran)."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pika
import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.examples.shop.domain import registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import upgrade
from cqrskit.infra.settings import QueueType, Settings
from cqrskit.infra.store import EventStore

PG_ADMIN = os.environ.get("CQRSKIT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("CQRSKIT_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _admin_dsn() -> str:
    url = make_url(PG_ADMIN)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _unique_node_ids(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _slow_files_first(items)


def _unique_node_ids(items: list[pytest.Item]) -> None:
    """Give every test its own node id. pytest-xdist hands tests to its workers by node id, so of
    tests sharing one it runs the first and never reports the others; schemathesis names its tests
    ``test_x[GET /orders]``, but pytest 9 builds their ids from ``test_x`` alone. Such a test gets
    its name in its id, as a parametrised test has; a duplicate left over fails the run."""
    seen = Counter(item.nodeid for item in items)
    for item in items:
        if seen[item.nodeid] > 1 and isinstance(item, pytest.Function) and item.nodeid.endswith(
                f"::{item.originalname}"):
            nodeid = f"{item.nodeid.removesuffix(item.originalname)}{item.name}"
            if hasattr(item, "_id"):  # pytest 9: a structured id
                item._id = type(item._id).parse(nodeid)
            else:
                item._nodeid = nodeid
    duplicates = [nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1]
    if duplicates:
        raise pytest.UsageError(f"tests sharing a node id (pytest-xdist would run one of each): {duplicates}")


def _slow_files_first(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2``: each file runs whole in one worker, the files in the collected
    order), the files with the most tests marked slow come first, so that the longest files start
    early and the short ones fill in around them at the end. Tests keep their order within a
    file; a run without xdist keeps pytest's own order."""
    slow: Counter[Path] = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # a stable sort: each file stays whole


@pytest.fixture(scope="session")
def pg_admin() -> str:
    try:
        with psycopg.connect(_admin_dsn(), connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}: {exc}")
    return PG_ADMIN


@pytest.fixture(scope="session")
def amqp_url() -> str:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL + "?connection_attempts=2&socket_timeout=5")).close()
    except pika.exceptions.AMQPError as exc:
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL}: {exc!r}")
    return AMQP_URL


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test, dropped afterwards."""
    name = f"cqrskit_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    _migrate(url)
    yield url
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'write.db'}"
    _migrate(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same test against each write-store adapter (the contract suite)."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    engine = make_engine(store_url)
    yield EventStore(engine, registry)
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite", "memory"])
def any_store(request: pytest.FixtureRequest) -> Iterator[EventStore]:
    """Each write store behind the port, opened from its URL: PostgreSQL, SQLite and the in-memory
    store (the contract suite, and the executor's tests without a database)."""
    from cqrskit.infra.write_store.opening import MEMORY_URL, open_store

    fixtures = {"postgresql": "pg_url", "sqlite": "sqlite_url"}
    url = MEMORY_URL if request.param == "memory" else request.getfixturevalue(fixtures[request.param])
    opened = open_store(url, registry)
    yield opened  # type: ignore[misc]
    if isinstance(opened, EventStore):
        opened.engine.dispose()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[EventStore]:
    engine = make_engine(pg_url)
    yield EventStore(engine, registry)
    engine.dispose()


@pytest.fixture
def amqp_settings(pg_url: str, amqp_url: str) -> Iterator[Settings]:
    """Settings for a test on real PostgreSQL and RabbitMQ, with its own exchange and queues."""
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        database_url=pg_url,
        broker_url=amqp_url,
        commands_exchange=f"test.{tag}.commands",
        commands_queue=f"test.{tag}.commands",
        events_exchange=f"test.{tag}.events",
        indexer_queue=f"test.{tag}.indexer",
        index_prefix=f"t{tag}",
        queue_type=QueueType.quorum,
        min_backoff_ms=50,
        max_backoff_ms=500,
    )
    yield settings
    delete_topology(settings)


def delete_topology(settings: Settings) -> None:
    from cqrskit.infra.topology import indexer_partitions

    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    channel = connection.channel()
    for base in (settings.commands_queue, *(p.queue for p in indexer_partitions(settings))):
        for queue in (base, f"{base}.DQ", f"{base}.XQ"):
            channel.queue_delete(queue)
    channel.exchange_delete(settings.commands_exchange)
    channel.exchange_delete(settings.events_exchange)
    connection.close()


def _migrate(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def search_url() -> Iterator[str]:
    """One osmem server (Elasticsearch-compatible, in memory) for the session; tests isolate
    themselves with their own index prefix."""
    from osmem_server import OsmemServer

    server = OsmemServer.start(japanese=False)
    yield server.url
    server.close()


@pytest.fixture
def index_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A CLI run inside a test (typer's CliRunner) configures logging onto the runner's stream, which
    is closed afterwards: put the root logger back so later tests never log into a closed file."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
