"""The convergence oracle (G6): every document of a read model's index compared with a fresh
projection from the write store. Used by tests, by ``cqrskit verify`` and by operators."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from elasticsearch import Elasticsearch
from sqlalchemy import Engine

from cqrskit.domain.registry import Registry
from cqrskit.read_models.indices import alias
from cqrskit.read_models.model import ReadModel
from cqrskit.read_models.source import WriteStoreSource, snapshot


@dataclass
class VerifyReport:
    read_model: str
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: dict[str, list[str]] = field(default_factory=dict)  # doc id -> differing fields

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)


def verify(engine: Engine, registry: Registry, es: Elasticsearch, prefix: str, model: ReadModel,
           chunk: int = 500) -> VerifyReport:
    """Compare the index behind the model's alias with the write store, document by document."""
    index = alias(prefix, model.name)
    es.indices.refresh(index=index)
    report = VerifyReport(model.name)
    expected_ids: set[str] = set()
    with snapshot(engine) as conn:
        source = WriteStoreSource(conn, registry)
        for ids in source.all_ids(model.stream_type, chunk):
            expected = model.build(source, ids)
            expected_ids.update(expected)
            found = {d["_id"]: d["_source"] for d in es.mget(index=index, ids=list(expected))["docs"] if d.get("found")}
            for doc_id, document in expected.items():
                report.checked += 1
                if doc_id not in found:
                    report.missing.append(doc_id)
                elif found[doc_id] != document.source:
                    report.different[doc_id] = _differing_fields(document.source, found[doc_id])
    report.extra = [doc_id for doc_id in indexed_ids(es, index, model.id_field) if doc_id not in expected_ids]
    return report


def indexed_ids(es: Elasticsearch, index: str, id_field: str, page: int = 1000) -> Iterator[str]:
    """Every document id in an index, paged with search_after on the id field."""
    after: list[Any] | None = None
    while True:
        body: dict[str, Any] = {"size": page, "sort": [{id_field: "asc"}], "_source": False, "query": {"match_all": {}}}
        if after is not None:
            body["search_after"] = after
        hits = es.search(index=index, **body)["hits"]["hits"]
        if not hits:
            return
        yield from (hit["_id"] for hit in hits)
        after = hits[-1]["sort"]


def _differing_fields(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
