"""The reference shop's read models: ``orders`` (denormalised with the customer's name and email
and the product names of its lines), ``products`` (with stock and units sold) and
``customers`` (with order count and lifetime value). Mappings are explicit and strict; each
model declares its queries (``Queries``): the query API, ``cqrskit search`` and read-your-writes
are derived from them.

Text, per model: orders match when every word appears in the customer's name, or their email,
or the product name of one line; products in the name or the description; customers in the
name or the email. Relevance weights are in each ``text`` parameter's description."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from cqrskit.app.api import (
    FRESH, HELD, STREAMS, Cents, Document, Facet, Flag, Queries, Range, Term, View, When,
    WriteStoreSource, bounded_int, iso, positions_by_stream, streams_of, text_keyword)
from cqrskit.examples.shop.domain import Customer, Order, Product

LONG, INT, KEYWORD, DATE = ({"type": t} for t in ("long", "integer", "keyword", "date"))


FACET_SIZE = 20
OrderStatus = Literal["placed", "paid", "shipped", "cancelled"]
RELEVANCE_NOTE = "Relevance (sort=relevance only)."


# ---------------------------------------------------------------- views (what a query returns)

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
    score: float | None = Field(None, description=RELEVANCE_NOTE)


class ProductView(View):
    product_id: str
    sku: str
    name: str
    description: str | None = None
    price_cents: int
    stock: int
    units_sold: int
    added_at: datetime | None = None
    score: float | None = Field(None, description=RELEVANCE_NOTE)


class CustomerView(View):
    customer_id: str
    name: str
    email: str
    order_count: int
    lifetime_value_cents: int
    registered_at: datetime | None = None
    score: float | None = Field(None, description=RELEVANCE_NOTE)



# ---------------------------------------------------------------- documents



class OrdersModel:
    name = "orders"
    stream_type = "order"
    id_field = "order_id"
    # an order's document holds its order; a customer's rename must reach every one of their orders
    reflects = {"order": HELD, "customer": FRESH}
    lookups = (("order", "customer_id"),)  # a customer's orders (indexed by `cqrskit setup`)
    queries = Queries(
        view=OrderView, description="Orders with their customer and lines (denormalised).",
        text={"customer.name": 4, "customer.email": 2, "lines.name": 1},
        text_description="Words that all appear in the customer's name, or all in their email, or all in "
                         "the product name of one line.",
        filters={
            "status": Term("status", OrderStatus, many=4),
            "customer_id": Term("customer.id"),
            "sku": Term("lines.sku", description="Orders with a line of this sku."),
            "placed_since": Range("placed_at", "gte", When, "Placed at or after (ISO 8601; UTC when no offset)."),
            "placed_until": Range("placed_at", "lt", When, "Placed before (ISO 8601; UTC when no offset)."),
            "total_min": Range("total_cents", "gte", Cents, "Order total at least (cents)."),
            "total_max": Range("total_cents", "lte", Cents, "Order total at most (cents)."),
        },
        sorts={"placed_at": ("placed_at", "desc"), "updated_at": ("updated_at", "desc"),
               "total": ("total_cents", "desc"), "units": ("units", "desc"),
               "customer_name": ("customer.name.keyword", "asc")},
        default_sort="placed_at",
        facets={"status": Facet("status", 10),
                "sku": Facet("lines.sku", FACET_SIZE, f"The {FACET_SIZE} skus on most matching orders.")},
        columns=("order_id", "status", "customer.name", "customer.email", "total_cents", "units", "placed_at"),
    )
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "order_id": KEYWORD, "status": KEYWORD,
            "customer": {"properties": {"id": KEYWORD, "name": text_keyword(), "email": text_keyword()}},
            "lines": {"type": "nested", "properties": {
                "sku": KEYWORD, "product_id": KEYWORD, "name": text_keyword(),
                "quantity": INT, "unit_price_cents": LONG, "total_cents": LONG}},
            "line_count": INT, "units": INT, "total_cents": LONG, "cancel_reason": {"type": "text"},
            "placed_at": DATE, "paid_at": DATE, "shipped_at": DATE, "cancelled_at": DATE, "updated_at": DATE,
            "streams": STREAMS,
        },
    }

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        touched = positions_by_stream(events, "order")
        renamed = positions_by_stream(events, "customer")
        for customer_id, order_ids in source.ids_where("order", "customer_id", renamed).items():
            for order_id in order_ids:
                touched[order_id] += renamed[customer_id]
        return touched

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        orders = {i: o for i, o in source.aggregates(Order, ids).items() if o.state.status != "new"}
        customers = source.aggregates(Customer, {o.state.customer_id for o in orders.values()})
        times = source.event_times("order", orders)
        return {i: self._document(o, customers.get(o.state.customer_id), times[i]) for i, o in orders.items()}

    def _document(self, order: Order, customer: Customer | None, times: dict[str, Any]) -> Document:
        state = order.state
        lines = [{"sku": line.sku, "product_id": line.product_id, "name": line.name, "quantity": line.quantity,
                  "unit_price_cents": line.unit_price_cents, "total_cents": line.quantity * line.unit_price_cents}
                 for line in state.lines]
        source = {
            "order_id": order.id, "status": state.status,
            "customer": {"id": state.customer_id, "name": customer.state.name if customer else None,
                         "email": customer.state.email if customer else None},
            "lines": lines, "line_count": len(lines), "units": sum(line.quantity for line in state.lines),
            "total_cents": state.total_cents,
            "placed_at": iso(times.get("OrderPlaced")), "paid_at": iso(times.get("OrderPaid")),
            "shipped_at": iso(times.get("OrderShipped")), "cancelled_at": iso(times.get("OrderCancelled")),
            "updated_at": iso(max(times.values())) if times else None,
            "streams": streams_of(order, customer),
        }
        return Document(order.id, source=source)  # its version: the sum of its streams'


class ProductsModel:
    name = "products"
    stream_type = "product"
    id_field = "product_id"
    queries = Queries(
        view=ProductView, description="Products with stock and units sold.",
        text={"name": 2, "description": 1},
        text_description="Words that all appear in the name, or all in the description.",
        filters={
            "sku": Term("sku"),
            "in_stock": Flag({"range": {"stock": {"gt": 0}}}, {"range": {"stock": {"lte": 0}}},
                             "true: stock above zero; false: none left."),
            "price_min": Range("price_cents", "gte", Cents, "Price at least (cents)."),
            "price_max": Range("price_cents", "lte", Cents, "Price at most (cents)."),
        },
        sorts={"name": ("name.keyword", "asc"), "price": ("price_cents", "asc"),
               "units_sold": ("units_sold", "desc"), "stock": ("stock", "desc"), "added_at": ("added_at", "desc")},
        default_sort="name",
    )
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "product_id": KEYWORD, "sku": KEYWORD, "name": text_keyword(), "description": {"type": "text"},
            "price_cents": LONG, "stock": LONG, "units_sold": LONG, "added_at": DATE, "streams": STREAMS,
        },
    }

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        return positions_by_stream(events, "product")

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        products = {i: p for i, p in source.aggregates(Product, ids).items() if p.state.added}
        added = source.event_times("product", products, first_only=True)
        return {i: Document(i, source={
            "product_id": i, "sku": p.state.sku, "name": p.state.name, "description": p.state.description,
            "price_cents": p.state.price_cents, "stock": p.state.stock, "units_sold": p.state.units_sold,
            "added_at": iso(added[i].get("ProductAdded")), "streams": streams_of(p),
        }) for i, p in products.items()}


class CustomersModel:
    name = "customers"
    stream_type = "customer"
    id_field = "customer_id"
    reflects = {"customer": HELD, "order": HELD}
    lookups = (("order", "customer_id"),)
    queries = Queries(
        view=CustomerView, description="Customers with their order count and lifetime value.",
        text={"name": 2, "email": 1},
        text_description="Words that all appear in the name, or all in the email.",
        filters={
            "email": Term("email.keyword", description="Exactly this email address."),
            "min_orders": Range("order_count", "gte", bounded_int(0, 10**9), "At least this many orders."),
            "min_lifetime_value": Range("lifetime_value_cents", "gte", Cents,
                                        "Paid and shipped orders worth at least (cents)."),
        },
        sorts={"name": ("name.keyword", "asc"), "lifetime_value": ("lifetime_value_cents", "desc"),
               "order_count": ("order_count", "desc"), "registered_at": ("registered_at", "desc")},
        default_sort="name",
        columns=("customer_id", "name", "email", "order_count", "lifetime_value_cents"),
    )
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "customer_id": KEYWORD, "name": text_keyword(), "email": text_keyword(),
            "order_count": INT, "lifetime_value_cents": LONG, "registered_at": DATE, "streams": STREAMS,
        },
    }

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        touched = positions_by_stream(events, "customer")
        ordered = positions_by_stream(events, "order")
        for order_id, order in source.aggregates(Order, ordered).items():
            if order.state.customer_id:
                touched[order.state.customer_id] += ordered[order_id]
        return touched

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        customers = {i: c for i, c in source.aggregates(Customer, ids).items() if c.state.registered}
        order_ids = source.ids_where("order", "customer_id", customers)
        orders = source.aggregates(Order, [o for ids_ in order_ids.values() for o in ids_])
        registered = source.event_times("customer", customers, first_only=True)
        docs = {}
        for i, customer in customers.items():
            mine = [orders[o] for o in order_ids.get(i, []) if o in orders]
            value = sum(o.state.total_cents for o in mine if o.state.status in ("paid", "shipped"))
            docs[i] = Document(i, source={
                "customer_id": i, "name": customer.state.name, "email": customer.state.email,
                "order_count": len(mine), "lifetime_value_cents": value,
                "registered_at": iso(registered[i].get("CustomerRegistered")),
                "streams": streams_of(customer, *sorted(mine, key=lambda o: o.id)),
            })
        return docs


SHOP_READ_MODELS = (OrdersModel(), ProductsModel(), CustomersModel())
