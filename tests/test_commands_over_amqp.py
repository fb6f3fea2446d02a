"""Commands over RabbitMQ to real worker processes, published as another system would: plain pika
following only the documented contract (docs/commands.md). Outcomes (G3), bad input (G10), and
Dramatiq-shaped bodies forged by a producer (G10, G11)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator

import pika
import pytest

from cqrskit.infra.outcomes import Status
from cqrskit.infra.settings import Settings
from tests.bad_inputs import BAD_INPUTS, outcome_text
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

FLOW = "flow-42"


def flow(type: str, aggregate_id: str, **payload: object) -> dict:
    command = envelope(type, aggregate_id, payload)
    command["metadata"]["correlation_id"] = FLOW
    return command


def publish_and_wait(publisher: PikaProducer, store: WriteStore, *commands: dict) -> list:
    ids = publisher.publish_all(commands)
    found = store.wait_for_outcomes(ids, timeout=30)
    return [found[i] for i in ids]


@pytest.mark.timeout(60)
def test_a_shop_flow_gets_outcomes_with_versions_positions_and_reasons(
    workers: Workers, write_store: WriteStore
) -> None:
    """A producer publishes each phase once the previous one has its outcomes."""
    worker = workers.start(threads=2)
    with producer(workers.settings) as publisher:
        customer, mug, tee = publish_and_wait(
            publisher,
            write_store,
            flow("RegisterCustomer", "c-ann", name="Ann", email="Ann@Example.com"),
            flow("AddProduct", "p-mug", sku="MUG-1", name="Mug", price_cents=1250, stock=10),
            flow("AddProduct", "p-tee", sku="TEE-1", name="Tee", price_cents=2000, stock=1),
        )
        placed, placed_unpaid = publish_and_wait(
            publisher,
            write_store,
            flow(
                "PlaceOrder",
                "o-1",
                customer_id="c-ann",
                lines=[{"sku": "MUG-1", "quantity": 2}, {"sku": "TEE-1", "quantity": 1}],
            ),
            flow("PlaceOrder", "o-2", customer_id="c-ann", lines=[{"sku": "MUG-1", "quantity": 1}]),
        )
        paid, unpaid_ship, short = publish_and_wait(
            publisher,
            write_store,
            flow("PayOrder", "o-1"),
            flow("ShipOrder", "o-2"),
            flow("PlaceOrder", "o-3", customer_id="c-ann", lines=[{"sku": "MUG-1", "quantity": 99}]),
        )
        (shipped,) = publish_and_wait(publisher, write_store, flow("ShipOrder", "o-1"))

    succeeded = [customer, mug, tee, placed, placed_unpaid, paid, shipped]
    assert {o.status for o in succeeded} == {Status.succeeded}, [o.reason for o in succeeded]
    assert [o.aggregate_version for o in (customer, mug, placed, paid, shipped)] == [1, 1, 1, 2, 3]
    assert len(placed.positions) == 3  # OrderPlaced + StockReserved on each of two products
    everything = [p for o in succeeded for p in o.positions]
    assert len(everything) == len(set(everything)) == 10
    assert [o.positions[0] for o in (placed, paid, shipped)] == sorted(
        o.positions[0] for o in (placed, paid, shipped)
    )
    recorded = {e.position: e for e in write_store.store.read_all(0)}
    assert sorted(recorded) == sorted(everything)
    assert [recorded[p].type for p in placed.positions] == ["OrderPlaced", "StockReserved", "StockReserved"]
    assert recorded[shipped.positions[0]].type == "OrderShipped"
    assert recorded[customer.positions[0]].data["email"] == "ann@example.com"
    assert {e.metadata["correlation_id"] for e in recorded.values()} == {FLOW}
    assert all(o.correlation_id == FLOW for o in succeeded + [short, unpaid_ship])

    assert (short.status, unpaid_ship.status) == (Status.rejected, Status.rejected)
    assert short.reason == "not enough stock for sku MUG-1: 7 in stock, 99 asked"
    assert "unpaid order o-2" in unpaid_ship.reason
    assert short.positions == unpaid_ship.positions == [] and short.aggregate_version is None

    logged = worker.wait_for_log(lambda r: r["event"] == "command.rejected", count=2)
    assert {r["command_id"] for r in logged} == {short.command_id, unpaid_ship.command_id}
    assert all(r["correlation_id"] == FLOW for r in logged)


@pytest.mark.timeout(90)
def test_every_bad_input_gets_an_invalid_outcome_or_a_dead_letter_and_the_worker_carries_on(
    workers: Workers, write_store: WriteStore
) -> None:
    """G3/G10: each row of the bad-input table, over the wire; then a good command still runs."""
    settings = workers.settings
    rows = [
        (name, f"bad-{index}-{uuid.uuid4().hex[:8]}", make_body, fate)
        for index, (name, make_body, fate) in enumerate(BAD_INPUTS)
    ]
    bodies = {name: make_body(command_id) for name, command_id, make_body, _ in rows}
    assert len(bodies["oversized"]) > settings.max_command_bytes
    worker = workers.start(threads=2)
    with producer(settings) as publisher:
        for name, command_id, _make, _fate in rows:
            publisher.publish_bytes(bodies[name], "RegisterCustomer", message_id=command_id)
        good = publisher.publish(
            envelope("RegisterCustomer", "c-good", {"name": "Gil", "email": "gil@example.com"})
        )

    invalid = [(name, cid, fragment) for name, cid, _m, (fate, fragment) in rows if fate == "invalid"]
    dead = [(name, fragment) for name, _c, _m, (fate, fragment) in rows if fate == "dead-letter"]
    outcomes = write_store.wait_for_outcomes([cid for _n, cid, _f in invalid] + [good], timeout=30)
    assert outcomes[good].status is Status.succeeded
    for name, command_id, fragment in invalid:
        outcome = outcomes[command_id]
        assert outcome.status is Status.invalid, name
        assert fragment in outcome_text(outcome), (name, outcome_text(outcome))

    parked = wait_for_dead_letters(settings.broker_url, f"{settings.commands_queue}.XQ", len(dead))
    assert sorted(parked) == sorted(bodies[name] for name, _f in dead)
    logged = worker.wait_for_log(lambda r: r["event"] == "command.dead_lettered", count=len(dead))
    for name, fragment in dead:
        assert any(r["body_bytes"] == len(bodies[name]) and fragment in r["reason"] for r in logged), name

    assert worker.alive
    records = worker.log_records()
    assert not [r for r in records if "Retrying" in r["event"] or "unhandled exception" in r["event"]]
    assert len([r for r in records if r["event"] == "command.invalid"]) == len(invalid)
    assert write_store.count_outcomes() == len(invalid) + 1
    assert set(write_store.events_by_command()) == {good}


# -- Dramatiq-shaped bodies forged by a producer ------------------------------------------------
def forged(
    settings: Settings,
    victim: str,
    *,
    actor: str = "execute_command",
    queue: str | None = None,
    args: list | None = None,
    options: dict | None = None,
) -> bytes:
    """A body shaped like a Dramatiq message (what the workers' own retries look like on the wire)."""
    command = envelope(
        "RegisterCustomer", f"c-{uuid.uuid4().hex[:8]}", {"name": "Eve", "email": "eve@example.com"}
    )
    return json.dumps(
        {
            "queue_name": queue or settings.commands_queue,
            "actor_name": actor,
            "args": [base64.b64encode(json.dumps(command).encode()).decode()] if args is None else args,
            "kwargs": {},
            "options": options or {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": 0,
        }
    ).encode()


def pipe_target(victim: str) -> dict:
    return {
        "queue_name": victim,
        "actor_name": "index_documents",
        "args": ["anything"],
        "kwargs": {},
        "options": {},
        "message_id": "m-1",
        "message_timestamp": 0,
    }


# What a producer could make a worker do if it honoured the forged fields, as Dramatiq does:
FORGERIES = {
    # ...run another actor of the process (Dramatiq would look it up by name):
    "another actor": lambda settings, victim: forged(settings, victim, actor="os_system", args=["rm -rf /"]),
    # ...reach the indexer's actor, which the command workers' encoder lets through (then Dramatiq
    # parks it as an undefined actor, without the command.dead_lettered line):
    "indexer actor": lambda settings, victim: forged(settings, victim, actor="index_events", args=[[]]),
    # ...kill the worker thread: Dramatiq acks through ``consumers[message.queue_name]``, a KeyError
    # for a queue it does not consume, raised in the thread's ``finally``; the message stays unacked:
    "queue not consumed": lambda settings, victim: forged(settings, victim, queue=victim),
    # ...declare a queue of its choosing and publish into it with the worker's rights (Pipelines):
    "pipe target": lambda settings, victim: forged(
        settings, victim, options={"pipe_target": pipe_target(victim)}
    ),
    # ...hold the message unacked until the year 5138, filling the consumer's prefetch (2 x threads):
    "far-future eta": lambda settings, victim: forged(settings, victim, options={"eta": 10**14}),
    # ...be retried as if the broker or the store had failed (TypeError in the actor):
    "args not a body": lambda settings, victim: forged(settings, victim, args=[123]),
}


@pytest.fixture
def victim_queue(amqp_settings: Settings) -> Iterator[str]:
    """A queue name the forgeries aim at; whatever a worker declared under it is deleted after."""
    name = f"{amqp_settings.commands_queue}.victim"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    channel = connection.channel()
    for queue in (name, f"{name}.DQ", f"{name}.XQ"):
        channel.queue_delete(queue)
    connection.close()


def queue_exists(url: str, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_dramatiq_message_is_a_bad_command_and_steers_nothing(
    workers: Workers, write_store: WriteStore, victim_queue: str, forgery: str
) -> None:
    """G10/G11: producers publish command envelopes, nothing else. A body shaped like a Dramatiq
    message but not one of the workers' own retries is a bad command: dead-lettered as published,
    logged, never retried, never run, and the commands after it run."""
    settings = workers.settings
    threads = 2
    bodies = [FORGERIES[forgery](settings, victim_queue) for _ in range(2 * threads)]
    worker = workers.start(threads=threads)
    with producer(settings) as publisher:
        for body in bodies:
            publisher.publish_bytes(body, "RegisterCustomer")
        sentinel = publisher.publish(
            envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "a@example.com"})
        )

    assert write_store.wait_for_outcomes([sentinel], timeout=15)[sentinel].status is Status.succeeded
    parked = wait_for_dead_letters(
        settings.broker_url, f"{settings.commands_queue}.XQ", len(bodies), timeout=15
    )
    assert sorted(parked) == sorted(bodies)
    worker.wait_for_log(lambda r: r["event"] == "command.dead_lettered", count=len(bodies), timeout=10)
    assert not [r for r in worker.log_records() if r["event"].startswith("Retrying")]
    assert write_store.count_outcomes() == 1 and set(write_store.events_by_command()) == {sentinel}
    assert not queue_exists(settings.broker_url, victim_queue)
    assert not queue_exists(settings.broker_url, f"{victim_queue}.DQ")
    assert worker.alive
