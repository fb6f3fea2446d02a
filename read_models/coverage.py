"""What an indexer process knows it has written, so that it never computes a document again for
an event the written document already reflects.

A document records the streams it was computed from, each at its version (its ``streams``
field; the document's external version is their sum). Once the search server has taken the
document (written, or refused as stale because it already held the same or a newer version), an
event of stream ``s`` at version ``v`` that touches the document is *covered* when ``s`` was at
``v`` or later in what was written: the document in the index already reflects it, and
computing it again would only produce a write the server refuses as stale.

Skipping never loses a newer document: an event that no written document covers is computed as
before, and a document that records no ``streams`` is never skipped. Coverage holds per set of
write targets: an entry recorded while writing to the live alias only does not cover a write a
rebuild's ``-next`` alias now needs. It is forgotten when a write to the search server fails (an
index may have been lost), and bounded (least recently recorded entries go first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from cqrskit.read_models.model import Document

Key = tuple[str, str]  # (read model, document id)
Touch = tuple[str, int]  # (stream id, version) of an event touching a document


class Coverage:
    """Thread-safe map of (read model, document id) -> (write targets, stream -> version written)."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._entries: OrderedDict[Key, tuple[tuple[str, ...], dict[str, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def covered(self, model: str, doc_id: str, targets: Sequence[str], touches: Iterable[Touch]) -> bool:
        """Whether every touching event is reflected by what was written to exactly ``targets``."""
        with self._lock:
            entry = self._entries.get((model, doc_id))
        if entry is None or entry[0] != tuple(targets):
            return False
        written = entry[1]
        return all(written.get(stream, 0) >= version for stream, version in touches)

    def record(self, model: str, targets: Sequence[str], documents: Iterable[Document]) -> None:
        """Note documents the search server has taken on every one of ``targets``."""
        key = tuple(targets)
        with self._lock:
            for doc in documents:
                streams = _streams(doc)
                if streams is None:
                    continue
                self._entries[(model, doc.id)] = (key, streams)
                self._entries.move_to_end((model, doc.id))
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)

    def forget_all(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _streams(doc: Document) -> dict[str, int] | None:
    entries: Any = doc.source.get("streams")
    if not isinstance(entries, list):
        return None
    try:
        return {str(e["id"]): int(e["version"]) for e in entries}
    except (KeyError, TypeError, ValueError):
        return None
