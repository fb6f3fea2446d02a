"""Bulk writes of documents with external versions, and what each per-item result means.

- created/updated, or 409 version conflict (the index holds the same or a newer version): done;
- 429 and 5xx: retried with backoff, then ``TransientIndexError`` (the message is retried later);
- 404 on a ``-next`` alias: the rebuild finished or was abandoned meanwhile: nothing to do;
- 404 on a live alias: the index is gone (a search server restarted empty): ``TransientIndexError``
  so the backlog waits in the broker until ``setup``/``rebuild`` recreates it;
- any other 4xx (mapping conflict...): the document is parked with its error (G7).
Nothing is reported written before the server said so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from elasticsearch import Elasticsearch

from cqrskit.read_models.model import Document


class TransientIndexError(Exception):
    """The search server could not take some writes now; retry the whole batch later."""


@dataclass(frozen=True)
class Write:
    read_model: str
    target: str  # an alias
    document: Document
    optional: bool = False  # the -next alias of a rebuild


@dataclass
class BulkResult:
    written: int = 0
    stale: int = 0  # the index already held this version or a newer one
    parked: list[tuple[Write, str]] = field(default_factory=list)


def write_documents(es: Elasticsearch, writes: list[Write], *, attempts: int = 4, backoff: float = 0.2,
                    chunk: int = 1000) -> BulkResult:
    """Write everything; returns what was written, stale or must be parked. Raises
    TransientIndexError when retryable failures outlive ``attempts``."""
    result = BulkResult()
    for start in range(0, len(writes), chunk):
        pending = writes[start : start + chunk]
        for attempt in range(attempts):
            pending = _write_once(es, pending, result)
            if not pending:
                break
            time.sleep(backoff * 2**attempt)
        if pending:
            raise TransientIndexError(f"{len(pending)} documents not accepted after {attempts} attempts")
    return result


def _write_once(es: Elasticsearch, writes: list[Write], result: BulkResult) -> list[Write]:
    operations: list[dict[str, Any]] = []
    for w in writes:
        operations.append({"index": {"_index": w.target, "_id": w.document.id,
                                     "version": w.document.version, "version_type": "external"}})
        operations.append(w.document.source)
    response = es.bulk(operations=operations, require_alias=True)
    retry: list[Write] = []
    for w, item in zip(writes, response["items"], strict=True):
        outcome = item["index"]
        status = outcome.get("status", 500)
        if status < 300:
            result.written += 1
        elif status == 409:
            result.stale += 1
        elif status == 404 and w.optional:
            continue
        elif status in (404, 429) or status >= 500:
            retry.append(w)
        else:
            result.parked.append((w, _error_text(outcome.get("error"), status)))
    return retry


def _error_text(error: Any, status: int) -> str:
    if isinstance(error, dict):
        reason = f"{error.get('type')}: {error.get('reason')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict):
            reason += f" (caused by {cause.get('type')}: {cause.get('reason')})"
        return f"{status} {reason}"
    return f"{status} {json.dumps(error)[:500]}"
