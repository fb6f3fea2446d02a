"""The commands' dead-letter queue (``<commands queue>.XQ``) over AMQP.

It holds two kinds of message: raw bodies (a body with no readable command id, dead-lettered at
once, G10; or a message a quorum queue parked after too many deliveries) and Dramatiq messages
(``args[0]`` = the base64 body) of commands that ran out of retries. A ``DeadLetter`` shows both
by the command inside. Positions count from the head of the queue (1).

Who sent a dead command is never read from its body (G11): a message is taken as a worker's
Dramatiq wrapper, and its ``Delivery`` believed, only when its ``user_id`` (validated by RabbitMQ
when it was published, kept by dead-lettering) is the workers' user (``CQRSKIT_WORKER_USER``).
Anything else is a raw body, whatever it looks like, and its identity is its own delivery's:
RabbitMQ's ``user_id`` and the headers a delegating producer may set.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika

from cqrskit.infra.broker import MESSAGE_KEYS, amqp_nodes
from cqrskit.infra.delivery import ISSUER_HEADER, PRODUCER_HEADER, RETRIED_HEADER, Delivery
from cqrskit.infra.settings import Settings


@dataclass
class DeadLetter:
    """One message of the dead-letter queue, and the command body inside it."""

    position: int
    raw: bytes
    body: bytes
    wrapper: dict[str, Any] | None  # the Dramatiq message around ``body``, if it was one
    headers: dict[str, Any]
    command_id: str | None  # as far as one can be read from ``body``
    delivery: Delivery = Delivery()  # who sent the command, as RabbitMQ (or a worker) established it

    @property
    def envelope(self) -> dict[str, Any] | None:
        try:
            decoded = json.loads(self.body)
        except (ValueError, RecursionError):
            return None
        return decoded if isinstance(decoded, dict) else None

    @property
    def type(self) -> str | None:
        kind = (self.envelope or {}).get("type")
        return kind[:200] if isinstance(kind, str) else None

    @property
    def traceback(self) -> str | None:
        return (self.wrapper or {}).get("options", {}).get("traceback")

    @property
    def reason(self) -> str:
        """The exception of Dramatiq's last traceback, or why RabbitMQ dead-lettered the raw body."""
        if self.traceback:
            retries = self.wrapper["options"].get("retries", 0)  # type: ignore[index]
            return f"{exception_line(self.traceback)} (after {retries} retries)"
        deaths = self.headers.get("x-death") or [{}]
        how = f"{_text(deaths[0].get('reason')) or 'dead-lettered'} by {_text(deaths[0].get('queue')) or '?'}"
        if self.command_id is None:
            return f"{how}: no readable command_id (not a command envelope)"
        return how if self.wrapper is None else f"{how} (retries exhausted)"


def exception_line(traceback: str) -> str:
    """The line naming the exception, at the end of a formatted traceback (the first line after the
    last frame: messages may span lines, e.g. SQLAlchemy's "(Background on this error at: ...)")."""
    lines = traceback.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  ")]
    after = frames[-1] + 1 if frames else 0
    return lines[after] if after < len(lines) else lines[-1]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def unwrap(raw: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """The command body of a worker's dead letter, and the Dramatiq message around it if there was
    one. Only for messages a worker published: anyone can write a body shaped like a wrapper."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return raw, None
    if not (isinstance(message, dict) and message.keys() == MESSAGE_KEYS and isinstance(message["args"], list)
            and len(message["args"]) == 1 and isinstance(message["args"][0], str)):
        return raw, None
    try:
        return base64.b64decode(message["args"][0], validate=True), message
    except (ValueError, binascii.Error):
        return raw, None


class DeadLetterQueue:
    """The commands' XQ over one AMQP connection. ``take`` gets the next message without
    acknowledging it: it stays invisible until ``ack`` removes it, or until ``close`` puts back
    every message taken and not acknowledged, in its place. ``command_id_of`` reads the command
    id of a body (None when it has no readable one). Connecting raises pika's AMQPError or OSError."""

    def __init__(self, settings: Settings, command_id_of: Callable[[bytes], str | None]) -> None:
        self.settings = settings
        self.command_id_of = command_id_of
        self.name = f"{settings.commands_queue}.XQ"
        self.user = pika.URLParameters(settings.broker_urls[0]).credentials.username
        self.worker_user = settings.worker_user or self.user
        self.connection = pika.BlockingConnection(amqp_nodes(settings))  # the first node that answers
        self.channel = self.connection.channel()
        self.publisher: Any = None
        self.taken = 0

    def count(self) -> int:
        return int(self.channel.queue_declare(self.name, passive=True).method.message_count)

    def take(self) -> tuple[int, DeadLetter] | None:
        method, properties, raw = self.channel.basic_get(self.name, auto_ack=False)
        if method is None:
            return None
        self.taken += 1
        headers = dict(properties.headers or {})
        body, wrapper = unwrap(raw) if properties.user_id == self.worker_user else (raw, None)
        delivery = Delivery.from_kwargs(wrapper["kwargs"]) if wrapper else None
        if delivery is None:
            wrapper, body = None, raw
            delivery = Delivery.from_amqp("", properties.user_id, headers)
        letter = DeadLetter(self.taken, raw, body, wrapper, headers, self.command_id_of(body), delivery)
        return method.delivery_tag, letter

    def ack(self, tag: int) -> None:
        self.channel.basic_ack(tag)

    def republish(self, letter: DeadLetter) -> None:
        """Publish the command body to the commands exchange, as the original producer's (and
        issuer's) command: a worker honours that only if this user may act on behalf of others
        (G11). Returns once the broker confirmed it (raises pika's UnroutableError or NackError
        otherwise)."""
        if self.publisher is None:
            self.publisher = self.connection.channel()
            self.publisher.confirm_delivery()
        headers = {RETRIED_HEADER: self.name}
        if letter.delivery.producer:
            headers[PRODUCER_HEADER] = letter.delivery.producer
            if letter.delivery.on_behalf_of:
                headers[ISSUER_HEADER] = letter.delivery.on_behalf_of
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                          message_id=letter.command_id, headers=headers,
                                          user_id=self.user)
        self.publisher.basic_publish(self.settings.commands_exchange, letter.type or "dlq.retry", letter.body,
                                     properties, mandatory=True)

    def needs_vouching(self, letter: DeadLetter) -> bool:
        """Whether republishing ``letter`` as its original producer's needs this user to be granted
        ``--on-behalf`` (someone else sent it, or it was sent on behalf of someone)."""
        producer, issuer = letter.delivery.producer, letter.delivery.on_behalf_of
        return producer is not None and (producer != self.user or issuer not in (None, producer))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()  # messages taken and not acknowledged go back in their places
