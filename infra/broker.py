"""The Dramatiq broker of a cqrskit process, made at start-up from the settings.

Commands arrive as plain JSON envelopes published by other systems (docs/commands.md), not as
Dramatiq messages. ``CommandEncoder`` makes the two meet: a body that is a Dramatiq message
(our own retries, delayed re-deliveries) decodes as such; any other body, garbage included,
becomes a message for the ``execute_command`` actor carrying the exact bytes (base64), so that
the actor, not the consumer, decides what becomes of it (G10).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import re
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import dq_name, xq_name
from dramatiq.errors import ConnectionClosed
from dramatiq.encoder import JSONEncoder, MessageData
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, Retries, ShutdownNotifications, TimeLimit

from cqrskit.infra.deadletter_queues import declare_dead_letter_queue
from cqrskit.infra.delivery import Delivery
from cqrskit.infra.nodes import NodeList
from cqrskit.infra.reconnect import ConsumeBackoff, quick_restarts
from cqrskit.infra.tracing_hooks import current_options, trace_options
from cqrskit.infra.settings import QueueType, Settings

COMMAND_ACTOR = "execute_command"
INDEX_ACTOR = "index_events"
# The keys of a Dramatiq message (dramatiq.Message.asdict), no more, no fewer.
MESSAGE_KEYS = frozenset({"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"})


class CommandEncoder(JSONEncoder):
    """A body passes through as a Dramatiq message only if it is exactly what this process's own
    broker enqueues: a message for one of ``broker``'s declared actors, on that actor's queue (or
    its delay queue, with an ``eta`` at most ``max_delay_ms`` ahead), carrying nothing but retry
    bookkeeping. Every other body, garbage and forgeries included, is wrapped as published for
    the command actor, which dead-letters what is not a command. So a producer cannot steer
    Dramatiq: no other actor or queue, no pipe target or callback, no time limit, no far-future
    eta (G10, G11)."""

    def __init__(self, commands_queue: str, broker: dramatiq.Broker | None = None, max_delay_ms: int = 90_000) -> None:
        # Dramatiq's encoder is process-wide; a process with several brokers (the demo's pipeline:
        # the workers' and the relay's) trusts the actors of every one of them.
        self.brokers: weakref.WeakSet[dramatiq.Broker] = weakref.WeakSet([broker] if broker else [])
        self.commands_queue = commands_queue
        self.max_delay_ms = max_delay_ms

    def decode(self, data: bytes) -> MessageData:
        try:
            decoded = json.loads(data)
        except (ValueError, RecursionError):
            decoded = None
        if self._is_own(decoded):
            return decoded  # type: ignore[no-any-return]
        # Not through the commands exchange (RabbitMQ's consumer wraps those, with their delivery):
        # the empty routing key of the default exchange, which matches no command type.
        return wrap_command(data, self.commands_queue, Delivery(routing_key=""))

    def _is_own(self, message: Any) -> bool:
        if not isinstance(message, dict) or message.keys() != MESSAGE_KEYS:
            return False
        name, queue, options = message["actor_name"], message["queue_name"], message["options"]
        actor = next((b.actors[name] for b in list(self.brokers) if isinstance(name, str) and name in b.actors), None)
        if actor is None or queue not in (actor.queue_name, dq_name(actor.queue_name)):
            return False
        if not isinstance(options, dict) or not options.keys() <= _OWN_OPTIONS:
            return False
        if message["kwargs"] != {} and not (name == COMMAND_ACTOR and Delivery.from_kwargs(message["kwargs"])):
            return False
        delayed = queue == dq_name(actor.queue_name)
        eta = options.get("eta")
        if delayed != (eta is not None) or (delayed and not _soon(eta, self.max_delay_ms)):
            return False
        return name != COMMAND_ACTOR or _is_body(message["args"])


_OWN_OPTIONS = frozenset({"retries", "traceback", "requeue_timestamp", "eta",  # what Retries and delays write
                          "traceparent", "tracestate"})  # the trace context (cqrskit.infra.tracing)


def _soon(eta: Any, max_delay_ms: int) -> bool:
    return isinstance(eta, int) and eta <= time.time() * 1000 + max_delay_ms


def _is_body(args: Any) -> bool:
    """``[base64 of a body]``, the one argument of the command actor."""
    if not (isinstance(args, list) and len(args) == 1 and isinstance(args[0], str)):
        return False
    try:
        base64.b64decode(args[0], validate=True)
    except (ValueError, binascii.Error):
        return False
    return True


def index_message(events: list[dict[str, Any]], queue_name: str, actor_name: str = INDEX_ACTOR) -> dramatiq.Message:
    """The Dramatiq message asking an indexer to project a batch of events (relay -> indexer);
    ``actor_name``: the indexer actor of the queue's partition (``infra.topology``)."""
    return dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=(events,), kwargs={},
                            options=current_options())


def wrap_command(body: bytes, queue_name: str, delivery: Delivery | None = None,
                 options: dict[str, Any] | None = None) -> MessageData:
    """The Dramatiq message that runs ``execute_command`` on a raw command body, with what its
    delivery said (the routing key, the validated producer); retries carry both unchanged.
    ``options``: the trace context the delivery carried (``tracing_hooks.trace_options``)."""
    return {
        "queue_name": queue_name,
        "actor_name": COMMAND_ACTOR,
        "args": [base64.b64encode(body).decode("ascii")],
        "kwargs": (delivery or Delivery()).as_kwargs(),
        "options": options or {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }


class CqrsRabbitmqBroker(ConsumeBackoff, RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with quorum queues (optional) and a delivery limit, so that a
    message that kills its worker process is parked instead of coming back forever; its
    consumers back off together while the broker is down (``cqrskit.infra.reconnect``).

    On a cluster (several node URLs) every connection of the broker tries the nodes in its
    ``NodeList`` order: the process's random first node, and after a lost connection the next
    node first, so that a dead node is tried last, never waited for. Its dead-letter queues
    (``.XQ``) are quorum queues too, without Dramatiq's 7-day TTL, so that a dead letter outlives
    a node and a week (G3); one declared classic by an older cqrskit is used as it is until
    ``cqrskit setup`` moves it (``cqrskit.infra.deadletter_queues``)."""

    def __init__(self, *, queue_type: QueueType, delivery_limit: int, commands_queue: str = "", endpoint: str = "?",
                 nodes: NodeList | None = None, own_user: str | None = None, route: tuple[str, str] | None = None,
                 max_command_bytes: int = 0, **kwargs: Any) -> None:
        self.nodes = nodes
        super().__init__(**kwargs)
        quick_restarts()
        self.max_command_bytes = max_command_bytes  # a raw body is cut to one byte over it before it is wrapped
        self.own_user = own_user  # RabbitMQ validates it: the mark of this broker's own messages (G11)
        # (exchange, queue pattern): queues matching the pattern are bound to that direct exchange
        # when declared, and published to through it instead of the default exchange (G11)
        self.route = (route[0], re.compile(route[1])) if route else None
        self.endpoint = endpoint
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.commands_queue = commands_queue

    @property  # type: ignore[override]
    def parameters(self) -> Any:
        return self.nodes.ordered() if self.nodes is not None else self.__dict__["parameters"]

    @parameters.setter
    def parameters(self, value: Any) -> None:
        self.__dict__["parameters"] = value  # Dramatiq's own list, used when no NodeList was given

    @property  # type: ignore[override]
    def connection(self) -> pika.BlockingConnection:
        connection = RabbitmqBroker.connection.fget(self)  # type: ignore[attr-defined]
        if self.nodes is not None:
            self.nodes.reached(connection)
        return connection

    @connection.deleter
    def connection(self) -> None:
        current = getattr(self.state, "connection", None)
        if self.nodes is not None and current is not None and not current.is_open:
            self.nodes.lost(current)  # an error dropped it: the next connection starts elsewhere
        RabbitmqBroker.connection.fdel(self)  # type: ignore[attr-defined]

    @property
    def consumer_class(self) -> type:
        return CommandsConsumer

    @property
    def channel(self) -> Any:
        """This thread's channel; what Dramatiq publishes on it (retries, delayed re-enqueues)
        carries ``own_user`` as ``user_id``."""
        return _StampedChannel(RabbitmqBroker.channel.fget(self), self.own_user, self.route)  # type: ignore[attr-defined]

    @channel.deleter
    def channel(self) -> None:
        RabbitmqBroker.channel.fdel(self)  # type: ignore[attr-defined]

    def _declare_queue(self, queue_name: str) -> Any:
        declared = super()._declare_queue(queue_name)
        self._bind_route(queue_name)
        return declared

    def _declare_dq_queue(self, queue_name: str) -> Any:
        declared = super()._declare_dq_queue(queue_name)
        self._bind_route(dq_name(queue_name))
        return declared

    def _bind_route(self, queue: str) -> None:
        if self.route is not None and self.route[1].fullmatch(queue):
            self.channel.exchange_declare(self.route[0], exchange_type="direct", durable=True)
            self.channel.queue_bind(queue, self.route[0], routing_key=queue)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        arguments = super()._build_queue_arguments(queue_name)
        if self.queue_type is QueueType.quorum:
            arguments["x-queue-type"] = "quorum"
            arguments["x-delivery-limit"] = self.delivery_limit
        return arguments

    def _declare_xq_queue(self, queue_name: str) -> Any:
        if self.queue_type is not QueueType.quorum:
            return super()._declare_xq_queue(queue_name)
        return declare_dead_letter_queue(self, xq_name(queue_name))


class _StampedChannel:
    """A pika channel whose publishes carry ``user_id`` (when none was set): RabbitMQ refuses a
    ``user_id`` that is not the publisher's, so no one else can make a message look like ours."""

    def __init__(self, channel: Any, user: str | None, route: tuple[str, re.Pattern[str]] | None) -> None:
        self._channel, self._user, self._route = channel, user, route

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: Any = None,
                      mandatory: bool = False) -> None:
        if self._user and properties is not None and properties.user_id is None:
            properties.user_id = self._user
        if exchange == "" and self._route is not None and self._route[1].fullmatch(routing_key):
            exchange = self._route[0]
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


class CommandsConsumer(_RabbitmqConsumer):  # type: ignore[misc]
    """Dramatiq's consumer, told where each message came from. On the commands queues a body
    published through an exchange (the commands exchange: producers, the gateway, ``dlq retry``)
    is always a raw command, wrapped with its ``Delivery`` (routing key, RabbitMQ's validated
    ``user_id``, the gateway's issuer header), however much it looks like a Dramatiq message.
    Only bodies from the default exchange published by this worker's own RabbitMQ user (its
    ``user_id``, which RabbitMQ validated: the workers' retries, the delay queue's re-enqueues)
    may be Dramatiq messages, and ``CommandEncoder`` checks each one; any other body from the
    default exchange is a raw command without a routing key (G10, G11)."""

    def __init__(self, broker: CqrsRabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.consuming = False
        if broker.nodes is not None:
            broker.nodes.reached(self.connection)
        commands = broker.commands_queue
        if queue_name in (commands, dq_name(commands)):
            self.iterator = _exchange_bodies_wrapped(self.iterator, commands, broker.own_user, broker.max_command_bytes)

    def __next__(self) -> Any:
        try:
            message = super().__next__()
        except ConnectionClosed as exc:
            if self.broker.nodes is not None:
                self.broker.nodes.lost(self.connection)  # the restarted consumer tries another node first
            if not self.consuming:  # lost before it consumed at all (a queue with no leader yet): back off
                self.broker.consume_failed(exc)
            raise
        self.consuming = True
        return message


def _exchange_bodies_wrapped(deliveries: Iterator[tuple[Any, Any, Any]], commands_queue: str,
                             own_user: str | None, max_bytes: int = 0) -> Iterator[tuple[Any, Any, Any]]:
    """Raw bodies wrapped with their delivery; one over ``max_bytes`` is cut to ``max_bytes + 1``
    first (the executor refuses it as too large all the same, G10), so that an oversized message
    is never copied into base64, JSON and back (a 20 MB command took a worker from 97 to 270 MB)."""
    for method, properties, body in deliveries:
        if method is not None and max_bytes and len(body) > max_bytes and properties.user_id != own_user:
            body = body[:max_bytes + 1]
        if method is not None and method.exchange != "":
            delivery = Delivery.from_amqp(method.routing_key, properties.user_id, properties.headers)
            body = json.dumps(wrap_command(body, commands_queue, delivery, trace_options(properties.headers))).encode()
        elif method is not None and (own_user is None or properties.user_id != own_user):
            delivery = Delivery(routing_key="", producer=Delivery.from_amqp("", properties.user_id, None).producer)
            body = json.dumps(wrap_command(body, commands_queue, delivery, trace_options(properties.headers))).encode()
        yield method, properties, body


def make_broker(settings: Settings, extra_middleware: list[dramatiq.Middleware] | None = None, *,
                install: bool = True) -> dramatiq.Broker:
    """The broker for ``settings`` (RabbitMQ with publisher confirms, or the in-process stub),
    installed as Dramatiq's global broker and encoder (``install=False``: the encoder only, for a
    process that only declares and publishes through this broker, like the relay, and runs no
    actor). Connects lazily, on first use.
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
            nodes=NodeList([connection_parameters(url, cluster=len(settings.broker_urls) > 1) | {
                "client_properties": {"connection_name": f"cqrskit-dramatiq-{os.getpid()}"}}  # who, for rabbitmqctl
                for url in settings.broker_urls]),
            confirm_delivery=True,
            middleware=middleware,
            queue_type=settings.queue_type,
            delivery_limit=settings.delivery_limit,
            endpoint=",".join(_masked(url) for url in settings.broker_urls),
            commands_queue=settings.commands_queue,
            own_user=pika.URLParameters(settings.broker_urls[0]).credentials.username,
            route=(indexer_exchange(settings), indexer_route_pattern(settings)),
            max_command_bytes=settings.max_command_bytes,
        )
    # Retries wait at most max_backoff_ms; the rest allows for clocks that disagree between hosts.
    encoder = dramatiq.get_encoder()
    if isinstance(encoder, CommandEncoder) and encoder.commands_queue == settings.commands_queue:
        encoder.brokers.add(broker)
    else:
        dramatiq.set_encoder(CommandEncoder(settings.commands_queue, broker, max_delay_ms=settings.max_backoff_ms + 60_000))
    if install:
        dramatiq.set_broker(broker)
    return broker


def indexer_exchange(settings: Settings) -> str:
    """The direct exchange through which the relay and the indexers reach the indexer queues (and
    their delay queues), bound by queue name: so that neither needs the default exchange, which
    reaches every queue, the commands queue included (G11)."""
    return f"{settings.events_exchange}.indexer"


def indexer_route_pattern(settings: Settings) -> str:
    """Every partition's indexer queue and delay queue (``indexer``, ``indexer.p1.DQ``...)."""
    return re.escape(settings.indexer_queue) + r"(\.p[0-9]+)?(\.DQ)?"


def connection_parameters(url: str, cluster: bool = False) -> dict[str, Any]:
    """pika parameters from an amqp URL, with heartbeats and a blocked-connection timeout so a
    dead or blackholed broker is noticed in seconds, not minutes. A node of a cluster
    (``cluster``) gets one quick attempt per round (pika tries every node of a list once per
    round; 3 rounds, 1 s apart) and a short connect timeout: a node that does not answer is
    passed over for the next one within 3 s."""
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
    } | ({"socket_timeout": 3.0, "stack_timeout": 6.0} if cluster else {})


def amqp_nodes(settings: Settings, timeout: float = 5.0) -> list[pika.ConnectionParameters]:
    """Every node of ``settings.broker_url``, from a random one on, for one short-lived
    connection: ``pika.BlockingConnection(amqp_nodes(settings))`` connects to the first node that
    answers, one quick attempt each (an operator's command must not hang on a dead node)."""
    urls = settings.broker_urls
    start = random.randrange(len(urls))
    return [pika.ConnectionParameters(**_quick(connection_parameters(url, cluster=len(urls) > 1), timeout))
            for url in urls[start:] + urls[:start]]


def _quick(params: dict[str, Any], timeout: float) -> dict[str, Any]:
    return params | {"connection_attempts": 1, "socket_timeout": timeout, "stack_timeout": timeout * 2,
                     "blocked_connection_timeout": timeout * 2}


def amqp_parameters(url: str, timeout: float = 5.0) -> pika.ConnectionParameters:
    """One quick connection attempt to the node at ``url`` (an operator's command must not hang
    on a dead broker)."""
    return pika.ConnectionParameters(**_quick(connection_parameters(url), timeout))


def _masked(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for log lines)."""
    parameters = pika.URLParameters(url)
    return f"amqp://{parameters.credentials.username}@{parameters.host}:{parameters.port}{parameters.virtual_host}"
