"""What a read model is: an index mapping, how events fan out to its documents, and how a
document is computed from the write store.

Every document carries an external version derived from the write store: the sum of the
versions of the streams it was computed from. Streams only grow, so a document computed from a
newer committed state has a greater version, and Elasticsearch's ``version_type=external``
refuses any older write: duplicates, replays and out-of-order deliveries cannot regress a
document, and the last event of every contributing stream triggers a computation that wins (G6).
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from cqrskit.read_models.source import WriteStoreSource


@dataclass(frozen=True, init=False)
class Document:
    """One document of a read model: its id, its external version and its ``source``.
    ``Document(id, source=...)`` takes the version from the source's ``streams`` (what
    ``streams_of`` made: the sum of their versions), so the two never drift apart;
    ``Document(id, version, source)`` states it. Raises ValueError for a source without
    ``streams`` and no version."""

    id: str
    version: int
    source: dict[str, Any]

    def __init__(self, id: str, version: int | None = None, source: dict[str, Any] | None = None) -> None:
        source = {} if source is None else source
        if version is None:
            if not isinstance(source.get("streams"), list):
                raise ValueError(f"document {id!r}: no version given and no 'streams' (streams_of) to derive it from")
            version = sum(entry["version"] for entry in source["streams"])
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "source", source)


class ReadModel(Protocol):
    """Everything cqrskit reads of a read model: ``name``, ``stream_type``, ``id_field``,
    ``mappings``, ``affected`` and ``build`` (required), and the optional declarations
    ``queries`` (``cqrskit.read_models.queryable.Queries``: its searches, the query API's routes),
    ``reflects`` (stream type -> ``HELD`` or ``FRESH``, for read-your-writes; default: it holds
    its own stream type), ``projection_version`` (an int, default 1: bump it when ``build``
    computes other documents from the same events; the live index records the version it was
    built with, and a difference is drift that ``cqrskit rebuild`` offers to fix) and ``lookups`` (``(stream type, state field)`` pairs that its fan-out
    finds aggregates by: ``cqrskit setup`` indexes them). Any other public, non-callable class
    attribute is refused when the app is resolved (a misspelt ``querys`` is one line at start-up,
    not a declaration silently ignored): see ``declaration_problems``."""

    name: ClassVar[str]
    stream_type: ClassVar[str]  # the aggregate type whose ids are this model's document ids
    id_field: ClassVar[str]  # the keyword field holding the document id (sortable, unlike _id)
    mappings: ClassVar[dict[str, Any]]
    queries: ClassVar[Any]  # a cqrskit.read_models.queryable.Queries, or None
    reflects: ClassVar[dict[str, str]]
    lookups: ClassVar[Sequence[tuple[str, str]]]
    projection_version: ClassVar[int]

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Document ids touched by ``events`` (wire-format dicts), each with the positions that touched it."""
        ...

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        """Fresh documents for ``ids`` from the write store; ids with no aggregate are left out."""
        ...


REQUIRED = ("name", "stream_type", "id_field", "mappings", "affected", "build")
OPTIONAL = ("queries", "reflects", "lookups", "projection_version")


def declaration_problems(model: Any) -> list[str]:
    """What is wrong with ``model`` as a ``ReadModel``, one line each: a required attribute
    missing, or a public non-callable attribute cqrskit does not read (with the closest name)."""
    label = f"read model {getattr(model, 'name', type(model).__name__)!r}"
    problems = [f"{label} has no {name!r} (a read model declares {', '.join(REQUIRED)})"
                for name in REQUIRED if not hasattr(model, name)]
    for name in sorted(_public_values(model)):
        if name not in REQUIRED + OPTIONAL:
            close = difflib.get_close_matches(name, REQUIRED + OPTIONAL, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (cqrskit reads {', '.join(REQUIRED + OPTIONAL)})"
            problems.append(f"{label}: unknown attribute {name!r}{hint}")
    return problems


def _public_values(model: Any) -> set[str]:
    names = {n for cls in type(model).__mro__ if cls is not object for n in vars(cls)} | set(vars(model))
    return {n for n in names if not n.startswith("_") and not callable(getattr(model, n, None))}


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
