"""Rows in and out of the PostgreSQL hot path (``cqrskit.infra.pg_store``): an aggregate restored
from its stream row, its snapshot as JSON text, ids as JSON strings, an outcome as JSON, and the
advisory-lock key of a stream or claim."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any, TypeVar

from cqrskit.domain.model import Aggregate, restore, stream_id
from cqrskit.infra.outcomes import Outcome
from cqrskit.infra.pg_sql import READ_EVENTS

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


def q(text: str) -> str:
    """``text`` as a JSON string (ids and type names: most need no escaping at all)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def outcome_json(outcome: Outcome) -> str:
    """``outcome`` as the JSON object the write statement inserts (``cqrskit.infra.pg_sql``)."""
    return json.dumps({"id": outcome.command_id, "status": outcome.status.value, "type": outcome.type,
                       "aid": outcome.aggregate_id, "reason": outcome.reason, "errors": outcome.errors,
                       "version": outcome.aggregate_version, "corr": outcome.correlation_id,
                       "cause": outcome.causation_id, "at": outcome.recorded_at.isoformat()})


def snapshot_json(aggregate: Aggregate[Any]) -> str:
    if type(aggregate).snapshot is Aggregate.snapshot:
        return aggregate.state.model_dump_json()
    return json.dumps(aggregate.snapshot())


def restored(cls: type[A], aggregate_id: str, row: tuple[Any, ...] | None, tx: Any) -> A:
    """The aggregate of a stream row ``(version, state as JSON text, state version)`` (None: no
    stream), by the domain's one ``restore``; its events are read in ``tx`` only if needed."""
    version, state, state_version = (0, None, None) if row is None else row
    sid = stream_id(cls.stream_type, aggregate_id)
    return restore(cls, aggregate_id, version, state, state_version, lambda: [
        tx.registry.decode_event(t, v, d) for t, v, d in tx.all(READ_EVENTS, (sid, 0))])


@lru_cache(maxsize=65536)
def lock_key(kind: str, *parts: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same in every process; remembered, since a
    batch asks for the keys of the same streams and claims several times)."""
    digest = hashlib.blake2b("\x00".join((kind, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
