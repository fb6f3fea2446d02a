"""Bulk writes of documents with external versions, and what each result means.

A bulk request refused whole (G6: nothing of it was written, nothing is lost):
- 429 (a circuit breaker, a full write queue), 408, 502/503/504 and other 5xx, or no answer at
  all: retried with backoff, then ``TransientIndexError`` (the message is retried later);
- 413 (over ``http.max_content_length``): the chunk is halved and each half sent, down to a single
  document, which is then too large to ever be accepted: parked (G7);
- 401/403 (the process's role may not write there): ``IndexRefused``, retried later like an
  outage (fixing the role lets everything flow), never parked: the documents are not at fault.

Per item:
- created/updated, or 409 version conflict (the index holds the same or a newer version): done;
- 429 and 5xx: retried with backoff, then ``TransientIndexError`` (the message is retried later);
- 404 on a ``-next`` alias: the rebuild finished or was abandoned meanwhile: nothing to do;
- 404 on a live alias: the index is gone (a search server restarted empty): ``TransientIndexError``
  so the backlog waits in the broker until ``setup``/``rebuild`` recreates it;
- 401/403: ``IndexRefused`` (as above);
- any other 4xx (a mapping conflict, a document the mapping refuses...): it cannot succeed as
  it is, so the document is parked with its error (G7).
Nothing is reported written before the server said so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout
from elasticsearch import ApiError, Elasticsearch

from cqrskit.read_models.model import Document


class TransientIndexError(Exception):
    """The search server could not take some writes now; retry the whole batch later."""


class IndexRefused(TransientIndexError):
    """The search server's security refused this process's writes (401/403): its role or key
    must be fixed; the batch is retried meanwhile, and nothing is parked."""


RETRIED = frozenset({408, 429})  # and every status >= 500
MAX_SLEEP = 5.0


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
    TransientIndexError when retryable failures outlive ``attempts`` (IndexRefused on 401/403)."""
    result = BulkResult()
    for start in range(0, len(writes), chunk):
        _write_chunk(es, writes[start : start + chunk], result, attempts, backoff)
    return result


def _write_chunk(es: Elasticsearch, pending: list[Write], result: BulkResult, attempts: int, backoff: float) -> None:
    failure = ""
    for attempt in range(attempts):
        try:
            pending = _write_once(es, pending, result)
            failure = f"{len(pending)} documents not accepted"
        except ApiError as exc:
            status = exc.meta.status
            if status == 413:
                return _halve(es, pending, result, attempts, backoff, exc)
            if status in (401, 403):
                raise IndexRefused(f"the search server refused the bulk write: {_error_text(exc.body, status)}") from exc
            if status not in RETRIED and status < 500:
                raise
            failure = f"bulk request refused whole: {_error_text(exc.body, status)}"
        except (TransportConnectionError, ConnectionTimeout) as exc:
            failure = f"bulk request not answered: {exc}"
        if not pending:
            return None
        if attempt + 1 < attempts:
            time.sleep(min(backoff * 2**attempt, MAX_SLEEP))
    raise TransientIndexError(f"{failure} after {attempts} attempts")


def _halve(es: Elasticsearch, pending: list[Write], result: BulkResult, attempts: int, backoff: float,
           exc: ApiError) -> None:
    """A chunk over the server's request size limit: each half alone; one document over it alone
    can never be accepted: parked."""
    if len(pending) == 1:
        detail = f": {_error_text(exc.body, 413)}" if exc.body else ""
        result.parked.append((pending[0], f"413 the document is larger than the search server accepts in one "
                                          f"request (http.max_content_length){detail}"[:1000]))
        return
    half = len(pending) // 2
    _write_chunk(es, pending[:half], result, attempts, backoff)
    _write_chunk(es, pending[half:], result, attempts, backoff)


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
        elif status in (401, 403):
            raise IndexRefused(f"the search server refused writing to {w.target}: {_error_text(outcome.get('error'), status)}")
        else:
            result.parked.append((w, _error_text(outcome.get("error"), status)))
    return retry


def _error_text(error: Any, status: int) -> str:
    if isinstance(error, dict) and isinstance(error.get("error"), dict):  # a whole response's body
        error = error["error"]
    if isinstance(error, dict):
        reason = f"{error.get('type')}: {error.get('reason')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict):
            reason += f" (caused by {cause.get('type')}: {cause.get('reason')})"
        return f"{status} {reason}"
    return f"{status} {json.dumps(error)[:500]}"
