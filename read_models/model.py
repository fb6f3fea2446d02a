"""What a read model is: an index mapping, how events fan out to its documents, and how a
document is computed from the write store.

Every document carries an external version derived from the write store: the sum of the
versions of the streams it was computed from. Streams only grow, so a document computed from a
newer committed state has a greater version, and Elasticsearch's ``version_type=external``
refuses any older write: duplicates, replays and out-of-order deliveries cannot regress a
document, and the last event of every contributing stream triggers a computation that wins (G6).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from cqrskit.read_models.source import WriteStoreSource


@dataclass(frozen=True)
class Document:
    id: str
    version: int
    source: dict[str, Any]


class ReadModel(Protocol):
    name: ClassVar[str]
    stream_type: ClassVar[str]  # the aggregate type whose ids are this model's document ids
    id_field: ClassVar[str]  # the keyword field holding the document id (sortable, unlike _id)
    mappings: ClassVar[dict[str, Any]]

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Document ids touched by ``events`` (wire-format dicts), each with the positions that touched it."""
        ...

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        """Fresh documents for ``ids`` from the write store; ids with no aggregate are left out."""
        ...


def all_ids(model: ReadModel, source: WriteStoreSource, chunk: int = 1000) -> Iterator[list[str]]:
    return source.all_ids(model.stream_type, chunk)


SETTINGS: dict[str, Any] = {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "1s"}


def text_keyword(**extra: Any) -> dict[str, Any]:
    return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}, **extra}


def iso(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


# The streams a document was computed from, each at its version: part of every read model's
# contract (its external version is their sum; read-your-writes reads them, G8). A plain object
# array, not ``nested``: the search server indexes it as two flat fields (``streams.id`` and
# ``streams.version``) instead of one hidden document per entry, so an entry costs about a third
# as much to index (a document computed from many streams is rewritten on each of their events). Nothing searches
# an (id, version) pair: read-your-writes looks documents up by ``streams.id`` and compares the
# versions of their ``_source``.
STREAMS: dict[str, Any] = {"type": "object", "properties": {"id": {"type": "keyword"}, "version": {"type": "long"}}}


def streams_of(*aggregates: Any) -> list[dict[str, Any]]:
    """The ``streams`` field of a document computed from ``aggregates`` (None ones left out)."""
    return [{"id": a.stream_id, "version": a.version} for a in aggregates if a is not None]


def positions_by_stream(events: list[dict[str, Any]], stream_type: str) -> dict[str, list[int]]:
    """The positions of a batch's events (wire-format dicts) per aggregate id, for the streams of
    ``stream_type``: what a fan-out usually starts from. A ``defaultdict(list)``, so a fan-out can
    add the positions that touch other documents with ``+=``."""
    out: defaultdict[str, list[int]] = defaultdict(list)
    for event in events:
        if event["stream_type"] == stream_type:
            out[event["aggregate_id"]].append(event["position"])
    return out
