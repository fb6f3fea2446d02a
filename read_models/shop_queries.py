"""The shop's typed queries, as a back office asks them: orders, products and customers, and
aggregations over orders. Built on ``cqrskit.read_models.query_engine`` (whose contracts hold).

- text, per model: orders match when every word appears in the customer's name, or their email,
  or the product name of one line; products in the name or the description; customers in the
  name or the email. Relevance weights are in each ``text`` field's description;
- aggregations are exact on one shard (ours); money counts paid and shipped orders only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from elasticsearch import Elasticsearch
from pydantic import BaseModel, Field, field_validator

from cqrskit.read_models.indices import alias
from cqrskit.read_models.query_engine import (
    KEYWORD, NUMBER, RELEVANCE, Bucket, Cents, Clauses, Ident, Page, PageQuery, QueryModel, Spec, Text, View,
    When, bool_query, fetch, ranges, search, text_query)

FACET_SIZE = 20
SOLD = ["paid", "shipped"]
NESTED = frozenset({"lines"})
OrderStatus = Literal["placed", "paid", "shipped", "cancelled"]
Interval = Literal["day", "week", "month"]


# ---------------------------------------------------------------- requests

class OrderFilters(QueryModel):
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


class OrderQuery(OrderFilters, PageQuery):
    sort: Literal["placed_at", "updated_at", "total", "units", "customer_name", "relevance"] | None = Field(
        None, description="Default: relevance with text, else placed_at (newest first).")
    facets: bool = Field(False, description="Add counts by status and by sku over all matches.")


class ProductQuery(PageQuery):
    text: Text | None = Field(None, description="Words that all appear in the name, or all in the "
                                                "description. Relevance: name 2 + description 1.")
    sku: Ident | None = None
    in_stock: bool | None = Field(None, description="true: stock above zero; false: none left.")
    price_min: Cents | None = Field(None, description="Price at least (cents).")
    price_max: Cents | None = Field(None, description="Price at most (cents).")
    sort: Literal["name", "price", "units_sold", "stock", "added_at", "relevance"] | None = Field(
        None, description="Default: relevance with text, else name.")


class CustomerQuery(PageQuery):
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

class CustomerRef(View):
    id: str
    name: str | None = None
    email: str | None = None


class LineView(View):
    sku: str
    product_id: str
    name: str
    quantity: int
    unit_price_cents: int
    total_cents: int


class OrderView(View):
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


class ProductView(View):
    product_id: str
    sku: str
    name: str
    description: str | None = None
    price_cents: int
    stock: int
    units_sold: int
    added_at: datetime | None = None
    score: float | None = Field(None, description="Relevance (sort=relevance only).")


class CustomerView(View):
    customer_id: str
    name: str
    email: str
    order_count: int
    lifetime_value_cents: int
    registered_at: datetime | None = None
    score: float | None = Field(None, description="Relevance (sort=relevance only).")


class OrderFacets(BaseModel):
    status: list[Bucket]
    sku: list[Bucket] = Field(description=f"The {FACET_SIZE} skus on most matching orders.")


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

def _order_clauses(q: OrderFilters) -> Clauses:
    weights = {"customer.name": 4, "customer.email": 2, "lines.name": 1}
    must = [text_query(q.text, weights, NESTED)] if q.text else []
    filters: list[dict[str, Any]] = [{"terms": {"status": q.status}}] if q.status else []
    if q.customer_id:
        filters.append({"term": {"customer.id": q.customer_id}})
    if q.sku:
        filters.append({"nested": {"path": "lines", "query": {"term": {"lines.sku": q.sku}}}})
    filters += ranges("placed_at", gte=q.placed_since, lt=q.placed_until)
    filters += ranges("total_cents", gte=q.total_min, lte=q.total_max)
    return must, filters


def _product_clauses(q: ProductQuery) -> Clauses:
    must = [text_query(q.text, {"name": 2, "description": 1}, NESTED)] if q.text else []
    filters = [{"term": {"sku": q.sku}}] if q.sku else []
    if q.in_stock is not None:
        filters += ranges("stock", gt=0) if q.in_stock else ranges("stock", lte=0)
    filters += ranges("price_cents", gte=q.price_min, lte=q.price_max)
    return must, filters


def _customer_clauses(q: CustomerQuery) -> Clauses:
    must = [text_query(q.text, {"name": 2, "email": 1}, NESTED)] if q.text else []
    filters = [{"term": {"email.keyword": q.email}}] if q.email else []
    filters += ranges("order_count", gte=q.min_orders)
    filters += ranges("lifetime_value_cents", gte=q.min_lifetime_value)
    return must, filters


ORDERS = Spec("orders", "order_id", OrderQuery, OrderView, {
    "placed_at": ("placed_at", NUMBER, "desc"), "updated_at": ("updated_at", NUMBER, "desc"),
    "total": ("total_cents", NUMBER, "desc"), "units": ("units", NUMBER, "desc"),
    "customer_name": ("customer.name.keyword", KEYWORD, "asc"), "relevance": RELEVANCE,
}, "placed_at", _order_clauses)
PRODUCTS = Spec("products", "product_id", ProductQuery, ProductView, {
    "name": ("name.keyword", KEYWORD, "asc"), "price": ("price_cents", NUMBER, "asc"),
    "units_sold": ("units_sold", NUMBER, "desc"), "stock": ("stock", NUMBER, "desc"),
    "added_at": ("added_at", NUMBER, "desc"), "relevance": RELEVANCE,
}, "name", _product_clauses)
CUSTOMERS = Spec("customers", "customer_id", CustomerQuery, CustomerView, {
    "name": ("name.keyword", KEYWORD, "asc"), "lifetime_value": ("lifetime_value_cents", NUMBER, "desc"),
    "order_count": ("order_count", NUMBER, "desc"), "registered_at": ("registered_at", NUMBER, "desc"),
    "relevance": RELEVANCE,
}, "name", _customer_clauses)
SPECS = {spec.name: spec for spec in (ORDERS, PRODUCTS, CUSTOMERS)}
_ORDER_FACETS = {
    "status": {"terms": {"field": "status", "size": 10}},
    "lines": {"nested": {"path": "lines"}, "aggs": {
        "sku": {"terms": {"field": "lines.sku", "size": FACET_SIZE},
                "aggs": {"orders": {"reverse_nested": {}}}}}},
}


# ---------------------------------------------------------------- searches

def search_orders(es: Elasticsearch, prefix: str, q: OrderQuery) -> OrderPage:
    items, total, cursor, response = search(es, prefix, ORDERS, q, _ORDER_FACETS if q.facets else None)
    facets = None
    if q.facets:
        aggs = response["aggregations"]
        facets = OrderFacets(
            status=[Bucket(key=b["key"], count=b["doc_count"]) for b in aggs["status"]["buckets"]],
            sku=[Bucket(key=b["key"], count=b["orders"]["doc_count"])
                 for b in aggs["lines"]["sku"]["buckets"]])
    return OrderPage(items=items, total=total, next_cursor=cursor, facets=facets)


def search_products(es: Elasticsearch, prefix: str, q: ProductQuery) -> ProductPage:
    items, total, cursor, _ = search(es, prefix, PRODUCTS, q)
    return ProductPage(items=items, total=total, next_cursor=cursor)


def search_customers(es: Elasticsearch, prefix: str, q: CustomerQuery) -> CustomerPage:
    items, total, cursor, _ = search(es, prefix, CUSTOMERS, q)
    return CustomerPage(items=items, total=total, next_cursor=cursor)


def get_document(es: Elasticsearch, prefix: str, model: str, doc_id: str) -> View | None:
    """One document as its view, or None when there is none with that id (a missing index raises)."""
    return fetch(es, prefix, SPECS[model], doc_id)


# ---------------------------------------------------------------- aggregations

def _aggregate(es: Elasticsearch, prefix: str, q: OrderFilters, aggs: dict[str, Any], *,
               sold_only: bool) -> dict[str, Any]:
    must, filters = _order_clauses(q)
    if sold_only:
        filters = [*filters, {"terms": {"status": SOLD}}]
    response = es.search(index=alias(prefix, "orders"), query=bool_query(must, filters), size=0,
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
