"""The reference domain: a small shop (customers, products, orders).

``registry`` holds every shop command (with its handler) and every shop event; each module also
keeps its own part (``customers.registry``...), merged here. Rules are in each module's docstring.
"""

from __future__ import annotations

from cqrskit.app.api import merged
import cqrskit.examples.shop.customers as customers
import cqrskit.examples.shop.orders as orders
import cqrskit.examples.shop.products as products
from cqrskit.examples.shop.customers import Customer
from cqrskit.examples.shop.orders import Order
from cqrskit.examples.shop.products import Product

registry = merged(customers.registry, products.registry, orders.registry)

__all__ = ["Customer", "Order", "Product", "customers", "orders", "products", "registry"]
