"""The shop's query side in one import: its typed queries (``shop_queries``, on the generic
``query_engine``, whose contracts hold) and read-your-writes over its read models (G8, on the
generic ``consistency``).

How each read model reflects a write to a stream, by the stream's type: ``orders`` hold their
order and are fresh for their customer (a rename reaches every order), ``products`` hold their
product, ``customers`` hold their customer and the customer's orders.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from elasticsearch import Elasticsearch

from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.read_models import consistency
from cqrskit.read_models.consistency import FRESH, HELD, POLL_SECONDS, Awaited
from cqrskit.read_models.indices import alias
from cqrskit.read_models.query_engine import (
    TOTAL_CAP, Bucket, Cents, Direction, Ident, Page, QueryError, Text, Total, When)
from cqrskit.read_models.shop_queries import (
    CUSTOMERS, FACET_SIZE, ORDERS, PRODUCTS, SOLD, SPECS, CustomerPage, CustomerQuery, CustomerRef,
    CustomerView, Interval, LineView, OrderFacets, OrderFilters, OrderPage, OrderQuery, OrderStatsQuery,
    OrderStatus, OrderView, ProductPage, ProductQuery, ProductView, Revenue, RevenueBucket, StatusBucket,
    StatusOverTime, TopProduct, TopProducts, TopProductsQuery, get_document, revenue, search_customers,
    search_orders, search_products, status_over_time, top_products)

__all__ = [
    "CUSTOMERS", "FACET_SIZE", "FRESH", "HELD", "HOLDERS_PAGE", "ORDERS", "POLL_SECONDS", "PRODUCTS",
    "REFLECTS", "SOLD", "SPECS", "TOTAL_CAP", "Awaited", "Bucket", "Cents", "CustomerPage",
    "CustomerQuery", "CustomerRef", "CustomerView", "Direction", "Ident", "Interval", "LineView",
    "OrderFacets", "OrderFilters", "OrderPage", "OrderQuery", "OrderStatsQuery", "OrderStatus",
    "OrderView", "Page", "ProductPage", "ProductQuery", "ProductView", "QueryError", "Reflection",
    "Revenue", "RevenueBucket", "StatusBucket", "StatusOverTime", "Text", "TopProduct", "TopProducts",
    "TopProductsQuery", "Total", "When", "awaited", "get_document", "pending", "revenue",
    "search_customers", "search_orders", "search_products", "status_over_time", "top_products",
    "wait_until_reflected",
]

REFLECTS: dict[str, dict[str, str]] = {
    "orders": {"order": HELD, "customer": FRESH},
    "products": {"product": HELD},
    "customers": {"customer": HELD, "order": HELD},
}
HOLDERS_PAGE = 1000


def awaited(model: str, token: ConsistencyToken) -> list[Awaited]:
    """What ``model`` must show before it reflects the writes ``token`` names."""
    return consistency.awaited(REFLECTS[model], token)


def pending(es: Elasticsearch, prefix: str, model: str, conditions: list[Awaited]) -> list[Awaited]:
    """The conditions the searchable documents of ``model`` do not meet yet."""
    return consistency.unmet(es, alias(prefix, model), SPECS[model].id_field, conditions, HOLDERS_PAGE)


class Reflection(consistency.Reflection):
    """One bounded wait until ``model`` reflects ``token`` (see ``consistency.Reflection``)."""

    def __init__(self, model: str, token: ConsistencyToken, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        super().__init__(awaited(model, token), self._unmet, timeout, clock)

    def _unmet(self, es: Elasticsearch, prefix: str, conditions: list[Awaited]) -> list[Awaited]:
        return pending(es, prefix, self.model, conditions)


def wait_until_reflected(es: Elasticsearch, prefix: str, model: str, token: ConsistencyToken,
                         timeout: float) -> bool:
    """Block until ``model``'s searchable documents reflect ``token``; False when ``timeout`` passed first."""
    return consistency.wait(Reflection(model, token, timeout), es, prefix)
