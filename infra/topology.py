"""The broker topology, declared by ``cqrskit setup`` (idempotent).

    producers --(routing key: command type)--> exchange ``cqrskit.commands`` (topic, durable)
        --(binding "#")--> queue ``commands`` (Dramatiq's, quorum by default)
                              dead letters --> ``commands.XQ``; retries via ``commands.DQ``

    relay --> exchange ``cqrskit.events`` (topic, durable: other systems bind their queues)
          --> indexer queue of every partition: ``indexer`` (partition 0), ``indexer.p1``, ...
              (``CQRSKIT_INDEXER_PARTITIONS``; each with its ``.DQ`` and ``.XQ``)
"""

from __future__ import annotations

from typing import NamedTuple

import dramatiq

from cqrskit.infra.broker import INDEX_ACTOR
from cqrskit.infra.settings import Settings


class IndexerPartition(NamedTuple):
    index: int
    queue: str
    actor: str  # the Dramatiq actor of that queue (one actor per queue)


def indexer_partitions(settings: Settings) -> list[IndexerPartition]:
    """Every partition's queue and actor. Partition 0 keeps the plain names (``indexer``,
    ``index_events``), so that one partition is the topology of before partitions."""
    return [IndexerPartition(p, settings.indexer_queue if p == 0 else f"{settings.indexer_queue}.p{p}",
                             INDEX_ACTOR if p == 0 else f"{INDEX_ACTOR}_p{p}")
            for p in range(settings.indexer_partitions)]


def indexer_queues(settings: Settings, partitions: list[int] | None = None) -> list[str]:
    """The queues an indexer of ``partitions`` (default: all) consumes: each one and its delay queue."""
    chosen = [p for p in indexer_partitions(settings) if partitions is None or p.index in partitions]
    return [name for p in chosen for name in (p.queue, f"{p.queue}.DQ")]


def declare_command_topology(broker: dramatiq.Broker, settings: Settings) -> None:
    """Declare the commands exchange and Dramatiq's queues, and bind them. No-op in memory."""
    if settings.embedded_broker:
        broker.declare_queue(settings.commands_queue)
        return
    broker.declare_queue(settings.commands_queue, ensure=True)  # type: ignore[call-arg]
    channel = broker.channel  # type: ignore[attr-defined]
    channel.exchange_declare(settings.commands_exchange, exchange_type="topic", durable=True)
    channel.queue_bind(settings.commands_queue, settings.commands_exchange, routing_key="#")


def declare_read_side_topology(broker: dramatiq.Broker, settings: Settings) -> None:
    """Declare the events exchange (for other systems) and every partition's indexer queue (Dramatiq's)."""
    for partition in indexer_partitions(settings):
        if settings.embedded_broker:
            broker.declare_queue(partition.queue)
        else:
            broker.declare_queue(partition.queue, ensure=True)  # type: ignore[call-arg]
    if not settings.embedded_broker:
        broker.channel.exchange_declare(settings.events_exchange, exchange_type="topic", durable=True)  # type: ignore[attr-defined]
