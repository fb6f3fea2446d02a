"""The relay's outlets on RabbitMQ: the events exchange, for other systems, and the indexer
queue of every partition."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cqrskit.infra.amqp import AmqpPublisher, OutgoingMessage
from cqrskit.infra.broker import index_message, indexer_exchange, make_broker
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.settings import Settings
from cqrskit.infra.topology import indexer_partitions
from cqrskit.infra.tracing_hooks import relayed_to


class EventsNotConfirmed(Exception):
    """The broker did not confirm every event of a batch; the batch will be published again."""


class RabbitmqOutlet:
    """The relay's outlets on RabbitMQ: the events exchange (topic, durable; persistent messages,
    ``message_id`` = event id, publisher confirms) and the indexer queue (one Dramatiq message
    per batch, published to it through the indexer exchange (``infra.broker.indexer_exchange``), confirmed, ``mandatory``: a missing
    queue fails the batch). Each outlet has its own confirming publisher, so that the two may be
    used from two threads at once. Declares both on first use and again after any failure."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher: AmqpPublisher | None = None
        self.indexer_publisher: AmqpPublisher | None = None
        self.broker: Any = None
        self.declared = False
        self.lock = threading.Lock()  # the two outlets are used from two threads

    def publish_events(self, messages: list[EventMessage]) -> None:
        """Raises EventsNotConfirmed unless the broker confirmed every message. Published without
        ``mandatory``: a message no queue is bound for is confirmed too (nobody subscribed to it,
        which is no failure)."""
        with self._reset_on_error():
            headers = relayed_to(self.settings.events_exchange) or None  # the relay span's traceparent
            report = self.publisher.publish_many(  # type: ignore[union-attr]
                OutgoingMessage(body=m.model_dump_json().encode(), routing_key=m.routing_key(),
                                message_id=m.event_id, headers=headers) for m in messages)
            failed = report.failed
            if failed:
                raise EventsNotConfirmed(f"{len(failed)} of {len(messages)} events not confirmed, "
                                         f"e.g. {failed[0][0]}: {failed[0][1]}")

    def feed_indexer(self, batch: list[dict[str, Any]]) -> None:
        """One message per indexer partition, in one confirm round. Raises EventsNotConfirmed
        unless the broker confirmed every one."""
        with self._reset_on_error():
            messages = [index_message(batch, p.queue, p.actor) for p in indexer_partitions(self.settings)]
            report = self.indexer_publisher.publish_many([OutgoingMessage(  # type: ignore[union-attr]
                body=m.encode(), routing_key=m.queue_name, message_id=m.message_id) for m in messages])
            if report.failed:
                raise EventsNotConfirmed(f"indexer batch of {len(batch)} events not confirmed: {report.failed[0][1]}")

    @contextmanager
    def _reset_on_error(self) -> Iterator[None]:
        try:
            self._declare()
            yield
        except Exception:
            self.reset()
            raise

    def _declare(self) -> None:
        with self.lock:
            if not self.declared:
                self._declare_locked()

    def _declare_locked(self) -> None:
        if self.broker is None:
            self.broker = make_broker(self.settings, install=False)  # the process's global broker stays its own
        try:
            for partition in indexer_partitions(self.settings):
                self.broker.declare_queue(partition.queue, ensure=True)
            self.broker.channel.exchange_declare(self.settings.events_exchange, exchange_type="topic", durable=True)
        finally:
            del self.broker.connection  # this thread's, used only to declare
        if self.publisher is None:
            self.publisher = AmqpPublisher(self.settings.broker_url, self.settings.events_exchange,
                                           confirm_timeout=15.0, reconnect_attempts=2, mandatory=False)
        if self.indexer_publisher is None:
            self.indexer_publisher = AmqpPublisher(self.settings.broker_url, indexer_exchange(self.settings),
                                                   confirm_timeout=15.0,
                                                   reconnect_attempts=2, mandatory=True)
        self.declared = True

    def reset(self) -> None:
        """Forget connections after a failure; the next call reconnects and declares again."""
        with self.lock:
            self.declared = False
            publishers, self.publisher, self.indexer_publisher = (self.publisher, self.indexer_publisher), None, None
        for publisher in publishers:
            if publisher is not None:
                publisher.close()

    def close(self) -> None:
        self.reset()
        if self.broker is not None:
            self.broker.close()
