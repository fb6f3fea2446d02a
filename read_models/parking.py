"""Parked documents (G7): a document that the search server refused (mapping conflict...) or
that a projection failed to compute is parked here with its error, visible and retryable,
while everything else flows on. Parking the same document again updates its row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from cqrskit.infra.db import upsert_insert
from cqrskit.infra.schema import parked_documents


def park(engine: Engine, entries: list[tuple[str, str, str, list[int]]]) -> None:
    """Park (read_model, doc_id, error, positions) entries; upserts, counting attempts."""
    if not entries:
        return
    with engine.begin() as conn:
        now = datetime.now(UTC)
        for read_model, doc_id, error, positions in entries:
            insert = upsert_insert(conn, parked_documents).values(
                read_model=read_model, doc_id=doc_id, error=error[:4000], positions=positions[-100:],
                attempts=1, parked_at=now)
            conn.execute(insert.on_conflict_do_update(
                index_elements=["read_model", "doc_id"],
                set_={"error": insert.excluded.error, "positions": insert.excluded.positions,
                      "attempts": parked_documents.c.attempts + 1, "parked_at": now}))


def unpark(engine: Engine, read_model: str, doc_ids: list[str]) -> int:
    """Forget parked entries of documents that have since been written; returns how many."""
    if not doc_ids:
        return 0
    with engine.begin() as conn:
        deleted = conn.execute(parked_documents.delete().where(
            parked_documents.c.read_model == read_model, parked_documents.c.doc_id.in_(doc_ids)))
        return deleted.rowcount or 0


def parked_models(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(parked_documents.c.read_model).distinct()).scalars())


def list_parked(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    query = sa.select(parked_documents).order_by(parked_documents.c.id).limit(limit)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def get_parked(engine: Engine, ids: list[int] | None) -> list[dict[str, Any]]:
    """Parked rows by id (all when ``ids`` is None)."""
    query = sa.select(parked_documents).order_by(parked_documents.c.id)
    if ids is not None:
        query = query.where(parked_documents.c.id.in_(ids))
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def drop_parked(engine: Engine, ids: list[int] | None) -> int:
    query = parked_documents.delete()
    if ids is not None:
        query = query.where(parked_documents.c.id.in_(ids))
    with engine.begin() as conn:
        return conn.execute(query).rowcount or 0


def parked_errors(engine: Engine, read_model: str, doc_ids: list[str]) -> list[tuple[str, str]]:
    """(doc id, error) of those of ``doc_ids`` that are parked in ``read_model``."""
    query = (sa.select(parked_documents.c.doc_id, parked_documents.c.error)
             .where(parked_documents.c.read_model == read_model, parked_documents.c.doc_id.in_(doc_ids)))
    with engine.connect() as conn:
        return [(doc_id, error) for doc_id, error in conn.execute(query).all()]
