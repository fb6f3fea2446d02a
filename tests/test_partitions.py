"""Indexer partitions: each document is computed by the indexers of its home partition only, and
the read models converge whatever the partitions (G6). On real PostgreSQL, RabbitMQ and osmem."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from cqrskit.examples.shop.load import ShopLoad
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.infra.topology import indexer_partitions, indexer_queues
from cqrskit.read_models.indexer import Indexer
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.partitions import Partition, home
from cqrskit.read_models.search import make_client
from cqrskit.read_models.verify import verify
from cqrskit.workers.execution import CommandExecutor
from tests.stack import Stack


def test_a_home_is_stable_balanced_and_few_documents_move_when_partitions_grow() -> None:
    """The same stream id has the same home in every process; homes spread evenly; from 3 to 4
    partitions about a quarter of the documents move, all of them to the new partition."""
    ids = [f"order:o-{i}" for i in range(20_000)]
    three = [home(i, 3) for i in ids]
    four = [home(i, 4) for i in ids]
    assert three == [home(i, 3) for i in ids] and {home(i, 1) for i in ids} == {0}
    assert all(abs(n - len(ids) / 3) < 0.03 * len(ids) for n in Counter(three).values())
    moved = [(a, b) for a, b in zip(three, four, strict=True) if a != b]
    assert 0.22 < len(moved) / len(ids) < 0.28 and {b for _, b in moved} == {3}
    assert Partition(1, 2).owns("order:o-1") != Partition(0, 2).owns("order:o-1")
    with pytest.raises(ValueError):
        Partition(2, 2)


def test_partition_queues_keep_the_plain_names_for_partition_zero() -> None:
    settings = Settings(indexer_queue="ix", indexer_partitions=3)
    assert [(p.queue, p.actor) for p in indexer_partitions(settings)] == [
        ("ix", "index_events"), ("ix.p1", "index_events_p1"), ("ix.p2", "index_events_p2")]
    assert indexer_queues(settings, [2]) == ["ix.p2", "ix.p2.DQ"]


@pytest.fixture
def es(search_url: str) -> Iterator[Elasticsearch]:
    client = make_client(search_url)
    yield client
    client.close()


def test_two_partitions_compute_every_document_once_and_converge(
        pg_store: EventStore, es: Elasticsearch, index_prefix: str) -> None:
    """G6: two indexers, one per partition, each given every batch (as the relay feeds them):
    together they compute each touched document exactly once, and the read models equal a fresh
    projection of the write store."""
    for model in SHOP_READ_MODELS:
        ensure(es, pg_store.engine, index_prefix, model)
    executor = CommandExecutor(pg_store, pg_store.registry)
    load = ShopLoad(size=300, seed=11)
    for envelope in [e for _, phase in load.phases() for e in phase]:
        executor.execute(envelope.to_json())
    events = [EventMessage.from_stored(e).model_dump(mode="json") for e in pg_store.read_all(0, limit=100_000)]
    batches = [events[i:i + 50] for i in range(0, len(events), 50)]
    indexers = [Indexer(pg_store.engine, pg_store.registry, es, index_prefix, SHOP_READ_MODELS) for _ in range(2)]
    computed = [sum(ix.index_batches([b], Partition(p, 2)).documents for b in batches)
                for p, ix in enumerate(indexers)]
    alone = Indexer(pg_store.engine, pg_store.registry, es, index_prefix, SHOP_READ_MODELS)
    unpartitioned = sum(alone.index_events(b).documents for b in batches)
    assert all(n > 0 for n in computed) and sum(computed) == unpartitioned
    for model in SHOP_READ_MODELS:
        report = verify(pg_store.engine, pg_store.registry, es, index_prefix, model)
        assert report.ok, report


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_indexer_processes_on_their_partitions_converge(
        amqp_settings: Settings, search_url: str, tmp_path: Path) -> None:
    """G6 with the indexer queue partitioned: the relay feeds both partitions, one indexer process
    consumes each, the pipeline drains and every read model equals the write store; each process
    computed documents, and together no more than one process alone would."""
    settings = amqp_settings.model_copy(update={"indexer_partitions": 2})
    stack = Stack.create(settings, search_url, tmp_path)
    try:
        indexers = [stack.start_indexer(threads=4, partitions=[p]) for p in (0, 1)]
        stack.start_relay()
        stack.start_worker()
        load = ShopLoad(size=400, seed=23)
        stack.start_load(load).join(timeout=180)
        stack.wait_drained(timeout=150)
        stack.assert_converged()
        computed = [sum(r.get("documents", 0) for r in p.log_records() if r["event"] == "indexer.indexed")
                    for p in indexers]
        assert all(n > 0 for n in computed), computed
    finally:
        stack.close()


def test_status_counts_every_partition_queue(amqp_settings: Settings) -> None:
    """G12: with three partitions, ``cqrskit status`` inspects every partition's queues; the
    indexer workers are those of the least-served partition (0 here: partition 2 has no
    consumer) and the indexer's dead letters are summed over the partitions."""
    import pika

    from cqrskit.app.status import gather_status
    from cqrskit.infra.topology import indexer_partitions

    settings = amqp_settings.model_copy(update={"indexer_partitions": 3, "elasticsearch_url": "http://127.0.0.1:1"})
    queues = [p.queue for p in indexer_partitions(settings)]
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_declare(name, durable=True)
        channel.basic_publish("", f"{queues[1]}.XQ", b"{}")
        channel.basic_publish("", f"{queues[2]}.XQ", b"{}")
        consumers = connection.channel()
        for queue in queues[:2]:
            consumers.basic_consume(queue, lambda *_: None)
        status = gather_status(settings, models=[])
        assert {role: q.name for role, q in status.queues.items() if role.startswith("indexer")} == {
            "indexer": queues[0], "indexer.DQ": f"{queues[0]}.DQ", "indexer.XQ": f"{queues[0]}.XQ",
            "indexer.p1": queues[1], "indexer.p1.DQ": f"{queues[1]}.DQ", "indexer.p1.XQ": f"{queues[1]}.XQ",
            "indexer.p2": queues[2], "indexer.p2.DQ": f"{queues[2]}.DQ", "indexer.p2.XQ": f"{queues[2]}.XQ"}
        assert [status.queues[r].consumers for r in ("indexer", "indexer.p1", "indexer.p2")] == [1, 1, 0]
        assert status.workers.indexer == 0
        assert status.dead_letters["indexer"] == 2
        consumers.basic_consume(queues[2], lambda *_: None)
        assert gather_status(settings, models=[]).workers.indexer == 1
    finally:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
        connection.close()
