"""The shop's queries that the declarations cannot express (the escape hatch, ``QueryFunction``):
revenue and orders by status over time, and the best-selling products; plus the shop's query
side in one import (the query and page models derived from the read models' declarations).

Aggregations are exact on one shard (ours); money counts paid and shipped orders only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from elasticsearch import Elasticsearch
from pydantic import BaseModel, Field

from cqrskit.app.api import (
    Awaited, ConsistencyToken, QueryError, QueryFunction, Searchable, View, alias, bool_query, searchable)
from cqrskit.examples.shop.read_models import (
    FACET_SIZE, SHOP_READ_MODELS, CustomerRef, CustomerView, LineView, OrderStatus, OrderView, ProductView)

__all__ = [
    "CUSTOMERS", "FACET_SIZE", "FUNCTIONS", "ORDERS", "PRODUCTS", "SEARCHABLE", "SOLD", "SPECS", "CustomerPage",
    "CustomerQuery", "CustomerRef", "CustomerView", "Interval", "LineView", "OrderFilters", "OrderPage",
    "OrderQuery", "OrderStatsQuery", "OrderStatus", "OrderView", "ProductPage", "ProductQuery", "ProductView",
    "QueryError", "Revenue", "RevenueBucket", "StatusBucket", "StatusOverTime", "TopProduct", "TopProducts",
    "TopProductsQuery", "awaited", "get_document", "pending", "revenue", "search_customers", "search_orders",
    "search_products", "status_over_time", "top_products", "wait_until_reflected",
]

SOLD = ["paid", "shipped"]
Interval = Literal["day", "week", "month"]


def _searchable(name: str) -> Searchable:
    found = searchable(next(m for m in SHOP_READ_MODELS if m.name == name))
    assert found is not None
    return found


SEARCHABLE = {m.name: _searchable(m.name) for m in SHOP_READ_MODELS}
SPECS = {name: s.spec for name, s in SEARCHABLE.items()}
ORDERS, PRODUCTS, CUSTOMERS = SPECS["orders"], SPECS["products"], SPECS["customers"]
OrderFilters: Any = SEARCHABLE["orders"].filter_model
OrderQuery: Any = SEARCHABLE["orders"].query_model
ProductQuery: Any = SEARCHABLE["products"].query_model
CustomerQuery: Any = SEARCHABLE["customers"].query_model
OrderPage: Any = SEARCHABLE["orders"].page_model
ProductPage: Any = SEARCHABLE["products"].page_model
CustomerPage: Any = SEARCHABLE["customers"].page_model


# ---------------------------------------------------------------- the declared queries, by name

def search_orders(es: Elasticsearch, prefix: str, q: Any) -> Any:
    return SEARCHABLE["orders"].search(es, prefix, q)


def search_products(es: Elasticsearch, prefix: str, q: Any) -> Any:
    return SEARCHABLE["products"].search(es, prefix, q)


def search_customers(es: Elasticsearch, prefix: str, q: Any) -> Any:
    return SEARCHABLE["customers"].search(es, prefix, q)


def get_document(es: Elasticsearch, prefix: str, model: str, doc_id: str) -> View | None:
    return SEARCHABLE[model].get(es, prefix, doc_id)


def awaited(model: str, token: ConsistencyToken) -> list[Awaited]:
    return SEARCHABLE[model].awaited(token)


def pending(es: Elasticsearch, prefix: str, model: str, conditions: list[Awaited]) -> list[Awaited]:
    return SEARCHABLE[model].pending(es, prefix, conditions)


def wait_until_reflected(es: Elasticsearch, prefix: str, model: str, token: ConsistencyToken,
                         timeout: float) -> bool:
    return SEARCHABLE[model].wait_until_reflected(es, prefix, token, timeout)


# ---------------------------------------------------------------- the escape hatch: parameters

class OrderStatsQuery(OrderFilters):  # type: ignore[misc,valid-type]
    interval: Interval = Field("day", description="Calendar bucket (UTC).")


class TopProductsQuery(OrderFilters):  # type: ignore[misc,valid-type]
    by: Literal["units", "revenue"] = Field("units", description="Rank by units sold or by revenue.")
    size: int = Field(10, ge=1, le=100, description="How many products.")


# ---------------------------------------------------------------- responses

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


# ---------------------------------------------------------------- aggregations

def _aggregate(es: Elasticsearch, prefix: str, q: Any, aggs: dict[str, Any], *,
               sold_only: bool) -> dict[str, Any]:
    must, filters = ORDERS.clauses(q)
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


FUNCTIONS = (
    QueryFunction("/orders/revenue", "orders", OrderStatsQuery, Revenue, revenue,
                  "Revenue of paid and shipped orders per day (week, month) of placement"),
    QueryFunction("/orders/status-over-time", "orders", OrderStatsQuery, StatusOverTime, status_over_time,
                  "Orders per day (week, month) of placement, by their current status"),
    QueryFunction("/products/top", "orders", TopProductsQuery, TopProducts, top_products,
                  "Best sellers by units or revenue over the paid and shipped orders that match "
                  "(from the orders model)"),
)
