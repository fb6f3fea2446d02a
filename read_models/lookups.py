"""Indexes for the fan-out lookups of read models.

``WriteStoreSource.ids_where(stream_type, field, values)`` finds aggregates by a field of their
state: the bookings of a room, say (a change of the room reaches each of them). Without an index
that reads every stream of the write store, on every indexer window that needs it. A read model
that uses such a lookup declares it (``lookups = (("booking", "room_id"),)``), and
``cqrskit setup`` makes, on PostgreSQL, a partial expression index for each: one entry per
aggregate of that type, keyed by the field. Made ``CONCURRENTLY`` (a live write store is not
locked against writes) and idempotently; an index a failed build left invalid is made again.
SQLite gets none (an embedded store is small).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

Lookup = tuple[str, str]  # (stream type, field of its state)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def checked(stream_type: str, field: str) -> Lookup:
    """``(stream_type, field)`` if both are plain identifiers (they are written into SQL); raises ValueError."""
    for what, name in (("stream type", stream_type), ("state field", field)):
        if not _NAME.match(name):
            raise ValueError(f"lookup {stream_type!r}.{field!r}: the {what} must be a plain identifier")
    return stream_type, field


def lookups_of(models: Iterable[Any]) -> list[Lookup]:
    """The lookups the read models declare (``lookups``), each once, checked."""
    found = {checked(*lookup) for model in models for lookup in getattr(model, "lookups", ())}
    return sorted(found)


def index_name(lookup: Lookup) -> str:
    return f"ix_streams_{lookup[0]}_{lookup[1]}"[:63].lower()


def ensure_lookup_indexes(engine: Engine, models: Iterable[Any]) -> list[str]:
    """Make the index of every declared lookup that has none (PostgreSQL); returns those made."""
    if engine.dialect.name != "postgresql":
        return []
    made = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for lookup in lookups_of(models):
            name = index_name(lookup)
            valid = conn.execute(sa.text("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                         "WHERE c.relname = :name"), {"name": name}).scalar()
            if valid:
                continue
            if valid is False:
                conn.exec_driver_sql(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
            stream_type, field = lookup
            conn.exec_driver_sql(f"CREATE INDEX CONCURRENTLY \"{name}\" ON streams ((state ->> '{field}')) "
                                 f"WHERE stream_type = '{stream_type}'")
            made.append(name)
    return made
