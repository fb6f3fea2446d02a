"""Read-your-writes (G8), for any read model: wait until a model's searchable documents reflect
the writes a ``ConsistencyToken`` names.

Which stream types a model reflects, and how, is the model's rule (stream type -> ``HELD`` or
``FRESH``). HELD: some document must hold the stream at the token's version or later (an order's
own document; the guest of a booking). Every rule also requires that no document holds it at
an older version (a guest's bookings after a rename). Stream types a rule does not list do not
concern the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from elasticsearch import ConnectionTimeout, Elasticsearch

from cqrskit.infra.tokens import ConsistencyToken

HELD, FRESH = "held", "fresh"
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Awaited:
    stream: str
    version: int
    held: bool

    def __str__(self) -> str:
        return f"{self.stream} at version {self.version}"


def awaited(rules: dict[str, str], token: ConsistencyToken) -> list[Awaited]:
    """What a model with ``rules`` must show before it reflects the writes ``token`` names."""
    latest: dict[str, int] = {}
    for stream, version in token.streams:
        if stream.split(":", 1)[0] in rules:
            latest[stream] = max(latest.get(stream, 0), min(version, 2**62))
    return [Awaited(s, v, rules[s.split(":", 1)[0]] == HELD) for s, v in sorted(latest.items())]


def _holders(es: Elasticsearch, index: str, id_field: str, streams: list[str],
             page: int) -> Iterator[dict[str, Any]]:
    """The ``streams`` entries of every document holding any of ``streams``, paged on the id."""
    query = {"terms": {"streams.id": streams}}
    after = None
    while True:
        response = es.search(index=index, query=query, size=page, sort=[{id_field: "asc"}],
                             search_after=after, source_includes=["streams"], track_total_hits=False)
        hits = response["hits"]["hits"]
        for hit in hits:
            yield from hit["_source"].get("streams") or ()
        if len(hits) < page:
            return
        after = hits[-1]["sort"]


def unmet(es: Elasticsearch, index: str, id_field: str, conditions: list[Awaited],
          page: int) -> list[Awaited]:
    """The conditions the searchable documents of ``index`` do not meet yet. Fetches the ``streams``
    of the documents holding any awaited stream, ``page`` documents a request (a keyword lookup:
    ~3 ms on 100k documents, where a nested version range took 150 ms a stream) and compares versions
    here."""
    if not conditions:
        return []
    versions: dict[str, list[int]] = {c.stream: [] for c in conditions}
    for entry in _holders(es, index, id_field, list(versions), page):
        if entry.get("id") in versions:
            versions[entry["id"]].append(entry.get("version", 0))
    return [c for c in conditions
            if any(v < c.version for v in versions[c.stream]) or (c.held and not versions[c.stream])]


Unmet = Callable[[Elasticsearch, str, list[Awaited]], list[Awaited]]  # (es, prefix, conditions) -> unmet


class Reflection:
    """One bounded wait until a model reflects a token: call ``check`` until it returns True or
    ``next_delay`` returns None (the deadline passed). Searches only (no refresh: the query side
    holds read privileges only, G11), so what it sees is what the next query sees. A condition once
    met stays met (document versions only grow), so only pending ones are checked again."""

    def __init__(self, conditions: list[Awaited], still_unmet: Unmet, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.still_unmet = clock, still_unmet
        self.awaited = conditions
        self.pending = list(conditions)
        self.deadline = clock() + timeout

    def check(self, es: Elasticsearch, prefix: str) -> bool:
        left = self.deadline - self.clock()
        try:
            bounded = es.options(request_timeout=max(left, 0.05))
            self.pending = self.still_unmet(bounded, prefix, self.pending)
        except ConnectionTimeout:
            pass  # an overloaded server is the same as a lagging one: the deadline decides
        return not self.pending

    def next_delay(self) -> float | None:
        left = self.deadline - self.clock()
        return None if left <= 0 else min(POLL_SECONDS, left)


ParkedNotes = Callable[[str, list[Awaited]], list[str]]  # (read model, pending) -> one note per parked document


def parked_notes(engine: Any) -> ParkedNotes:
    """What a wait that timed out should add: for each pending stream whose own document is
    parked (G7), "document ID is parked (ERROR)". Reads ``parked_documents`` only (the query
    role's one read of the write store besides API keys); read errors add nothing."""
    import sqlalchemy as sa

    from cqrskit.read_models.parking import parked_errors

    def notes(model: str, pending: list[Awaited]) -> list[str]:
        ids = sorted({c.stream.split(":", 1)[1] for c in pending if c.held and ":" in c.stream})
        if not ids:
            return []
        try:
            rows = parked_errors(engine, model, ids[:50])
        except sa.exc.SQLAlchemyError:
            return []
        return [f"document {doc_id} is parked ({error[:300]}): cqrskit parked list" for doc_id, error in rows]

    return notes


def wait(reflection: Reflection, es: Elasticsearch, prefix: str) -> bool:
    """Block until ``reflection`` is met; False when its deadline passed first."""
    while not reflection.check(es, prefix):
        delay = reflection.next_delay()
        if delay is None:
            return False
        time.sleep(delay)
    return True
