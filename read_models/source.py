"""Reading the write store for the read side: aggregates in bulk, the aggregates that refer to others, and
event timestamps, inside one consistent snapshot (REPEATABLE READ on PostgreSQL).

Read-only: the projections compute documents from what this returns, never from events in
flight, so every document reflects a committed state of the write store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from cqrskit.domain.model import Aggregate, restore, stream_id
from cqrskit.domain.registry import Registry
from cqrskit.infra.schema import events, streams
from cqrskit.infra.utc import as_utc
from cqrskit.read_models.lookups import checked

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]
CHUNK = 500


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only connection on one consistent snapshot of the write store."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":  # one BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            yield conn


class WriteStoreSource:
    """Reads of one snapshot. ``remember``: keep every aggregate read (or found missing), so that
    the fan-out and the projections of one indexer window read each aggregate once; the snapshot
    does not change, so neither do they. Not for a source that reads a whole store (memory)."""

    def __init__(self, conn: Connection, registry: Registry, remember: bool = False) -> None:
        self.conn = conn
        self.registry = registry
        self.remembered: dict[tuple[str, str], Any] | None = {} if remember else None

    def aggregates(self, cls: type[A], ids: Iterable[str]) -> dict[str, A]:
        """The aggregates that exist among ``ids`` (with their versions), by id."""
        wanted = sorted(set(ids))
        known = self.remembered if self.remembered is not None else {}
        found: dict[str, A] = {i: known[(cls.stream_type, i)] for i in wanted
                               if known.get((cls.stream_type, i)) is not None}
        missing = [i for i in wanted if (cls.stream_type, i) not in known]
        for chunk in _chunks(missing):
            sids = [stream_id(cls.stream_type, i) for i in chunk]
            query = sa.select(streams.c.aggregate_id, streams.c.version, streams.c.state, streams.c.state_version)
            for row in self.conn.execute(query.where(streams.c.stream_id.in_(sids))):
                found[row.aggregate_id] = self._restore(cls, row)
        if self.remembered is not None:
            self.remembered.update({(cls.stream_type, i): found.get(i) for i in missing})
        return found

    def _restore(self, cls: type[A], row: Any) -> A:
        return restore(cls, row.aggregate_id, row.version, row.state, row.state_version, lambda: self._history(cls, row))

    def _history(self, cls: type[A], row: Any) -> list[Any]:
        query = (sa.select(events.c.type, events.c.schema_version, events.c.data)
                 .where(events.c.stream_id == stream_id(cls.stream_type, row.aggregate_id),
                        events.c.version <= row.version)
                 .order_by(events.c.version))
        return [self.registry.decode_event(e.type, e.schema_version, e.data) for e in self.conn.execute(query)]

    def ids_where(self, stream_type: str, json_field: str, values: Iterable[str]) -> dict[str, list[str]]:
        """Aggregate ids of ``stream_type`` whose state's ``json_field`` is one of ``values``. On
        PostgreSQL the type and the field are written as literals, so that the index of a declared
        lookup (``cqrskit.read_models.lookups``) serves the query; both must be plain identifiers."""
        out: dict[str, list[str]] = defaultdict(list)
        if self.conn.dialect.name == "postgresql":
            checked(stream_type, json_field)
            field: Any = streams.c.state.op("->>")(sa.literal_column(f"'{json_field}'")).label("value")
            of_type: Any = streams.c.stream_type == sa.literal_column(f"'{stream_type}'")
        else:
            field, of_type = streams.c.state[json_field].as_string(), streams.c.stream_type == stream_type
        for chunk in _chunks(sorted(set(values))):
            query = sa.select(field, streams.c.aggregate_id).where(of_type, field.in_(chunk))
            for value, aggregate_id in self.conn.execute(query):
                out[value].append(aggregate_id)
        return out

    def event_times(self, stream_type: str, ids: Iterable[str], first_only: bool = False) -> dict[str, dict[str, datetime]]:
        """For each aggregate: event type -> when it was last recorded (or only its first event)."""
        out: dict[str, dict[str, datetime]] = defaultdict(dict)
        for chunk in _chunks(sorted(set(ids))):
            sids = [stream_id(stream_type, i) for i in chunk]
            query = sa.select(events.c.stream_id, events.c.type, events.c.recorded_at).where(events.c.stream_id.in_(sids))
            if first_only:
                query = query.where(events.c.version == 1)
            for sid, type_, at in self.conn.execute(query.order_by(events.c.position)):
                out[sid.split(":", 1)[1]][type_] = as_utc(at)
        return out

    def all_ids(self, stream_type: str, chunk: int = 1000) -> Iterator[list[str]]:
        """Every aggregate id of a type, in chunks, streamed (memory stays flat)."""
        query = sa.select(streams.c.aggregate_id).where(streams.c.stream_type == stream_type)
        result = self.conn.execution_options(yield_per=chunk).execute(query)
        for part in result.partitions(chunk):
            yield [row.aggregate_id for row in part]

    def count(self, stream_type: str) -> int:
        query = sa.select(sa.func.count()).select_from(streams).where(streams.c.stream_type == stream_type)
        return self.conn.execute(query).scalar_one()


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]
