"""Whether a command may run at all, and who issued it: from its delivery, never its body (G11).

Checked after the command is valid and before it is decided; a refusal is an ``invalid``
outcome with the reason:
- the routing key must equal the envelope's type (a producer's topic permission was checked
  against the routing key, so a body of another type would slip past it);
- with the allow-list on (``CQRSKIT_PRODUCER_GRANTS=true``), the producer is RabbitMQ's validated
  ``user_id``, and it must have been granted the type; a command without one is refused.

The issuer is the validated producer, or, when that producer may act on behalf of others (the
gateway), the identity it vouches for (the API key), which must exist and be allowed the type (a
live key whose scope covers it, or a producer granted it). A body's own ``metadata.issuer`` is kept
only as ``claimed_issuer``. A retried command (``dlq retry``) keeps its original producer when the
user that republished it (``vouched_by``) may act on behalf of others, and the original producer
is then checked as if it had sent the command again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cqrskit.infra.delivery import Delivery
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.grants import ProducerGrants


@dataclass(frozen=True)
class Admission:
    refused: str | None = None  # the reason, when the command must not run
    producer: str | None = None
    issuer: str | None = None

    def metadata(self, envelope: CommandEnvelope) -> dict[str, Any]:
        """What the events of the command record about where it came from."""
        meta = {"issuer": self.issuer, "producer": self.producer}
        claimed = envelope.metadata.issuer
        if claimed and claimed != self.issuer:
            meta["claimed_issuer"] = claimed
        return {key: value for key, value in meta.items() if value}


@dataclass
class Gate:
    grants: ProducerGrants | None = None  # None: no table to ask (nothing is delegated)
    enforce: bool = False                 # the allow-list is on

    def admit(self, envelope: CommandEnvelope, delivery: Delivery | None) -> Admission:
        delivery = delivery or Delivery()
        if delivery.routing_key is not None and delivery.routing_key != envelope.type:
            return Admission(refused=_route_reason(delivery.routing_key, envelope.type))
        if delivery.vouched_by is not None and not self._may_vouch(delivery.vouched_by):
            return Admission(refused=f"not allowed: {delivery.vouched_by!r} may not republish the commands of "
                                     f"{delivery.producer!r} (grant it --on-behalf)", producer=delivery.producer)
        producer = self.grants.producer(delivery.producer) if self.grants and delivery.producer else None
        if self.enforce:
            if delivery.producer is None:
                return Admission(refused="not allowed: no validated producer identity (publish with the "
                                         "AMQP user_id property set to your RabbitMQ user)")
            if producer is None or not producer.may_send(envelope.type):
                return Admission(refused=f"not allowed: producer {delivery.producer!r} may not send {envelope.type}",
                                 producer=delivery.producer)
        vouched = delivery.on_behalf_of if producer is not None and producer.on_behalf else None
        if vouched and vouched != producer.name and not self.grants.issuer_may_send(vouched, envelope.type):  # type: ignore[union-attr]
            return Admission(refused=f"not allowed: issuer {vouched!r} (vouched for by {delivery.producer!r}) is "
                                     f"unknown or may not send {envelope.type}", producer=delivery.producer)
        return Admission(producer=delivery.producer, issuer=vouched or delivery.producer)

    def _may_vouch(self, user: str) -> bool:
        found = self.grants.producer(user) if self.grants else None
        return found is not None and found.on_behalf


def _route_reason(routing_key: str, command_type: str) -> str:
    if routing_key == "":
        return "not published through the commands exchange (no routing key); publish with the type as routing key"
    return f"routing key {routing_key[:200]!r} does not match the command type {command_type!r}"
