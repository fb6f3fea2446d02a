"""Products of the reference shop: add, change price, restock; stock reserved and released by orders.

Rules:
- a product id is added at most once; a sku belongs to at most one product (unique claim scope
  ``product.sku``, owner = product id; skus are case-sensitive, ``ABC`` and ``abc`` differ);
- stock is never negative: a reservation larger than the stock is rejected;
- changing the price to the current price succeeds and records nothing (idempotent);
- amounts are integer cents, bounded so that any order total fits a signed 64-bit integer
  (100 lines x 10,000 units x MAX_PRICE_CENTS < 2**63), which search indices store as ``long``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from cqrskit.app.api import Aggregate, ClaimRead, Command, Event, HandlerContext, Registry, RuleViolation
from cqrskit.examples.shop.customers import MultiLine, Name

SKU_SCOPE = "product.sku"
MAX_PRICE_CENTS = 1_000_000_000_000
MAX_STOCK = 1_000_000_000
MAX_RESTOCK = 1_000_000
Sku = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
PriceCents = Annotated[int, Field(strict=True, ge=0, le=MAX_PRICE_CENTS)]
registry = Registry()


class ProductState(BaseModel):
    sku: str = ""
    name: str = ""
    description: str = ""
    price_cents: int = 0
    stock: int = 0
    units_sold: int = 0  # reserved by orders and not released (by a cancellation)
    added: bool = False


@registry.event
class ProductAdded(Event):
    type = "ProductAdded"
    sku: str
    name: str
    description: str
    price_cents: int
    stock: int


@registry.event
class ProductPriceChanged(Event):
    type = "ProductPriceChanged"
    price_cents: int


@registry.event
class ProductRestocked(Event):
    type = "ProductRestocked"
    quantity: int


@registry.event
class StockReserved(Event):
    """Recorded on the product's stream by PlaceOrder: ``quantity`` units held for ``order_id``."""

    type = "StockReserved"
    order_id: str
    quantity: int


@registry.event
class StockReleased(Event):
    """Recorded on the product's stream by CancelOrder: the order's reservation given back."""

    type = "StockReleased"
    order_id: str
    quantity: int


class Product(Aggregate[ProductState]):
    stream_type = "product"
    State = ProductState
    state_version = 2  # 2: units_sold

    def apply(self, event: Event) -> None:
        match event:
            case ProductAdded():
                self.state = ProductState(**event.model_dump(), added=True)
            case ProductPriceChanged(price_cents=price_cents):
                self.state.price_cents = price_cents
            case ProductRestocked(quantity=quantity):
                self.state.stock += quantity
            case StockReleased(quantity=quantity):
                self.state.stock += quantity
                self.state.units_sold -= quantity
            case StockReserved(quantity=quantity):
                self.state.stock -= quantity
                self.state.units_sold += quantity
            case _:
                raise TypeError(f"product cannot apply {type(event).__name__}")

    def require_added(self) -> None:
        self.require(self.state.added, f"product {self.id} does not exist")

    def add(self, sku: str, name: str, description: str, price_cents: int, stock: int) -> None:
        """Rejected when the product exists already; the sku claim is the handler's job."""
        self.require(not self.state.added, f"product {self.id} already exists")
        self.record(
            ProductAdded(sku=sku, name=name, description=description, price_cents=price_cents, stock=stock)
        )

    def change_price(self, price_cents: int) -> None:
        """Rejected when the product does not exist; the current price records nothing."""
        self.require_added()
        if price_cents != self.state.price_cents:
            self.record(ProductPriceChanged(price_cents=price_cents))

    def restock(self, quantity: int) -> None:
        self.require_added()
        self.record(ProductRestocked(quantity=quantity))

    def reserve(self, order_id: str, quantity: int) -> None:
        """Hold ``quantity`` units for an order; rejected, naming sku, stock and quantity, when short."""
        self.require_added()
        stock, sku = self.state.stock, self.state.sku
        self.require(
            quantity <= stock, f"not enough stock for sku {sku}: {stock} in stock, {quantity} asked"
        )
        self.record(StockReserved(order_id=order_id, quantity=quantity))

    def release(self, order_id: str, quantity: int) -> None:
        """Give back what ``reserve`` held for an order (the caller releases each reservation once)."""
        self.require_added()
        self.record(StockReleased(order_id=order_id, quantity=quantity))


def product_for_sku(ctx: HandlerContext, sku: str) -> Product:
    """The product that owns ``sku``; RuleViolation ``unknown sku ...`` when none does."""
    product_id = ctx.owner_of(SKU_SCOPE, sku)
    if product_id is None:
        raise RuleViolation(f"unknown sku {sku}")
    return ctx.load(Product, product_id)


def add_product(command: AddProduct, product_id: str, ctx: HandlerContext) -> None:
    product = ctx.load(Product, product_id)
    product.require(not product.state.added, f"product {product_id} already exists")
    if ctx.owner_of(SKU_SCOPE, command.sku) is not None:
        raise RuleViolation(f"sku {command.sku} is already in use")
    ctx.claim(SKU_SCOPE, command.sku, owner=product_id)
    product.add(command.sku, command.name, command.description, command.price_cents, command.stock)


def change_product_price(command: ChangeProductPrice, product_id: str, ctx: HandlerContext) -> None:
    ctx.load(Product, product_id).change_price(command.price_cents)


def restock_product(command: RestockProduct, product_id: str, ctx: HandlerContext) -> None:
    ctx.load(Product, product_id).restock(command.quantity)


@registry.command(add_product, reads=lambda command, _: [ClaimRead(SKU_SCOPE, command.sku)])
class AddProduct(Command):
    type = "AddProduct"
    aggregate = Product
    sku: Sku
    name: Name
    description: Annotated[MultiLine, Field(max_length=5000)] = ""
    price_cents: PriceCents
    stock: Annotated[int, Field(strict=True, ge=0, le=MAX_STOCK)]


@registry.command(change_product_price)
class ChangeProductPrice(Command):
    type = "ChangeProductPrice"
    aggregate = Product
    price_cents: PriceCents


@registry.command(restock_product)
class RestockProduct(Command):
    type = "RestockProduct"
    aggregate = Product
    quantity: Annotated[int, Field(strict=True, gt=0, le=MAX_RESTOCK)]
