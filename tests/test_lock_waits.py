"""Bounded lock waits on PostgreSQL (``CQRSKIT_LOCK_TIMEOUT``, ``CQRSKIT_IDLE_TRANSACTION_TIMEOUT``).

A batch waits for the aggregates another transaction holds (batches queue on hot aggregates
instead of retrying in a storm). These tests show that the wait is bounded: a transaction that
holds an aggregate for too long stalls only the commands on that aggregate (G3), and a frozen
worker's transaction is ended by the server, so the other workers go on while it is stopped;
nothing is lost or applied twice (G1, G2).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.examples.shop.domain import Product, registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.pg_store import lock_key
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore, Waits
from cqrskit.producers.commands import new_command
from cqrskit.workers.execution import CommandExecutor
from tests.processes import (  # noqa: F401  (fixtures: commands_topology, workers, write_store)
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    producer,
    workers,
    write_store,
)
from tests.test_worker_faults import waiting_on_a_lock


def dsn(pg_url: str) -> str:
    return make_url(pg_url).set(drivername="postgresql").render_as_string(False)


def order(order_id: str, customer: str, sku: str, quantity: int) -> bytes:
    return new_command("PlaceOrder", order_id, {"customer_id": customer,
                                                "lines": [{"sku": sku, "quantity": quantity}]}).to_json()


def test_settings_bound_the_waits_by_default() -> None:
    settings = Settings()
    assert (settings.lock_timeout, settings.idle_transaction_timeout) == (5.0, 15.0)
    assert Waits(lock=1.5, idle=0).settings() == ("1500ms", "0ms")


def test_an_aggregate_held_too_long_stalls_only_its_own_commands(pg_url: str) -> None:
    """G3/G2: another transaction holds product p1's lock and stays idle. A group of commands
    that includes an order of p1 gives up waiting after ``lock`` seconds: the order of p2 and the
    registration are decided while p1 is still held; the order of p1 is decided, once, when it
    is released."""
    store = EventStore(make_engine(pg_url), registry, waits=Waits(lock=0.5, idle=30))
    executor = CommandExecutor(store, registry)
    tag = uuid.uuid4().hex[:6]
    for command in (new_command("RegisterCustomer", f"c-{tag}", {"name": "Ann", "email": f"c.{tag}@example.com"}),
                    *(new_command("AddProduct", f"p{i}-{tag}", {"sku": f"SKU-{i}-{tag}".upper(), "name": "Thing",
                                                                "price_cents": 100, "stock": 10}) for i in (1, 2))):
        assert executor.execute(command.to_json()).status is Status.succeeded
    bodies = {
        "held": order(f"o1-{tag}", f"c-{tag}", f"SKU-1-{tag}".upper(), 3),
        "free": order(f"o2-{tag}", f"c-{tag}", f"SKU-2-{tag}".upper(), 4),
        "other": new_command("RegisterCustomer", f"d-{tag}", {"name": "Bo", "email": f"d.{tag}@example.com"}).to_json(),
    }
    outcomes: dict[str, Outcome] = {}
    finished: dict[str, float] = {}

    def run(name: str) -> None:
        outcomes[name] = executor.execute(bodies[name])
        finished[name] = time.monotonic()

    holder = psycopg.connect(dsn(pg_url))
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("s", f"product:p1-{tag}"),))
        threads = [threading.Thread(target=run, args=(name,)) for name in bodies]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while {"free", "other"} - set(finished) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {"free", "other"} <= set(finished), "commands on free aggregates waited for the held one"
        assert "held" not in finished, "the order of the held product was decided while it was held"
        released = time.monotonic()
        holder.rollback()
    finally:
        holder.close()
    for thread in threads:
        thread.join(timeout=60)
    assert {name: o.status for name, o in outcomes.items()} == dict.fromkeys(bodies, Status.succeeded)
    assert finished["held"] >= released
    with store.unit_of_work() as uow:
        assert [uow.load(Product, f"p{i}-{tag}").state.stock for i in (1, 2)] == [7, 6]
    store.engine.dispose()


def process_states(worker_pid: int) -> set[str]:
    """The states (R, S, T...) of a worker's process group members."""
    states = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == worker_pid:  # the process group
            states.add(fields[0])
    return states


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_frozen_worker_holding_an_aggregate_is_cut_off_and_the_others_go_on(
    workers: Workers, write_store: WriteStore, pg_url: str
) -> None:
    """G1/G2: a worker is frozen (SIGSTOP) inside its transaction, holding a product. The server
    ends that transaction once it sat idle for ``CQRSKIT_IDLE_TRANSACTION_TIMEOUT``, so a second
    worker decides the next order of the same product while the first is still stopped. The
    first order is decided again (by either worker): each order took effect once, the stock adds
    up."""
    tag = uuid.uuid4().hex[:6]
    product_id, customer = f"p-{tag}", f"c-{tag}"
    waits = {"CQRSKIT_IDLE_TRANSACTION_TIMEOUT": "2", "CQRSKIT_LOCK_TIMEOUT": "1"}
    frozen = workers.start(threads=2, **waits)
    line = lambda q: [{"sku": product_id.upper(), "quantity": q}]  # noqa: E731
    first = envelope("PlaceOrder", f"o1-{tag}", {"customer_id": customer, "lines": line(3)})
    second = envelope("PlaceOrder", f"o2-{tag}", {"customer_id": customer, "lines": line(2)})
    with producer(workers.settings) as publisher:
        setup = [envelope("AddProduct", product_id, {"sku": product_id.upper(), "name": "Thing",
                                                     "price_cents": 100, "stock": 10}),
                 envelope("RegisterCustomer", customer, {"name": "Ann", "email": f"{customer}@example.com"})]
        assert {o.status for o in write_store.wait_for_outcomes(publisher.publish_all(setup)).values()} \
            == {Status.succeeded}
        with psycopg.connect(dsn(pg_url)) as row_lock:
            # The worker's write waits on the product's row: it is inside its transaction,
            # holding the product's advisory lock, when it is frozen.
            row_lock.execute("SELECT 1 FROM streams WHERE stream_id = %s FOR UPDATE", (f"product:{product_id}",))
            publisher.publish(first)
            write_store.wait_until(lambda: waiting_on_a_lock(write_store) == 1, timeout=20,
                                   what="the first worker's transaction to wait on the product's row")
            os.killpg(frozen.popen.pid, signal.SIGSTOP)
            row_lock.rollback()
        workers.start(threads=2, **waits)
        publisher.publish(second)
    try:
        decided = write_store.wait_for_outcomes([second["command_id"]], timeout=40)
        assert decided[second["command_id"]].status is Status.succeeded
        assert process_states(frozen.popen.pid) == {"T"}, "the first worker was not stopped throughout"
    finally:
        os.killpg(frozen.popen.pid, signal.SIGCONT)
    # The first order is decided by the thawed worker, or by the second one once RabbitMQ gave
    # up on the frozen worker's connection (missed heartbeats) and delivered it again.
    outcomes = write_store.wait_for_outcomes([first["command_id"], second["command_id"]], timeout=60)
    assert Counter(o.status for o in outcomes.values()) == Counter({Status.succeeded: 2})
    events = write_store.events_by_command()
    for command in (first, second):
        assert sorted(events[command["command_id"]]) == ["OrderPlaced", "StockReserved"]
    with write_store.store.unit_of_work() as uow:
        assert uow.load(Product, product_id).state.stock == 5

