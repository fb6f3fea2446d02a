"""The reference domain: a small shop (customers, products, orders).

``registry`` holds every shop command (with its handler) and every shop event; each module also
keeps its own part (``customers.registry``...), merged here. Rules are in each module's docstring.
"""

from __future__ import annotations

from cqrskit.domain.registry import Registry
from cqrskit.domain.shop import customers, orders, products
from cqrskit.domain.shop.customers import Customer
from cqrskit.domain.shop.orders import Order
from cqrskit.domain.shop.products import Product


def merged(*parts: Registry) -> Registry:
    """One registry holding every type, handler and upcaster of ``parts``.
    Raises ValueError when two parts register different classes under one type name."""
    registry = Registry()
    for part in parts:
        for cls in part.events.values():
            registry.event(cls)
        for name, cls in part.commands.items():
            registry.command(part.handlers[name])(cls)
        registry.upcasters.update(part.upcasters)
    return registry


registry = merged(customers.registry, products.registry, orders.registry)

__all__ = ["Customer", "Order", "Product", "customers", "merged", "orders", "products", "registry"]
