"""The operator's view (G12, G3, G2) on real PostgreSQL, RabbitMQ and osmem, through the CLI as an
operator runs it: ``cqrskit status --json`` reports a known state exactly; ``cqrskit dlq``
retries commands that an outage dead-lettered, so that each takes effect once, and purges the
rest without leaving a command without an outcome; worker processes serve Prometheus metrics.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import upgrade
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.settings import Settings
from cqrskit.producers.commands import new_command
from cqrskit.read_models.indices import alias
from cqrskit.read_models.parking import list_parked
from tests.processes import (  # noqa: F401  (fixtures: commands_topology, workers, write_store)
    PROJECT,
    WorkerProcess,
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    producer,
    worker_env,
    workers,
    write_store,
)
from tests.stack import Stack, wait_until

pytestmark = pytest.mark.slow
NESTED_LIMIT = "index.mapping.nested_objects.limit"


@pytest.fixture
def stack(amqp_settings: Settings, search_url: str, tmp_path: Path) -> Iterator[Stack]:
    built = Stack.create(amqp_settings, search_url, tmp_path)
    yield built
    built.close()


def ready(settings: Settings, queue: str) -> int:
    """Messages ready in ``queue`` (AMQP passive declare)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def status_json(stack: Stack) -> dict[str, Any]:
    result = stack.cli("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def holder_of(process: WorkerProcess) -> str:
    return f"{socket.gethostname()}:{process.popen.pid}:"


@pytest.mark.parametrize("command", [["status"], ["dlq"], ["dlq", "list"], ["dlq", "show"], ["dlq", "retry"],
                                     ["dlq", "purge"]])
def test_every_operator_command_has_help(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "cqrskit.app", *command, "--help"], cwd=PROJECT, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and "Usage" in result.stdout, result.stdout + result.stderr


# -- status ---------------------------------------------------------------------------------------
def shop_with_a_parked_order(stack: Stack, tag: str) -> list[str]:
    """One customer and six products, indexed; then the orders index limited to 5 nested objects
    and two orders placed: one with a line (indexed) and one with six (refused, parked). Returns
    the command ids (9 commands, all relayed)."""
    skus = [f"SKU-{tag}-{i}" for i in range(6)]
    catalogue = [new_command("RegisterCustomer", f"{tag}-c", {"name": "Grace", "email": f"{tag}@example.com"})]
    catalogue += [new_command("AddProduct", f"{tag}-p{i}", {"sku": sku, "name": f"Mug {i}", "price_cents": 250,
                                                            "stock": 100}) for i, sku in enumerate(skus)]
    relayed = stack.send_and_wait(catalogue)
    stack.wait_drained(timeout=60)
    stack.es.indices.put_settings(index=alias(stack.settings.index_prefix, "orders"), settings={NESTED_LIMIT: 5})
    orders = [new_command("PlaceOrder", f"{tag}-{name}", {"customer_id": f"{tag}-c", "lines": [
        {"sku": sku, "quantity": 1} for sku in skus[:lines]]}) for name, lines in (("ok", 1), ("poison", 6))]
    relayed += stack.send_and_wait(orders)
    stack.wait_drained(timeout=60)
    wait_until(lambda: len(list_parked(stack.write_store.engine)) == 1, 30, "the poison order parked")
    return relayed


def dead_letter_garbage(settings: Settings) -> None:
    with producer(settings) as publisher:
        publisher.publish_bytes(b"\xffnot a command", "Garbage")
    wait_until(lambda: ready(settings, f"{settings.commands_queue}.XQ") == 1, 30, "the garbage dead-lettered")


def unpublished_and_backlog(stack: Stack, relay: WorkerProcess, worker: WorkerProcess, tag: str) -> None:
    """The relay stopped, three customers registered (three events unpublished); the worker
    stopped, five commands published (a backlog)."""
    stack.stop(relay)
    stack.send_and_wait([new_command("RegisterCustomer", f"{tag}-n{i}", {
        "name": f"New {i}", "email": f"{tag}-n{i}@example.com"}) for i in range(3)])
    stack.stop(worker)
    with producer(stack.settings) as publisher:
        publisher.publish_all(envelope("RegisterCustomer", f"{tag}-b{i}", {
            "name": "B", "email": f"{tag}-b{i}@example.com"}) for i in range(5))
    wait_until(lambda: ready(stack.settings, stack.settings.commands_queue) == 5, 30, "five commands waiting")


@pytest.mark.timeout(150)
def test_status_reports_a_known_backlog_dead_letter_and_parked_document_exactly(stack: Stack) -> None:
    """``status --json`` on a known state, twice: with every process running (one parked order,
    one dead letter), then with the relay stopped after three more commands (three events
    unpublished) and the worker stopped before five more (a backlog). Every number is checked."""
    tag = uuid.uuid4().hex[:8]
    worker, relay, _indexer = stack.start_worker(), stack.start_relay(), stack.start_indexer()
    relayed = shop_with_a_parked_order(stack, tag)
    dead_letter_garbage(stack.settings)

    first = status_json(stack)
    endpoints = {"broker": stack.settings.broker_url.replace(":guest@", ":***@"),
                 "write_store": stack.settings.database_url, "search": stack.settings.elasticsearch_url}
    assert first["components"] == {name: {"reachable": True, "error": None, "endpoint": endpoint}
                                   for name, endpoint in endpoints.items()}  # the endpoints checked, masked
    assert first["relay"]["holder"].startswith(holder_of(relay)), first["relay"]
    assert first["relay"]["unpublished_events"] == 0
    assert first["workers"] == {"commands": 1, "indexer": 1, "relay": first["relay"]["holder"]}
    assert first["outcomes"] == {"succeeded": 9, "rejected": 0, "invalid": 0, "dead": 0}
    assert first["dead_letters"] == {"commands": 1, "indexer": 0}
    assert lags(first) == {"orders": (1, 1, 1), "products": (6, 0, 0), "customers": (1, 0, 0)}

    started = time.monotonic()
    unpublished_and_backlog(stack, relay, worker, tag)
    last = status_json(stack)
    elapsed = time.monotonic() - started
    queues = {role: (q["name"], q["ready"], q["consumers"]) for role, q in last["queues"].items()}
    names = {"commands": stack.settings.commands_queue, "indexer": stack.settings.indexer_queue}
    assert queues == {"commands": (names["commands"], 5, 0), "commands.DQ": (f"{names['commands']}.DQ", 0, 0),
                      "commands.XQ": (f"{names['commands']}.XQ", 1, 0), "indexer": (names["indexer"], 0, 1),
                      "indexer.DQ": (f"{names['indexer']}.DQ", 0, 1), "indexer.XQ": (f"{names['indexer']}.XQ", 0, 0)}
    assert last["dead_letters"] == {"commands": 1, "indexer": 0}
    assert last["outcomes"] == {"succeeded": 12, "rejected": 0, "invalid": 0, "dead": 0}
    relay_state = last["relay"]
    checkpoint = max(p for o in stack.write_store.outcomes(relayed).values() for p in o.positions)
    assert (relay_state["unpublished_events"], relay_state["checkpoint_position"]) == (3, checkpoint)
    assert 0 < relay_state["oldest_unpublished_seconds"] <= elapsed
    assert relay_state["holder"] is None and relay_state["last_holder"] == first["relay"]["holder"]
    assert last["workers"] == {"commands": 0, "indexer": 1, "relay": None}
    assert lags(last) == {"orders": (1, 1, 1), "products": (6, 0, 0), "customers": (1, 0, 3)}
    models = last["read_models"]
    assert relay_state["oldest_unpublished_seconds"] <= models["customers"]["lag_seconds"] <= elapsed
    assert models["orders"]["lag_seconds"] > models["customers"]["lag_seconds"]
    assert all(m["lag_exact"] for m in models.values())
    screen = stack.cli("status")
    assert screen.returncode == 0 and "commands.XQ" in screen.stdout and "orders" in screen.stdout, screen.stdout


def lags(status: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """read model -> (documents, parked, lag in events)."""
    return {name: (m["documents"], m["parked"], m["lag_events"]) for name, m in status["read_models"].items()}


def test_status_reports_what_it_cannot_reach_and_exits_1(tmp_path: Path) -> None:
    """Nothing listens: every component is reported unreachable with its error, no crash."""
    (closed,) = _free_ports(1)
    env = {"CQRSKIT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{closed}/nowhere",
           "CQRSKIT_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{closed}/%2F",
           "CQRSKIT_ELASTICSEARCH_URL": f"http://127.0.0.1:{closed}"}
    result = subprocess.run([sys.executable, "-m", "cqrskit.app", "status", "--json"], cwd=PROJECT, text=True,
                            capture_output=True, timeout=60, env=worker_env(Settings(), **env))
    assert result.returncode == 1, result.stderr
    status = json.loads(result.stdout)
    assert {name: c["reachable"] for name, c in status["components"].items()} == {
        "broker": False, "write_store": False, "search": False}
    assert all(c["error"] for c in status["components"].values())
    assert status["outcomes"] is None and status["queues"] == {} and status["workers"]["commands"] is None


# -- the dead-letter queue ------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dlq_retry_after_a_store_outage_takes_effect_exactly_once(workers: Workers, pg_admin: str) -> None:
    """Three deliveries are dead-lettered while the worker's database does not exist: command A
    twice (same id) and command B. Once the database exists, B is given a ``dead`` outcome (as
    DeadOutcomes records when the store answers), a worker runs on it, and ``dlq retry --all``
    republishes all three: A and B succeed once each (one outcome, one event each), the second
    A is a duplicate (G2), and the dead-letter queue is empty."""
    settings = workers.settings
    name = f"cqrskit_t_missing_{uuid.uuid4().hex[:8]}"
    database_url = make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    admin = make_url(pg_admin).set(drivername="postgresql").render_as_string(hide_password=False)
    outage = workers.start(threads=2, CQRSKIT_DATABASE_URL=database_url, CQRSKIT_MAX_RETRIES="1",
                           CQRSKIT_MIN_BACKOFF_MS="20", CQRSKIT_MAX_BACKOFF_MS="50")
    a = envelope("RegisterCustomer", "c-a", {"name": "Ann", "email": "ann@example.com"})
    b = envelope("RegisterCustomer", "c-b", {"name": "Bo", "email": "bo@example.com"})
    xq = f"{settings.commands_queue}.XQ"
    try:
        with producer(settings) as publisher:
            publisher.publish_all([a, a, b])
        wait_until(lambda: ready(settings, xq) == 3, 60, "three dead letters")
        outage.kill()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        engine = make_engine(database_url)
        upgrade(engine)
        engine.dispose()
        store = WriteStore(database_url)
        try:
            store.store.record_outcome(Outcome(command_id=b["command_id"], status=Status.dead, reason="outage"))
            dlq = lambda *args: cli(settings, "dlq", *args, CQRSKIT_DATABASE_URL=database_url)  # noqa: E731
            listed = json.loads(dlq("list", "--json").stdout)
            assert [d["position"] for d in listed] == [1, 2, 3]  # in the order they were dead-lettered
            assert sorted((d["command_id"], d["type"], d["wrapped"]) for d in listed) == sorted(
                [(a["command_id"], "RegisterCustomer", True)] * 2 + [(b["command_id"], "RegisterCustomer", True)])
            assert all("OperationalError" in d["reason"] and d["reason"].endswith("(after 1 retries)")
                       for d in listed), [d["reason"] for d in listed]
            shown = dlq("show", b["command_id"]).stdout
            assert b["command_id"] in shown and '"email": "bo@example.com"' in shown and "Traceback" in shown

            worker = workers.start(threads=2, CQRSKIT_DATABASE_URL=database_url)
            assert "retried 3" in dlq("retry", "--all").stdout
            found = store.wait_for_outcomes([a["command_id"], b["command_id"]], timeout=30)
            assert {o.status for o in found.values()} == {Status.succeeded}
            worker.wait_for_log(lambda r: r["event"] == "command.duplicate" and r.get("command_id") == a["command_id"])
            assert store.events_by_command() == {a["command_id"]: ["CustomerRegistered"],
                                                 b["command_id"]: ["CustomerRegistered"]}
            assert store.count_outcomes() == 2
            assert ready(settings, xq) == 0 and ready(settings, settings.commands_queue) == 0
            assert "is empty" in dlq("list").stdout
        finally:
            store.close()
    finally:
        workers.kill_all()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(60)
def test_dlq_purge_asks_then_leaves_every_readable_command_an_outcome(workers: Workers, write_store: WriteStore) -> None:
    """A body with no command id (dead-lettered by a worker) and a raw command a quorum queue
    parked (published straight into the XQ here): ``purge`` asks first; ``purge --yes`` empties
    the queue and records the readable command ``dead`` (G3)."""
    settings = workers.settings
    xq = f"{settings.commands_queue}.XQ"
    workers.start(threads=1)
    parked = envelope("RegisterCustomer", "c-p", {"name": "Pat", "email": "pat@example.com"})
    with producer(settings) as publisher:
        publisher.publish_bytes(b"[1, 2, 3]", "Garbage")
        publisher.channel.basic_publish("", xq, json.dumps(parked).encode(), pika.BasicProperties(delivery_mode=2))
    wait_until(lambda: ready(settings, xq) == 2, 30, "two dead letters")
    listed = cli(settings, "dlq", "list").stdout
    assert "unreadable" in listed and parked["command_id"] in listed, listed

    declined = cli(settings, "dlq", "purge", input="n\n")
    assert declined.returncode == 1 and ready(settings, xq) == 2
    purged = cli(settings, "dlq", "purge", "--yes")
    assert f"purged 2 from {xq}; recorded 1 dead outcomes" in purged.stdout, purged.stdout + purged.stderr
    assert ready(settings, xq) == 0
    outcome = write_store.outcomes([parked["command_id"]])[parked["command_id"]]
    assert outcome.status is Status.dead and "purged" in (outcome.reason or "")


def cli(settings: Settings, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, text=True, capture_output=True,
                          input=input, timeout=60, env=worker_env(settings, COLUMNS="200", **env))


# -- metrics --------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_each_worker_group_serves_its_own_metrics(workers: Workers, write_store: WriteStore, tmp_path: Path) -> None:
    """Two command-worker process groups on one host, each on its own metrics port: together they
    count every command once by outcome (Dramatiq's one shared port and directory would lose one
    group and count the other twice), next to Dramatiq's own message metrics."""
    settings = workers.settings
    ports = _free_ports(2)
    for port in ports:
        workers.start(threads=2, processes=2, CQRSKIT_METRICS_PORT=str(port), CQRSKIT_METRICS_DIR=str(tmp_path))
    for port in ports:
        wait_until(lambda: _scrape(port) is not None, 30, f"metrics on port {port}")
    first = envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "ann@example.com"})
    with producer(settings) as publisher:
        publisher.publish(first)
        write_store.wait_for_outcomes([first["command_id"]])
        ids = publisher.publish_all([
            first,  # duplicate
            envelope("RegisterCustomer", "c-2", {"name": "Bo", "email": "bo@example.com"}),
            envelope("RegisterCustomer", "c-3", {"name": "Copy", "email": "ann@example.com"}),  # rejected
            envelope("RefundOrder", "o-1", {}),  # invalid: unknown type
        ])
        publisher.publish_bytes(b"garbage", "Garbage")  # dead-lettered
    write_store.wait_for_outcomes(ids)
    wait_until(lambda: ready(settings, f"{settings.commands_queue}.XQ") == 1, 30, "the garbage dead-lettered")

    def totals() -> dict[str, float]:
        summed: dict[str, float] = {}
        for port in ports:
            for key, value in metric_samples(_scrape(port) or "").items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    queue = settings.commands_queue
    expected = {'cqrskit_commands_total{status="succeeded"}': 2.0, 'cqrskit_commands_total{status="duplicate"}': 1.0,
                'cqrskit_commands_total{status="rejected"}': 1.0, 'cqrskit_commands_total{status="invalid"}': 1.0,
                'cqrskit_commands_total{status="dead"}': 1.0,
                f'dramatiq_messages_total{{actor_name="execute_command",queue_name="{queue}"}}': 6.0,
                f'dramatiq_message_rejects_total{{actor_name="execute_command",queue_name="{queue}"}}': 1.0}
    wait_until(lambda: {k: totals().get(k) for k in expected} == expected, 10, f"metrics {expected}")
    assert all(_scrape(port) for port in ports)
    assert sorted(p.name for p in tmp_path.glob("group-*")) == sorted(
        f"group-{w.popen.pid}" for w in workers.started)


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def metric_samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def _free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range (32768 and up on Linux), so that no outgoing
    connection of a worker takes one before the worker's metrics server binds it."""
    found: list[int] = []
    for port in random.sample(range(20000, 32000), 500):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError(f"not {count} free ports between 20000 and 32000")
