"""Command workers as real processes under faults: killed with -9 mid-stream and mid-command
(G1, G2), many of them racing on one aggregate (G4), a write store that is not there (G1, G3).
Producers are plain pika with publisher confirms (tests/processes.py)."""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import make_url

from cqrskit.examples.shop.domain import Order, Product
from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import upgrade
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.settings import Settings
from tests.processes import (  # noqa: F401  (fixtures: commands_topology, workers, write_store)
    PikaProducer,
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    producer,
    wait_for_dead_letters,
    workers,
    write_store,
)


def customer(index: int, tag: str) -> dict:
    return envelope(
        "RegisterCustomer",
        f"c-{tag}-{index}",
        {"name": f"Customer {index}", "email": f"c{index}.{tag}@example.com"},
    )


def setup_shop(
    publisher: PikaProducer, store: WriteStore, products: dict[str, int], customers: list[str]
) -> None:
    """Products (id -> stock; sku = id upper-cased) and customers, all succeeded before returning."""
    commands = [
        envelope("AddProduct", pid, {"sku": pid.upper(), "name": pid, "price_cents": 100, "stock": stock})
        for pid, stock in products.items()
    ]
    commands += [
        envelope("RegisterCustomer", cid, {"name": cid, "email": f"{cid}@example.com"}) for cid in customers
    ]
    outcomes = store.wait_for_outcomes(publisher.publish_all(commands), timeout=30)
    assert {o.status for o in outcomes.values()} == {Status.succeeded}


def publish_in_background(settings: Settings, commands: list[dict]) -> tuple[threading.Thread, list[str]]:
    """Publish ``commands`` from another thread; the list fills with each confirmed command id."""
    confirmed: list[str] = []

    def run() -> None:
        with producer(settings) as publisher:
            for command in commands:
                confirmed.append(publisher.publish(command))

    thread = threading.Thread(target=run, name="producer", daemon=True)
    thread.start()
    return thread, confirmed


def stock_of(store: WriteStore, product_id: str) -> int:
    with store.store.unit_of_work() as uow:
        return uow.load(Product, product_id).state.stock


def assert_each_command_took_effect_once(
    store: WriteStore, outcomes: dict[str, Outcome], expected: Callable[[str], list[str]]
) -> None:
    """Every command id: one outcome (the table's key), succeeded, and exactly ``expected(id)`` events."""
    assert Counter(o.status for o in outcomes.values()) == Counter({Status.succeeded: len(outcomes)})
    by_command = store.events_by_command()
    wrong = {
        cid: by_command.get(cid)
        for cid in outcomes
        if sorted(by_command.get(cid, [])) != sorted(expected(cid))
    }
    assert not wrong, f"{len(wrong)} commands with unexpected events, e.g. {list(wrong.items())[:3]}"


# -- G1: accepted is durable ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_killed_mid_stream_loses_and_duplicates_nothing(
    workers: Workers, write_store: WriteStore
) -> None:
    """G1/G2: ~1,500 commands confirmed while a 4-thread worker runs; the worker's process group is
    killed with -9 after some outcomes and long before all; a new worker finishes the job."""
    tag = uuid.uuid4().hex[:6]
    products = {f"p-{tag}-{i}": 10 for i in range(4)}
    restocks = [
        envelope("RestockProduct", pid, {"quantity": 1 + i % 5}) for i in range(75) for pid in products
    ]
    commands = [customer(i, tag) for i in range(1200)] + restocks
    random.Random(1).shuffle(commands)
    first = workers.start(threads=4)
    with producer(workers.settings) as publisher:
        setup_shop(publisher, write_store, products, [])
    publishing, confirmed = publish_in_background(workers.settings, commands)
    write_store.wait_until(lambda: write_store.count_outcomes() >= 4 + 150, timeout=30, what="150 outcomes")
    first.kill()
    done_at_kill = write_store.count_outcomes() - 4
    assert done_at_kill < len(commands) // 2, "the kill came too late to test anything"

    second = workers.start(threads=4)
    publishing.join(timeout=60)
    assert not publishing.is_alive() and len(confirmed) == len(commands)
    outcomes = write_store.wait_for_outcomes(confirmed, timeout=60)
    event_type = {
        c["command_id"]: ("ProductRestocked" if c["type"] == "RestockProduct" else "CustomerRegistered")
        for c in commands
    }
    assert_each_command_took_effect_once(write_store, outcomes, lambda cid: [event_type[cid]])
    for pid in products:
        restocked = sum(c["payload"]["quantity"] for c in restocks if c["aggregate_id"] == pid)
        assert write_store.stream_version(f"product:{pid}") == 1 + 75
        assert stock_of(write_store, pid) == 10 + restocked
    assert second.alive


# -- G2: exactly-once effect ------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_one_command_published_three_times_takes_effect_once(
    workers: Workers, write_store: WriteStore
) -> None:
    tag = uuid.uuid4().hex[:6]
    worker = workers.start(threads=4)
    with producer(workers.settings) as publisher:
        setup_shop(publisher, write_store, {f"p-{tag}": 10}, [f"c-{tag}"])
        order = envelope(
            "PlaceOrder",
            f"o-{tag}",
            {"customer_id": f"c-{tag}", "lines": [{"sku": f"P-{tag}".upper(), "quantity": 3}]},
        )
        for _ in range(3):
            publisher.publish(order)
    command_id = order["command_id"]
    logged = worker.wait_for_log(lambda r: r.get("command_id") == command_id, count=3)
    assert sorted(r["event"] for r in logged) == [
        "command.duplicate",
        "command.duplicate",
        "command.succeeded",
    ]
    outcome = write_store.outcomes([command_id])[command_id]
    assert (outcome.status, outcome.aggregate_version, len(outcome.positions)) == (Status.succeeded, 1, 2)
    assert sorted(write_store.events_by_command()[command_id]) == ["OrderPlaced", "StockReserved"]
    assert stock_of(write_store, f"p-{tag}") == 7


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_killed_after_commit_before_ack_redelivers_without_a_second_effect(
    workers: Workers, write_store: WriteStore
) -> None:
    """G2 at its sharpest: commands committed but not acknowledged when the worker dies. The first
    worker's log pipe is never read, so each thread blocks on the log line it writes after its
    commit and before its ack; once one is blocked there, the group is killed with -9."""
    tag = uuid.uuid4().hex[:6]
    # Enough commands that their log lines overflow both pipes (the worker's to Dramatiq's parent,
    # ~64 KB, and the parent's 4 KB stdout) however full the group commit's batches come out: a
    # batch logs one line for all its commands.
    commands = [customer(i, tag) for i in range(3000)]
    stalled = workers.start(threads=4, stall_logs=True)
    with producer(workers.settings) as publisher:
        confirmed = publisher.publish_all(commands)
    write_store.wait_until(
        lambda: stalled.threads_blocked_writing() >= 1,
        timeout=45,
        what="a worker thread blocked on its post-commit log line",
    )
    stalled.kill()
    done_at_kill = write_store.count_outcomes()
    assert 0 < done_at_kill < len(commands)

    second = workers.start(threads=4)
    outcomes = write_store.wait_for_outcomes(confirmed, timeout=60)
    assert_each_command_took_effect_once(write_store, outcomes, lambda cid: ["CustomerRegistered"])
    # The redelivered, already committed commands were recognised by their command id.
    second.wait_for_log(lambda r: r["event"] == "command.duplicate", timeout=10)


@pytest.mark.timeout(60)
def test_worker_killed_mid_transaction_leaves_nothing_behind(
    workers: Workers, write_store: WriteStore, pg_url: str
) -> None:
    """G1/G2: the test holds the product's stream row locked, so the worker's PlaceOrder stops in
    the middle of its transaction (order stream already inserted); the worker is killed there."""
    tag = uuid.uuid4().hex[:6]
    product_id = f"p-{tag}"
    workers.start(threads=2)
    with producer(workers.settings) as publisher:
        setup_shop(publisher, write_store, {product_id: 10}, [f"c-{tag}"])
        order = envelope(
            "PlaceOrder",
            f"o-{tag}",
            {"customer_id": f"c-{tag}", "lines": [{"sku": product_id.upper(), "quantity": 4}]},
        )
        with psycopg.connect(make_url(pg_url).set(drivername="postgresql").render_as_string(False)) as lock:
            lock.execute("SELECT 1 FROM streams WHERE stream_id = %s FOR UPDATE", (f"product:{product_id}",))
            publisher.publish(order)
            write_store.wait_until(
                lambda: waiting_on_a_lock(write_store) == 1,
                timeout=20,
                what="the worker's transaction to wait on the locked stream row",
            )
            workers.started[0].kill()
            lock.rollback()
    assert write_store.outcomes([order["command_id"]]) == {}
    workers.start(threads=2)
    outcome = write_store.wait_for_outcomes([order["command_id"]], timeout=30)[order["command_id"]]
    assert (outcome.status, outcome.aggregate_version) == (Status.succeeded, 1)
    assert sorted(write_store.events_by_command()[order["command_id"]]) == ["OrderPlaced", "StockReserved"]
    assert write_store.stream_version(f"order:o-{tag}") == 1
    assert stock_of(write_store, product_id) == 6


def waiting_on_a_lock(store: WriteStore) -> int:
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )
    with store.engine.connect() as conn:
        return conn.execute(query).scalar_one()


# -- G4: no lost updates ------------------------------------------------------------------------------
@dataclass
class Race:
    """1,600 commands: most at one product (orders of 1-3 units, restocks, price changes), 12 at
    one placed order (pay, ship, cancel, published back to back), 10 pairs of registrations
    sharing an email (each pair back to back)."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    commands: list[dict] = field(default_factory=list)
    racers: list[dict] = field(default_factory=list)
    twins: list[dict] = field(default_factory=list)

    @property
    def product_id(self) -> str:
        return f"p-{self.tag}"

    @property
    def sku(self) -> str:
        return self.product_id.upper()

    @property
    def buyer(self) -> str:
        return f"c-{self.tag}"

    @property
    def order_id(self) -> str:
        return f"o-race-{self.tag}"

    def build(self, total: int = 1600, seed: int = 4) -> Race:
        rng = random.Random(seed)
        self.racers = [
            envelope(type, self.order_id, {})
            for type in ("PayOrder", "ShipOrder", "CancelOrder")
            for _ in range(4)
        ]
        rng.shuffle(self.racers)
        self.twins = [
            envelope(
                "RegisterCustomer",
                f"c-{self.tag}-{pair}-{side}",
                {"name": "Twin", "email": f"twin{pair}.{self.tag}@example.com"},
            )
            for pair in range(10)
            for side in "ab"
        ]
        self.commands = [self._product_command(index, rng) for index in range(total - 32)]
        self.commands[700:700] = self.racers  # back to back: eight threads take them at once
        for pair in range(10):
            self.commands[50 + pair * 150 : 50 + pair * 150] = self.twins[2 * pair : 2 * pair + 2]
        return self

    def _product_command(self, index: int, rng: random.Random) -> dict:
        kind = rng.choices(["order", "restock", "price"], weights=[7, 2, 1])[0]  # demand outruns restocks
        if kind == "order":
            return envelope(
                "PlaceOrder",
                f"o-{self.tag}-{index}",
                {"customer_id": self.buyer, "lines": [{"sku": self.sku, "quantity": rng.randint(1, 3)}]},
            )
        if kind == "restock":
            return envelope("RestockProduct", self.product_id, {"quantity": rng.randint(1, 5)})
        return envelope("ChangeProductPrice", self.product_id, {"price_cents": rng.randint(100, 999)})


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_workers_racing_on_one_product_and_one_order_lose_no_update(
    workers: Workers, write_store: WriteStore
) -> None:
    """G4 on 2 processes x 4 threads: no lost update on the product (stock never negative, exact
    history), a legal history for the order, one winner per email."""
    race = Race().build()
    setup = workers.start(threads=2)
    with producer(workers.settings) as publisher:
        setup_shop(publisher, write_store, {race.product_id: 500}, [race.buyer])
        lines = [{"sku": race.sku, "quantity": 7}]
        place = envelope("PlaceOrder", race.order_id, {"customer_id": race.buyer, "lines": lines})
        placed = write_store.wait_for_outcomes([publisher.publish(place)])
        assert {o.status for o in placed.values()} == {Status.succeeded}
        setup.kill()  # all 1,600 are queued before the racing workers start
        publisher.publish_all(race.commands)
    workers.start(threads=4, processes=2)
    outcomes = write_store.wait_for_outcomes([c["command_id"] for c in race.commands], timeout=200)
    statuses = Counter(o.status for o in outcomes.values())
    assert set(statuses) <= {Status.succeeded, Status.rejected}, statuses

    assert_one_email_winner_per_pair(race.twins, outcomes)
    released = assert_raced_order_is_consistent(write_store, race.order_id, race.racers, outcomes)
    by_id = {c["command_id"]: c for c in race.commands}
    assert_product_history_is_exact(write_store, race.product_id, by_id, outcomes, released)


def assert_one_email_winner_per_pair(emails: list[dict], outcomes: dict[str, Outcome]) -> None:
    for first, second in zip(emails[::2], emails[1::2]):
        pair = [outcomes[first["command_id"]], outcomes[second["command_id"]]]
        assert sorted(o.status.value for o in pair) == ["rejected", "succeeded"]
        (loser,) = [o for o in pair if o.status is Status.rejected]
        assert first["payload"]["email"] in loser.reason


def assert_raced_order_is_consistent(
    store: WriteStore, order_id: str, racers: list[dict], outcomes: dict[str, Outcome]
) -> int:
    """The order's events are a legal path and match exactly the racing commands that succeeded.
    Returns the quantity its cancellation gave back (0 if not cancelled)."""
    won = sorted(
        (outcomes[r["command_id"]].positions[0], r["type"])
        for r in racers
        if outcomes[r["command_id"]].status is Status.succeeded
    )
    history = [e.type for e in store.stream(f"order:{order_id}")]
    assert history == ["OrderPlaced"] + [
        {"PayOrder": "OrderPaid", "ShipOrder": "OrderShipped", "CancelOrder": "OrderCancelled"}[t]
        for _p, t in won
    ]
    assert history[1:] in (["OrderPaid", "OrderShipped"], ["OrderPaid", "OrderCancelled"], ["OrderCancelled"])
    assert store.stream_version(f"order:{order_id}") == len(history)
    with store.store.unit_of_work() as uow:
        status = uow.load(Order, order_id).state.status
    assert status == {"OrderShipped": "shipped", "OrderCancelled": "cancelled"}[history[-1]]
    for racer in racers:
        outcome = outcomes[racer["command_id"]]
        assert outcome.status is Status.succeeded or f"order {order_id}" in outcome.reason
    return 7 if history[-1] == "OrderCancelled" else 0


def assert_product_history_is_exact(
    store: WriteStore, product_id: str, by_id: dict[str, dict], outcomes: dict[str, Outcome], released: int
) -> None:
    """No lost update: the stream holds exactly one event per succeeded command that changed it,
    in gap-free versions; folding it never goes below zero stock and ends at the loaded state."""
    history = store.stream(f"product:{product_id}")
    assert [e.version for e in history] == list(range(1, len(history) + 1))
    assert store.stream_version(f"product:{product_id}") == len(history)
    stock, lowest, price = 0, None, None
    for event in history:
        change = {
            "ProductAdded": event.data.get("stock"),
            "ProductRestocked": event.data.get("quantity"),
            "StockReleased": event.data.get("quantity"),
            "StockReserved": -event.data.get("quantity", 0),
        }
        stock += change.get(event.type) or 0
        lowest = stock if lowest is None else min(lowest, stock)
        price = event.data["price_cents"] if event.type in ("ProductAdded", "ProductPriceChanged") else price
    assert lowest is not None and lowest >= 0

    succeeded = [by_id[cid] for cid, o in outcomes.items() if o.status is Status.succeeded and cid in by_id]
    restocked = sum(c["payload"]["quantity"] for c in succeeded if c["type"] == "RestockProduct")
    ordered = sum(c["payload"]["lines"][0]["quantity"] for c in succeeded if c["type"] == "PlaceOrder")
    assert stock == 500 - 7 + restocked - ordered + released
    assert stock_of(store, product_id) == stock
    with store.store.unit_of_work() as uow:
        assert uow.load(Product, product_id).state.price_cents == price

    counted = Counter(e.type for e in history)
    assert counted["ProductRestocked"] == sum(c["type"] == "RestockProduct" for c in succeeded)
    assert counted["StockReserved"] == 1 + sum(c["type"] == "PlaceOrder" for c in succeeded)
    assert counted["StockReleased"] == (1 if released else 0)
    rejected_orders = [
        o for cid, o in outcomes.items() if o.status is Status.rejected and by_id[cid]["type"] == "PlaceOrder"
    ]
    assert rejected_orders, "stock never ran short: the test did not exercise the stock rule"
    for outcome in rejected_orders:
        in_stock, asked = re.fullmatch(
            r"not enough stock for sku \S+: (\d+) in stock, (\d+) asked", outcome.reason
        ).groups()
        assert int(in_stock) < int(asked)
    assert not [
        o
        for cid, o in outcomes.items()
        if o.status is Status.rejected and by_id[cid]["type"] in ("RestockProduct", "ChangeProductPrice")
    ]


# -- a write store that is not there -------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_command_outliving_a_store_outage_is_dead_lettered_then_the_worker_recovers(
    workers: Workers, pg_admin: str
) -> None:
    """G1/G3: with its database missing the worker retries a command (Dramatiq's retries with
    backoff), then parks it in the dead-letter queue and says so in the log; once the database
    exists, the same worker executes the next command without a restart."""
    name = f"cqrskit_t_missing_{uuid.uuid4().hex[:8]}"
    database_url = make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    settings = workers.settings
    worker = workers.start(
        threads=2,
        CQRSKIT_DATABASE_URL=database_url,
        CQRSKIT_MAX_RETRIES="2",
        CQRSKIT_MIN_BACKOFF_MS="20",
        CQRSKIT_MAX_BACKOFF_MS="100",
    )
    lost = envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "ann@example.com"})
    admin = make_url(pg_admin).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with producer(settings) as publisher:
            publisher.publish(lost)
            (parked,) = wait_for_dead_letters(settings.broker_url, f"{settings.commands_queue}.XQ", 1)
            (logged,) = worker.wait_for_log(lambda r: r["event"] == "command.dead_lettered")
            retried = [r for r in worker.log_records() if r["event"].startswith("Retrying message")]
            assert len(retried) == 2
            assert logged["command_id"] == lost["command_id"] and "OperationalError" in logged["reason"]
            assert "outcome_not_recorded" in logged  # the store that would hold the outcome is the one down
            # What is parked after retries is Dramatiq's message around the body, not the body.
            message = json.loads(parked)
            assert (message["actor_name"], message["options"]["retries"]) == ("execute_command", 2)
            assert base64.b64decode(message["args"][0]) == json.dumps(lost).encode()

            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            engine = make_engine(database_url)
            upgrade(engine)
            engine.dispose()
            store = WriteStore(database_url)
            try:
                later = publisher.publish(
                    envelope("RegisterCustomer", "c-2", {"name": "Bo", "email": "bo@example.com"})
                )
                assert store.wait_for_outcomes([later], timeout=30)[later].status is Status.succeeded
                assert store.outcomes([lost["command_id"]]) == {}
            finally:
                store.close()
        assert worker.alive
    finally:
        worker.kill()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
