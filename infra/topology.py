"""The broker topology of the command side, declared by ``cqrskit setup`` (idempotent).

    producers --(routing key: command type)--> exchange ``cqrskit.commands`` (topic, durable)
        --(binding "#")--> queue ``commands`` (Dramatiq's, quorum by default)
                              dead letters --> ``commands.XQ``; retries via ``commands.DQ``
"""

from __future__ import annotations

import dramatiq

from cqrskit.infra.settings import Settings


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
    """Declare the events exchange (for other systems) and the indexer queue (Dramatiq's)."""
    if settings.embedded_broker:
        broker.declare_queue(settings.indexer_queue)
        return
    broker.declare_queue(settings.indexer_queue, ensure=True)  # type: ignore[call-arg]
    broker.channel.exchange_declare(settings.events_exchange, exchange_type="topic", durable=True)  # type: ignore[attr-defined]
