"""The typed queries (the shop's declared queries, cqrskit.examples.shop.queries) against real osmem holding a generated shop: every
query type answers exactly what a brute-force filter and sort over the write store's state gives
(the documents the read models' ``build`` computes for every id, as ``verify`` does); deep
pagination visits every match once, in order; read-your-writes waits are bounded (G8).

The shop: ``ShopLoad(size=4000)`` executed on SQLite (2,000 orders), its event times then spread
over 120 days in the write store (so that time buckets mean something), and indexed by rebuild.
It is built once per session and shared with test_query_api.py.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
import typer
from elasticsearch import Elasticsearch
from typer.testing import CliRunner

from cqrskit.examples.shop.domain import registry
from cqrskit.app.cli_search import register
from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import upgrade
from cqrskit.infra.schema import events
from cqrskit.infra.store import EventStore
from cqrskit.infra.settings import Settings
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.examples.shop.load import ShopLoad
from cqrskit.examples.shop import queries as q
from cqrskit.read_models import queryable
from cqrskit.read_models.indices import alias, ensure
from cqrskit.read_models.rebuild import rebuild
from cqrskit.read_models.search import make_client
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from cqrskit.read_models.source import WriteStoreSource, snapshot
from cqrskit.workers.execution import CommandExecutor

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
SPAN = timedelta(days=120)


@dataclass
class ShopIndex:
    es: Elasticsearch
    url: str
    prefix: str
    docs: dict[str, dict[str, dict[str, Any]]]  # read model -> id -> the fresh projection's document

    def orders(self) -> list[dict[str, Any]]:
        return list(self.docs["orders"].values())


_SHOPS: dict[str, ShopIndex] = {}


def build_shop(search_url: str, workdir: Any) -> ShopIndex:
    """The shared generated shop (built once per search server)."""
    if search_url not in _SHOPS:
        engine = make_engine(f"sqlite:///{workdir / 'write.db'}")
        upgrade(engine)
        executor = CommandExecutor(EventStore(engine, registry), registry)
        with structlog.testing.capture_logs():
            for _, commands in ShopLoad(size=4000, seed=5, tag="qs").phases():
                for command in commands:
                    executor.execute(command.to_json())
        _spread_event_times(engine)
        es, prefix = make_client(search_url), f"q{uuid.uuid4().hex[:8]}"
        docs: dict[str, dict[str, dict[str, Any]]] = {}
        with snapshot(engine) as conn:
            source = WriteStoreSource(conn, registry)
            for model in SHOP_READ_MODELS:
                ensure(es, engine, prefix, model)
                rebuild(engine, registry, es, prefix, model)
                ids = [i for chunk in source.all_ids(model.stream_type) for i in chunk]
                docs[model.name] = {i: d.source for i, d in model.build(source, ids).items()}
        engine.dispose()
        _SHOPS[search_url] = ShopIndex(es, search_url, prefix, docs)
    return _SHOPS[search_url]


def _spread_event_times(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        positions = [p for (p,) in conn.execute(sa.select(events.c.position).order_by(events.c.position))]
        step = SPAN / len(positions)
        update = (events.update().where(events.c.position == sa.bindparam("p"))
                  .values(recorded_at=sa.bindparam("t")))
        conn.execute(update, [{"p": p, "t": EPOCH + step * i} for i, p in enumerate(positions)])


@pytest.fixture(scope="session")
def shop(search_url: str, tmp_path_factory: pytest.TempPathFactory) -> ShopIndex:
    return build_shop(search_url, tmp_path_factory.mktemp("query-shop"))


# ---------------------------------------------------------------- the brute-force oracle

def words(value: str | None) -> set[str]:
    """Words as the standard analyzer splits the shop's text (letters and digits; dots inside)."""
    return set(re.findall(r"[0-9a-z]+(?:\.[0-9a-z]+)*", (value or "").lower()))


def has_words(text: str, *values: str | None) -> bool:
    wanted = words(text)
    return bool(wanted) and any(wanted <= words(v) for v in values)


def millis(value: str | None) -> int | None:
    return None if value is None else int(datetime.fromisoformat(value).timestamp() * 1000)


def order_matches(d: dict[str, Any], f: q.OrderFilters) -> bool:
    placed = millis(d["placed_at"])
    return all((
        not f.text or has_words(f.text, d["customer"]["name"], d["customer"]["email"],
                                *(line["name"] for line in d["lines"])),
        not f.status or d["status"] in f.status,
        not f.customer_id or d["customer"]["id"] == f.customer_id,
        not f.sku or any(line["sku"] == f.sku for line in d["lines"]),
        not f.placed_since or placed >= f.placed_since.timestamp() * 1000,
        not f.placed_until or placed < f.placed_until.timestamp() * 1000,
        f.total_min is None or d["total_cents"] >= f.total_min,
        f.total_max is None or d["total_cents"] <= f.total_max,
    ))


def product_matches(d: dict[str, Any], f: q.ProductQuery) -> bool:
    return all((
        not f.text or has_words(f.text, d["name"], d["description"]),
        not f.sku or d["sku"] == f.sku,
        f.in_stock is None or (d["stock"] > 0) == f.in_stock,
        f.price_min is None or d["price_cents"] >= f.price_min,
        f.price_max is None or d["price_cents"] <= f.price_max,
    ))


def customer_matches(d: dict[str, Any], f: q.CustomerQuery) -> bool:
    return all((
        not f.text or has_words(f.text, d["name"], d["email"]),
        not f.email or d["email"] == f.email,
        f.min_orders is None or d["order_count"] >= f.min_orders,
        f.min_lifetime_value is None or d["lifetime_value_cents"] >= f.min_lifetime_value,
    ))


def field(d: dict[str, Any], path: str) -> Any:
    for part in path.removesuffix(".keyword").split("."):
        d = d[part]
    return millis(d) if isinstance(d, str) and path.endswith("_at") else d


SCORES: dict[str, Callable[[dict[str, Any], str], int]] = {
    "orders": lambda d, text: (4 * has_words(text, d["customer"]["name"])
                               + 2 * has_words(text, d["customer"]["email"])
                               + has_words(text, *(line["name"] for line in d["lines"]))),
    "products": lambda d, text: 2 * has_words(text, d["name"]) + has_words(text, d["description"]),
    "customers": lambda d, text: 2 * has_words(text, d["name"]) + has_words(text, d["email"]),
}


def expected_ids(docs: dict[str, dict[str, Any]], spec: Any, query: Any,
                 matches: Callable[..., bool]) -> list[str]:
    """Matching ids sorted as the query asks (relevance: the weights of the fields holding every word),
    then by id."""
    found = sorted(i for i, d in docs.items() if matches(d, query))
    if (query.sort or ("relevance" if query.text else None)) == "relevance":
        return sorted(found, key=lambda i: -SCORES[spec.name](docs[i], query.text))
    path, _, default = spec.sorts[query.sort or spec.default_sort]
    return sorted(found, key=lambda i: field(docs[i], path), reverse=(query.order or default) == "desc")


def every_page(run: Callable[[Any], Any], query: Any) -> Iterator[Any]:
    page = run(query)
    yield page
    while page.next_cursor:
        page = run(query.model_copy(update={"cursor": page.next_cursor}))
        yield page


def all_ids(pages: Iterator[Any], id_field: str) -> list[str]:
    return [getattr(item, id_field) for page in pages for item in page.items]


# ---------------------------------------------------------------- searches

ORDER_CASES = [
    {},
    {"status": ["shipped", "paid"], "sort": "total"},
    {"text": "Renamed", "sort": "placed_at", "order": "asc"},
    {"text": "qs-c17@example.com", "sort": "units"},
    {"text": "ceramic mug", "sort": "units", "order": "asc"},
    {"text": "grinder", "status": ["cancelled"], "total_min": 5000, "sort": "customer_name"},
    {"sku": "SKU-QS-P7", "sort": "customer_name", "order": "desc"},
    {"customer_id": "qs-c3", "sort": "updated_at"},
    {"placed_since": "2026-01-20T00:00:00Z", "placed_until": "2026-02-01", "total_max": 9000,
     "sort": "updated_at", "order": "asc"},
    {"text": "lovelace"},
    {"text": "qs", "status": ["placed"], "sort": "relevance"},
]


@pytest.mark.parametrize("params", ORDER_CASES, ids=lambda p: ",".join(p) or "default")
def test_orders_match_brute_force_in_order_across_all_pages(shop: ShopIndex, params: dict[str, Any]) -> None:
    query = q.OrderQuery(size=97, **params)
    expected = expected_ids(shop.docs["orders"], q.ORDERS, query, order_matches)
    assert expected, "a case that matches nothing proves little"
    pages = list(every_page(lambda x: q.search_orders(shop.es, shop.prefix, x), query))
    assert all_ids(iter(pages), "order_id") == expected
    assert {(p.total.value, p.total.relation) for p in pages} == {(len(expected), "eq")}
    first = q.search_orders(shop.es, shop.prefix, query.model_copy(update={"size": 20}))
    assert [o.order_id for o in first.items] == expected[:20]


def test_order_documents_are_views_of_the_projection(shop: ShopIndex) -> None:
    page = q.search_orders(shop.es, shop.prefix, q.OrderQuery(size=50))
    for item in page.items:
        view = item.model_dump(mode="json", exclude={"score"})
        doc = {k: v for k, v in shop.docs["orders"][item.order_id].items() if k != "streams"}
        assert {k: (millis(v) if k.endswith("_at") else v) for k, v in view.items()} == \
               {k: (millis(v) if k.endswith("_at") else v) for k, v in doc.items()}
        assert item.score is None


PRODUCT_CASES = [
    {}, {"text": "stoneware mug", "sort": "price"}, {"in_stock": True, "sort": "units_sold"},
    {"price_min": 2000, "price_max": 6000, "sort": "stock", "order": "asc"}, {"sku": "SKU-QS-P9"},
    {"sort": "added_at"}, {"text": "Kettle", "sort": "name", "order": "desc"}, {"text": "1"}, {"text": "mug"},
]


@pytest.mark.parametrize("params", PRODUCT_CASES, ids=lambda p: ",".join(p) or "default")
def test_products_match_brute_force(shop: ShopIndex, params: dict[str, Any]) -> None:
    query = q.ProductQuery(size=7, **params)
    expected = expected_ids(shop.docs["products"], q.PRODUCTS, query, product_matches)
    assert expected
    pages = every_page(lambda x: q.search_products(shop.es, shop.prefix, x), query)
    assert all_ids(pages, "product_id") == expected


CUSTOMER_CASES = [
    {}, {"text": "renamed", "sort": "lifetime_value"}, {"min_orders": 7, "sort": "order_count"},
    {"min_lifetime_value": 100_000, "sort": "registered_at", "order": "asc"}, {"email": "qs-c42@example.com"},
    {"text": "qs-c42@example.com"}, {"text": "Ada", "sort": "name", "order": "desc"},
]


@pytest.mark.parametrize("params", CUSTOMER_CASES, ids=lambda p: ",".join(p) or "default")
def test_customers_match_brute_force(shop: ShopIndex, params: dict[str, Any]) -> None:
    query = q.CustomerQuery(size=33, **params)
    expected = expected_ids(shop.docs["customers"], q.CUSTOMERS, query, customer_matches)
    assert expected
    pages = every_page(lambda x: q.search_customers(shop.es, shop.prefix, x), query)
    assert all_ids(pages, "customer_id") == expected


def test_an_email_matches_through_the_email_field_only(shop: ShopIndex) -> None:
    email = "qs-c42@example.com"
    customers = q.search_customers(shop.es, shop.prefix, q.CustomerQuery(text=email))
    assert [c.customer_id for c in customers.items] == ["qs-c42"]
    pages = every_page(lambda x: q.search_orders(shop.es, shop.prefix, x), q.OrderQuery(text=email))
    theirs = [i for i, d in shop.docs["orders"].items() if d["customer"]["id"] == "qs-c42"]
    assert sorted(all_ids(pages, "order_id")) == sorted(theirs)
    assert q.search_products(shop.es, shop.prefix, q.ProductQuery(text=email)).items == []


def test_relevance_ranks_by_the_fields_that_match(shop: ShopIndex) -> None:
    page = q.search_products(shop.es, shop.prefix, q.ProductQuery(text="1", size=100))
    scores = [p.score for p in page.items]
    assert {1.0, 2.0} <= set(scores) and scores == sorted(scores, reverse=True)
    assert all(p.score == SCORES["products"](shop.docs["products"][p.product_id], "1") for p in page.items)


# ---------------------------------------------------------------- facets and aggregations

@pytest.mark.parametrize("params", [{}, {"text": "espresso"}, {"status": ["cancelled", "placed"]}])
def test_facets_count_every_match(shop: ShopIndex, params: dict[str, Any]) -> None:
    query = q.OrderQuery(facets=True, size=1, **params)
    matched = [d for d in shop.orders() if order_matches(d, query)]
    page = q.search_orders(shop.es, shop.prefix, query)
    by_status = Counter(d["status"] for d in matched)
    by_sku = Counter(sku for d in matched for sku in {line["sku"] for line in d["lines"]})
    assert page.facets is not None
    assert [(b.key, b.count) for b in page.facets.status] == ranked(by_status, 10)
    assert [(b.key, b.count) for b in page.facets.sku] == ranked(by_sku, q.FACET_SIZE)


def bucket_start(placed: str, interval: str) -> datetime:
    at = datetime.fromisoformat(placed)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1) if interval == "month" else day


def ranked(counts: Counter[str], n: int) -> list[tuple[str, int]]:
    """As a terms aggregation orders buckets: count descending, then key."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def histogram(docs: list[dict[str, Any]], interval: str,
              value: Callable[[list[dict[str, Any]]], Any]) -> list[tuple[datetime, int, Any]]:
    """Buckets from the first to the last (empty ones included), as date_histogram with min_doc_count 0."""
    groups: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for d in docs:
        groups[bucket_start(d["placed_at"], interval)].append(d)
    if not groups:
        return []
    out, at = [], min(groups)
    while at <= max(groups):
        out.append((at, len(groups[at]), value(groups[at])))
        at = bucket_start((at + timedelta(days=32 if interval == "month" else 7 if interval == "week" else 1))
                          .isoformat(), interval)
    return out


@pytest.mark.parametrize("interval,params", [("day", {}), ("week", {"text": "tumbler"}), ("month", {}),
                                             ("day", {"placed_since": "2026-01-25", "status": ["paid"]})])
def test_revenue_per_interval(shop: ShopIndex, interval: str, params: dict[str, Any]) -> None:
    query = q.OrderStatsQuery(interval=interval, **params)
    sold = [d for d in shop.orders() if order_matches(d, query) and d["status"] in q.SOLD]
    expected = histogram(sold, interval, lambda ds: sum(d["total_cents"] for d in ds))
    result = q.revenue(shop.es, shop.prefix, query)
    assert [(b.start, b.orders, b.revenue_cents) for b in result.buckets] == expected
    assert len(expected) > (1 if interval == "month" else 3)


@pytest.mark.parametrize("interval", ["day", "week"])
def test_orders_per_status_over_time(shop: ShopIndex, interval: str) -> None:
    query = q.OrderStatsQuery(interval=interval)
    expected = histogram(shop.orders(), interval, lambda ds: dict(Counter(d["status"] for d in ds)))
    result = q.status_over_time(shop.es, shop.prefix, query)
    assert [(b.start, b.orders, b.by_status) for b in result.buckets] == expected


@pytest.mark.parametrize("by,params", [("units", {}), ("revenue", {}),
                                       ("revenue", {"text": "hopper", "size": 5})])
def test_top_products(shop: ShopIndex, by: str, params: dict[str, Any]) -> None:
    query = q.TopProductsQuery(by=by, **params)
    per_sku: dict[str, list[Any]] = defaultdict(lambda: [None, 0, 0, 0])  # name, units, revenue, orders
    for d in shop.orders():
        if order_matches(d, query) and d["status"] in q.SOLD:
            for line in d["lines"]:
                row = per_sku[line["sku"]]
                row[0] = line["name"]
                row[1:] = [row[1] + line["quantity"], row[2] + line["total_cents"], row[3] + 1]
    metric = 1 if by == "units" else 2
    ranked = sorted(per_sku.items(), key=lambda kv: (-kv[1][metric], kv[0]))[: query.size]
    result = q.top_products(shop.es, shop.prefix, query)
    assert [(p.sku, p.name, p.units, p.revenue_cents, p.orders) for p in result.items] == \
           [(sku, *row) for sku, row in ranked]


# ---------------------------------------------------------------- cursors

def test_a_cursor_only_serves_its_own_query(shop: ShopIndex) -> None:
    query = q.OrderQuery(status=["paid"], size=5)
    cursor = q.search_orders(shop.es, shop.prefix, query).next_cursor
    assert cursor
    bigger = q.search_orders(shop.es, shop.prefix, query.model_copy(update={"cursor": cursor, "size": 50}))
    assert len(bigger.items) == 50  # size may change between pages
    same_statuses = q.OrderQuery(status=["paid", "paid"], size=5, cursor=cursor)
    assert q.search_orders(shop.es, shop.prefix, same_statuses).items
    others = ({"status": ["shipped"]}, {"sort": "total"}, {"order": "asc"},
              {"text": "ada", "sort": "placed_at"})
    for other in others:
        with pytest.raises(q.QueryError, match="another query"):
            query = q.OrderQuery(cursor=cursor, **{"status": ["paid"], **other})
            q.search_orders(shop.es, shop.prefix, query)
    with pytest.raises(q.QueryError, match="another query"):
        q.search_customers(shop.es, shop.prefix, q.CustomerQuery(cursor=cursor))
    for damaged in ("x" * 7, cursor[:-3], "W10", "eyJxIjoxfQ", "W1tb" * 450):
        with pytest.raises(q.QueryError):
            q.search_orders(shop.es, shop.prefix, q.OrderQuery(status=["paid"], cursor=damaged))
    fingerprint = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["q"]
    for after in ([float("nan"), "x"], [10**30, "x"], [1.5, "x"], ["x", "x"], [1, 2], [1], [True, "x"]):
        forged = base64.urlsafe_b64encode(json.dumps({"q": fingerprint, "after": after}).encode()).decode()
        with pytest.raises(q.QueryError, match="damaged"):
            query = q.OrderQuery(status=["paid"], size=5, cursor=forged.rstrip("="))
            q.search_orders(shop.es, shop.prefix, query)


@pytest.mark.parametrize("bad", [
    {"size": 0}, {"size": 101}, {"sort": "streams"}, {"sort": "customer.email"}, {"order": "sideways"},
    {"text": ""}, {"text": "a\x00b"}, {"text": "\ud800"}, {"text": "x" * 201}, {"_source": "streams"},
    {"status": ["new"]}, {"total_min": -1}, {"sort": "relevance"},
    {"text": "a", "sort": "relevance", "order": "asc"},
    {"placed_since": "9999-12-31T23:59:59-05:00"}, {"cursor": "not base64!"},
])
def test_bad_parameters_are_refused_before_any_search(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        q.OrderQuery(**bad)


# ---------------------------------------------------------------- read-your-writes (G8)

def test_waits_until_reflected_and_no_longer_than_the_timeout(shop: ShopIndex) -> None:
    order_id, doc = next(iter(shop.docs["orders"].items()))
    (order_stream, order_v), (customer_stream, customer_v) = ((s["id"], s["version"]) for s in doc["streams"])
    reflected = ConsistencyToken(((order_stream, order_v), (customer_stream, customer_v),
                                  ("product:qs-p1", 99)))
    for model in ("orders", "customers"):
        assert q.wait_until_reflected(shop.es, shop.prefix, model, reflected, timeout=1.0)
    ahead = ConsistencyToken(((order_stream, order_v + 1),))
    for model in ("orders", "customers"):
        started = time.monotonic()
        assert not q.wait_until_reflected(shop.es, shop.prefix, model, ahead, timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 1.0
    assert q.wait_until_reflected(shop.es, shop.prefix, "products", ahead, timeout=0)  # not its stream type
    renamed_later = ConsistencyToken(((customer_stream, customer_v + 1),))
    assert not q.wait_until_reflected(shop.es, shop.prefix, "orders", renamed_later, timeout=0)
    awaited = [str(a) for a in q.awaited("customers", renamed_later)]
    assert awaited == [f"{customer_stream} at version {customer_v + 1}"]


def test_holders_are_read_page_after_page(shop: ShopIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    customer_id, customer = max(shop.docs["customers"].items(), key=lambda kv: kv[1]["order_count"])
    version = next(s["version"] for s in customer["streams"] if s["id"] == f"customer:{customer_id}")
    last_order = max(i for i, d in shop.docs["orders"].items() if d["customer"]["id"] == customer_id)
    order_version = shop.docs["orders"][last_order]["streams"][0]["version"]
    assert customer["order_count"] > 3
    monkeypatch.setattr(queryable, "HOLDERS_PAGE", 2)  # the customer's orders come two by two, the last one last
    current = ConsistencyToken(((f"customer:{customer_id}", version), (f"order:{last_order}", order_version)))
    assert q.pending(shop.es, shop.prefix, "orders", q.awaited("orders", current)) == []
    ahead = ConsistencyToken(((f"customer:{customer_id}", version),
                              (f"order:{last_order}", order_version + 1)))
    assert [str(c) for c in q.pending(shop.es, shop.prefix, "orders", q.awaited("orders", ahead))] == \
           [f"order:{last_order} at version {order_version + 1}"]


def test_index_holds_what_the_projection_computes(shop: ShopIndex) -> None:
    """The oracle's premise: the index equals the fresh projection, document for document."""
    for name, docs in shop.docs.items():
        shop.es.indices.refresh(index=alias(shop.prefix, name))
        assert shop.es.count(index=alias(shop.prefix, name))["count"] == len(docs) > 0
    sample = list(shop.docs["orders"])[::97]
    found = shop.es.mget(index=alias(shop.prefix, "orders"), ids=sample)["docs"]
    assert [d["_source"] for d in found] == [shop.docs["orders"][i] for i in sample]


# ---------------------------------------------------------------- the command line

def test_search_command_prints_tables_and_json(shop: ShopIndex) -> None:
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = Settings(elasticsearch_url=shop.url, index_prefix=shop.prefix)

    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["search", "orders", "--status", "cancelled", "--facets", "--size", "3"],
                           env={"COLUMNS": "200"})
    cancelled = sum(d["status"] == "cancelled" for d in shop.orders())
    assert result.exit_code == 0, result.output
    assert f"3 of {cancelled}" in result.output and "--cursor" in result.output and "facets" in result.output
    result = runner.invoke(app, ["search", "customers", "--text", "qs-c42@example.com", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["items"][0]["customer_id"] == "qs-c42"
    for args, message in ((["search", "products", "--status", "paid"], "does not apply"),
                          (["search", "orders", "--size", "500"], "size"), (["search", "things"], "unknown"),
                          (["search", "orders", "--cursor", "abc"], "cursor")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
