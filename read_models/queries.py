"""Typed queries over the shop's read models, as a back office asks them, and read-your-writes (G8).

Contracts:
- user input never becomes query DSL: words go into ``match`` queries as values, filters into
  ``term``/``terms``/``range`` values, and sort fields come from a whitelist; unknown
  parameters are refused (``extra="forbid"``), strings with control characters or lone
  surrogates too;
- text means: every word of ``text`` appears in one searched field (for orders: the customer's
  name, or their email, or the product name of one line), as the standard analyzer splits words;
  relevance is the sum of the weights of the fields that hold every word (a constant score: exact,
  reproducible, and safe for ``search_after``), ties broken by id;
- every sort ends with the document id, so ``search_after`` pages visit each match exactly once
  while the index stands still; the cursor is opaque (base64url JSON of the last sort values and
  a fingerprint of the query) and ``QueryError`` refuses it with any other query. No ``from``:
  the first page starts at the top, later pages at their cursor. ``size`` may change between pages;
- results are DTOs: index names, versions and the ``streams`` bookkeeping never leak out;
- ``total`` counts exactly up to ``TOTAL_CAP`` and says ``gte`` beyond;
- aggregations are exact on one shard (ours); money counts paid and shipped orders only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from elasticsearch import ConnectionTimeout, Elasticsearch, NotFoundError
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator,
                      model_validator)

from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.read_models.indices import alias
from cqrskit.read_models.model import iso

TOTAL_CAP = 10_000
FACET_SIZE = 20
SOLD = ["paid", "shipped"]
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class QueryError(ValueError):
    """A well-formed request that cannot be answered as asked: a bad or foreign cursor (HTTP 400)."""


def _plain(value: str) -> str:
    if _FORBIDDEN.search(value):
        raise ValueError("control characters and lone surrogates are not allowed")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date out of range") from None


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
                 AfterValidator(_plain)]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_plain)]
Cents = Annotated[int, Field(ge=0, le=10**15)]
When = Annotated[datetime, AfterValidator(_utc)]
OrderStatus = Literal["placed", "paid", "shipped", "cancelled"]
Direction = Literal["asc", "desc"]
Interval = Literal["day", "week", "month"]


# ---------------------------------------------------------------- requests

class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Page(_Query):
    order: Direction | None = Field(None, description="Sort direction; the default depends on the sort.")
    size: int = Field(20, ge=1, le=100, description="Items per page (at most 100).")
    cursor: str | None = Field(None, min_length=1, max_length=2000, pattern=r"^[A-Za-z0-9_-]+$",
                               description="`next_cursor` of the previous page (same parameters).")

    @model_validator(mode="after")
    def _relevance(self) -> _Page:
        if getattr(self, "sort", None) == "relevance":
            if not getattr(self, "text", None):
                raise ValueError("sort=relevance needs text")
            if self.order == "asc":
                raise ValueError("sort=relevance is always descending")
        return self


class OrderFilters(_Query):
    text: Text | None = Field(None, description="Words that all appear in the customer's name, or all in "
                                                "their email, or all in the product name of one line. "
                                                "Relevance: name 4 + email 2 + product name 1.")
    status: list[OrderStatus] = Field(default_factory=list, max_length=4, description="Any of these.")
    customer_id: Ident | None = None
    sku: Ident | None = Field(None, description="Orders with a line of this sku.")
    placed_since: When | None = Field(None, description="Placed at or after (ISO 8601; UTC when no offset).")
    placed_until: When | None = Field(None, description="Placed before (ISO 8601; UTC when no offset).")
    total_min: Cents | None = Field(None, description="Order total at least (cents).")
    total_max: Cents | None = Field(None, description="Order total at most (cents).")

    @field_validator("status")
    @classmethod
    def _canonical(cls, value: list[str]) -> list[str]:
        return sorted(set(value))


class OrderQuery(OrderFilters, _Page):
    sort: Literal["placed_at", "updated_at", "total", "units", "customer_name", "relevance"] | None = Field(
        None, description="Default: relevance with text, else placed_at (newest first).")
    facets: bool = Field(False, description="Add counts by status and by sku over all matches.")


class ProductQuery(_Page):
    text: Text | None = Field(None, description="Words that all appear in the name, or all in the "
                                                "description. Relevance: name 2 + description 1.")
    sku: Ident | None = None
    in_stock: bool | None = Field(None, description="true: stock above zero; false: none left.")
    price_min: Cents | None = Field(None, description="Price at least (cents).")
    price_max: Cents | None = Field(None, description="Price at most (cents).")
    sort: Literal["name", "price", "units_sold", "stock", "added_at", "relevance"] | None = Field(
        None, description="Default: relevance with text, else name.")


class CustomerQuery(_Page):
    text: Text | None = Field(None, description="Words that all appear in the name, or all in the email. "
                                                "Relevance: name 2 + email 1.")
    email: Ident | None = Field(None, description="Exactly this email address.")
    min_orders: int | None = Field(None, ge=0, le=10**9, description="At least this many orders.")
    min_lifetime_value: Cents | None = Field(None, description="Paid and shipped orders worth at least "
                                                                "(cents).")
    sort: Literal["name", "lifetime_value", "order_count", "registered_at", "relevance"] | None = Field(
        None, description="Default: relevance with text, else name.")


class OrderStatsQuery(OrderFilters):
    interval: Interval = Field("day", description="Calendar bucket (UTC).")


class TopProductsQuery(OrderFilters):
    by: Literal["units", "revenue"] = Field("units", description="Rank by units sold or by revenue.")
    size: int = Field(10, ge=1, le=100, description="How many products.")


# ---------------------------------------------------------------- responses

class _View(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CustomerRef(_View):
    id: str
    name: str | None = None
    email: str | None = None


class LineView(_View):
    sku: str
    product_id: str
    name: str
    quantity: int
    unit_price_cents: int
    total_cents: int


class OrderView(_View):
    order_id: str
    status: str
    customer: CustomerRef
    lines: list[LineView]
    line_count: int
    units: int
    total_cents: int
    placed_at: datetime | None = None
    paid_at: datetime | None = None
    shipped_at: datetime | None = None
    cancelled_at: datetime | None = None
    updated_at: datetime | None = None
    score: float | None = Field(None, description="Relevance (sort=relevance only).")


class ProductView(_View):
    product_id: str
    sku: str
    name: str
    description: str | None = None
    price_cents: int
    stock: int
    units_sold: int
    added_at: datetime | None = None
    score: float | None = Field(None, description="Relevance (sort=relevance only).")


class CustomerView(_View):
    customer_id: str
    name: str
    email: str
    order_count: int
    lifetime_value_cents: int
    registered_at: datetime | None = None
    score: float | None = Field(None, description="Relevance (sort=relevance only).")


V = TypeVar("V", bound=_View)


class Total(BaseModel):
    value: int
    relation: Literal["eq", "gte"] = Field(description="gte: at least this many (counting stops at 10,000).")


class Bucket(BaseModel):
    key: str
    count: int


class OrderFacets(BaseModel):
    status: list[Bucket]
    sku: list[Bucket] = Field(description=f"The {FACET_SIZE} skus on most matching orders.")


class Page(BaseModel, Generic[V]):
    items: list[V]
    total: Total
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class OrderPage(Page[OrderView]):
    facets: OrderFacets | None = None


class ProductPage(Page[ProductView]):
    pass


class CustomerPage(Page[CustomerView]):
    pass


class RevenueBucket(BaseModel):
    start: datetime
    orders: int
    revenue_cents: int


class Revenue(BaseModel):
    interval: Interval
    buckets: list[RevenueBucket] = Field(description="Paid and shipped orders by placement time; empty "
                                                     "buckets between the first and the last included.")


class StatusBucket(BaseModel):
    start: datetime
    orders: int
    by_status: dict[str, int]


class StatusOverTime(BaseModel):
    interval: Interval
    buckets: list[StatusBucket]


class TopProduct(BaseModel):
    sku: str
    name: str | None
    units: int
    revenue_cents: int
    orders: int


class TopProducts(BaseModel):
    by: Literal["units", "revenue"]
    items: list[TopProduct] = Field(description="Over the paid and shipped orders that match.")


# ---------------------------------------------------------------- query building

_NUMBER, _KEYWORD, _SCORE = "number", "keyword", "score"
NESTED = {"lines"}
SortKey = tuple[str, str, str]  # (field, kind, direction)


@dataclass(frozen=True)
class _Spec:
    name: str
    id_field: str
    query_type: type[_Page]
    view: type[_View]
    sorts: dict[str, tuple[str, str, Direction]]  # public name -> (field, kind, default direction)
    default_sort: str
    clauses: Callable[[Any], tuple[list[dict[str, Any]], list[dict[str, Any]]]]  # (must, filter)


def _text(text: str, weights: dict[str, float]) -> dict[str, Any]:
    """Documents where every word of ``text`` appears in one of the fields (``lines.*``: in one line);
    the score is the sum of the weights of the fields that hold them all. Constant scores keep the
    relevance order exact and reproducible, and ``search_after`` on it exact on every server."""
    should = []
    for name, weight in weights.items():
        match = {"match": {name: {"query": text, "operator": "and"}}}
        clause = {"constant_score": {"filter": match, "boost": weight}}
        path = name.split(".")[0]
        nested = {"nested": {"path": path, "score_mode": "max", "query": clause}}
        should.append(nested if path in NESTED else clause)
    return {"bool": {"should": should, "minimum_should_match": 1}}


def _ranges(field: str, **bounds: Any) -> list[dict[str, Any]]:
    bounds = {k: iso(v) if isinstance(v, datetime) else v for k, v in bounds.items() if v is not None}
    return [{"range": {field: bounds}}] if bounds else []


def _order_clauses(q: OrderFilters) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    must = [_text(q.text, {"customer.name": 4, "customer.email": 2, "lines.name": 1})] if q.text else []
    filters: list[dict[str, Any]] = [{"terms": {"status": q.status}}] if q.status else []
    if q.customer_id:
        filters.append({"term": {"customer.id": q.customer_id}})
    if q.sku:
        filters.append({"nested": {"path": "lines", "query": {"term": {"lines.sku": q.sku}}}})
    filters += _ranges("placed_at", gte=q.placed_since, lt=q.placed_until)
    filters += _ranges("total_cents", gte=q.total_min, lte=q.total_max)
    return must, filters


def _product_clauses(q: ProductQuery) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    must = [_text(q.text, {"name": 2, "description": 1})] if q.text else []
    filters = [{"term": {"sku": q.sku}}] if q.sku else []
    if q.in_stock is not None:
        filters += _ranges("stock", gt=0) if q.in_stock else _ranges("stock", lte=0)
    filters += _ranges("price_cents", gte=q.price_min, lte=q.price_max)
    return must, filters


def _customer_clauses(q: CustomerQuery) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    must = [_text(q.text, {"name": 2, "email": 1})] if q.text else []
    filters = [{"term": {"email.keyword": q.email}}] if q.email else []
    filters += _ranges("order_count", gte=q.min_orders)
    filters += _ranges("lifetime_value_cents", gte=q.min_lifetime_value)
    return must, filters


_RELEVANCE = ("_score", _SCORE, "desc")
ORDERS = _Spec("orders", "order_id", OrderQuery, OrderView, {
    "placed_at": ("placed_at", _NUMBER, "desc"), "updated_at": ("updated_at", _NUMBER, "desc"),
    "total": ("total_cents", _NUMBER, "desc"), "units": ("units", _NUMBER, "desc"),
    "customer_name": ("customer.name.keyword", _KEYWORD, "asc"), "relevance": _RELEVANCE,
}, "placed_at", _order_clauses)
PRODUCTS = _Spec("products", "product_id", ProductQuery, ProductView, {
    "name": ("name.keyword", _KEYWORD, "asc"), "price": ("price_cents", _NUMBER, "asc"),
    "units_sold": ("units_sold", _NUMBER, "desc"), "stock": ("stock", _NUMBER, "desc"),
    "added_at": ("added_at", _NUMBER, "desc"), "relevance": _RELEVANCE,
}, "name", _product_clauses)
CUSTOMERS = _Spec("customers", "customer_id", CustomerQuery, CustomerView, {
    "name": ("name.keyword", _KEYWORD, "asc"), "lifetime_value": ("lifetime_value_cents", _NUMBER, "desc"),
    "order_count": ("order_count", _NUMBER, "desc"), "registered_at": ("registered_at", _NUMBER, "desc"),
    "relevance": _RELEVANCE,
}, "name", _customer_clauses)
_ORDER_FACETS = {
    "status": {"terms": {"field": "status", "size": 10}},
    "lines": {"nested": {"path": "lines"}, "aggs": {
        "sku": {"terms": {"field": "lines.sku", "size": FACET_SIZE},
                "aggs": {"orders": {"reverse_nested": {}}}}}},
}


def _bool(must: list[dict[str, Any]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"bool": {"must": must, "filter": filters}} if must or filters else {"match_all": {}}


def _sort(spec: _Spec, q: Any) -> list[SortKey]:
    field, kind, default = spec.sorts[q.sort or ("relevance" if q.text else spec.default_sort)]
    return [(field, kind, q.order or default), (spec.id_field, _KEYWORD, "asc")]


def _fingerprint(spec: _Spec, q: Any, sort: list[SortKey]) -> str:
    fields = set(spec.query_type.model_fields) - {"cursor", "size", "facets", "sort", "order"}
    data = [spec.name, q.model_dump(mode="json", include=fields), sort]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _encode_cursor(fingerprint: str, after: list[Any]) -> str:
    raw = json.dumps({"q": fingerprint, "after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(cursor: str, fingerprint: str, sort: list[SortKey]) -> list[Any]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise QueryError("cursor is not a cursor of this API: pass next_cursor unchanged") from None
    if not isinstance(data, dict) or not isinstance(data.get("after"), list):
        raise QueryError("cursor is not a cursor of this API: pass next_cursor unchanged")
    if data.get("q") != fingerprint:
        raise QueryError("cursor belongs to another query: repeat the parameters of the query that returned "
                         "it (only size may change), or start again without a cursor")
    after = data["after"]
    if len(after) != len(sort) or not all(_fits(v, kind) for v, (_, kind, _) in zip(after, sort, strict=True)):
        raise QueryError("cursor is damaged: pass next_cursor unchanged")
    return after


def _fits(value: Any, kind: str) -> bool:
    if kind == _KEYWORD:
        return value is None or (isinstance(value, str) and len(value) <= 1000)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2**63
    return kind == _SCORE and isinstance(value, float) and math.isfinite(value)


def _search(es: Elasticsearch, prefix: str, spec: _Spec, q: Any,
            aggs: dict[str, Any] | None = None) -> tuple[list[Any], Total, str | None, Any]:
    sort = _sort(spec, q)
    fingerprint = _fingerprint(spec, q, sort)
    after = _decode_cursor(q.cursor, fingerprint, sort) if q.cursor else None
    response = es.search(
        index=alias(prefix, spec.name), query=_bool(*spec.clauses(q)), size=q.size + 1,
        sort=[{field: {"order": direction}} for field, _, direction in sort], search_after=after,
        track_total_hits=TOTAL_CAP, source_excludes=["streams"], aggs=aggs)
    hits = response["hits"]["hits"]
    more, hits = len(hits) > q.size, hits[: q.size]
    scored = sort[0][1] == _SCORE
    items = [spec.view.model_validate({**h["_source"], "score": h.get("_score") if scored else None})
             for h in hits]
    total = Total(**response["hits"]["total"])
    return items, total, _encode_cursor(fingerprint, hits[-1]["sort"]) if more else None, response


def search_orders(es: Elasticsearch, prefix: str, q: OrderQuery) -> OrderPage:
    items, total, cursor, response = _search(es, prefix, ORDERS, q, _ORDER_FACETS if q.facets else None)
    facets = None
    if q.facets:
        aggs = response["aggregations"]
        facets = OrderFacets(
            status=[Bucket(key=b["key"], count=b["doc_count"]) for b in aggs["status"]["buckets"]],
            sku=[Bucket(key=b["key"], count=b["orders"]["doc_count"])
                 for b in aggs["lines"]["sku"]["buckets"]])
    return OrderPage(items=items, total=total, next_cursor=cursor, facets=facets)


def search_products(es: Elasticsearch, prefix: str, q: ProductQuery) -> ProductPage:
    items, total, cursor, _ = _search(es, prefix, PRODUCTS, q)
    return ProductPage(items=items, total=total, next_cursor=cursor)


def search_customers(es: Elasticsearch, prefix: str, q: CustomerQuery) -> CustomerPage:
    items, total, cursor, _ = _search(es, prefix, CUSTOMERS, q)
    return CustomerPage(items=items, total=total, next_cursor=cursor)


def get_document(es: Elasticsearch, prefix: str, model: str, doc_id: str) -> _View | None:
    """One document as its view, or None when there is none with that id (a missing index raises)."""
    try:
        response = es.get(index=alias(prefix, model), id=doc_id, source_excludes=["streams"])
    except NotFoundError as exc:
        if isinstance(exc.body, dict) and exc.body.get("found") is False:
            return None
        raise
    return SPECS[model].view.model_validate(response["_source"])


SPECS = {spec.name: spec for spec in (ORDERS, PRODUCTS, CUSTOMERS)}


# ---------------------------------------------------------------- aggregations

def _aggregate(es: Elasticsearch, prefix: str, q: OrderFilters, aggs: dict[str, Any], *,
               sold_only: bool) -> dict[str, Any]:
    must, filters = _order_clauses(q)
    if sold_only:
        filters = [*filters, {"terms": {"status": SOLD}}]
    response = es.search(index=alias(prefix, "orders"), query=_bool(must, filters), size=0,
                         track_total_hits=False, aggs=aggs)
    return response["aggregations"]


def _histogram(interval: str, **aggs: Any) -> dict[str, Any]:
    histogram = {"field": "placed_at", "calendar_interval": interval, "min_doc_count": 0}
    return {"date_histogram": histogram, "aggs": aggs}


def _start(bucket: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(bucket["key"] / 1000, UTC)


def revenue(es: Elasticsearch, prefix: str, q: OrderStatsQuery) -> Revenue:
    aggs = _aggregate(es, prefix, q, {"t": _histogram(q.interval, revenue={"sum": {"field": "total_cents"}})},
                      sold_only=True)
    return Revenue(interval=q.interval, buckets=[
        RevenueBucket(start=_start(b), orders=b["doc_count"], revenue_cents=round(b["revenue"]["value"] or 0))
        for b in aggs["t"]["buckets"]])


def status_over_time(es: Elasticsearch, prefix: str, q: OrderStatsQuery) -> StatusOverTime:
    per_status = {"terms": {"field": "status", "size": 10}}
    aggs = _aggregate(es, prefix, q, {"t": _histogram(q.interval, s=per_status)}, sold_only=False)
    return StatusOverTime(interval=q.interval, buckets=[
        StatusBucket(start=_start(b), orders=b["doc_count"],
                     by_status={s["key"]: s["doc_count"] for s in b["s"]["buckets"]})
        for b in aggs["t"]["buckets"]])


def top_products(es: Elasticsearch, prefix: str, q: TopProductsQuery) -> TopProducts:
    terms = {"field": "lines.sku", "size": q.size, "order": [{q.by: "desc"}, {"_key": "asc"}]}
    per_sku = {"terms": terms, "aggs": {
        "units": {"sum": {"field": "lines.quantity"}}, "revenue": {"sum": {"field": "lines.total_cents"}},
        "name": {"terms": {"field": "lines.name.keyword", "size": 1}}, "orders": {"reverse_nested": {}}}}
    lines = {"nested": {"path": "lines"}, "aggs": {"top": per_sku}}
    aggs = _aggregate(es, prefix, q, {"lines": lines}, sold_only=True)
    return TopProducts(by=q.by, items=[
        TopProduct(sku=b["key"], name=b["name"]["buckets"][0]["key"] if b["name"]["buckets"] else None,
                   units=round(b["units"]["value"]), revenue_cents=round(b["revenue"]["value"]),
                   orders=b["orders"]["doc_count"])
        for b in aggs["lines"]["top"]["buckets"]])


# ---------------------------------------------------------------- read-your-writes (G8)

# How a read model reflects a write to a stream, by the stream's type. HELD: some document must
# hold the stream at the token's version or later (the order's own document; the customer of an
# order). Every rule also requires that no document holds it at an older version (a customer's
# orders after a rename). Stream types not listed do not concern the model.
HELD, FRESH = "held", "fresh"
REFLECTS: dict[str, dict[str, str]] = {
    "orders": {"order": HELD, "customer": FRESH},
    "products": {"product": HELD},
    "customers": {"customer": HELD, "order": HELD},
}
POLL_SECONDS = 0.05
HOLDERS_PAGE = 1000


@dataclass(frozen=True)
class Awaited:
    stream: str
    version: int
    held: bool

    def __str__(self) -> str:
        return f"{self.stream} at version {self.version}"


def awaited(model: str, token: ConsistencyToken) -> list[Awaited]:
    """What ``model`` must show before it reflects the writes ``token`` names."""
    rules = REFLECTS[model]
    latest: dict[str, int] = {}
    for stream, version in token.streams:
        if stream.split(":", 1)[0] in rules:
            latest[stream] = max(latest.get(stream, 0), min(version, 2**62))
    return [Awaited(s, v, rules[s.split(":", 1)[0]] == HELD) for s, v in sorted(latest.items())]


def _holders(es: Elasticsearch, index: str, id_field: str, streams: list[str]) -> Iterator[dict[str, Any]]:
    """The ``streams`` entries of every document holding any of ``streams``, paged on the id."""
    query = {"nested": {"path": "streams", "query": {"terms": {"streams.id": streams}}}}
    after = None
    while True:
        response = es.search(index=index, query=query, size=HOLDERS_PAGE, sort=[{id_field: "asc"}],
                             search_after=after, source_includes=["streams"], track_total_hits=False)
        hits = response["hits"]["hits"]
        for hit in hits:
            yield from hit["_source"].get("streams") or ()
        if len(hits) < HOLDERS_PAGE:
            return
        after = hits[-1]["sort"]


def pending(es: Elasticsearch, prefix: str, model: str, conditions: list[Awaited]) -> list[Awaited]:
    """The conditions the searchable documents of ``model`` do not meet yet. Fetches the ``streams``
    of the documents holding any awaited stream (a keyword lookup: ~3 ms on 100k orders, where a
    nested version range took 150 ms a stream) and compares versions here."""
    if not conditions:
        return []
    versions: dict[str, list[int]] = {c.stream: [] for c in conditions}
    for entry in _holders(es, alias(prefix, model), SPECS[model].id_field, list(versions)):
        if entry.get("id") in versions:
            versions[entry["id"]].append(entry.get("version", 0))
    return [c for c in conditions
            if any(v < c.version for v in versions[c.stream]) or (c.held and not versions[c.stream])]


class Reflection:
    """One bounded wait until ``model`` reflects ``token``: call ``check`` until it returns True or
    ``next_delay`` returns None (the deadline passed). Searches only (no refresh: the query side
    holds read privileges only, G11), so what it sees is what the next query sees. A condition once
    met stays met (document versions only grow), so only pending ones are checked again."""

    def __init__(self, model: str, token: ConsistencyToken, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.clock = model, clock
        self.awaited = awaited(model, token)
        self.pending = list(self.awaited)
        self.deadline = clock() + timeout

    def check(self, es: Elasticsearch, prefix: str) -> bool:
        left = self.deadline - self.clock()
        try:
            bounded = es.options(request_timeout=max(left, 0.05))
            self.pending = pending(bounded, prefix, self.model, self.pending)
        except ConnectionTimeout:
            pass  # an overloaded server is the same as a lagging one: the deadline decides
        return not self.pending

    def next_delay(self) -> float | None:
        left = self.deadline - self.clock()
        return None if left <= 0 else min(POLL_SECONDS, left)


def wait_until_reflected(es: Elasticsearch, prefix: str, model: str, token: ConsistencyToken,
                         timeout: float) -> bool:
    """Block until ``model``'s searchable documents reflect ``token``; False when ``timeout`` passed first."""
    reflection = Reflection(model, token, timeout)
    while not reflection.check(es, prefix):
        delay = reflection.next_delay()
        if delay is None:
            return False
        time.sleep(delay)
    return True
