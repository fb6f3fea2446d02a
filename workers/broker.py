"""The Dramatiq broker of a cqrskit process, made at start-up from the settings.

Commands arrive as plain JSON envelopes published by other systems (docs/commands.md), not as
Dramatiq messages. ``CommandEncoder`` makes the two meet: a body that is a Dramatiq message
(our own retries, delayed re-deliveries) decodes as such; any other body, garbage included,
becomes a message for the ``execute_command`` actor carrying the exact bytes (base64), so that
the actor, not the consumer, decides what becomes of it (G10).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.encoder import JSONEncoder, MessageData
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from infra.settings import QueueType, Settings

COMMAND_ACTOR = "execute_command"
INDEX_ACTOR = "index_events"
_MESSAGE_KEYS = frozenset({"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"})


class CommandEncoder(JSONEncoder):
    """Dramatiq messages for one of ``actors`` pass through; every other body is wrapped for the
    command actor (so a producer cannot address another actor by forging a Dramatiq message)."""

    def __init__(self, commands_queue: str, actors: frozenset[str] = frozenset({COMMAND_ACTOR, INDEX_ACTOR})) -> None:
        self.commands_queue = commands_queue
        self.actors = actors

    def decode(self, data: bytes) -> MessageData:
        try:
            decoded = json.loads(data)
        except (ValueError, RecursionError):
            decoded = None
        if isinstance(decoded, dict) and _MESSAGE_KEYS <= decoded.keys() and decoded["actor_name"] in self.actors:
            return decoded
        return wrap_command(data, self.commands_queue)


def index_message(events: list[dict[str, Any]], queue_name: str) -> dramatiq.Message:
    """The Dramatiq message asking an indexer to project a batch of events (relay -> indexer)."""
    return dramatiq.Message(queue_name=queue_name, actor_name=INDEX_ACTOR, args=(events,), kwargs={}, options={})


def wrap_command(body: bytes, queue_name: str) -> MessageData:
    """The Dramatiq message that runs ``execute_command`` on a raw command body."""
    return {
        "queue_name": queue_name,
        "actor_name": COMMAND_ACTOR,
        "args": [base64.b64encode(body).decode("ascii")],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }


class CqrsRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with quorum queues (optional) and a delivery limit, so that a
    message that kills its worker process is parked instead of coming back forever."""

    def __init__(self, *, queue_type: QueueType, delivery_limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments = super()._build_queue_arguments(queue_name)
        if self.queue_type is QueueType.quorum:
            arguments["x-queue-type"] = "quorum"
            arguments["x-delivery-limit"] = self.delivery_limit
        return arguments


def make_broker(settings: Settings, extra_middleware: list[dramatiq.Middleware] | None = None) -> dramatiq.Broker:
    """The broker for ``settings`` (RabbitMQ with publisher confirms, or the in-process stub),
    installed as Dramatiq's global broker and encoder. Connects lazily, on first use.
    ``extra_middleware`` goes first: Dramatiq runs ``after_*`` hooks in reverse order, so theirs
    run after Retries has decided whether a message failed."""
    middleware = [
        *(extra_middleware or []),
        AgeLimit(),
        TimeLimit(time_limit=120_000),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=settings.max_retries),
    ]
    broker: dramatiq.Broker
    if settings.embedded_broker:
        broker = StubBroker(middleware=middleware)
    else:
        broker = CqrsRabbitmqBroker(
            parameters=[connection_parameters(settings.broker_url)],
            confirm_delivery=True,
            middleware=middleware,
            queue_type=settings.queue_type,
            delivery_limit=settings.delivery_limit,
        )
    dramatiq.set_encoder(CommandEncoder(settings.commands_queue))
    dramatiq.set_broker(broker)
    return broker


def connection_parameters(url: str) -> dict[str, Any]:
    """pika parameters from an amqp URL, with heartbeats and a blocked-connection timeout so a
    dead or blackholed broker is noticed in seconds, not minutes."""
    params = pika.URLParameters(url)
    return {
        "host": params.host,
        "port": params.port,
        "virtual_host": params.virtual_host,
        "credentials": params.credentials,
        "ssl_options": params.ssl_options,
        "heartbeat": 10,
        "blocked_connection_timeout": 30,
        "connection_attempts": 3,
        "retry_delay": 1,
    }
