"""Process managers (G13): the declaration, given/when/then, the reaction transaction on each
write store, and the shop's payment deadline through the Harness (a clock the test moves, no sleep)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cqrskit.app.testing import Harness
from cqrskit.domain.process import ProcessScenario
from cqrskit.examples.shop import app as shop
from cqrskit.examples.shop.orders import OrderLine, OrderPaid, OrderPlaced
from cqrskit.examples.shop.payments import payment_deadline
from cqrskit.infra.db import make_engine
from cqrskit.infra.store import EventStore
from cqrskit.infra.write_store.reactions import ReactionStore

T0 = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)
LINE = OrderLine(sku="SKU-1", product_id="p1", name="Pen", quantity=2, unit_price_cents=150)


def placed() -> OrderPlaced:
    return OrderPlaced(customer_id="c1", lines=[LINE], total_cents=300)


def test_given_when_then_of_the_payment_deadline() -> None:
    """G13: an order placed sets the timer; unpaid at the deadline, the timer sends the internal
    cancel; paid first, the timer is cancelled and nothing is sent."""
    scenario = ProcessScenario(payment_deadline, now=T0)
    scenario.given("o1", placed()).then_timers("o1", payment=T0 + timedelta(seconds=1800))
    scenario.given("o2", placed(), OrderPaid(amount_cents=300)).then_timers("o2")
    scenario.advance(timedelta(seconds=1799)).then_sent()
    scenario.advance(timedelta(seconds=1))
    (sent,) = scenario.then_sent(("CancelUnpaidOrder", "o1", {"reason": "not paid in time"}))
    assert sent.command_id.startswith("pm:")
    scenario.then_timers("o1")
    scenario.advance(timedelta(days=1)).then_sent()


@pytest.fixture
def shop_store(store_url: str) -> Any:
    engine = make_engine(store_url)
    yield EventStore(engine, shop.registry), ReactionStore(engine, shop.registry, shop.process_managers)
    engine.dispose()


def _append_placed(store: EventStore, order_id: str) -> Any:
    from cqrskit.examples.shop.orders import Order

    with store.unit_of_work() as uow:
        uow.load(Order, order_id).place("c1", [LINE])
        uow.commit({"correlation_id": f"corr-{order_id}"})
    return store.read_stream(f"order:{order_id}")[-1]


def test_a_redelivered_event_changes_nothing(shop_store: Any) -> None:
    """G13: the reaction commits with its handled record; the same event again writes nothing,
    so the instance's version and its timer stay as the first delivery left them."""
    store, reactions = shop_store
    event = _append_placed(store, "o1")
    assert reactions.react(payment_deadline, event, T0) is True
    assert reactions.react(payment_deadline, event, T0 + timedelta(minutes=5)) is False
    state, version = reactions.state(payment_deadline.name, "o1")
    assert (state.status, version) == ("awaiting", 1)
    assert reactions.timers(payment_deadline.name, "o1") == {"payment": T0 + timedelta(seconds=1800)}


def test_a_due_timer_fires_once_and_sends_one_outbox_command(shop_store: Any) -> None:
    """G13 and G2: a due timer fires once (two processes racing get it once between them), its
    command lands in the outbox once with a derived id and the event's correlation id; the
    outbox hands it out until it is marked published."""
    store, reactions = shop_store
    reactions.react(payment_deadline, _append_placed(store, "o1"), T0)
    assert reactions.fire_due(T0 + timedelta(seconds=1799)) == []
    due = T0 + timedelta(seconds=1801)
    results: list[Any] = []
    racers = [threading.Thread(target=lambda: results.append(reactions.fire_due(due))) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    fired = [f for batch in results for f in batch]
    assert [(f.key, f.name, f.commands, f.lateness) for f in fired] == [("o1", "payment", 1, 1.0)]
    with reactions.take_unpublished() as commands:
        (command,) = commands
    assert (command.envelope.type, command.envelope.aggregate_id) == ("CancelUnpaidOrder", "o1")
    assert command.envelope.metadata.correlation_id == "corr-o1"
    assert reactions.sent_internally(command.envelope)
    with reactions.take_unpublished() as again:
        assert again == []


def test_a_cancelled_timer_never_fires(shop_store: Any) -> None:
    """G13: paying deletes the timer in the reaction's transaction; nothing fires later."""
    store, reactions = shop_store
    reactions.react(payment_deadline, _append_placed(store, "o1"), T0)
    from cqrskit.examples.shop.orders import Order

    with store.unit_of_work() as uow:
        uow.load(Order, "o1").pay()
        uow.commit({})
    reactions.react(payment_deadline, store.read_stream("order:o1")[-1], T0 + timedelta(minutes=1))
    assert reactions.timers(payment_deadline.name, "o1") == {}
    assert reactions.fire_due(T0 + timedelta(days=2)) == []


# -- the shop through the Harness ----------------------------------------------------------------
@pytest.fixture
def pipeline(search_url: str, tmp_path: Path) -> Any:
    with Harness(shop, f"sqlite:///{tmp_path / 'shop.db'}", search_url, now=T0) as harness:
        yield harness


def _catalogue(pipeline: Harness) -> None:
    assert pipeline.send("RegisterCustomer", "c1", {"name": "Ada", "email": "ada@example.com"}).status == "succeeded"
    product = {"sku": "SKU-1", "name": "Pen", "description": "blue", "price_cents": 150, "stock": 10}
    assert pipeline.send("AddProduct", "p1", product).status == "succeeded"


def test_an_unpaid_order_is_cancelled_at_its_deadline_and_a_paid_one_is_not(pipeline: Harness) -> None:
    """G13, G2, G3: unpaid at the deadline, the order is cancelled once, through an internal command
    with an outcome, its stock released; the paid order keeps its stock; the read model shows it."""
    _catalogue(pipeline)
    order = {"customer_id": "c1", "lines": [{"sku": "SKU-1", "quantity": 3}]}
    assert pipeline.send("PlaceOrder", "o1", order).status == "succeeded"
    assert pipeline.send("PlaceOrder", "o2", order).status == "succeeded"
    paid = pipeline.send("PayOrder", "o2", {})
    assert [e.type for e in pipeline.events(paid)] == ["OrderPaid"]
    assert pipeline.advance(timedelta(seconds=1799)) == []
    fired = pipeline.advance(timedelta(seconds=2))
    assert [(f.key, f.name, f.commands) for f in fired] == [("o1", "payment", 1)]
    assert pipeline.advance(timedelta(days=1)) == []
    cancels = [o for o in _outcomes(pipeline) if o.type == "CancelUnpaidOrder"]
    assert [(o.aggregate_id, o.status.value) for o in cancels] == [("o1", "succeeded")]
    assert [e.type for e in pipeline.store.read_stream("order:o1")] == ["OrderPlaced", "OrderCancelled"]
    released = [e for e in pipeline.store.read_stream("product:p1") if e.type == "StockReleased"]
    assert [e.data["quantity"] for e in released] == [3]
    assert pipeline.get("orders", "o1").status == "cancelled"
    assert pipeline.get("orders", "o2").status == "paid"
    assert pipeline.get("products", "p1").stock == 7
    assert all(r.ok for r in pipeline.verify())


def test_an_internal_command_from_a_producer_is_refused(pipeline: Harness) -> None:
    """G13, G11, G10: an internal command type sent by a producer is invalid ("internal command",
    no event); a command id in the process managers' namespace that no reaction sent is refused."""
    _catalogue(pipeline)
    pipeline.send("PlaceOrder", "o1", {"customer_id": "c1", "lines": [{"sku": "SKU-1", "quantity": 1}]})
    refused = pipeline.send("CancelUnpaidOrder", "o1", {})
    assert refused.status == "invalid"
    assert refused.outcome.reason.startswith("internal command: CancelUnpaidOrder")
    assert [e.type for e in pipeline.store.read_stream("order:o1")] == ["OrderPlaced"]
    from cqrskit.workers.execution import BadCommand

    with pytest.raises(BadCommand, match="process managers' own"):
        pipeline.send("PayOrder", "o1", {}, command_id="pm:forged")


def _outcomes(pipeline: Harness) -> list[Any]:
    import sqlalchemy as sa

    from cqrskit.infra.outcomes import Outcome
    from cqrskit.infra.schema import command_outcomes

    with pipeline.engine.connect() as conn:
        return [Outcome.from_row(r._mapping) for r in conn.execute(sa.select(command_outcomes))]


def test_the_gateway_refuses_internal_commands_and_leaves_them_out_of_its_openapi() -> None:
    """G13, G11, G10: the gateway's check (the one the workers make) refuses an internal command
    type (400, "internal command") and a command id in the process managers' namespace; its
    OpenAPI lists every other command type and not the internal ones."""
    import json

    from cqrskit.infra.settings import Settings
    from cqrskit.producers.gateway import check_command, create_app
    from cqrskit.infra.problems import ProblemError

    def body(**fields: Any) -> bytes:
        return json.dumps({"command_id": "k1", "type": "CancelUnpaidOrder", "aggregate_id": "o1",
                           "payload": {}, **fields}).encode()

    with pytest.raises(ProblemError) as refused:
        check_command(body(), shop.registry, 65536)
    assert (refused.value.status, refused.value.detail) == (
        400, "internal command: CancelUnpaidOrder is sent only by the app's process managers")
    with pytest.raises(ProblemError, match="process managers' own"):
        check_command(body(type="PayOrder", command_id="pm:0f1e"), shop.registry, 65536)
    nowhere = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/%2F",
                       database_url="postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    mapping = create_app(nowhere, registry=shop.registry).openapi()["components"]["schemas"]["Command"]
    assert set(mapping["discriminator"]["mapping"]) == set(shop.registry.commands) - {"CancelUnpaidOrder"}


def test_the_hotels_no_show_frees_the_nights_of_a_guest_who_never_came(search_url: str, tmp_path: Path) -> None:
    """G13, G4: a booking not checked in by noon of the day after arrival becomes a no-show (its
    nights free again: the room books once more); a checked-in guest's booking is left alone."""
    from cqrskit.examples.hotel import app as hotel

    now = datetime.now(UTC)
    today = now.date()
    stay = {"guest_email": "ada@example.com", "check_in": today.isoformat(),
            "check_out": (today + timedelta(days=2)).isoformat()}
    with Harness(hotel, f"sqlite:///{tmp_path / 'hotel.db'}", search_url, now=now) as pipeline:
        for room, number in (("r1", "101"), ("r2", "102")):
            pipeline.send("AddRoom", room, {"number": number, "room_type": "double", "rate_cents": 9000})
        assert pipeline.send("BookRoom", "b1", {**stay, "room_id": "r1", "guest_name": "Ada"}).status == "succeeded"
        assert pipeline.send("BookRoom", "b2", {**stay, "room_id": "r2", "guest_name": "Grace"}).status == "succeeded"
        assert pipeline.send("CheckIn", "b2", {}).status == "succeeded"
        noon_after = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
        pipeline.advance(noon_after - pipeline.now - timedelta(seconds=1))
        assert pipeline.get("bookings", "b1").status == "booked"
        fired = pipeline.advance(timedelta(seconds=1))
        assert [(f.key, f.commands) for f in fired] == [("b1", 1)]
        assert [e.data.get("reason") for e in pipeline.store.read_stream("booking:b1")][-1] == "no-show"
        assert pipeline.get("bookings", "b1").status == "cancelled"
        assert pipeline.get("bookings", "b2").status == "checked_in"
        again = pipeline.send("BookRoom", "b3", {**stay, "room_id": "r1", "guest_name": "Alan"})
        assert again.status == "succeeded", again.outcome.reason
        assert all(r.ok for r in pipeline.verify())


def test_status_counts_instances_pending_and_overdue_timers_and_the_outbox(shop_store: Any) -> None:
    """G12, G13: pending timers, overdue ones (and how late the oldest is) and unpublished commands
    are one query away (``cqrskit status``'s process-managers row)."""
    from cqrskit.app.cli_ops import render_status
    from cqrskit.app.status import PipelineStatus
    from cqrskit.infra.write_store.reactions import process_manager_state

    store, reactions = shop_store
    for order in ("o1", "o2"):
        reactions.react(payment_deadline, _append_placed(store, order), T0)
    with store.engine.connect() as conn:
        state = process_manager_state(conn, now=T0 + timedelta(seconds=3600))
    assert (state.instances, state.timers_pending, state.timers_overdue, state.oldest_overdue_seconds,
            state.outbox_unpublished) == (2, 2, 2, 1800.0, 0)
    reactions.fire_due(T0 + timedelta(seconds=3600), limit=1)
    with store.engine.connect() as conn:
        state = process_manager_state(conn, now=T0 + timedelta(seconds=3600))
    assert (state.timers_pending, state.timers_overdue, state.outbox_unpublished) == (1, 1, 1)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_status(PipelineStatus(taken_at=T0, components={}, process_managers=state)))
    assert "process managers: 2 instances, timers 1 pending, 1 overdue (oldest 1800 s), outbox 1 unpublished" \
        in console.export_text()


def test_the_process_serves_its_metrics(shop_store: Any) -> None:
    """G12, G13: events handled, timers fired and their lateness, lag, timers pending and overdue."""
    from cqrskit.workers.process_managers import ProcessManagerMetrics, ProcessManagers

    store, reactions = shop_store
    _append_placed(store, "o1")
    process = ProcessManagers(store.engine, reactions, publish=lambda _: None)
    assert process.consume_once() == 1 and process.lag() == 0
    process.fire_once(datetime.now(UTC) + timedelta(days=1))
    values = {m.name: m.samples for m in ProcessManagerMetrics(process).collect()}
    assert values["cqrskit_process_manager_events_handled"][0].value == 1
    assert values["cqrskit_process_manager_timers_fired"][0].value == 1
    assert values["cqrskit_process_manager_timers_pending"][0].value == 0
    assert values["cqrskit_process_manager_lag_events"][0].value == 0
