"""Publishing commands, for other Python systems and for cqrskit's own CLI and gateway.

``CommandProducer`` sends ``CommandEnvelope``s: over AMQP to the commands exchange with
publisher confirms (``send`` returns once the broker holds the command durably: G1), or into
the embedded in-process broker. Either way the body on the wire is exactly the documented JSON
envelope (docs/commands.md), so a producer in another language does the same thing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

import dramatiq
from dramatiq import Message

from cqrskit.infra.envelope import CommandEnvelope, CommandMetadata
from cqrskit.infra.settings import Settings
from cqrskit.infra.amqp import AmqpPublisher, CommandNotConfirmed, OutgoingMessage, PublishReport
from cqrskit.infra.broker import wrap_command
from cqrskit.infra.delivery import Delivery
from cqrskit.infra.tracing_hooks import publishing, trace_options, traced_messages

__all__ = ["CommandProducer", "CommandNotConfirmed", "PublishReport", "new_command"]


def new_command(
    type: str,
    aggregate_id: str,
    payload: dict[str, Any],
    *,
    command_id: str | None = None,
    expected_version: int | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    issuer: str | None = None,
) -> CommandEnvelope:
    """A new envelope with a fresh UUID command id (unless given) and ``issued_at`` now."""
    return CommandEnvelope(
        command_id=command_id or str(uuid.uuid4()),
        type=type,
        aggregate_id=aggregate_id,
        expected_version=expected_version,
        payload=payload,
        metadata=CommandMetadata(
            correlation_id=correlation_id,
            causation_id=causation_id,
            issued_at=datetime.now(UTC),
            issuer=issuer,
        ),
    )


def outgoing(envelope: CommandEnvelope) -> OutgoingMessage:
    return OutgoingMessage(body=envelope.to_json(), routing_key=envelope.type, message_id=envelope.command_id)


class Publisher(Protocol):
    def publish(self, message: OutgoingMessage) -> None: ...
    def publish_many(
        self, messages: Iterable[OutgoingMessage], on_confirmed: Callable[[int], None] | None = None
    ) -> PublishReport: ...
    def close(self) -> None: ...


class InProcessPublisher:
    """Publishes into the embedded (stub) broker of this very process."""

    def __init__(self, broker: dramatiq.Broker, queue_name: str) -> None:
        self.broker = broker
        self.queue_name = queue_name

    def publish(self, message: OutgoingMessage) -> None:
        delivery = Delivery(routing_key=message.routing_key)  # no broker to vouch for a producer here
        self.broker.enqueue(Message(**wrap_command(message.body, self.queue_name, delivery, trace_options(message.headers))))

    def publish_many(
        self, messages: Iterable[OutgoingMessage], on_confirmed: Callable[[int], None] | None = None
    ) -> PublishReport:
        count = 0
        for message in messages:
            self.publish(message)
            count += 1
            if on_confirmed:
                on_confirmed(1)
        return PublishReport(confirmed=count, failed=[])

    def close(self) -> None:
        pass


class CommandProducer:
    """Sends command envelopes; see the module docstring for the guarantees."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    @classmethod
    def from_settings(cls, settings: Settings, broker: dramatiq.Broker | None = None, window: int = 1000) -> CommandProducer:
        """AMQP for an amqp:// broker URL; the embedded broker needs ``broker`` (this process's)."""
        if settings.embedded_broker:
            if broker is None:
                raise ValueError("the embedded broker lives in-process: pass the process's broker")
            return cls(InProcessPublisher(broker, settings.commands_queue))
        return cls(AmqpPublisher(settings.broker_url, settings.commands_exchange, window=window))

    def send(self, envelope: CommandEnvelope) -> str:
        """Publish one command and wait for the broker's confirm. Returns the command id.
        Raises CommandNotConfirmed when the broker did not take it (then nothing is promised)."""
        with publishing([outgoing(envelope)], getattr(self.publisher, "exchange", "commands")) as messages:
            self.publisher.publish(messages[0])
        return envelope.command_id

    def send_many(
        self, envelopes: Iterable[CommandEnvelope], on_confirmed: Callable[[int], None] | None = None
    ) -> PublishReport:
        """Publish many with a window of unconfirmed messages in flight; the report says how many
        were confirmed and which were not (by command id, with the reason)."""
        return self.publisher.publish_many(traced_messages(outgoing(e) for e in envelopes), on_confirmed)

    def close(self) -> None:
        self.publisher.close()

    def __enter__(self) -> CommandProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
