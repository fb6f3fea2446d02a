"""Bulk requests refused whole, and item errors, as Elasticsearch 8/9 answer them: real error
bodies replayed by the suite's front (``tests/es_front.py``) in front of osmem. A refusal of the
whole request is retried with backoff (413: the chunk halved) and loses nothing (G6); only item
errors that can never succeed are parked, with their error (G7)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from elasticsearch import Elasticsearch

from cqrskit.read_models.model import Document
from cqrskit.read_models.search import make_client
from cqrskit.read_models.writer import IndexRefused, TransientIndexError, Write, write_documents
from tests.es_front import EsFront

# Bodies as Elasticsearch 8.x/9.x sends them (the 413 of its HTTP layer has no body).
CIRCUIT_BREAKER = {"error": {"root_cause": [{"type": "circuit_breaking_exception", "reason": "[parent] Data too large, "
                   "data for [<http_request>] would be [1043324212/994.9mb], which is larger than the limit of "
                   "[1020054732/972.7mb], real usage: [1043324000/994.9mb], new bytes reserved: [212/212b]",
                   "bytes_wanted": 1043324212, "bytes_limit": 1020054732, "durability": "TRANSIENT"}],
                   "type": "circuit_breaking_exception", "reason": "[parent] Data too large, data for "
                   "[<http_request>] would be [1043324212/994.9mb], which is larger than the limit of "
                   "[1020054732/972.7mb]", "bytes_wanted": 1043324212, "bytes_limit": 1020054732,
                   "durability": "TRANSIENT"}, "status": 429}
REJECTED = {"error": {"root_cause": [{"type": "es_rejected_execution_exception", "reason": "rejected execution of "
            "coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, all_bytes=0, "
            "coordinating_operation_bytes=48503, max_coordinating_and_primary_bytes=53687091]"}],
            "type": "es_rejected_execution_exception", "reason": "rejected execution of coordinating operation"},
            "status": 429}
UNAVAILABLE = {"error": {"root_cause": [{"type": "cluster_block_exception", "reason": "blocked by: "
               "[SERVICE_UNAVAILABLE/2/no master];"}], "type": "cluster_block_exception",
               "reason": "blocked by: [SERVICE_UNAVAILABLE/2/no master];"}, "status": 503}
GATEWAY = {"message": "upstream connect error or disconnect/reset before headers"}
MAPPING = {"type": "strict_dynamic_mapping_exception", "reason": "[1:20] mapping set to strict, dynamic introduction "
           "of [extra] within [_doc] is not allowed"}
PARSING = {"type": "document_parsing_exception", "reason": "[1:10] failed to parse field [n] of type [long] in "
           "document with id 'd-2'. Preview of field's value: 'many'",
           "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"many\""}}
NO_ALIAS = {"type": "index_not_found_exception", "reason": "no such index [x-next] and [require_alias] request flag "
            "is [true] and [x-next] is not an alias", "index": "x-next"}


@pytest.fixture
def front(search_url: str) -> Iterator[EsFront]:
    with EsFront(search_url) as f:
        yield f


@pytest.fixture
def target(front: EsFront, index_prefix: str) -> Iterator[tuple[Elasticsearch, str]]:
    es = make_client(front.url)
    name = f"{index_prefix}-docs"
    es.indices.create(index=f"{name}-v1", aliases={name: {}}, settings={"number_of_shards": 1, "number_of_replicas": 0},
                      mappings={"dynamic": "strict", "properties": {"name": {"type": "keyword"}, "n": {"type": "long"}}})
    yield es, name
    es.indices.delete(index=f"{name}-v1", ignore_unavailable=True)
    es.close()


def writes(alias: str, count: int, version: int = 1) -> list[Write]:
    return [Write("docs", alias, Document(f"d-{i}", version, {"name": f"n{i}", "n": i})) for i in range(count)]


def stored(es: Elasticsearch, alias: str) -> dict[str, int]:
    es.indices.refresh(index=alias)
    hits = es.search(index=alias, size=1000, version=True)["hits"]["hits"]
    return {h["_id"]: h["_version"] for h in hits}


@pytest.mark.parametrize("status, body", [(429, CIRCUIT_BREAKER), (429, REJECTED), (503, UNAVAILABLE),
                                          (502, GATEWAY), (504, GATEWAY)],
                         ids=["429-breaker", "429-rejected", "503", "502", "504"])
def test_a_bulk_refused_whole_is_retried_and_loses_nothing(front: EsFront, target: tuple[Elasticsearch, str],
                                                           status: int, body: dict) -> None:  # type: ignore[type-arg]
    """G6: a bulk request refused whole (a circuit breaker, a full write queue, no master, a
    proxy's 502/504) is sent again after a backoff; every document arrives once, none parked."""
    es, alias = target
    front.fail(status, body, times=2, path="/_bulk")
    result = write_documents(es, writes(alias, 30), backoff=0.01)
    assert (result.written, result.stale, result.parked) == (30, 0, [])
    assert stored(es, alias) == {f"d-{i}": 1 for i in range(30)}
    assert [r.status for r in front.records if r.path == "/_bulk"] == [status, status, 200]


def test_a_refusal_that_outlasts_the_attempts_is_transient_and_nothing_is_parked(
        front: EsFront, target: tuple[Elasticsearch, str]) -> None:
    """G6, G7: a server that keeps refusing raises TransientIndexError (the indexer's message is
    retried later), never parks a document that was not at fault."""
    es, alias = target
    front.fail(429, CIRCUIT_BREAKER, times=3, path="/_bulk")
    with pytest.raises(TransientIndexError, match="circuit_breaking_exception"):
        write_documents(es, writes(alias, 5), attempts=3, backoff=0.01)
    assert write_documents(es, writes(alias, 5)).written == 5


def test_a_bulk_over_the_size_limit_is_halved_and_a_single_oversized_document_parked(
        front: EsFront, target: tuple[Elasticsearch, str]) -> None:
    """G6, G7: a 413 (over http.max_content_length) halves the chunk until it fits; a single
    document that alone is over the limit can never be accepted: it is parked with the reason,
    and the others are written."""
    es, alias = target
    front.fail(413, {}, times=2, path="/_bulk")  # the whole 16 and the first half of 8
    result = write_documents(es, writes(alias, 16), backoff=0.01)
    assert (result.written, result.parked) == (16, [])
    sizes = [len(r.json_body()) // 2 for r in front.records if r.path == "/_bulk"]
    assert sizes == [16, 8, 4, 4, 8]
    front.records.clear()
    front.fail(413, {}, times=2, path="/_bulk")  # the 2, then d-0 alone: too large; d-1 alone fits
    result = write_documents(es, writes(alias, 2, version=2), backoff=0.01)
    assert result.written == 1 and [(w.document.id, e[:3]) for w, e in result.parked] == [("d-0", "413")]
    assert "http.max_content_length" in result.parked[0][1]


def test_item_errors_parked_only_when_they_cannot_succeed(front: EsFront, target: tuple[Elasticsearch, str]) -> None:
    """G6, G7: per item, as Elasticsearch answers a bulk: 409 (the index holds this version or a
    newer one) is done, not parked; 404 on a rebuild's vanished ``-next`` alias is nothing to do;
    400 (strict mapping, a value the mapping refuses) is parked with the error and its cause;
    429 and 5xx items are retried; 403 items (the role) raise IndexRefused, nothing parked."""
    es, alias = target
    batch = writes(alias, 4)
    batch[3] = Write("docs", "x-next", batch[3].document, optional=True)
    items = [{"index": {"_index": alias, "_id": "d-0", "status": 409, "error": {
        "type": "version_conflict_engine_exception", "reason": "[d-0]: version conflict, current version [3] is "
        "higher or equal to the one provided [1]"}}},
             {"index": {"_index": alias, "_id": "d-1", "status": 400, "error": MAPPING}},
             {"index": {"_index": alias, "_id": "d-2", "status": 400, "error": PARSING}},
             {"index": {"_index": "x-next", "_id": "d-3", "status": 404, "error": NO_ALIAS}}]
    front.fail(200, {"took": 3, "errors": True, "items": items}, path="/_bulk")
    result = write_documents(es, batch, backoff=0.01)
    assert (result.written, result.stale) == (0, 1)
    parked = {w.document.id: error for w, error in result.parked}
    assert parked == {"d-1": f"400 strict_dynamic_mapping_exception: {MAPPING['reason']}",
                      "d-2": f"400 document_parsing_exception: {PARSING['reason']} (caused by "
                             f"illegal_argument_exception: For input string: \"many\")"}
    retried = [{"index": {"_index": alias, "_id": "d-0", "status": 429, "error": REJECTED["error"]}},
               {"index": {"_index": alias, "_id": "d-1", "status": 503, "error": UNAVAILABLE["error"]}}]
    front.fail(200, {"took": 1, "errors": True, "items": retried}, path="/_bulk")
    assert write_documents(es, writes(alias, 2), backoff=0.01).written == 2  # the second attempt went through
    refused = {"type": "security_exception", "reason": "action [indices:data/write/bulk[s]] is unauthorized"}
    front.fail(200, {"took": 1, "errors": True, "items": [{"index": {"_index": alias, "_id": "d-0", "status": 403,
                                                                     "error": refused}}]}, path="/_bulk")
    with pytest.raises(IndexRefused, match="security_exception"):
        write_documents(es, writes(alias, 1, version=5), backoff=0.01)
