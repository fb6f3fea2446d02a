"""The event store's contract, run unchanged against PostgreSQL, SQLite and the in-memory store
(STYLE habit 6); the two tests that reach under the port (raw SQL, migrations) run on the two
SQL stores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cqrskit.examples.shop.domain import Customer, Product, registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import current_revision, head_revision, upgrade
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.store import ConcurrencyConflict, EventStore


@pytest.fixture
def store(any_store: EventStore) -> EventStore:
    return any_store


@pytest.fixture
def sql_store(store_url: str) -> Iterator[EventStore]:
    engine = make_engine(store_url)
    yield EventStore(engine, registry)
    engine.dispose()


def register(store: EventStore, customer_id: str, email: str, command_id: str | None = None) -> list[int]:
    with store.unit_of_work() as uow:
        customer = uow.load(Customer, customer_id)
        assert customer.version == 0
        from cqrskit.examples.shop.customers import CustomerRegistered

        customer.record(CustomerRegistered(name="Ann", email=email))
        uow.claim("customer.email", email, customer_id)
        outcome = Outcome(command_id=command_id, status=Status.succeeded) if command_id else None
        return uow.commit({"command_id": command_id or "x"}, outcome)


def test_append_then_load_round_trips_state_and_version(store: EventStore) -> None:
    positions = register(store, "c1", "ann@example.com")
    assert len(positions) == 1
    with store.unit_of_work() as uow:
        customer = uow.load(Customer, "c1")
        assert (customer.version, customer.state.email, customer.state.registered) == (1, "ann@example.com", True)
    events = store.read_stream("customer:c1")
    assert [(e.version, e.type, e.data["email"]) for e in events] == [(1, "CustomerRegistered", "ann@example.com")]
    assert events[0].metadata == {"command_id": "x"}


def test_positions_increase_across_streams_in_commit_order(store: EventStore) -> None:
    first = register(store, "c1", "a@example.com")
    second = register(store, "c2", "b@example.com")
    assert first[0] < second[0]
    assert [e.position for e in store.read_all(0)] == first + second
    assert [e.position for e in store.read_all(first[0])] == second
    assert store.last_position() == second[0]


def test_stale_version_is_a_conflict_and_writes_nothing(store: EventStore) -> None:
    """G4: two decisions from one loaded version cannot both commit."""
    from cqrskit.examples.shop.customers import CustomerRenamed

    register(store, "c1", "a@example.com")
    with store.unit_of_work() as slow:
        stale = slow.load(Customer, "c1")
        with store.unit_of_work() as fast:
            fast.load(Customer, "c1").record(CustomerRenamed(name="Fast"))
            fast.commit({})
        stale.record(CustomerRenamed(name="Slow"))
        with pytest.raises(ConcurrencyConflict):
            slow.commit({})
    assert [e.data.get("name") for e in store.read_stream("customer:c1")][1:] == ["Fast"]


def test_creating_a_stream_twice_is_a_conflict(store: EventStore) -> None:
    from cqrskit.examples.shop.customers import CustomerRegistered

    with store.unit_of_work() as a:
        first = a.load(Customer, "c1")
        register(store, "c1", "a@example.com")
        first.record(CustomerRegistered(name="Other", email="other@example.com"))
        with pytest.raises(ConcurrencyConflict):
            a.commit({})


def test_a_taken_claim_is_refused_and_a_concurrent_claim_conflicts(store: EventStore) -> None:
    """G4: the unique email holds even when two registrations race."""
    from cqrskit.domain.model import RuleViolation

    with store.unit_of_work() as racing:
        racing.load(Customer, "c2")
        racing.claim("customer.email", "a@example.com", "c2")  # not taken yet, as far as it knows
        register(store, "c1", "a@example.com")
        with pytest.raises(ConcurrencyConflict):
            racing.commit({})
    with store.unit_of_work() as late:
        assert late.owner_of("customer.email", "a@example.com") == "c1"
        with pytest.raises(RuleViolation):
            late.claim("customer.email", "a@example.com", "c2")


def test_released_claim_is_free_again(store: EventStore) -> None:
    register(store, "c1", "a@example.com")
    with store.unit_of_work() as uow:
        uow.release("customer.email", "a@example.com", "c1")
        uow.claim("customer.email", "b@example.com", "c1")
        assert uow.owner_of("customer.email", "a@example.com") is None
        uow.commit({})
    with store.unit_of_work() as uow:
        assert uow.owner_of("customer.email", "a@example.com") is None
        assert uow.owner_of("customer.email", "b@example.com") == "c1"


def test_outcome_commits_with_events_and_a_second_one_conflicts(store: EventStore) -> None:
    """G2: the dedup record commits in the same transaction as the events."""
    register(store, "c1", "a@example.com", command_id="cmd-1")
    assert store.outcome("cmd-1").status is Status.succeeded
    with pytest.raises(ConcurrencyConflict):
        register(store, "c9", "z@example.com", command_id="cmd-1")
    assert store.read_stream("customer:c9") == []


def test_record_outcome_first_one_wins(store: EventStore) -> None:
    first = store.record_outcome(Outcome(command_id="cmd-2", status=Status.invalid, reason="bad"))
    again = store.record_outcome(Outcome(command_id="cmd-2", status=Status.dead, reason="later"))
    assert (first.status, first.duplicate) == (Status.invalid, False)
    assert (again.status, again.reason, again.duplicate) == (Status.invalid, "bad", True)


def test_snapshot_of_another_state_version_is_ignored_and_events_replayed(sql_store: EventStore) -> None:
    store = sql_store
    from cqrskit.examples.shop.products import ProductAdded, ProductRestocked

    with store.unit_of_work() as uow:
        product = uow.load(Product, "p1")
        product.record(ProductAdded(sku="S1", name="N", description="", price_cents=100, stock=5))
        product.record(ProductRestocked(quantity=3))
        uow.commit({})
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE streams SET state_version = 999, state = NULL")
    with store.unit_of_work() as uow:
        product = uow.load(Product, "p1")
        assert (product.version, product.state.stock) == (2, 8)


def test_migrations_are_idempotent(sql_store: EventStore) -> None:
    store = sql_store
    upgrade(store.engine)
    upgrade(store.engine)
    assert current_revision(store.engine) == head_revision()
