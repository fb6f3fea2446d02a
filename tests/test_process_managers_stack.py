"""Process managers as real processes on PostgreSQL, RabbitMQ and the search server: the shop's
payment deadline with a few seconds' timeout, two ``cqrskit process-managers`` processes (two
partitions); every process of the stack killed with -9 while timers are due, and started again."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cqrskit.infra.schema import events, process_handled, process_outbox, process_timers
from cqrskit.infra.settings import Settings
from cqrskit.producers.commands import new_command
from tests.processes import WorkerProcess
from tests.stack import Stack, wait_until

pytestmark = pytest.mark.slow
ORDERS = 200
TIMEOUT_SECONDS = 15
STOCK = 10_000


@pytest.fixture
def stack(amqp_settings: Settings, search_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("SHOP_PAYMENT_TIMEOUT_SECONDS", str(TIMEOUT_SECONDS))  # the processes' environment
    built = Stack.create(amqp_settings, search_url, tmp_path)
    yield built
    built.close()


def start_process_managers(stack: Stack, partition: int, partitions: int = 2) -> WorkerProcess:
    return stack._spawn("process-managers", ["-m", "cqrskit.app", "process-managers", "--partition", str(partition),
                                             "--partitions", str(partitions)])


def test_unpaid_orders_are_cancelled_once_across_kill_9(stack: Stack) -> None:
    """G13, G2, G3, G5, G6: 200 orders (timeout 15 s), half paid; both process-managers processes, the
    command worker, the relay and the indexer killed with -9 while timers are due, then started again
    (timers survive a restart of every process): every unpaid order is cancelled exactly once (one
    OrderCancelled, one CancelUnpaidOrder outcome), no paid order is cancelled, no timer fired
    twice (the processes' logs), stock equals its oracle and every read model converges."""
    stack.start_worker(threads=8)
    stack.start_relay()
    stack.start_indexer()
    managers = [start_process_managers(stack, p) for p in (0, 1)]
    products = [f"p{i}" for i in range(4)]
    catalogue = [new_command("RegisterCustomer", "c1", {"name": "Ada", "email": "ada@example.com"})] + [
        new_command("AddProduct", p, {"sku": f"SKU-{p.upper()}", "name": p, "description": "", "price_cents": 100,
                                      "stock": STOCK}) for p in products]
    stack.send_and_wait(catalogue, timeout=180)
    lines = {f"o{i}": (products[i % 4], 1 + i % 3) for i in range(ORDERS)}
    places = [new_command("PlaceOrder", o, {"customer_id": "c1", "lines": [{"sku": f"SKU-{p.upper()}", "quantity": q}]})
              for o, (p, q) in lines.items()]
    placed = stack.write_store.outcomes(stack.send_and_wait(places, timeout=180))
    assert Counter(o.status.value for o in placed.values()) == {"succeeded": ORDERS}
    pays = [new_command("PayOrder", o, {}) for o in list(lines)[::2]]
    stack.send_and_wait(pays, timeout=180)
    engine = stack.write_store.engine
    reacted_to = ORDERS + len(pays)  # every OrderPlaced and OrderPaid
    wait_until(lambda: _handled(engine) >= reacted_to, 120, "the process managers reacted to every order event")
    wait_until(lambda: _due(engine) > 0, 60, "timers due", poll=0.05)
    for process in stack.started:
        process.kill()  # -9, every process (the command worker, relay, indexer too), while timers are due
    assert _pending_timers(engine) > 0
    stack.start_worker(threads=8)
    stack.start_relay()
    stack.start_indexer()
    managers = [start_process_managers(stack, p) for p in (0, 1)]
    wait_until(lambda: _pending_timers(engine) == 0 and _unpublished(engine) == 0, 180, "every timer fired, sent")
    stack.wait_drained(timeout=180)
    _assert_each_order_settled_once(stack, lines)
    fired = Counter(r["instance"] for p in stack.started if p.log_path.name.startswith("process-managers")
                    for r in p.log_records() if r.get("event") == "process_manager.timer_fired")
    assert fired and max(fired.values()) == 1, fired.most_common(3)
    stack.assert_converged()


def _assert_each_order_settled_once(stack: Stack, lines: dict[str, tuple[str, int]]) -> None:
    engine = stack.write_store.engine
    with engine.connect() as conn:
        rows = conn.execute(sa.select(events.c.stream_id, events.c.type, events.c.data)
                            .where(events.c.stream_type.in_(["order", "product"]))).all()
    per_order = {o: Counter() for o in lines}
    stock: Counter[str] = Counter()
    for stream, kind, data in rows:
        owner = stream.partition(":")[2]
        if stream.startswith("order:"):
            per_order[owner][kind] += 1
        elif kind in ("StockReserved", "StockReleased"):
            stock[owner] += (data if isinstance(data, dict) else json.loads(data))["quantity"] * (
                1 if kind == "StockReserved" else -1)
    paid = {o for o, kinds in per_order.items() if kinds["OrderPaid"]}
    assert len(paid) == len(lines) // 2
    assert all(per_order[o]["OrderCancelled"] == 0 for o in paid), "a paid order was cancelled"
    assert all(per_order[o]["OrderCancelled"] == 1 for o in set(lines) - paid), \
        Counter(per_order[o]["OrderCancelled"] for o in set(lines) - paid)
    oracle = Counter()
    for o in paid:
        oracle[lines[o][0]] += lines[o][1]
    assert {p: stock[p] for p in oracle} == dict(oracle)  # reserved minus released: the paid orders' lines
    cancels = _outbox(engine)  # command id -> order: one command per timer, whatever was redelivered
    assert len(set(cancels.values())) == len(cancels)
    outcomes = stack.write_store.outcomes(list(cancels))
    assert len(outcomes) == len(cancels)  # each an outcome (G3)
    fates = {o.aggregate_id: o.status.value for o in outcomes.values()}
    assert all(fates[o] == "succeeded" for o in set(lines) - paid)
    # a payment and its deadline may cross (the timer fired before the payment was reacted to):
    # the order decides, and a paid order refuses the cancel
    assert all(fates[o] == "rejected" for o in paid if o in fates)

def _handled(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(process_handled)).scalar_one()


def _pending_timers(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(process_timers)).scalar_one()


def _due(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).where(process_timers.c.due_at <= sa.func.now())).scalar_one()


def _unpublished(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).where(process_outbox.c.published_at.is_(None))).scalar_one()


def _outbox(engine: Any) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(process_outbox.c.command_id, process_outbox.c.aggregate_id)).all())

