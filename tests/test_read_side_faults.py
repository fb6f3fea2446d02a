"""The read side as deployed, under faults (G6, G7, G9, G12): command workers, the relay and
indexers as real processes on PostgreSQL, RabbitMQ and osmem. After each fault the pipeline is
drained and ``verify`` must find every read model equal to a fresh projection of the write store
(``Stack.assert_converged``: no missing, extra or different document, nothing parked, no indexer
batch dead-lettered). Tests that freeze or kill the search server run their own osmem.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from osmem_server import OsmemServer

from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.settings import Settings
from cqrskit.producers.commands import new_command
from cqrskit.examples.shop.load import ShopLoad
from cqrskit.read_models.indices import alias, next_alias, physical
from cqrskit.read_models.parking import list_parked
from tests.processes import WorkerProcess
from tests.stack import Stack, unread_request_bytes, wait_until
from cqrskit.infra.broker import index_message, make_broker
from cqrskit.app import bootstrap

pytestmark = pytest.mark.slow
MODELS = ("orders", "products", "customers")
FREEZE_SECONDS = 10.0
Batch = list[dict[str, Any]]


@pytest.fixture
def make_stack(amqp_settings: Settings, tmp_path: Path) -> Iterator[Callable[[str], Stack]]:
    """Builds this test's stack (``cqrskit setup`` done) on a search server URL."""
    stacks: list[Stack] = []

    def make(search_url: str) -> Stack:
        stacks.append(Stack.create(amqp_settings, search_url, tmp_path))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.close()


class SearchServers:
    """osmem servers of one test (to freeze or kill); every one is resumed and closed at the end."""

    def __init__(self) -> None:
        self.started: list[OsmemServer] = []

    def start(self, addr: str | None = None) -> OsmemServer:
        self.started.append(OsmemServer.start(japanese=False, addr=addr))
        return self.started[-1]

    def close(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            server.close()


@pytest.fixture
def own_search() -> Iterator[SearchServers]:
    servers = SearchServers()
    yield servers
    servers.close()


def is_indexed(record: dict[str, Any]) -> bool:
    return record["event"] == "indexer.indexed"


def is_retry(record: dict[str, Any]) -> bool:
    """Dramatiq's Retries middleware scheduling a failed batch again."""
    return record["event"].startswith("Retrying message")


def count(process: WorkerProcess, predicate: Callable[[dict[str, Any]], bool]) -> int:
    return sum(1 for record in process.log_records() if predicate(record))


def bulk_seconds(record: dict[str, Any]) -> float:
    """How long the bulk writes of one indexed window took, from the indexer's own log line
    (``indexer.indexed`` with ``write_ms``; the search client's per-request lines are kept at
    WARNING); 0 for any other line."""
    if record.get("event") != "indexer.indexed":
        return 0.0
    return float(record.get("write_ms") or 0) / 1000


# -- G6: deliveries shuffled and duplicated --------------------------------------------------------
def shuffled_deliveries(events: Batch, rng: random.Random) -> list[Batch]:
    """Batches of 1..40 events, each shuffled; 30% of them delivered twice (the copy shuffled
    anew); every delivery in random order."""
    batches, start = [], 0
    while start < len(events):
        batch = events[start:start + rng.randint(1, 40)]
        batches.append(rng.sample(batch, k=len(batch)))
        start += len(batch)
    copies = [rng.sample(b, k=len(b)) for b in rng.sample(batches, k=round(0.3 * len(batches)))]
    deliveries = batches + copies
    rng.shuffle(deliveries)
    return deliveries


class ShuffledFeed:
    """Executes commands in-process and hands their events to the indexer queue as shuffled,
    duplicated deliveries, holding a fifth of them back for the end (late deliveries)."""

    def __init__(self, stack: Stack, rng: random.Random) -> None:
        self.runtime = bootstrap.runtime(stack.settings)
        self.broker = make_broker(stack.settings)
        self.queue = stack.settings.indexer_queue
        self.broker.declare_queue(self.queue, ensure=True)
        self.rng = rng
        self.statuses: Counter[str] = Counter()
        self.late: list[Batch] = []
        self.delivered = self.after = 0

    def execute(self, envelopes: list[CommandEnvelope]) -> None:
        self.statuses.update(self.runtime.executor.execute(e.to_json()).status.value for e in envelopes)
        stored = self.runtime.store.read_all(self.after, limit=100_000)
        self.after = stored[-1].position
        events = [EventMessage.from_stored(e).model_dump(mode="json") for e in stored]
        deliveries = shuffled_deliveries(events, self.rng)
        cut = len(deliveries) // 5
        self.late += deliveries[:cut]
        self.deliver(deliveries[cut:])

    def deliver(self, batches: list[Batch]) -> None:
        for batch in batches:
            self.broker.enqueue(index_message(batch, self.queue))
            self.delivered += len(batch)

    def close(self) -> None:
        self.broker.close()
        self.runtime.close()


@pytest.mark.timeout(150)
def test_shuffled_and_duplicated_deliveries_converge(make_stack, search_url: str) -> None:
    """Each phase of a shop load is executed, its events cut into batches, shuffled, 30% of the
    batches duplicated, and enqueued for an indexer process (2 threads) while the next phase
    executes; a fifth of each phase's deliveries arrive only after the last phase."""
    stack = make_stack(search_url)
    indexer = stack.start_indexer()
    load = ShopLoad(size=400, seed=5)
    feed = ShuffledFeed(stack, random.Random(20261122))
    try:
        for _name, envelopes in load.phases():
            feed.execute(envelopes)
        feed.deliver(feed.late)
        stack.wait_drained(timeout=90, relay=False)
    finally:
        feed.close()
    expected = Counter(load.expected, succeeded=feed.statuses.total() - load.expected.total())
    assert feed.statuses == expected
    stack.assert_converged()
    indexed = [r for r in indexer.log_records() if is_indexed(r)]
    assert sum(r["events"] for r in indexed) == feed.delivered  # every delivery once, none failed
    # older states were refused: by the search server's version guard (stale) or, before it, by the
    # indexer's coverage of what it already wrote (skipped); which of the two catches them depends
    # on how the deliveries fall into windows
    assert sum(r["stale"] + r["skipped"] for r in indexed) > 0


# -- G6: indexer killed with SIGKILL while busy ------------------------------------------------------
@pytest.mark.timeout(240)
def test_indexer_killed_mid_bulk_converges(make_stack, own_search: SearchServers) -> None:
    """~2,000 commands through the full stack; the indexer is SIGKILLed twice and restarted each
    time: once while it holds batches, once with a bulk request sent and not yet read by the
    search server (stopped for that instant), which applies it after the indexer died: the batch
    is written but not acknowledged, and comes back to the next indexer."""
    server = own_search.start()
    stack = make_stack(server.url)
    stack.start_worker()
    stack.start_relay()
    indexer = stack.start_indexer()
    load = ShopLoad(size=1500, seed=21)
    runner = stack.start_load(load)
    wait_until(lambda: count(indexer, is_indexed) >= 3, 60, "3 batches indexed")
    wait_until(lambda: stack.indexer_backlog() > 0, 60, "a backlog on the indexer queue", poll=0)
    indexer.kill()
    indexer = stack.start_indexer()

    wait_until(lambda: count(indexer, is_indexed) >= 3, 60, "3 batches indexed after the restart")
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        port = urlsplit(server.url).port
        wait_until(lambda: unread_request_bytes(port) > 0, 60, "a bulk request in flight")
        indexer.kill()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    indexer = stack.start_indexer()
    runner.join(timeout=200)
    stack.wait_drained(timeout=150)
    stack.assert_load_outcomes(load, runner.command_ids)
    stack.assert_converged()
    assert count(indexer, is_indexed) > 0


# -- G6: indexer killed with SIGKILL in the middle of a coalesced window ------------------------------
@pytest.mark.timeout(240)
def test_indexer_killed_mid_coalesced_window_converges(make_stack, own_search: SearchServers) -> None:
    """G6 with coalescing: the relay fills the indexer queue with a backlog of batches before any
    indexer runs; the search server is stopped and an indexer (8 threads) starts, projects several
    batches as one window and sends its bulk request, which the stopped server has not read when
    the indexer is SIGKILLed. None of the window's batches was acknowledged: they come back to the
    next indexer, the server applies the dead indexer's request on resuming, and the read models
    converge (external versions settle the overlap)."""
    server = own_search.start()
    stack = make_stack(server.url)
    stack.start_worker()
    stack.start_relay()
    load = ShopLoad(size=600, seed=41)
    stack.start_load(load).join(timeout=180)
    wait_until(lambda: stack.indexer_backlog() >= 4, 60, "a backlog of batches on the indexer queue")
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        indexer = stack.start_indexer(threads=8)
        coalesced = indexer.wait_for_log(lambda r: r["event"] == "indexer.coalesced", timeout=60)
        port = urlsplit(server.url).port
        wait_until(lambda: unread_request_bytes(port) > 0, 60, "a bulk request in flight")
        indexer.kill()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert coalesced[0]["batches"] >= 2
    assert count(indexer, is_indexed) == 0  # nothing was acknowledged before the kill
    indexer = stack.start_indexer(threads=8)
    stack.wait_drained(timeout=150)
    stack.assert_converged()
    assert count(indexer, is_indexed) > 0


# -- G6: search server frozen (SIGSTOP) for 10 s under load -----------------------------------------
@pytest.mark.timeout(210)
def test_search_server_frozen_under_load_converges(make_stack, own_search: SearchServers) -> None:
    """Commands and the relay keep flowing while osmem is stopped; after SIGCONT the indexer's
    backlog drains, nothing parked, nothing dead-lettered."""
    server = own_search.start()
    stack = make_stack(server.url)
    stack.start_worker()
    relay = stack.start_relay()
    indexer = stack.start_indexer()
    load = ShopLoad(size=800, seed=31)
    runner = stack.start_load(load)
    indexer.wait_for_log(is_indexed, count=2, timeout=60)
    published = lambda r: r["event"] == "relay.published"  # noqa: E731
    flow = lambda: (stack.write_store.count_outcomes(), count(relay, published))  # noqa: E731
    before = flow()
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        time.sleep(FREEZE_SECONDS)  # the fault itself lasts this long; nothing waits on it
        during = flow()
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert during[0] > before[0] and during[1] > before[1], (before, during)
    runner.join(timeout=180)
    stack.wait_drained(timeout=120)
    stack.assert_load_outcomes(load, runner.command_ids)
    stack.assert_converged()
    # The bulk requests in flight when the server stopped either timed out and their batches
    # were retried, or waited for the server to resume (the client's timeout is 30 s).
    assert count(indexer, is_retry) or count(indexer, lambda r: bulk_seconds(r) >= FREEZE_SECONDS - 1)


# -- G6: search server killed and restarted empty, then rebuilt -------------------------------------
@pytest.mark.timeout(240)
def test_search_server_restarted_empty_then_rebuild_converges(make_stack, own_search: SearchServers) -> None:
    """osmem is SIGKILLed under load and restarted empty on the same port: the indexer's writes
    fail (aliases gone; ``require_alias`` creates nothing) and are retried; ``cqrskit rebuild``
    of each model, with no ``setup`` before, recreates the indices and the backlog drains."""
    server = own_search.start()
    stack = make_stack(server.url)
    stack.start_worker()
    stack.start_relay()
    indexer = stack.start_indexer()
    load = ShopLoad(size=800, seed=41)
    runner = stack.start_load(load)
    indexer.wait_for_log(is_indexed, count=2, timeout=60)
    server.process.kill()
    server.process.wait(timeout=10)
    assert own_search.start(addr=f"127.0.0.1:{urlsplit(server.url).port}").url == server.url
    indexer.wait_for_log(lambda r: "TransientIndexError" in str(r), timeout=60)  # 404: no such alias
    indexer.wait_for_log(is_retry, timeout=60)
    prefix = stack.settings.index_prefix
    assert stack.es.indices.get(index=f"{prefix}-*") == {}  # no index created by a write
    for model in MODELS:
        result = stack.cli("rebuild", model)
        assert result.returncode == 0, result.stdout + result.stderr
    runner.join(timeout=180)
    stack.wait_drained(timeout=120)
    stack.assert_load_outcomes(load, runner.command_ids)
    stack.assert_converged()
    for model in MODELS:
        assert stack.live_indices(model) == {physical(prefix, model, 2)}


# -- G7: a document the index refuses is parked; `cqrskit parked` shows and retries it -------------
NESTED_LIMIT = "index.mapping.nested_objects.limit"


def shop_with_poison_order(stack: Stack, relay: WorkerProcess, tag: str) -> tuple[set[str], str]:
    """A customer and six products, indexed; then the orders index limited to 5 nested objects
    per document and five orders committed while the relay is stopped, so that they are relayed
    as one batch: four with 1 or 2 lines, and a poison one with 6 lines. Returns the orders'
    command ids and the poison order's id."""
    skus = [f"SKU-{tag}-{i}" for i in range(6)]
    customer = {"name": "Grace Hopper", "email": f"{tag}@example.com"}
    catalogue = [new_command("RegisterCustomer", f"{tag}-c", customer)]
    catalogue += [new_command("AddProduct", f"{tag}-p{i}", {"sku": sku, "name": f"Mug {i}",
                                                            "price_cents": 250, "stock": 100})
                  for i, sku in enumerate(skus)]
    stack.send_and_wait(catalogue)
    stack.wait_drained(timeout=60)
    orders_alias = alias(stack.settings.index_prefix, "orders")
    stack.es.indices.put_settings(index=orders_alias, settings={NESTED_LIMIT: 5})
    stack.stop(relay)
    lines = {f"{tag}-o1": 1, f"{tag}-o2": 2, f"{tag}-poison": 6, f"{tag}-o4": 1, f"{tag}-o5": 2}
    orders = [new_command("PlaceOrder", order_id, {"customer_id": f"{tag}-c", "lines": [
        {"sku": sku, "quantity": 1} for sku in skus[:n]]}) for order_id, n in lines.items()]
    return set(stack.send_and_wait(orders)), f"{tag}-poison"


def squeeze(text: str) -> str:
    """Text without whitespace (the CLI's console wraps long lines)."""
    return re.sub(r"\s+", "", text)


@pytest.mark.timeout(120)
def test_unindexable_order_is_parked_and_retried_through_the_cli(make_stack, search_url: str) -> None:
    """An order the server refuses (mapper_parsing_exception: too many nested objects for a
    limit an operator lowered) is parked with its error while the rest of its batch lands and
    later commands flow on; ``cqrskit parked list|show`` show it, ``parked retry`` parks it again
    until the limit is restored, then writes it and removes the entry."""
    stack = make_stack(search_url)
    stack.start_worker()
    indexer = stack.start_indexer()
    tag = uuid.uuid4().hex[:8]
    order_commands, poison = shop_with_poison_order(stack, stack.start_relay(), tag)
    stack.start_relay()
    (batch,) = indexer.wait_for_log(lambda r: is_indexed(r) and r["parked"] > 0, timeout=30)
    assert order_commands <= set(batch["command_ids"]) and batch["parked"] == 1
    reports = {r.read_model: r for r in stack.verify()}
    assert reports["orders"].missing == [poison] and not reports["orders"].different
    assert reports["products"].ok and reports["customers"].ok

    (row,) = list_parked(stack.write_store.engine)
    listed = stack.cli("parked", "list").stdout
    cells = [c.strip() for c in next(line for line in listed.splitlines() if poison in line).split("│")[1:-1]]
    assert cells[:3] == [str(row["id"]), "orders", poison] and "mapper_parsing_exception" in cells[-1], listed
    shown = stack.cli("parked", "show", str(row["id"])).stdout
    assert "exceeded the allowed limit of [5]" in shown, shown
    assert squeeze(str(row["positions"])) in squeeze(shown), shown

    orders_alias = alias(stack.settings.index_prefix, "orders")
    stack.send_and_wait([new_command("PayOrder", f"{tag}-o1", {})])
    stack.wait_drained(timeout=60)
    assert stack.es.get(index=orders_alias, id=f"{tag}-o1")["_source"]["status"] == "paid"
    unfixed = stack.cli("parked", "retry", str(row["id"]))
    assert unfixed.returncode == 1 and "1 parked again" in unfixed.stdout, unfixed.stdout

    stack.es.indices.put_settings(index=orders_alias, settings={NESTED_LIMIT: 10_000})
    fixed = stack.cli("parked", "retry", str(row["id"]))
    assert fixed.returncode == 0 and "retried 1: 1 written, 0 parked again" in fixed.stdout, fixed.stdout
    assert "nothing parked" in stack.cli("parked", "list").stdout
    assert stack.cli("verify").returncode == 0
    stack.assert_converged()
    assert len(stack.es.get(index=orders_alias, id=poison)["_source"]["lines"]) == 6


# -- G9: rebuild while commands flow ----------------------------------------------------------------
def assert_rebuilt(stack: Stack, output: str, generation: int) -> None:
    prefix = stack.settings.index_prefix
    assert f"into {physical(prefix, 'orders', generation)}" in output, output
    assert f"replaced {physical(prefix, 'orders', generation - 1)}" in output, output


@pytest.mark.timeout(300)
def test_rebuild_during_a_load_of_5000_commands_loses_nothing(make_stack, search_url: str) -> None:
    """``cqrskit rebuild orders`` while ~5,000 commands flow through the full stack: once while
    orders are being placed, once while they are shipped (the last phase, so that no later
    command repairs what a rebuild might lose: the load waits until that rebuild has begun).
    Afterwards every read model equals the write store and the live alias points to the newest
    index; the older ones are gone."""
    stack = make_stack(search_url)
    stack.start_worker()
    stack.start_relay()
    stack.start_indexer()
    outcomes = stack.write_store.count_outcomes
    runner = stack.start_load(load := ShopLoad(size=3800, seed=61), timeout=240, hold_before="shipping")
    wait_until(lambda: "catalogue" in runner.phases_done and outcomes() > 1500, 120, "orders being placed")
    before = outcomes()
    first = stack.cli("rebuild", "orders")
    assert first.returncode == 0 and outcomes() > before, first.stdout + first.stderr
    assert_rebuilt(stack, first.stdout, 2)

    assert runner.holding.wait(240), "the load never reached its shipping phase"
    second, output = stack.start_cli("rebuild", "orders")
    wait_until(lambda: stack.es.indices.exists_alias(name=next_alias(stack.settings.index_prefix, "orders")),
               60, "the second rebuild to begin")
    released = outcomes()
    runner.release()
    assert second.wait(timeout=120) == 0, output.read_text()
    assert outcomes() > released, "orders must be shipped during the second rebuild"
    assert_rebuilt(stack, output.read_text(), 3)
    runner.join(timeout=240)
    assert len(runner.command_ids) > 4800
    stack.wait_drained(timeout=180)
    stack.assert_load_outcomes(load, runner.command_ids)
    stack.assert_converged()
    prefix = stack.settings.index_prefix
    assert stack.live_indices("orders") == {physical(prefix, "orders", 3)}
    assert not stack.es.indices.exists(index=[physical(prefix, "orders", 1), physical(prefix, "orders", 2)])


# -- G12: one command followed through the logs ------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_command_id_is_in_the_logs_of_worker_relay_and_indexer(make_stack, search_url: str) -> None:
    stack = make_stack(search_url)
    worker, relay, indexer = stack.start_worker(), stack.start_relay(), stack.start_indexer()
    command = new_command("RegisterCustomer", f"c-{uuid.uuid4().hex[:8]}",
                          {"name": "Ada Lovelace", "email": f"{uuid.uuid4().hex[:8]}@example.com"},
                          correlation_id="g12-flow")
    stack.send_and_wait([command], timeout=30)
    mine = lambda r: command.command_id in (r.get("command_ids") or [r.get("command_id")])  # noqa: E731
    (indexed,) = indexer.wait_for_log(lambda r: is_indexed(r) and mine(r), timeout=30)
    (published,) = [r for r in relay.log_records() if r["event"] == "relay.published" and mine(r)]
    executed = [r for r in worker.log_records() if mine(r)]
    assert [r["event"] for r in executed] == ["command.succeeded"]
    assert executed[0]["correlation_id"] == "g12-flow" and executed[0]["type"] == "RegisterCustomer"
    assert indexed["written"] == indexed["documents"] == 1 and published["count"] == 1
    stack.wait_drained(timeout=30)
    stack.assert_converged()
