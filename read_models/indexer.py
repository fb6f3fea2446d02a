"""The indexer: a batch of committed events in, fresh versioned documents out (bulk).

For each read model: which documents the events touch (fan-out: a guest's rename touches all
of their bookings), minus those whose touching events the documents already written reflect
(``coverage``), then the rest computed from ONE consistent snapshot of the write store, then one
bulk request to every write target (the live alias, plus the rebuild's ``-next`` alias while a
rebuild runs). Many events for one document in a batch become one write; several batches given
together (``index_batches``: a worker's coalesced window) become one batch. Idempotent: running
a batch twice, or two batches in any order, converges to the same index (G6).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from elasticsearch import Elasticsearch
from sqlalchemy import Engine

from cqrskit.domain.registry import Registry
from cqrskit.read_models.coverage import Coverage, Touch
from cqrskit.read_models.indices import next_alias, write_targets
from cqrskit.read_models.model import Document, ReadModel
from cqrskit.read_models.parking import park, parked_models, unpark
from cqrskit.read_models.partitions import Partition
from cqrskit.read_models.source import WriteStoreSource, snapshot
from cqrskit.read_models.writer import TransientIndexError, Write, write_documents

log = structlog.get_logger("cqrskit.indexer")


@dataclass
class IndexReport:
    events: int = 0
    documents: int = 0
    written: int = 0
    stale: int = 0
    skipped: int = 0  # touched documents not computed: what was written already reflects their events
    parked: list[tuple[str, str, str]] = field(default_factory=list)  # (read model, doc id, error)


class Indexer:
    def __init__(self, engine: Engine, registry: Registry, es: Elasticsearch, prefix: str,
                 models: Sequence[ReadModel]) -> None:
        self.engine = engine
        self.registry = registry
        self.es = es
        self.prefix = prefix
        self.models = {m.name: m for m in models}
        self.coverage = Coverage()

    def index_batches(self, batches: list[list[dict[str, Any]]], partition: Partition | None = None) -> IndexReport:
        """Project several batches as one (an event delivered twice is projected once; the report
        and the log count every event delivered); see index_events."""
        merged = {e["event_id"]: e for batch in batches for e in batch}
        events = sorted(merged.values(), key=lambda e: e["position"])
        delivered = sum(len(b) for b in batches)
        if len(batches) > 1:
            log.info("indexer.coalesced", batches=len(batches), events=delivered, distinct=len(events))
        return self.index_events(events, delivered=delivered, partition=partition)

    def index_events(self, events: list[dict[str, Any]], delivered: int | None = None,
                     partition: Partition | None = None) -> IndexReport:
        """Project a batch of events (wire-format dicts): of the documents they touch, those whose
        home is ``partition`` (all when None). Raises TransientIndexError (and database or
        connection errors) when the batch must be retried as a whole."""
        delivered = len(events) if delivered is None else delivered
        started = time.perf_counter()
        touches = {e["position"]: (e["stream_id"], e["version"]) for e in events}
        with snapshot(self.engine) as conn:
            targets = write_targets(conn, self.prefix, list(self.models))  # a rebuild that began is seen
            source = WriteStoreSource(conn, self.registry, remember=True)
            affected = {name: self._homed(model, model.affected(source, events), partition)
                        for name, model in self.models.items()}
            plan = {name: self._uncovered(name, touched, targets[name], touches) for name, touched in affected.items()}
            built = {name: self._build(source, self.models[name], touched) for name, touched in plan.items()}
        computed = time.perf_counter()
        try:
            report = self._write(built, plan, targets)
        except TransientIndexError:
            self.coverage.forget_all()  # an index may have been lost: trust nothing written before
            raise
        report.events = delivered
        report.skipped = sum(len(t) for t in affected.values()) - sum(len(t) for t in plan.values())
        log.info("indexer.indexed", events=delivered, documents=report.documents, written=report.written,
                 stale=report.stale, skipped=report.skipped, parked=len(report.parked),
                 compute_ms=round((computed - started) * 1000, 1), write_ms=round((time.perf_counter() - computed) * 1000, 1),
                 command_ids=sorted({e["command_id"] for e in events if e.get("command_id")}),
                 correlation_ids=sorted({e["correlation_id"] for e in events if e.get("correlation_id")}))
        return report

    def reindex(self, model_name: str, ids: list[str]) -> IndexReport:
        """Compute and write the given documents now (``parked retry``, repairs)."""
        targets = write_targets(self.engine, self.prefix, [model_name])
        touched = {i: [] for i in ids}
        with snapshot(self.engine) as conn:
            built = {model_name: self._build(WriteStoreSource(conn, self.registry), self.models[model_name], touched)}
        return self._write(built, {model_name: touched}, targets)

    @staticmethod
    def _homed(model: ReadModel, touched: dict[str, list[int]], partition: Partition | None) -> dict[str, list[int]]:
        if partition is None or partition.count == 1:
            return touched
        return {i: p for i, p in touched.items() if partition.owns(f"{model.stream_type}:{i}")}

    def _uncovered(self, name: str, touched: dict[str, list[int]], targets: list[str],
                   touches: dict[int, Touch]) -> dict[str, list[int]]:
        """The touched documents whose touching events are not all reflected by what was written."""
        def covered(doc_id: str, positions: list[int]) -> bool:
            if not positions or any(p not in touches for p in positions):
                return False
            return self.coverage.covered(name, doc_id, targets, [touches[p] for p in positions])

        return {doc_id: positions for doc_id, positions in touched.items() if not covered(doc_id, positions)}

    def _build(self, source: WriteStoreSource, model: ReadModel, touched: dict[str, list[int]]) -> tuple[
            dict[str, Document], dict[str, str]]:
        """Documents, and errors of documents whose projection failed (isolated one by one)."""
        ids = sorted(touched)
        try:
            return model.build(source, ids), {}
        except Exception:  # a projection bug: find the poison documents, keep the rest flowing
            documents, failures = {}, {}
            for doc_id in ids:
                try:
                    documents.update(model.build(source, [doc_id]))
                except Exception as exc:
                    failures[doc_id] = f"projection failed: {exc!r}\n{traceback.format_exc(limit=5)}"
            return documents, failures

    def _write(self, built: dict[str, tuple[dict[str, Document], dict[str, str]]],
               plan: dict[str, dict[str, list[int]]], targets: dict[str, list[str]]) -> IndexReport:
        writes = [Write(name, target, doc, optional=target == next_alias(self.prefix, name))
                  for name, (documents, _) in built.items() for doc in documents.values() for target in targets[name]]
        result = write_documents(self.es, writes)
        report = IndexReport(documents=sum(len(d) for d, _ in built.values()), written=result.written, stale=result.stale)
        to_park = [(w.read_model, w.document.id, error, plan[w.read_model].get(w.document.id, []))
                   for w, error in result.parked]
        to_park += [(name, doc_id, error, plan[name].get(doc_id, []))
                    for name, (_, failures) in built.items() for doc_id, error in failures.items()]
        park(self.engine, to_park)
        report.parked = [(m, d, e) for m, d, e, _ in to_park]
        refused = {(m, d) for m, d, _ in report.parked}
        for name, (documents, _) in built.items():
            self.coverage.record(name, targets[name], (d for i, d in documents.items() if (name, i) not in refused))
        self._unpark_written(built, {(m, d) for m, d, _ in report.parked})
        for model, doc_id, error in report.parked:
            log.error("indexer.parked", read_model=model, doc_id=doc_id, error=error.splitlines()[0])
        return report

    def _unpark_written(self, built: dict[str, tuple[dict[str, Document], dict[str, str]]], parked: set) -> None:  # type: ignore[type-arg]
        models = parked_models(self.engine)
        for name in models & set(built):
            unpark(self.engine, name, [d for d in built[name][0] if (name, d) not in parked])
