"""The shop's rules, decided by its handlers against the in-memory implementation of the port."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cqrskit.domain.model import Aggregate, Event, RuleViolation
from cqrskit.examples.shop.domain import Customer, Order, Product, registry
from cqrskit.examples.shop.orders import OrderLine, OrderPlaced
from cqrskit.examples.shop.products import StockReleased, StockReserved
from cqrskit.domain.testing import ConcurrencyConflict, InMemoryStore


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


def run(store: InMemoryStore, name: str, aggregate_id: str, /, **payload: Any) -> list[Event]:
    return store.execute(registry, name, aggregate_id, payload)


def rejected(store: InMemoryStore, name: str, aggregate_id: str, /, **payload: Any) -> str:
    """The reason a command is rejected; asserts it changed nothing."""
    before = ({sid: list(events) for sid, events in store.streams.items()}, dict(store.claims))
    with pytest.raises(RuleViolation) as info:
        run(store, name, aggregate_id, **payload)
    assert ({sid: list(events) for sid, events in store.streams.items()}, dict(store.claims)) == before
    return info.value.reason


def load(store: InMemoryStore, cls: type[Aggregate[Any]], aggregate_id: str) -> Any:
    return store.context().load(cls, aggregate_id)


def shop(store: InMemoryStore, stock: int = 10) -> InMemoryStore:
    """Customer c1 and products p1 (APPLE, 150 cents) and p2 (PEAR, 200 cents), ``stock`` each."""
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    run(store, "AddProduct", "p1", sku="APPLE", name="Apple", price_cents=150, stock=stock)
    run(store, "AddProduct", "p2", sku="PEAR", name="Pear", price_cents=200, stock=stock)
    return store


def place(store: InMemoryStore, order_id: str = "o1", **quantities: int) -> list[Event]:
    lines = [{"sku": sku, "quantity": q} for sku, q in (quantities or {"APPLE": 2}).items()]
    return run(store, "PlaceOrder", order_id, customer_id="c1", lines=lines)


# --- registry -------------------------------------------------------------------------------


def test_registry_holds_every_shop_type() -> None:
    assert set(registry.commands) == {
        "RegisterCustomer", "RenameCustomer", "ChangeCustomerEmail",
        "AddProduct", "ChangeProductPrice", "RestockProduct",
        "PlaceOrder", "PayOrder", "ShipOrder", "CancelOrder", "CancelUnpaidOrder",
    }  # fmt: skip
    assert registry.internal == {"CancelUnpaidOrder"}  # sent only by the payment deadline
    assert set(registry.events) == {
        "CustomerRegistered", "CustomerRenamed", "CustomerEmailChanged",
        "ProductAdded", "ProductPriceChanged", "ProductRestocked", "StockReserved", "StockReleased",
        "OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled",
    }  # fmt: skip
    assert all(cls.aggregate in (Customer, Product, Order) for cls in registry.commands.values())


def test_events_and_snapshots_round_trip(store: InMemoryStore) -> None:
    shop(store)
    place(store, APPLE=2, PEAR=1)
    run(store, "PayOrder", "o1")
    for events in store.streams.values():
        for event in events:
            assert registry.decode_event(event.type, 1, event.model_dump(mode="json")) == event
    for cls, aggregate_id in [(Customer, "c1"), (Product, "p1"), (Order, "o1")]:
        aggregate = load(store, cls, aggregate_id)
        restored = cls.restore(aggregate_id, aggregate.version, aggregate.snapshot())
        assert restored.state == aggregate.state


# --- customers ------------------------------------------------------------------------------


def test_register_customer_records_the_lower_cased_email_and_claims_it(store: InMemoryStore) -> None:
    events = run(store, "RegisterCustomer", "c1", name=" Ann ", email="Ann@Example.COM")
    assert [e.model_dump() for e in events] == [{"name": "Ann", "email": "ann@example.com"}]
    assert store.claims[("customer.email", "ann@example.com")] == "c1"
    assert load(store, Customer, "c1").state.registered


def test_a_customer_is_registered_once(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    assert rejected(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com") == (
        "customer c1 already exists"
    )
    assert rejected(store, "RegisterCustomer", "c1", name="Ann", email="other@example.com") == (
        "customer c1 already exists"
    )


def test_an_email_belongs_to_one_customer_whatever_its_case(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    reason = rejected(store, "RegisterCustomer", "c2", name="Bob", email="ANN@example.com")
    assert reason == "email ann@example.com is already in use"


def test_rename_customer(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    assert [e.model_dump() for e in run(store, "RenameCustomer", "c1", name="Anne")] == [{"name": "Anne"}]
    assert load(store, Customer, "c1").state.name == "Anne"


def test_renaming_to_the_current_name_succeeds_and_records_nothing(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    assert run(store, "RenameCustomer", "c1", name="Ann") == []


@pytest.mark.parametrize(
    ("name", "payload"), [("RenameCustomer", {"name": "X"}), ("ChangeCustomerEmail", {"email": "x@y.io"})]
)
def test_only_a_registered_customer_changes(store: InMemoryStore, name: str, payload: dict[str, Any]) -> None:
    assert rejected(store, name, "c9", **payload) == "customer c9 does not exist"


def test_change_email_moves_the_claim_and_frees_the_old_address(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    events = run(store, "ChangeCustomerEmail", "c1", email="Ann@New.example")
    assert [e.model_dump() for e in events] == [{"email": "ann@new.example"}]
    assert store.claims == {("customer.email", "ann@new.example"): "c1"}
    run(store, "RegisterCustomer", "c2", name="Bob", email="ann@example.com")
    assert store.claims[("customer.email", "ann@example.com")] == "c2"


def test_change_email_to_the_current_one_records_nothing(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    assert run(store, "ChangeCustomerEmail", "c1", email="ANN@example.com") == []
    assert store.claims == {("customer.email", "ann@example.com"): "c1"}


def test_change_email_to_another_customers_address_is_rejected(store: InMemoryStore) -> None:
    run(store, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    run(store, "RegisterCustomer", "c2", name="Bob", email="bob@example.com")
    reason = rejected(store, "ChangeCustomerEmail", "c2", email="ann@example.com")
    assert reason == "email ann@example.com is already in use"


def test_concurrent_claims_of_one_email_cannot_both_commit(store: InMemoryStore) -> None:
    first, second = store.context(), store.context()
    for ctx, customer_id in [(first, "c1"), (second, "c2")]:
        command = registry.command_type("RegisterCustomer").model_validate({"name": "A", "email": "a@b.io"})
        registry.handler("RegisterCustomer")(command, customer_id, ctx)
    first.commit()
    with pytest.raises(ConcurrencyConflict):
        second.commit()


# --- products -------------------------------------------------------------------------------


def test_add_product_records_it_and_claims_the_sku(store: InMemoryStore) -> None:
    events = run(store, "AddProduct", "p1", sku="A-1.x_2", name="Apple", price_cents=0, stock=0)
    assert [e.model_dump() for e in events] == [
        {"sku": "A-1.x_2", "name": "Apple", "description": "", "price_cents": 0, "stock": 0}
    ]
    assert store.claims == {("product.sku", "A-1.x_2"): "p1"}


def test_a_product_is_added_once_and_a_sku_belongs_to_one_product(store: InMemoryStore) -> None:
    run(store, "AddProduct", "p1", sku="APPLE", name="Apple", price_cents=150, stock=1)
    product = {"name": "Apple", "price_cents": 1, "stock": 1}
    assert rejected(store, "AddProduct", "p1", sku="OTHER", **product) == "product p1 already exists"
    assert rejected(store, "AddProduct", "p2", sku="APPLE", **product) == "sku APPLE is already in use"
    assert run(store, "AddProduct", "p3", sku="apple", **product)  # skus are case-sensitive


def test_change_price_and_restock(store: InMemoryStore) -> None:
    run(store, "AddProduct", "p1", sku="APPLE", name="Apple", price_cents=150, stock=1)
    assert [e.model_dump() for e in run(store, "ChangeProductPrice", "p1", price_cents=175)] == [
        {"price_cents": 175}
    ]
    assert run(store, "ChangeProductPrice", "p1", price_cents=175) == []  # unchanged: nothing recorded
    assert [e.model_dump() for e in run(store, "RestockProduct", "p1", quantity=4)] == [{"quantity": 4}]
    state = load(store, Product, "p1").state
    assert (state.price_cents, state.stock) == (175, 5)


@pytest.mark.parametrize(
    ("name", "payload"), [("ChangeProductPrice", {"price_cents": 1}), ("RestockProduct", {"quantity": 1})]
)
def test_only_an_added_product_changes(store: InMemoryStore, name: str, payload: dict[str, Any]) -> None:
    assert rejected(store, name, "p9", **payload) == "product p9 does not exist"


# --- orders: placement ----------------------------------------------------------------------


def test_place_order_captures_prices_and_reserves_stock_in_one_unit(store: InMemoryStore) -> None:
    shop(store)
    events = place(store, APPLE=3, PEAR=1)
    assert events == [
        OrderPlaced(
            customer_id="c1",
            lines=[
                OrderLine(sku="APPLE", product_id="p1", name="Apple", quantity=3, unit_price_cents=150),
                OrderLine(sku="PEAR", product_id="p2", name="Pear", quantity=1, unit_price_cents=200),
            ],
            total_cents=650,
        ),
        StockReserved(order_id="o1", quantity=3),
        StockReserved(order_id="o1", quantity=1),
    ]
    assert store.streams["product:p1"][-1] == StockReserved(order_id="o1", quantity=3)
    assert store.streams["product:p2"][-1] == StockReserved(order_id="o1", quantity=1)
    assert (load(store, Product, "p1").state.stock, load(store, Product, "p2").state.stock) == (7, 9)


def test_a_later_price_change_does_not_touch_a_placed_order(store: InMemoryStore) -> None:
    shop(store)
    place(store, APPLE=2)
    run(store, "ChangeProductPrice", "p1", price_cents=999)
    run(store, "PayOrder", "o1")
    order = load(store, Order, "o1").state
    assert (order.lines[0].unit_price_cents, order.total_cents) == (150, 300)
    assert store.streams["order:o1"][-1].model_dump() == {"amount_cents": 300}


def test_the_whole_stock_can_be_ordered_but_not_one_unit_more(store: InMemoryStore) -> None:
    shop(store, stock=5)
    reason = rejected(store, "PlaceOrder", "o1", customer_id="c1", lines=[
        {"sku": "PEAR", "quantity": 1}, {"sku": "APPLE", "quantity": 6},
    ])  # fmt: skip
    assert reason == "not enough stock for sku APPLE: 5 in stock, 6 asked"
    place(store, "o2", APPLE=5)
    assert rejected(store, "PlaceOrder", "o3", customer_id="c1", lines=[{"sku": "APPLE", "quantity": 1}]) == (
        "not enough stock for sku APPLE: 0 in stock, 1 asked"
    )


def test_placement_rules(store: InMemoryStore) -> None:
    shop(store)
    place(store, "o1")
    line = [{"sku": "APPLE", "quantity": 1}]
    reason = rejected(store, "PlaceOrder", "o1", customer_id="c1", lines=line)
    assert reason == "order o1 already exists (placed)"
    assert rejected(store, "PlaceOrder", "o2", customer_id="c9", lines=line) == "customer c9 does not exist"
    unknown = [{"sku": "APPLE", "quantity": 1}, {"sku": "KIWI", "quantity": 1}]
    assert rejected(store, "PlaceOrder", "o2", customer_id="c1", lines=unknown) == "unknown sku KIWI"


def test_concurrent_orders_on_one_product_cannot_both_commit(store: InMemoryStore) -> None:
    shop(store, stock=1)
    contexts = [store.context(), store.context()]
    for ctx, order_id in zip(contexts, ["o1", "o2"], strict=True):
        command = registry.command_type("PlaceOrder").model_validate(
            {"customer_id": "c1", "lines": [{"sku": "APPLE", "quantity": 1}]}
        )
        registry.handler("PlaceOrder")(command, order_id, ctx)
    contexts[0].commit()
    with pytest.raises(ConcurrencyConflict):
        contexts[1].commit()
    assert load(store, Product, "p1").state.stock == 0


# --- orders: the state machine --------------------------------------------------------------

REACH = {  # commands that bring a fresh order o1 to a status
    "new": [],
    "placed": ["PlaceOrder"],
    "paid": ["PlaceOrder", "PayOrder"],
    "shipped": ["PlaceOrder", "PayOrder", "ShipOrder"],
    "cancelled": ["PlaceOrder", "CancelOrder"],
}
TRANSITIONS: list[tuple[str, str, str]] = [  # (status, command, new status or rejection reason)
    ("new", "PlaceOrder", "placed"),
    ("new", "PayOrder", "order o1 does not exist"),
    ("new", "ShipOrder", "order o1 does not exist"),
    ("new", "CancelOrder", "order o1 does not exist"),
    ("placed", "PlaceOrder", "order o1 already exists (placed)"),
    ("placed", "PayOrder", "paid"),
    ("placed", "ShipOrder", "cannot ship an unpaid order o1: it is placed"),
    ("placed", "CancelOrder", "cancelled"),
    ("paid", "PlaceOrder", "order o1 already exists (paid)"),
    ("paid", "PayOrder", "cannot pay order o1: it is paid"),
    ("paid", "ShipOrder", "shipped"),
    ("paid", "CancelOrder", "cancelled"),
    ("shipped", "PlaceOrder", "order o1 already exists (shipped)"),
    ("shipped", "PayOrder", "cannot pay order o1: it is shipped"),
    ("shipped", "ShipOrder", "cannot ship order o1: it is shipped"),
    ("shipped", "CancelOrder", "cannot cancel order o1: it is shipped"),
    ("cancelled", "PlaceOrder", "order o1 already exists (cancelled)"),
    ("cancelled", "PayOrder", "cannot pay order o1: it is cancelled"),
    ("cancelled", "ShipOrder", "cannot ship order o1: it is cancelled"),
    ("cancelled", "CancelOrder", "cannot cancel order o1: it is cancelled"),
]
PAYLOADS: dict[str, dict[str, Any]] = {
    "PlaceOrder": {"customer_id": "c1", "lines": [{"sku": "APPLE", "quantity": 2}]},
    "PayOrder": {},
    "ShipOrder": {},
    "CancelOrder": {"reason": "changed my mind"},
}


@pytest.mark.parametrize(("status", "command", "outcome"), TRANSITIONS)
def test_order_state_machine(store: InMemoryStore, status: str, command: str, outcome: str) -> None:
    shop(store)
    for step in REACH[status]:
        run(store, step, "o1", **PAYLOADS[step])
    assert load(store, Order, "o1").state.status == status
    if outcome in REACH:
        run(store, command, "o1", **PAYLOADS[command])
        assert load(store, Order, "o1").state.status == outcome
    else:
        assert rejected(store, command, "o1", **PAYLOADS[command]) == outcome


def test_every_status_and_command_is_in_the_table() -> None:
    assert {(s, c) for s, c, _ in TRANSITIONS} == {(s, c) for s in REACH for c in PAYLOADS}


@pytest.mark.parametrize("status", ["placed", "paid"])
def test_cancel_releases_every_reservation(store: InMemoryStore, status: str) -> None:
    shop(store)
    place(store, APPLE=3, PEAR=4)
    if status == "paid":
        run(store, "PayOrder", "o1")
    events = run(store, "CancelOrder", "o1", reason="out of budget")
    assert events[0].model_dump() == {"reason": "out of budget"}
    assert events[1:] == [StockReleased(order_id="o1", quantity=3), StockReleased(order_id="o1", quantity=4)]
    assert (load(store, Product, "p1").state.stock, load(store, Product, "p2").state.stock) == (10, 10)


# --- validation (G10) -----------------------------------------------------------------------

GOOD: dict[str, dict[str, Any]] = {
    "RegisterCustomer": {"name": "Ann", "email": "ann@example.com"},
    "AddProduct": {"sku": "APPLE", "name": "Apple", "price_cents": 1, "stock": 1},
    "PlaceOrder": {"customer_id": "c1", "lines": [{"sku": "APPLE", "quantity": 1}]},
    "RestockProduct": {"quantity": 1},
    "CancelOrder": {"reason": "x"},
}
LINE = {"sku": "APPLE", "quantity": 1}
INVALID: list[tuple[str, dict[str, Any]]] = [
    ("RegisterCustomer", {"extra": 1}),
    ("RegisterCustomer", {"name": ""}),
    ("RegisterCustomer", {"name": "   "}),
    ("RegisterCustomer", {"name": "x" * 201}),
    ("RegisterCustomer", {"name": "A\x00nn"}),
    ("RegisterCustomer", {"name": "A\ud800nn"}),
    ("RegisterCustomer", {"email": "not-an-email"}),
    ("RegisterCustomer", {"email": "a@b"}),
    ("RegisterCustomer", {"email": "a b@example.com"}),
    ("RegisterCustomer", {"email": "a@@example.com"}),
    ("RegisterCustomer", {"email": "a" * 250 + "@example.com"}),
    ("AddProduct", {"sku": "-APPLE"}),
    ("AddProduct", {"sku": "AP PLE"}),
    ("AddProduct", {"sku": "A" * 65}),
    ("AddProduct", {"price_cents": -1}),
    ("AddProduct", {"price_cents": "100"}),
    ("AddProduct", {"price_cents": 1.5}),
    ("AddProduct", {"stock": -1}),
    ("AddProduct", {"stock": True}),
    ("AddProduct", {"description": "x" * 5001}),
    ("RestockProduct", {"quantity": 0}),
    ("RestockProduct", {"quantity": 1_000_001}),
    ("PlaceOrder", {"lines": []}),
    ("PlaceOrder", {"lines": [{"sku": "APPLE", "quantity": -1}]}),
    ("PlaceOrder", {"lines": [{"sku": "APPLE", "quantity": 0}]}),
    ("PlaceOrder", {"lines": [{"sku": "APPLE", "quantity": 10_001}]}),
    ("PlaceOrder", {"lines": [{"sku": "APPLE", "quantity": 1, "price_cents": 1}]}),
    ("PlaceOrder", {"lines": [LINE, {"sku": "PEAR", "quantity": 1}, LINE]}),
    ("PlaceOrder", {"lines": [{"sku": f"S{i}", "quantity": 1} for i in range(101)]}),
    ("PlaceOrder", {"customer_id": ""}),
    ("CancelOrder", {"reason": "x" * 501}),
]


@pytest.mark.parametrize(("name", "change"), INVALID)
def test_bad_payloads_are_invalid(name: str, change: dict[str, Any]) -> None:
    command = registry.command_type(name)
    command.model_validate(GOOD[name])
    with pytest.raises(ValidationError):
        command.model_validate(GOOD[name] | change)


@pytest.mark.parametrize("name", ["PayOrder", "ShipOrder", "RenameCustomer", "ChangeProductPrice"])
def test_unknown_fields_are_refused_by_every_command(name: str) -> None:
    with pytest.raises(ValidationError, match="extra"):
        registry.command_type(name).model_validate({"unexpected": 1})


def test_duplicate_skus_are_named_in_the_error() -> None:
    with pytest.raises(ValidationError, match="sku APPLE appears on more than one line"):
        registry.command_type("PlaceOrder").model_validate(GOOD["PlaceOrder"] | {"lines": [LINE, LINE]})


@pytest.mark.parametrize("email", ["a.b+tag@mail.example.co.uk", "X_Y@EXAMPLE.ORG", "o'neil@ex-ample.io"])
def test_usual_email_addresses_are_accepted_lower_cased(email: str) -> None:
    command = registry.command_type("RegisterCustomer").model_validate({"name": "A", "email": email})
    assert command.email == email.lower()  # type: ignore[attr-defined]


def test_a_description_may_span_lines() -> None:
    payload = GOOD["AddProduct"] | {"description": "Crisp.\n\tFrom the orchard.\r\n"}
    assert registry.command_type("AddProduct").model_validate(payload)


# --- property: stock is conserved -----------------------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("PlaceOrder"), st.integers(0, 5), st.integers(1, 8)),
        st.tuples(st.just("CancelOrder"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("RestockProduct"), st.just(0), st.integers(1, 6)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=st.integers(0, 10), steps=STEPS)
def test_stock_is_never_negative_and_is_conserved(initial: int, steps: list[tuple[str, int, int]]) -> None:
    """stock == initial + restocked - quantities of live orders, and each command is accepted
    exactly when this model of the rules says it should be."""
    store = shop(InMemoryStore(), stock=initial)
    restocked, live, ever_placed = 0, dict[str, int](), set[str]()
    for name, n, quantity in steps:
        order_id, stock = f"o{n}", initial + restocked - sum(live.values())
        if name == "PlaceOrder":
            accepted = order_id not in ever_placed and quantity <= stock
            outcome = _try(lambda: place(store, order_id, APPLE=quantity))
        elif name == "CancelOrder":
            accepted = order_id in live
            outcome = _try(lambda: run(store, "CancelOrder", order_id))
        else:
            accepted = True
            outcome = _try(lambda: run(store, "RestockProduct", "p1", quantity=quantity))
        assert outcome == accepted, (name, order_id, quantity, stock)
        if accepted and name == "PlaceOrder":
            live[order_id] = quantity
            ever_placed.add(order_id)
        elif accepted and name == "CancelOrder":
            del live[order_id]
        elif accepted:
            restocked += quantity
        actual = load(store, Product, "p1").state.stock
        assert actual >= 0
        assert actual == initial + restocked - sum(live.values())


def _try(action: Any) -> bool:
    try:
        action()
    except RuleViolation:
        return False
    return True
