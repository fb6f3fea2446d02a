"""Zero-downtime rebuild of a read model (G9).

1. A new physical index is created behind the ``-next`` alias and recorded as *building*: from
   then on every indexer also writes each document it computes to it.
2. Every document is computed from the write store, chunk by chunk (each chunk from a fresh
   snapshot taken after step 1), and bulk-written to ``-next``. Memory stays flat: ids are
   streamed, documents never accumulate.
3. The live alias is swapped to the new index in one atomic alias update; the old index is
   deleted.
An event committed during the rebuild is either in the state a chunk read (it committed
before) or in a batch an indexer started after step 1 (it committed after), which writes to
both indices; external versions settle any overlap. No event written during a rebuild is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from elasticsearch import Elasticsearch
from sqlalchemy import Engine

from cqrskit.domain.registry import Registry
from cqrskit.infra.utc import as_utc
from cqrskit.read_models.indices import alias, begin_build, finish_build, next_alias
from cqrskit.read_models.model import ReadModel
from cqrskit.read_models.parking import get_parked, park, unpark
from cqrskit.read_models.source import WriteStoreSource, snapshot
from cqrskit.read_models.writer import Write, write_documents


@dataclass
class RebuildReport:
    read_model: str
    index: str
    documents: int
    seconds: float
    replaced: list[str]
    parked: int


def rebuild(engine: Engine, registry: Registry, es: Elasticsearch, prefix: str, model: ReadModel,
            *, chunk: int = 1000, replicas: int | None = None, on_total: Callable[[int], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> RebuildReport:
    started, began_at = time.perf_counter(), datetime.now(UTC)
    index = begin_build(es, engine, prefix, model, replicas=replicas)
    target = next_alias(prefix, model.name)
    documents = parked = 0
    with snapshot(engine) as ids_conn:
        source_of_ids = WriteStoreSource(ids_conn, registry)
        if on_total:
            on_total(source_of_ids.count(model.stream_type))
        for ids in source_of_ids.all_ids(model.stream_type, chunk):
            with snapshot(engine) as conn:
                built = model.build(WriteStoreSource(conn, registry), ids)
            result = write_documents(es, [Write(model.name, target, doc) for doc in built.values()], attempts=10)
            park(engine, [(model.name, w.document.id, error, []) for w, error in result.parked])
            documents += len(built)
            parked += len(result.parked)
            if on_progress:
                on_progress(len(ids))
    es.indices.refresh(index=index)
    replaced = finish_build(es, engine, prefix, model.name, index)
    _forget_rebuilt(engine, es, prefix, model.name, began_at)
    return RebuildReport(model.name, index, documents, time.perf_counter() - started, replaced, parked)


def _forget_rebuilt(engine: Engine, es: Elasticsearch, prefix: str, model: str, began_at: datetime) -> int:
    """Documents parked before the rebuild began and not parked again since are in the new live
    index now (the rebuild wrote them): their entries go. Returns how many."""
    ids = [row["doc_id"] for row in get_parked(engine, None)
           if row["read_model"] == model and as_utc(row["parked_at"]) < began_at]
    if not ids:
        return 0
    docs = es.mget(index=alias(prefix, model), ids=ids, source=False)["docs"]
    return unpark(engine, model, [doc["_id"] for doc in docs if doc.get("found")])
