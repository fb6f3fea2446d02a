"""The reference shop's read models: ``orders`` (denormalised with the customer's name and email
and the product names of its lines), ``products`` (with stock and units sold) and
``customers`` (with order count and lifetime value). Mappings are explicit and strict."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from cqrskit.domain.shop import Customer, Order, Product
from cqrskit.read_models.model import Document, iso, text_keyword
from cqrskit.read_models.source import WriteStoreSource

LONG, INT, KEYWORD, DATE = ({"type": t} for t in ("long", "integer", "keyword", "date"))
# The streams a document was computed from, each at its version (the document's external version
# is their sum). Lets a query wait until a given write is reflected (G8).
STREAMS = {"type": "nested", "properties": {"id": KEYWORD, "version": LONG}}


def _streams(*aggregates: Any) -> list[dict[str, Any]]:
    return [{"id": a.stream_id, "version": a.version} for a in aggregates if a is not None]


def _by_stream(events: list[dict[str, Any]], stream_type: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if event["stream_type"] == stream_type:
            out[event["aggregate_id"]].append(event["position"])
    return out


class OrdersModel:
    name = "orders"
    stream_type = "order"
    id_field = "order_id"
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
        touched = _by_stream(events, "order")
        renamed = _by_stream(events, "customer")
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
            "streams": _streams(order, customer),
        }
        return Document(order.id, order.version + (customer.version if customer else 0), source)


class ProductsModel:
    name = "products"
    stream_type = "product"
    id_field = "product_id"
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "product_id": KEYWORD, "sku": KEYWORD, "name": text_keyword(), "description": {"type": "text"},
            "price_cents": LONG, "stock": LONG, "units_sold": LONG, "added_at": DATE, "streams": STREAMS,
        },
    }

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        return _by_stream(events, "product")

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        products = {i: p for i, p in source.aggregates(Product, ids).items() if p.state.added}
        added = source.event_times("product", products, first_only=True)
        return {i: Document(i, p.version, {
            "product_id": i, "sku": p.state.sku, "name": p.state.name, "description": p.state.description,
            "price_cents": p.state.price_cents, "stock": p.state.stock, "units_sold": p.state.units_sold,
            "added_at": iso(added[i].get("ProductAdded")), "streams": _streams(p),
        }) for i, p in products.items()}


class CustomersModel:
    name = "customers"
    stream_type = "customer"
    id_field = "customer_id"
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "customer_id": KEYWORD, "name": text_keyword(), "email": text_keyword(),
            "order_count": INT, "lifetime_value_cents": LONG, "registered_at": DATE, "streams": STREAMS,
        },
    }

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        touched = _by_stream(events, "customer")
        ordered = _by_stream(events, "order")
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
            docs[i] = Document(i, customer.version + sum(o.version for o in mine), {
                "customer_id": i, "name": customer.state.name, "email": customer.state.email,
                "order_count": len(mine), "lifetime_value_cents": value,
                "registered_at": iso(registered[i].get("CustomerRegistered")),
                "streams": _streams(customer, *sorted(mine, key=lambda o: o.id)),
            })
        return docs


SHOP_READ_MODELS = (OrdersModel(), ProductsModel(), CustomersModel())
