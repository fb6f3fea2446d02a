"""Declared reads (``cqrskit.domain.reads``) on PostgreSQL: a batch reads what its commands
declared in its opening round trips, so that deciding them makes no read of its own; a hint
never changes a decision (G4), whether it is right, wrong or raises; a declared read whose lock
another transaction holds puts its command off, never its neighbours (G2)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.domain.reads import ClaimRead, FromTarget, StreamRead
from cqrskit.domain.registry import merged
from cqrskit.examples.shop.customers import EMAIL_SCOPE, Customer
from cqrskit.examples.shop.domain import registry
from cqrskit.examples.shop.products import SKU_SCOPE, Product
from cqrskit.infra.db import make_engine
from cqrskit.infra.outcomes import Status
from cqrskit.infra.pg_store import PgTransaction, lock_key
from cqrskit.infra.store import EventStore
from cqrskit.producers.commands import new_command
from cqrskit.workers.execution import CommandExecutor
from cqrskit.workers.group_commit import Pending


def executor_for(url: str, reg=registry) -> CommandExecutor:  # type: ignore[no-untyped-def]
    return CommandExecutor(EventStore(make_engine(url), reg), reg)


@pytest.fixture
def shop(pg_url: str) -> Iterator[tuple[CommandExecutor, str]]:
    """An executor on a fresh PostgreSQL write store with two customers and three products."""
    executor = executor_for(pg_url)
    yield executor, seed(executor)
    executor.store.engine.dispose()


def seed(executor: CommandExecutor) -> str:
    """Two customers and three products (stock 5, 50, 50) under a new tag; returns the tag."""
    tag = uuid.uuid4().hex[:6]
    for i in range(2):
        run_alone(executor, "RegisterCustomer", f"c{i}-{tag}", name="Ann", email=f"c{i}.{tag}@example.com")
    for i, stock in enumerate((5, 50, 50)):
        run_alone(executor, "AddProduct", f"p{i}-{tag}", sku=f"SKU-{i}-{tag}".upper(), name=f"Thing {i}",
                  price_cents=100 + i, stock=stock)
    return tag


def run_alone(executor: CommandExecutor, type: str, aggregate_id: str, **payload):  # type: ignore[no-untyped-def]
    outcome = executor.execute(new_command(type, aggregate_id, payload).to_json())
    assert outcome.status is Status.succeeded, outcome
    return outcome


def pending(executor: CommandExecutor, type: str, aggregate_id: str, **payload) -> Pending:  # type: ignore[no-untyped-def]
    parsed = executor._parse(new_command(type, aggregate_id, payload).to_json())
    return Pending(parsed.envelope, parsed.command)


def order_batch(executor: CommandExecutor, tag: str) -> list[Pending]:
    """Orders that succeed, and orders rejected for each reason: unknown customer, unknown sku,
    too little stock (product 0 holds 5: the second and third orders of 2 take it to 1)."""
    sku = lambda i: f"SKU-{i}-{tag}".upper()  # noqa: E731
    specs = [
        (f"c0-{tag}", [(sku(0), 2), (sku(1), 1)]),
        (f"c1-{tag}", [(sku(0), 2)]),
        (f"nobody-{tag}", [(sku(1), 1)]),
        (f"c0-{tag}", [(f"SKU-NONE-{tag}".upper(), 1)]),
        (f"c1-{tag}", [(sku(2), 3), (sku(0), 2)]),
        (f"c0-{tag}", [(sku(2), 1), (sku(1), 4)]),
    ]
    return [pending(executor, "PlaceOrder", f"o{i}-{tag}", customer_id=customer,
                    lines=[{"sku": s, "quantity": q} for s, q in lines])
            for i, (customer, lines) in enumerate(specs)]


def decide(executor: CommandExecutor, batch: list[Pending]) -> list[tuple[str, str | None]]:
    assert executor._attempt(batch) == []
    return [(item.outcome.status.value, item.outcome.reason) for item in batch]  # type: ignore[union-attr]


EXPECTED = [("succeeded", None), ("succeeded", None), ("rejected", "customer nobody-TAG does not exist"),
            ("rejected", "unknown sku SKU-NONE-TAG"), ("rejected", "PRODUCT0"), ("succeeded", None)]


def expected(tag: str, reasons: list[tuple[str, str | None]]) -> None:
    want = [(s, None if r is None else r.replace("TAG", tag).replace("SKU-NONE-" + tag, f"SKU-NONE-{tag}".upper()))
            for s, r in EXPECTED]
    got = [(s, "PRODUCT0" if r and "stock" in r else r) for s, r in reasons]
    assert got == want


def test_a_batch_makes_no_read_of_its_own_once_its_commands_declared_them(
    shop: tuple[CommandExecutor, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PlaceOrder declares its customer, and each line's sku claim and product: a batch of six
    orders reads them all in its opening round trips, and deciding them makes no read (the
    handlers find every stream and claim read ahead). Outcomes are as decided one by one (G3)."""
    executor, tag = shop
    reads: list[str] = []
    one = PgTransaction.one
    monkeypatch.setattr(PgTransaction, "one", lambda self, sql, params=None: reads.append(sql) or one(self, sql, params))
    outcomes = decide(executor, order_batch(executor, tag))
    expected(tag, outcomes)
    assert reads == []


def cancellations(executor: CommandExecutor, tag: str) -> list[Pending]:
    """Three placed orders (products 1 and 2, two lines each), and a batch cancelling them."""
    sku = lambda i: f"SKU-{i}-{tag}".upper()  # noqa: E731
    placed = [pending(executor, "PlaceOrder", f"x{i}-{tag}", customer_id=f"c{i % 2}-{tag}",
                      lines=[{"sku": sku(1), "quantity": 2}, {"sku": sku(2), "quantity": 1 + i}]) for i in range(3)]
    assert [status for status, _ in decide(executor, placed)] == ["succeeded"] * 3
    return [pending(executor, "CancelOrder", f"x{i}-{tag}", reason="changed my mind") for i in range(3)]


def test_reads_that_follow_from_the_target_come_with_the_batch(
    shop: tuple[CommandExecutor, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CancelOrder declares, with ``FromTarget``, the product of each of its order's lines: a
    batch of cancellations reads them in its second round trip, and deciding them makes no read
    of its own. Every reservation is released exactly once (G2)."""
    executor, tag = shop
    batch = cancellations(executor, tag)
    reads: list[str] = []
    one = PgTransaction.one
    monkeypatch.setattr(PgTransaction, "one", lambda self, sql, params=None: reads.append(sql) or one(self, sql, params))
    assert [status for status, _ in decide(executor, batch)] == ["succeeded"] * 3
    assert reads == []
    with executor.store.unit_of_work() as uow:
        assert [uow.load(Product, f"p{i}-{tag}").state.stock for i in (1, 2)] == [50, 50]


@pytest.mark.parametrize("hint", ["none", "raises", "wrong"])
def test_a_hint_that_follows_from_the_target_never_changes_a_decision(pg_url: str, hint: str) -> None:
    """G4: cancellations decided with no hint, a ``FromTarget`` hint that raises, and one that
    names other streams and claims release the same stock as with the right hint."""
    variant = merged(registry)
    if hint == "none":
        del variant.reads["CancelOrder"]
    elif hint == "raises":
        variant.reads["CancelOrder"] = lambda command, order_id: [FromTarget(lambda order: [1 / 0])]
    else:
        variant.reads["CancelOrder"] = lambda command, order_id: [FromTarget(lambda order: [
            StreamRead(Customer, order_id), ClaimRead(SKU_SCOPE, "SKU-OTHER", owner=Product), "not a read"])]
    executor = executor_for(pg_url, variant)
    try:
        tag = seed(executor)
        assert [status for status, _ in decide(executor, cancellations(executor, tag))] == ["succeeded"] * 3
        with executor.store.unit_of_work() as uow:
            assert [uow.load(Product, f"p{i}-{tag}").state.stock for i in (1, 2)] == [50, 50]
    finally:
        executor.store.engine.dispose()


@pytest.mark.parametrize("hint", ["none", "raises", "wrong"])
def test_a_hint_never_changes_a_decision(pg_url: str, hint: str) -> None:
    """G4: the same batch decided with no hint, a hint that raises, and a hint that names other
    streams and claims gives the same outcomes and the same stock as with the right hint."""
    variant = merged(registry)
    if hint == "none":
        del variant.reads["PlaceOrder"]
    elif hint == "raises":
        variant.reads["PlaceOrder"] = lambda command, order_id: [1 / 0]
    else:
        variant.reads["PlaceOrder"] = lambda command, order_id: [
            StreamRead(Customer, "someone-else"), StreamRead(Product, command.customer_id),
            ClaimRead(SKU_SCOPE, "SKU-OTHER", owner=Customer), ClaimRead(EMAIL_SCOPE, order_id, owner=Product)]
    right, other = executor_for(pg_url), executor_for(pg_url, variant)
    try:
        results = []
        for executor in (right, other):
            tag = seed(executor)
            outcomes = decide(executor, order_batch(executor, tag))
            expected(tag, outcomes)
            with executor.store.unit_of_work() as uow:
                stock = [uow.load(Product, f"p{i}-{tag}").state.stock for i in range(3)]
            results.append((outcomes and [s for s, _ in outcomes], stock))
        assert results[0] == results[1]
        assert results[0][1] == [1, 45, 49]
    finally:
        right.store.engine.dispose()
        other.store.engine.dispose()


def test_a_declared_stream_locked_elsewhere_puts_off_its_command_only(shop: tuple[CommandExecutor, str],
                                                                     pg_url: str) -> None:
    """G2: another transaction holds the lock of a product that an order declared (through its sku
    claim): that order is put off to a later batch (having written nothing), and the rest of the
    batch commits; the next batch decides it. (A command put off also puts off every later one
    that touches what it touched: here the orders are of different customers.)"""
    executor, tag = shop
    batch = [pending(executor, "PlaceOrder", f"x{i}-{tag}", customer_id=f"c{i % 2}-{tag}",
                     lines=[{"sku": f"SKU-{i}-{tag}".upper(), "quantity": 1}]) for i in range(3)]
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(dsn) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("s", f"product:p1-{tag}"),))
        deferred = executor._attempt(batch)
        assert deferred == [batch[1]] and not batch[1].done
        assert [batch[0].outcome.status, batch[2].outcome.status] == [Status.succeeded] * 2  # type: ignore[union-attr]
    assert executor._attempt(deferred) == []
    assert batch[1].outcome.status is Status.succeeded  # type: ignore[union-attr]


def test_a_batch_waits_for_a_declared_aggregate_another_batch_holds(shop: tuple[CommandExecutor, str],
                                                                    pg_url: str) -> None:
    """G4: once a batch has read which product holds a sku, the next batch locks that product in
    its opening statement, waiting for it: a batch that shares a product with another
    transaction queues behind it instead of putting its orders off."""
    executor, tag = shop
    sku = lambda i: f"SKU-{i}-{tag}".upper()  # noqa: E731
    first = [pending(executor, "PlaceOrder", f"w{i}-{tag}", customer_id=f"c{i % 2}-{tag}",
                     lines=[{"sku": sku(i), "quantity": 1}]) for i in range(3)]
    assert executor._attempt(first) == []  # learns the skus' holders
    batch = [pending(executor, "PlaceOrder", f"v{i}-{tag}", customer_id=f"c{i % 2}-{tag}",
                     lines=[{"sku": sku(i), "quantity": 1}]) for i in range(3)]
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    other = psycopg.connect(dsn)
    other.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("s", f"product:p1-{tag}"),))
    releaser = threading.Timer(0.5, other.commit)
    releaser.start()
    started = time.monotonic()
    try:
        assert executor._attempt(batch) == []
    finally:
        releaser.join()
        other.close()
    assert time.monotonic() - started >= 0.4
    assert [item.outcome.status for item in batch] == [Status.succeeded] * 3  # type: ignore[union-attr]


def test_two_processes_batches_on_shared_products_never_deadlock(pg_url: str) -> None:
    """G2/G4: two stores (as two worker processes) decide batches of orders on the same three
    products at once, 20 rounds each: every order succeeds exactly once, the stock adds up, and
    PostgreSQL reports no deadlock (batches wait for each other's locks in one key order)."""
    executors = [executor_for(pg_url), executor_for(pg_url)]
    tag = uuid.uuid4().hex[:6]
    run_alone(executors[0], "RegisterCustomer", f"c-{tag}", name="Ann", email=f"c.{tag}@example.com")
    for i in range(3):
        run_alone(executors[0], "AddProduct", f"p{i}-{tag}", sku=f"SKU-{i}-{tag}".upper(), name=f"Thing {i}",
                  price_cents=100, stock=10_000)
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute(deadlocks).fetchone()[0]  # type: ignore[index]
    outcomes: list[Status] = []

    def decide_rounds(n: int, executor: CommandExecutor) -> None:
        for r in range(20):
            batch = [pending(executor, "PlaceOrder", f"o{n}-{r}-{i}-{tag}", customer_id=f"c-{tag}",
                             lines=[{"sku": f"SKU-{(i + k) % 3}-{tag}".upper(), "quantity": 1} for k in range(2)])
                     for i in range(6)]
            left = batch
            while left:
                left = executor._attempt(left)
            outcomes.extend(item.outcome.status for item in batch)  # type: ignore[union-attr]

    threads = [threading.Thread(target=decide_rounds, args=(n, e)) for n, e in enumerate(executors)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with executors[0].store.unit_of_work() as uow:
            stock = sum(uow.load(Product, f"p{i}-{tag}").state.stock for i in range(3))
    finally:
        for e in executors:
            e.store.engine.dispose()
    assert outcomes == [Status.succeeded] * 240
    assert stock == 3 * 10_000 - 2 * 240
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(deadlocks).fetchone()[0] == before  # type: ignore[index]
