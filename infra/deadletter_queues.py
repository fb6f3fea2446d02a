"""Dead-letter queues (``<queue>.XQ``) that outlive a node and a week (G3).

Dramatiq declares each ``.XQ`` as a classic queue with a 7-day message TTL: its messages live on
one node of a cluster, are gone with it, and expire after a week, while ``cqrskit dlq retry``
needs their bodies. With quorum queues (``CQRSKIT_QUEUE_TYPE=quorum``, the default) cqrskit
declares every ``.XQ`` as a quorum queue with no TTL and no delivery limit (listing dead letters
must never park them): replicated on a majority of the nodes, kept until an operator retries or
purges them.

A queue's type cannot change in place. A classic ``.XQ`` left by an older cqrskit is used as it
is by the workers (one warning) until ``cqrskit setup`` moves it (``move_to_quorum``), keeping
every message and its headers:

1. its messages are moved, each confirmed before it is acknowledged, into ``<name>.moving``
   (a quorum queue);
2. the classic queue is deleted (only if empty: a message that came meanwhile is moved first),
   and declared again as a quorum queue;
3. the messages are moved back, and ``<name>.moving`` (which only a move writes to) is deleted.

A move interrupted at any point is finished by the next ``setup``; an interruption between a
confirm and its acknowledgement leaves one message in both queues (a dead letter shown twice;
retrying it twice takes effect once, G2). While ``.XQ`` does not exist RabbitMQ would drop the
dead letters of its queue, so the move refuses to start while that queue has consumers.
"""

from __future__ import annotations

from typing import Any

import pika
import structlog
from pika.adapters.blocking_connection import BlockingChannel

log = structlog.get_logger(__name__)
QUORUM = {"x-queue-type": "quorum"}
PRECONDITION_FAILED, NOT_FOUND = 406, 404


class QueueInUse(Exception):
    """A classic ``.XQ`` cannot be moved while the queue it serves is consumed."""


def declare_dead_letter_queue(broker: Any, name: str) -> Any:
    """Declare ``name`` as a quorum dead-letter queue on a Dramatiq broker's channel; a classic
    one already there is kept (passively declared, with a warning). Returns the declare-ok."""
    try:
        return broker.channel.queue_declare(queue=name, durable=True, arguments=QUORUM)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
        del broker.channel
    log.warning("dead_letter_queue.classic", queue=name,
                fix="run cqrskit setup with the command workers stopped: it moves the queue to a quorum queue")
    return broker.channel.queue_declare(queue=name, passive=True)


def move_to_quorum(connection: pika.BlockingConnection, name: str, served: list[str]) -> int | None:
    """Make ``name`` a quorum queue, moving the messages of a classic one (see the module
    docstring). ``served``: the queues dead-lettering into it, which must have no consumer
    while it moves. Returns how many messages were moved, None when it was a quorum queue
    already (or new). Raises ``QueueInUse``, pika's AMQPError."""
    holding = f"{name}.moving"
    moved = 0
    if _is_quorum_or_new(connection, name):
        if not _exists(connection, holding):
            return None
    else:
        busy = {queue: consumers for queue in served if (consumers := _consumers(connection, queue))}
        if busy:
            raise QueueInUse(f"the dead-letter queue {name} is a classic queue, moved to a quorum queue only while "
                             f"nothing consumes {', '.join(f'{q} ({n} consumers)' for q, n in busy.items())}")
        _declare_quorum(connection, holding)
        moved += _move(connection, name, holding)
        while not _delete_if_empty(connection, name):
            moved += _move(connection, name, holding)
        _declare_quorum(connection, name)
    _move(connection, holding, name)
    _delete(connection, holding)  # nothing but a move writes to it (a quorum queue has no if-empty delete)
    return moved


def _is_quorum_or_new(connection: pika.BlockingConnection, name: str) -> bool:
    with _channel(connection) as channel:
        try:
            channel.queue_declare(queue=name, durable=True, arguments=QUORUM)
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            return False


def _declare_quorum(connection: pika.BlockingConnection, name: str) -> None:
    with _channel(connection) as channel:
        channel.queue_declare(queue=name, durable=True, arguments=QUORUM)


def _exists(connection: pika.BlockingConnection, name: str) -> bool:
    return _consumers(connection, name, missing=-1) >= 0


def _consumers(connection: pika.BlockingConnection, name: str, missing: int = 0) -> int:
    with _channel(connection) as channel:
        try:
            return int(channel.queue_declare(queue=name, passive=True).method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            return missing


def _move(connection: pika.BlockingConnection, source: str, target: str) -> int:
    """Every message of ``source`` into ``target`` (default exchange, confirmed, then acked)."""
    moved = 0
    with _channel(connection) as channel:
        channel.confirm_delivery()
        while True:
            method, properties, body = channel.basic_get(source, auto_ack=False)
            if method is None:
                return moved
            if properties.headers:  # the count of the queue it leaves, not of the dead letter
                properties.headers.pop("x-delivery-count", None)
            channel.basic_publish("", target, body, properties, mandatory=True)
            channel.basic_ack(method.delivery_tag)
            moved += 1


def _delete(connection: pika.BlockingConnection, name: str) -> None:
    with _channel(connection) as channel:
        channel.queue_delete(queue=name)


def _delete_if_empty(connection: pika.BlockingConnection, name: str) -> bool:
    with _channel(connection) as channel:
        try:
            channel.queue_delete(queue=name, if_empty=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:  # not empty: a message arrived meanwhile
                raise
            return False


class _channel:
    """A channel of ``connection`` for one step, closed after it (the broker closes it on an error)."""

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection

    def __enter__(self) -> BlockingChannel:
        self.channel = self.connection.channel()
        return self.channel

    def __exit__(self, *exc_info: Any) -> None:
        if self.channel.is_open:
            self.channel.close()
