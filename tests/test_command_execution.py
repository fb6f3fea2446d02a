"""The command executor on each write store (no broker): outcomes (G3), exactly-once effect
(G2), bad input (G10), expected versions and conflicts (G4)."""

from __future__ import annotations

import threading
import uuid

import pytest

from cqrskit.infra.outcomes import Status
from cqrskit.infra.store import EventStore
from cqrskit.producers.commands import new_command
from tests.bad_inputs import BAD_INPUTS, outcome_text
from cqrskit.workers.execution import BadCommand, CommandExecutor


@pytest.fixture
def store(any_store: EventStore) -> EventStore:
    """PostgreSQL, SQLite and the in-memory store: the executor only sees the port."""
    return any_store


@pytest.fixture
def executor(store: EventStore) -> CommandExecutor:
    return CommandExecutor(store, store.registry, max_bytes=64 * 1024)


def run(executor: CommandExecutor, type: str, aggregate_id: str, **payload):  # type: ignore[no-untyped-def]
    return executor.execute(new_command(type, aggregate_id, payload).to_json())


def test_success_records_events_version_positions_and_trace_ids(executor: CommandExecutor) -> None:
    command = new_command("RegisterCustomer", "c1", {"name": "Ann", "email": "ann@example.com"},
                          correlation_id="flow-1", causation_id="http-req-9")
    outcome = executor.execute(command.to_json())
    assert (outcome.status, outcome.aggregate_version, outcome.duplicate) == (Status.succeeded, 1, False)
    assert outcome.correlation_id == "flow-1" and outcome.causation_id == "http-req-9"
    stored = executor.store.outcome(command.command_id)
    assert stored.positions == outcome.positions and len(outcome.positions) == 1
    event = executor.store.read_all(0)[0]
    assert event.metadata["command_id"] == command.command_id
    assert (event.metadata["correlation_id"], event.metadata["causation_id"]) == ("flow-1", command.command_id)


def test_same_command_delivered_three_times_takes_effect_once(executor: CommandExecutor) -> None:
    """G2: redeliveries find the dedup record and change nothing."""
    run(executor, "AddProduct", "p1", sku="S1", name="Mug", price_cents=500, stock=10)
    run(executor, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    body = new_command("PlaceOrder", "o1", {"customer_id": "c1", "lines": [{"sku": "S1", "quantity": 2}]}).to_json()
    outcomes = [executor.execute(body) for _ in range(3)]
    assert [o.duplicate for o in outcomes] == [False, True, True]
    assert {o.status for o in outcomes} == {Status.succeeded}
    assert len({tuple(o.positions) for o in outcomes}) == 1
    assert [e.type for e in executor.store.read_all(0)].count("OrderPlaced") == 1
    with executor.store.unit_of_work() as uow:
        from cqrskit.examples.shop.domain import Product

        assert uow.load(Product, "p1").state.stock == 8


def test_business_rule_is_rejected_with_reason_and_not_retried(executor: CommandExecutor) -> None:
    outcome = run(executor, "ShipOrder", "nope")
    assert outcome.status is Status.rejected and "does not exist" in outcome.reason
    assert executor.store.read_all(0) == []


def test_rejection_is_final_for_its_command_id(executor: CommandExecutor) -> None:
    body = new_command("PayOrder", "o9", {}).to_json()
    first = executor.execute(body)
    again = executor.execute(body)
    assert (first.status, again.status, again.duplicate) == (Status.rejected, Status.rejected, True)


def test_expected_version_mismatch_is_rejected(executor: CommandExecutor) -> None:
    run(executor, "RegisterCustomer", "c1", name="Ann", email="ann@example.com")
    stale = new_command("RenameCustomer", "c1", {"name": "Bo"}, expected_version=0)
    fresh = new_command("RenameCustomer", "c1", {"name": "Bo"}, expected_version=1)
    assert executor.execute(stale.to_json()).status is Status.rejected
    outcome = executor.execute(fresh.to_json())
    assert (outcome.status, outcome.aggregate_version) == (Status.succeeded, 2)


@pytest.mark.parametrize(("name", "make_body", "expected"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_a_precise_outcome_or_a_dead_letter(executor: CommandExecutor, name, make_body, expected) -> None:  # type: ignore[no-untyped-def]
    """G10 and G3: every row of the bad-input table, never a crash, never an event."""
    command_id = f"bad-{uuid.uuid4().hex[:8]}"
    fate, fragment = expected
    if fate == "dead-letter":
        with pytest.raises(BadCommand, match=fragment):
            executor.execute(make_body(command_id))
    else:
        outcome = executor.execute(make_body(command_id))
        assert (outcome.command_id, outcome.status) == (command_id, Status.invalid)
        assert fragment in outcome_text(outcome)
        assert executor.store.outcome(command_id).status is Status.invalid
    assert executor.store.read_all(0) == []


def test_racing_registrations_of_one_email_exactly_one_succeeds(executor: CommandExecutor) -> None:
    """G4: the unique-email claim holds under concurrency (threads on one store)."""
    bodies = [new_command("RegisterCustomer", f"c{i}", {"name": "Ann", "email": "same@example.com"}).to_json()
              for i in range(8)]
    results = []
    threads = [threading.Thread(target=lambda b=b: results.append(executor.execute(b))) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.status.value for o in results) == ["rejected"] * 7 + ["succeeded"]
    assert all("same@example.com" in o.reason for o in results if o.status is Status.rejected)
