"""The conformance check (``tests/es_spec.py``): every request cqrskit sends to the search server,
recorded by the suite's front in front of osmem, against the official Elasticsearch specification
of the lowest and the highest supported major (8.x and 9.x, from Elastic's npm package
``@elastic/request-converter``, installed by ``.ci/run``; fetched here with npm when missing) and
the rules the types cannot express. osmem accepts what Elasticsearch refuses (a sort under a
nested field, an unknown property): only this check says a request would work on a real cluster."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cqrskit.app.declaration import App
from cqrskit.app.status import gather_status
from cqrskit.app.setup import setup_all
from cqrskit.app.testing import Harness
from cqrskit.examples.hotel import app as hotel_app
from cqrskit.examples.shop import app as shop_app
from cqrskit.examples.shop.load import ShopLoad
from cqrskit.infra.settings import Settings
from cqrskit.read_models.rebuild import rebuild
from tests.es_front import EsFront, Recorded
from tests.es_spec import VERSIONS, Specification, conformance, install, schema_path


@pytest.fixture(scope="module")
def specs() -> list[Specification]:
    """The specifications of 8.x and 9.x: installed by .ci/run; with npm, installed here when
    missing; without npm and without them, the tests are skipped saying why (never silently)."""
    if not all(schema_path(v).exists() for v in VERSIONS) and shutil.which("npm") is None:
        pytest.skip(f"the Elasticsearch specification is not installed ({schema_path(VERSIONS[0])}) and npm is "
                    "missing: run .ci/run, or npm install @elastic/request-converter as it does")
    return [Specification(install(v)) for v in VERSIONS]


@pytest.fixture(scope="module")
def front(search_url: str) -> Iterator[EsFront]:
    with EsFront(search_url) as f:
        yield f


def exercise(app: App, front: EsFront, tmp_path: Path, load: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Everything the product asks of the search server, for ``app``: setup, indexing, every
    declared sort in both directions paged through the cursor with facets and metrics, each
    filter, text, gets, query functions, read-your-writes, verify, a rebuild and status."""
    settings = Settings(app=f"cqrskit.examples.{app.name}:app", database_url=f"sqlite:///{tmp_path}/{app.name}.db",
                        elasticsearch_url=front.url, index_prefix=f"c{app.name}", elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    with Harness(app, f"sqlite:///{tmp_path}/{app.name}-h.db", front.url) as pipeline:
        token = None
        for type_, aggregate_id, payload in load:
            token = pipeline.send(type_, aggregate_id, payload).token or token
        for name, searchable in app.searchable.items():
            for sort in searchable.spec.sorts:
                for order in ("asc", "desc"):
                    params: dict[str, Any] = {"sort": sort, "order": order, "size": 2, "facets": True}
                    if sort == "relevance":
                        params |= {"text": "ada", "order": "desc"}
                    params = {k: v for k, v in params.items() if k in searchable.query_model.model_fields}
                    page = pipeline.search(name, consistent_with=token if name == "orders" else None, **params)
                    while page.next_cursor:
                        page = pipeline.search(name, **{**params, "cursor": page.next_cursor})
            for view in pipeline.search(name, size=1).items:
                pipeline.get(name, getattr(view, app_model(app, name).id_field, ""))
        for function in app.queries:
            pipeline.query(function.path, **FUNCTION_PARAMS.get(function.path, {}))
        assert all(report.ok for report in pipeline.verify())
        for model in app.read_models:
            rebuild(pipeline.engine, app.registry, pipeline.es, pipeline.prefix, model, replicas=0)
    gather_status(settings)


FUNCTION_PARAMS = {"/bookings/front-desk": {"start": "2030-01-01", "end": "2030-01-20"}}


def app_model(app: App, name: str) -> Any:
    return next(m for m in app.read_models if m.name == name)


def shop_commands() -> list[tuple[str, str, dict[str, Any]]]:
    load = ShopLoad(size=40, seed=3)
    return [(e.type, e.aggregate_id, e.payload) for _phase, envelopes in load.phases() for e in envelopes]


def test_every_request_conforms_to_the_specification_of_8_and_9(specs: list[Specification], front: EsFront,
                                                               tmp_path: Path) -> None:
    """G6, G8, G9 on a real cluster: every request of setup, indexing, searches (text, filters,
    facets, metrics, every sort both ways, cursors), gets, query functions, read-your-writes,
    verify, rebuild and status type-checks against Elasticsearch 8.x's and 9.x's specification,
    and keeps the rules (sortable fields, nested sorts, the result window, no scripts, no
    query_string, no compatible-with header)."""
    front.records.clear()
    exercise(shop_app, front, tmp_path, shop_commands())
    filters = [{"status": ["paid", "placed"]}, {"customer_id": "x"}, {"sku": "SKU-X"}, {"total_min": 1, "total_max": 10**6},
               {"placed_since": "2020-01-01T00:00:00Z", "placed_until": "2100-01-01T00:00:00Z"}, {"text": "ada lovelace"}]
    with Harness(shop_app, f"sqlite:///{tmp_path}/filters.db", front.url) as pipeline:
        for params in filters:
            pipeline.search("orders", **params)
        pipeline.search("products", in_stock=True, price_min=1, text="lamp")
    from tests.test_hotel_harness import stay  # the hotel's own booking payload
    from datetime import date

    hotel = [("AddRoom", "r1", {"number": "101", "room_type": "double", "rate_cents": 10000}),
             ("BookRoom", "b1", stay("r1", date(2030, 1, 1), 2, "Ada Lovelace")),
             ("BookRoom", "b2", stay("r1", date(2030, 2, 1), 1, "Grace Hopper")), ("CheckIn", "b1", {})]
    exercise(hotel_app, front, tmp_path, hotel)
    endpoints = {(e or {}).get("name") for e in (specs[0].endpoint(r.method, r.path) for r in front.records)}
    assert {"info", "bulk", "search", "get", "mget", "indices.create", "indices.exists_alias", "indices.get_alias",
            "indices.get_mapping", "indices.update_aliases", "indices.refresh", "indices.delete",
            "count"} <= endpoints, endpoints
    violations = conformance(front.records, specs)
    assert not violations, "\n".join(map(str, violations[:40]))


def recorded(method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> Recorded:
    raw = b"" if body is None else json.dumps(body).encode()
    return Recorded(method, path, query or {}, headers or {"content-type": "application/json"}, raw, None)


def test_the_check_fails_on_requests_the_specification_or_the_rules_refuse(specs: list[Specification]) -> None:
    """The check is not a rubber stamp: an unknown body property, a wrong type, an unknown
    endpoint or query parameter, a sort on a text field or under a nested field without a nested
    context, from + size beyond 10,000, a script, query_string and a compatible-with header are
    each reported; a correct request of each kind is not."""
    mapping = {"mappings": {"properties": {"id": {"type": "keyword"}, "note": {"type": "text"},
                                           "lines": {"type": "nested", "properties": {"sku": {"type": "keyword"}}}}},
               "aliases": {"t-m": {}}}
    create = recorded("PUT", "/t-m-v1", mapping)
    good = recorded("POST", "/t-m/_search", {"query": {"bool": {"filter": [{"term": {"id": "x"}}]}}, "size": 5,
                                             "sort": [{"id": {"order": "asc"}}], "search_after": ["a"]})
    bad = {
        "unknown property": recorded("POST", "/t-m/_search", {"query": {"match_all": {}}, "sizee": 3}),
        "wrong type": recorded("POST", "/t-m/_search", {"size": "many"}),
        "unknown query": recorded("POST", "/t-m/_search", {"query": {"matches": {"id": "x"}}}),
        "unknown endpoint": recorded("POST", "/t-m/_searchh", {}),
        "unknown parameter": recorded("POST", "/t-m/_search", {}, query={"scroll_size": "3"}),
        "text sort": recorded("POST", "/t-m/_search", {"sort": [{"note": {"order": "asc"}}]}),
        "nested sort": recorded("POST", "/t-m/_search", {"sort": [{"lines.sku": {"order": "asc"}}]}),
        "deep page": recorded("POST", "/t-m/_search", {"from": 9_990, "size": 20}),
        "script": recorded("POST", "/t-m/_search", {"query": {"script": {"script": {"source": "1"}}}}),
        "query_string": recorded("POST", "/t-m/_search", {"query": {"query_string": {"query": "a:b"}}}),
        "compatible-with": recorded("POST", "/t-m/_search", {}, headers={
            "content-type": "application/vnd.elasticsearch+json; compatible-with=9"}),
        "bad bulk line": Recorded("POST", "/_bulk", {}, {"content-type": "application/x-ndjson"},
                                  b'{"index": {"_index": "t-m", "version_type": "sometimes"}}\n{"a": 1}\n', None),
    }
    assert conformance([create, good], specs) == []
    for name, request in bad.items():
        found = conformance([create, request], specs)
        assert found, f"{name}: not reported"
    nested_ok = recorded("POST", "/t-m/_search", {"sort": [{"lines.sku": {"order": "asc", "nested": {"path": "lines"}}}]})
    assert conformance([create, nested_ok], specs) == []


def test_the_9x_client_works_against_8x_only_through_the_content_type_override(search_url: str) -> None:
    """G6/G8 on an 8.x cluster: elasticsearch-py 9.x sends ``compatible-with=9`` media types, which
    an 8.x cluster refuses (400 media_type_header_exception, as the front answers as 8.x); the
    client cqrskit makes sends plain JSON and works, on searches and bulk writes alike."""
    from elasticsearch import BadRequestError, Elasticsearch

    from cqrskit.read_models.search import make_client

    with EsFront(search_url, major=8) as eight:
        stock = Elasticsearch(eight.url)
        with pytest.raises(BadRequestError) as refused:
            stock.info()
        assert refused.value.body["error"]["type"] == "media_type_header_exception"
        stock.close()
        ours = make_client(eight.url)
        assert ours.info()["version"]["number"]
        ours.bulk(operations=[{"index": {"_index": "compat-8", "_id": "1"}}, {"a": 1}], refresh=True)
        assert ours.search(index="compat-8")["hits"]["total"]["value"] == 1
        ours.indices.delete(index="compat-8")
        ours.close()
        sent = [r.headers.get(h, "") for r in eight.records[1:] for h in ("accept", "content-type")]
        assert sent and not any("compatible-with" in value for value in sent)
