"""The query API over HTTP (a live uvicorn), against real osmem holding the generated shop of
test_queries.py: answers equal the brute-force oracle; problem details for every error; hostile
input gets a 4xx or a correct answer, never a 5xx nor another field's data; schemathesis finds no
5xx; read-your-writes waits, bounded by the server's cap (G8)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
import structlog
import uvicorn
from hypothesis import HealthCheck, settings

from cqrskit.examples.shop import app as shop_app
from cqrskit.examples.shop.domain import registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.producers.commands import new_command
from cqrskit.examples.shop import queries as q
from cqrskit.read_models.api import create_app
from cqrskit.read_models.indexer import Indexer
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.search import make_client
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from api_checks import ALL_CHECKS, credentials, key_store, no_key
from tests.test_gateway import serving
from test_queries import ShopIndex, expected_ids, order_matches, shop  # noqa: F401 (shop: the fixture)
from cqrskit.workers.execution import CommandExecutor

SECRET = "query-api-test-secret"
CAP = 1.5  # the server's cap on waits, small for the tests


class LiveServer:
    """uvicorn serving the app in a thread, on a free port."""

    def __init__(self, settings: Settings, max_wait: float = CAP) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(create_app(settings, shop_app.read_models, shop_app.queries, max_wait=max_wait), host="127.0.0.1", port=port,
                                log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the query API did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def api(shop: ShopIndex) -> Iterator[httpx.Client]:  # noqa: F811
    settings = Settings(elasticsearch_url=shop.url, index_prefix=shop.prefix, token_secret=SECRET)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def pages(api: httpx.Client, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    body = _ok(api.get(path, params=params))
    yield body
    while body["next_cursor"]:
        body = _ok(api.get(path, params={**params, "cursor": body["next_cursor"]}))
        yield body


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    return body


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("params", [
    {"status": ["paid", "cancelled"], "sort": "total", "order": "asc", "size": 100},
    {"text": "Hopper", "placed_since": "2026-01-22", "size": 50},
])
def test_orders_over_http_equal_the_oracle(api: httpx.Client, shop: ShopIndex,  # noqa: F811
                                           params: dict[str, Any]) -> None:
    expected = expected_ids(shop.docs["orders"], q.ORDERS, q.OrderQuery(**params), order_matches)
    got = [o["order_id"] for body in pages(api, "/orders", params) for o in body["items"]]
    assert got == expected and expected
    item = _ok(api.get("/orders", params={**params, "size": 1}))["items"][0]
    assert set(item) == set(q.OrderView.model_fields)  # no _index, _version, streams...


def test_one_document_of_each_model_and_404(api: httpx.Client, shop: ShopIndex) -> None:  # noqa: F811
    for model in ("orders", "products", "customers"):
        doc_id, doc = next(iter(shop.docs[model].items()))
        body = _ok(api.get(f"/{model}/{doc_id}"))
        assert body[q.SPECS[model].id_field] == doc_id and "streams" not in body
        assert body.get("name", body.get("status")) == doc.get("name", doc.get("status"))
        problem = _problem(api.get(f"/{model}/no-such-id"), 404)
        assert "no-such-id" in problem["detail"]


def test_facets_and_aggregations_over_http(api: httpx.Client, shop: ShopIndex) -> None:  # noqa: F811
    facets = _ok(api.get("/orders", params={"facets": "true", "size": 1}))["facets"]
    assert sum(b["count"] for b in facets["status"]) == len(shop.docs["orders"])
    revenue = _ok(api.get("/orders/revenue", params={"interval": "month"}))
    assert sum(b["revenue_cents"] for b in revenue["buckets"]) == sum(
        d["total_cents"] for d in shop.orders() if d["status"] in q.SOLD)
    over_time = _ok(api.get("/orders/status-over-time", params={"interval": "week"}))
    assert sum(b["orders"] for b in over_time["buckets"]) == len(shop.docs["orders"])
    top = _ok(api.get("/products/top", params={"by": "revenue", "size": 3}))["items"]
    assert len(top) == 3 and top[0]["revenue_cents"] >= top[1]["revenue_cents"] >= top[2]["revenue_cents"]
    assert _ok(api.get("/health")) == {"status": "ok", "documents": {m: len(d) for m, d in shop.docs.items()}}


def test_errors_are_problem_details(api: httpx.Client) -> None:
    problem = _problem(api.get("/orders", params={"size": 500, "sort": "streams"}), 422)
    assert {tuple(e["loc"]) for e in problem["errors"]} == {("query", "size"), ("query", "sort")}
    assert "size" in problem["detail"] and "sort" in problem["detail"]
    first = _ok(api.get("/orders", params={"status": "paid", "size": 2}))
    problem = _problem(api.get("/orders", params={"status": "shipped", "cursor": first["next_cursor"]}), 400)
    assert "another query" in problem["detail"]
    _problem(api.get("/nowhere"), 404)
    assert _problem(api.post("/orders"), 405)


# ---------------------------------------------------------------- hostile input

NASTY = [
    "name:(a OR", "*", '"', "' OR 1=1 --", '{"query":{"match_all":{}}}', "_source", "\\", "a" * 201,
    "x" * 5000, "\x00", "a\x07b", "\u202eevil", "\ud800", "%00", "}}]]", "lines.sku:*", "customer.email",
    "<script>alert(1)</script>", "NaN", "-1", "1e400", "99999999999999999999999", "true", "[]", "null",
]
ENDPOINTS = {
    "/orders": ["text", "status", "customer_id", "sku", "placed_since", "placed_until", "total_min",
                "total_max", "sort", "order", "size", "cursor", "facets", "consistent_with", "wait",
                "_source", "query", "from"],
    "/products": ["text", "sku", "in_stock", "price_min", "price_max", "sort", "order", "size", "cursor"],
    "/customers": ["text", "email", "min_orders", "min_lifetime_value", "sort", "size", "cursor"],
    "/orders/revenue": ["interval", "text", "placed_since", "status"],
    "/orders/status-over-time": ["interval", "sku"],
    "/products/top": ["by", "size", "text"],
}


RESULTS: dict[str, Any] = {
    "/orders": q.OrderPage, "/products": q.ProductPage, "/customers": q.CustomerPage,
    "/orders/revenue": q.Revenue, "/orders/status-over-time": q.StatusOverTime,
    "/products/top": q.TopProducts,
}
INTERNALS = {"_index", "_id", "_version", "_score", "_source", "_seq_no", "_primary_term", "streams", "hits",
             "sort"}


def keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*(keys(v) for v in value.values()))
    return set().union(*(keys(v) for v in value)) if isinstance(value, list) else set()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_hostile_parameters_get_a_4xx_or_a_correct_answer(api: httpx.Client, shop: ShopIndex,  # noqa: F811
                                                          path: str) -> None:
    for name in ENDPOINTS[path]:
        for value in NASTY:
            raw = value.encode("utf-8", "surrogatepass")  # a lone surrogate goes as its (invalid) UTF-8 bytes
            response = api.get(f"{path}?{name}={quote(raw, safe='')}")
            assert response.status_code < 500, (path, name, value, response.text)
            if response.status_code != 200:
                assert response.headers["content-type"] == "application/problem+json"
            elif path == "/orders" and name == "text":
                query = q.OrderQuery(text=raw.decode("utf-8", "replace"), size=20)  # what the server received
                expected = expected_ids(shop.docs["orders"], q.ORDERS, query, order_matches)
                assert [o["order_id"] for o in response.json()["items"]] == expected[:20], value
            else:
                RESULTS[path].model_validate_json(response.content)
                assert not keys(response.json()) & INTERNALS

@pytest.mark.parametrize("raw", ["%ED%A0%80", "%FF%FE", "a%00b", "x" * 300, "..%2F..%2F_search", "_all", "*",
                                 "%2e%2e", "_doc%2F1", "%22%7D"])
def test_hostile_ids_get_a_404_or_422(api: httpx.Client, raw: str) -> None:
    for model in ("orders", "products", "customers"):
        response = api.get(f"/{model}/{raw}")
        assert response.status_code in (404, 422), (model, raw, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_text_reaches_only_the_searched_fields(api: httpx.Client, shop: ShopIndex) -> None:  # noqa: F811
    email = "qs-c42@example.com"
    assert _ok(api.get("/products", params={"text": email}))["items"] == []
    customers = _ok(api.get("/customers", params={"text": email}))["items"]
    assert [c["customer_id"] for c in customers] == ["qs-c42"]
    assert _ok(api.get("/customers", params={"text": "SKU-QS-P7"}))["items"] == []  # not a customer field
    assert _ok(api.get("/products", params={"text": "qs-c42"}))["items"] == []


# ---------------------------------------------------------------- schemathesis

SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(elasticsearch_url="http://unused:9"), shop_app.read_models,
                                                   shop_app.queries, authenticate=no_key).openapi())


@pytest.fixture(scope="module")
def keyed_api(shop: ShopIndex, pg_admin: str) -> Iterator[tuple[str, dict[str, str]]]:  # noqa: F811
    """The query API as deployed: API keys looked up in PostgreSQL; yields its URL and a key's header."""
    settings = Settings(elasticsearch_url=shop.url, index_prefix=shop.prefix, token_secret=SECRET)
    with key_store(pg_admin) as (authenticate, token):
        app = create_app(settings, shop_app.read_models, shop_app.queries, max_wait=0.2, authenticate=authenticate)
        with serving(app) as url:
            yield url, {"Authorization": f"Bearer {token}"}  # the name the schema declares


@pytest.mark.slow
@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_no_server_error_on_any_generated_request(case: Any, keyed_api: tuple[str, dict[str, str]]) -> None:
    """G10, G11: every operation, with data that fits its schema and data that does not, under
    every check schemathesis ships (``--checks all``), authenticated with a real API key: no 5xx,
    only documented answers, valid data accepted, invalid data refused, no answer without a key."""
    url, headers = keyed_api
    case.call_and_validate(base_url=url, headers=credentials(case, headers), timeout=30, checks=ALL_CHECKS)


# ---------------------------------------------------------------- read-your-writes (G8)

class LiveShop:
    """A small shop of its own (write store, index prefix, API), written and indexed step by step."""

    def __init__(self, store: EventStore, search_url: str, prefix: str) -> None:
        self.store, self.es, self.prefix = store, make_client(search_url), prefix
        self.executor = CommandExecutor(store, store.registry)
        self.indexer = Indexer(store.engine, store.registry, self.es, prefix, SHOP_READ_MODELS)
        self.indexed_up_to = 0
        for model in SHOP_READ_MODELS:
            ensure(self.es, store.engine, prefix, model)

    def run(self, type: str, aggregate_id: str, secret: str = SECRET, **payload: Any) -> str:
        """Execute a command; its consistency token, as the gateway makes it."""
        with structlog.testing.capture_logs():
            outcome = self.executor.execute(new_command(type, aggregate_id, payload).to_json())
        assert outcome.status.value == "succeeded", outcome.reason
        latest: dict[str, int] = {}
        for event in self.store.read_all(0, limit=100_000):
            if event.position in outcome.positions:
                latest[event.stream_id] = max(latest.get(event.stream_id, 0), event.version)
        return ConsistencyToken(tuple(sorted(latest.items()))).encode(secret)

    def index(self) -> None:
        events = self.store.read_all(self.indexed_up_to, limit=100_000)
        self.indexed_up_to = events[-1].position if events else self.indexed_up_to
        self.indexer.index_events([EventMessage.from_stored(e).model_dump(mode="json") for e in events])


@pytest.fixture
def live(sqlite_url: str, search_url: str, index_prefix: str) -> Iterator[tuple[LiveShop, httpx.Client]]:
    engine = make_engine(sqlite_url)
    shop_ = LiveShop(EventStore(engine, registry), search_url, index_prefix)
    settings = Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield shop_, client
    engine.dispose()


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_a_query_with_a_token_waits_for_the_write_then_answers(live: tuple[LiveShop, httpx.Client]) -> None:
    shop_, api = live
    shop_.run("RegisterCustomer", "c1", name="Ada Lovelace", email="ada@example.com")
    shop_.run("AddProduct", "p1", sku="MUG", name="Ceramic mug", price_cents=1200, stock=10)
    shop_.run("PlaceOrder", "o1", customer_id="c1", lines=[{"sku": "MUG", "quantity": 1}])
    shop_.index()
    token = shop_.run("PlaceOrder", "o2", customer_id="c1", lines=[{"sku": "MUG", "quantity": 2}])
    for path, pending in (("/orders/o2", "order:o2 at version 1"), ("/customers/c1", "order:o2 at version 1"),
                          ("/products/p1", "product:p1 at version 3"), ("/orders", "order:o2 at version 1")):
        response, took = timed(lambda p=path: api.get(p, params={"consistent_with": token, "wait": 0.3}))
        problem = _problem(response, 504)
        assert problem["pending"] == [pending] and problem["waited_seconds"] == 0.3
        assert pending in problem["detail"] and 0.3 <= took < 0.9, took
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(timed, lambda: api.get("/customers/c1", params={"consistent_with": token}))
        time.sleep(0.3)
        assert not waiting.done()
        shop_.index()
        response, took = waiting.result()
    assert _ok(response)["order_count"] == 2 and took < CAP
    for path in ("/orders/o2", "/products/p1", "/orders"):
        response, took = timed(lambda p=path: api.get(p, params={"consistent_with": token, "wait": 5}))
        assert _ok(response) and took < 0.5
    assert _ok(api.get("/products/p1"))["stock"] == 7
    assert _ok(api.get("/orders", params={"consistent_with": token}))["total"]["value"] == 2


def test_a_rename_is_awaited_in_every_order_of_the_customer(live: tuple[LiveShop, httpx.Client]) -> None:
    shop_, api = live
    shop_.run("RegisterCustomer", "c1", name="Ada Lovelace", email="ada@example.com")
    shop_.run("AddProduct", "p1", sku="MUG", name="Ceramic mug", price_cents=1200, stock=10)
    for order_id in ("o1", "o2"):
        shop_.run("PlaceOrder", order_id, customer_id="c1", lines=[{"sku": "MUG", "quantity": 1}])
    shop_.index()
    token = shop_.run("RenameCustomer", "c1", name="Countess of Lovelace")
    _problem(api.get("/orders", params={"consistent_with": token, "wait": 0}), 504)
    shop_.index()
    orders = _ok(api.get("/orders", params={"consistent_with": token}))["items"]
    names = {o["customer"]["name"] for o in orders}
    assert names == {"Countess of Lovelace"}


def test_forged_tokens_are_refused_and_waits_are_capped(live: tuple[LiveShop, httpx.Client]) -> None:
    shop_, api = live
    shop_.run("RegisterCustomer", "c1", name="Ada Lovelace", email="ada@example.com")
    shop_.index()
    forged = shop_.run("RenameCustomer", "c1", secret="not-the-secret", name="Mallory")
    ahead = ConsistencyToken((("customer:c1", 99),)).encode(SECRET)
    payload, signature = ahead.split(".")
    for bad in (forged, f"{payload}.{signature[:-2]}AA", f"{payload[:-2]}.{signature}", "garbage", "a.b.c",
                "."):
        problem = _problem(api.get("/customers", params={"consistent_with": bad, "wait": 60}), 400)
        assert problem["type"].endswith("invalid-token")
    response, took = timed(lambda: api.get("/customers/c1", params={"consistent_with": ahead, "wait": 3600}))
    assert _problem(response, 504)["waited_seconds"] == CAP
    assert CAP <= took < CAP + 0.6, took
    _problem(api.get("/customers", params={"consistent_with": ahead, "wait": -1}), 422)
