"""What the broker, not the body, says about a command message (G11).

A command body says what it asks; only its delivery says who sent it and how. RabbitMQ validates
``user_id`` (a publisher may set it only to the user it authenticated as), and the routing key is
what a producer's topic permission was checked against. ``Delivery`` carries both from the
consumer to the executor, inside the Dramatiq message that wraps the raw body, so they survive
the workers' own retries unchanged.

``on_behalf_of`` is the ``cqrskit-issuer`` header: the API key a gateway authenticated. A worker
honours it only from a producer granted the right to act on behalf of others (``cqrskit producers
grant gateway '*' --on-behalf``); from anyone else it is ignored.

``cqrskit dlq retry`` republishes a dead command with ``cqrskit-retried-from`` and the original
``cqrskit-producer`` and ``cqrskit-issuer``: the delivery is then the original producer's, and
``vouched_by`` names the validated user that vouches for it (the operator), whom a worker must find
granted ``--on-behalf``. A retry that names no producer runs with none (asking for less identity is
harmless; with the allow-list on it is refused).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

ISSUER_HEADER = "cqrskit-issuer"
PRODUCER_HEADER = "cqrskit-producer"
RETRIED_HEADER = "cqrskit-retried-from"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}$")


@dataclass(frozen=True)
class Delivery:
    """``routing_key``: as published (None: not delivered through an exchange, e.g. a direct call);
    ``producer``: RabbitMQ's validated ``user_id`` (None: the publisher set none);
    ``on_behalf_of``: the identity a delegating producer (the gateway) vouches for."""

    routing_key: str | None = None
    producer: str | None = None
    on_behalf_of: str | None = None
    vouched_by: str | None = None  # the validated user republishing another producer's command

    def as_kwargs(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: Any) -> Delivery | None:
        """The delivery a wrapped message carries, or None when ``kwargs`` is not one."""
        if not isinstance(kwargs, dict) or not _FIRST_KEYS <= kwargs.keys() <= _KEYS:
            return None
        if not all(value is None or (isinstance(value, str) and len(value) <= 255) for value in kwargs.values()):
            return None
        return cls(**kwargs)

    @classmethod
    def from_amqp(cls, routing_key: str, user_id: Any, headers: Any) -> Delivery:
        """From a delivery's method and properties; values that are not plausible names are dropped
        (RabbitMQ validated ``user_id``; the header is only a claim until the worker checks who sent it)."""
        headers = headers if isinstance(headers, dict) else {}
        validated, claimed = _name(user_id), _name(_header(headers, ISSUER_HEADER))
        if RETRIED_HEADER not in headers:
            return cls(routing_key=routing_key[:255], producer=validated, on_behalf_of=claimed)
        original = _name(_header(headers, PRODUCER_HEADER))
        if original is None or original == validated:
            return cls(routing_key[:255], original, claimed if original else None)
        return cls(routing_key[:255], original, claimed, vouched_by=validated)


_KEYS = frozenset(Delivery.__dataclass_fields__)
_FIRST_KEYS = frozenset({"routing_key", "producer", "on_behalf_of"})  # the wrappers of before ``vouched_by``


def _header(headers: dict[str, Any], name: str) -> Any:
    value = headers.get(name)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and _NAME.match(value) else None


def is_name(value: str) -> bool:
    """A producer or API key name as cqrskit stores it (letters, digits and ``._:@/+-``, ≤ 200)."""
    return bool(_NAME.match(value))
