"""What ``cqrskit demo`` shows after the shop's load: a few back-office questions asked through
the shop's typed queries (a search, a facet, an aggregation, the best customers)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

import cqrskit.examples.shop.queries as q


def showcase(es: Any, prefix: str, console: Console) -> None:
    page = q.search_orders(es, prefix, q.OrderQuery(text="Ada", status=["shipped"], sort="total", order="desc",
                                                    size=5, facets=True))
    table = Table("order", "customer", "status", "lines", "total", "placed at",
                  title=f"Shipped orders of customers named Ada, largest first ({page.total.value} found)")
    for o in page.items:
        table.add_row(o.order_id, o.customer.name or "", o.status, str(o.line_count), f"{o.total_cents / 100:,.2f}",
                      f"{o.placed_at:%Y-%m-%d %H:%M:%S}" if o.placed_at else "")
    console.print(table)
    facets = q.search_orders(es, prefix, q.OrderQuery(size=1, facets=True)).facets
    if facets:
        table = Table("status", "orders", title="Facet: all orders by status")
        for bucket in facets.status:
            table.add_row(bucket.key, str(bucket.count))
        console.print(table)
    top = q.top_products(es, prefix, q.TopProductsQuery(by="revenue", size=5))
    table = Table("sku", "product", "units", "revenue", "orders", title="Aggregation: top products by revenue")
    for p in top.items:
        table.add_row(p.sku, p.name or "", str(p.units), f"{p.revenue_cents / 100:,.2f}", str(p.orders))
    console.print(table)
    busiest = q.search_customers(es, prefix, q.CustomerQuery(sort="lifetime_value", size=3))
    table = Table("customer", "email", "orders", "lifetime value", title="Best customers")
    for c in busiest.items:
        table.add_row(c.name, c.email, str(c.order_count), f"{c.lifetime_value_cents / 100:,.2f}")
    console.print(table)
