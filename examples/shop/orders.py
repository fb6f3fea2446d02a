"""Orders of the reference shop: place, pay, ship, cancel.

The state machine (anything else is rejected with a reason naming the current status)::

    new --PlaceOrder--> placed --PayOrder--> paid --ShipOrder--> shipped
                        placed --CancelOrder--> cancelled <--CancelOrder-- paid

Rules:
- PlaceOrder needs an existing customer and, for every line, a known sku with enough stock. It
  records OrderPlaced on the order's stream, with each product's name and price captured at
  placement (later price changes do not touch the order), and StockReserved on each product's
  stream, in the same unit of work: the product streams' versions guard stock under
  concurrency (G4). One order names a sku at most once (refused at validation).
- CancelOrder records OrderCancelled and gives each line's reservation back with StockReleased
  on the product's stream. A paid order may be cancelled; refunds are outside this domain.
- CancelUnpaidOrder (internal: only the payment deadline, ``cqrskit.examples.shop.payments``,
  sends it) does the same to an order still unpaid, and is rejected once the order was paid,
  shipped or cancelled: a payment that won the race is never undone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cqrskit.app.api import (
    Aggregate, ClaimRead, Command, Event, FromTarget, HandlerContext, Read, Registry, StreamRead)
from cqrskit.examples.shop.customers import AggregateId, Customer, MultiLine
from cqrskit.examples.shop.products import SKU_SCOPE, Product, Sku, product_for_sku

Status = Literal["new", "placed", "paid", "shipped", "cancelled"]
MAX_LINES = 100
MAX_QUANTITY = 10_000
registry = Registry()


class OrderLine(BaseModel):
    """A line as placed: what was ordered, from which product, at which captured unit price."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sku: str
    product_id: str
    name: str
    quantity: int
    unit_price_cents: int


class OrderState(BaseModel):
    customer_id: str = ""
    status: Status = "new"
    lines: list[OrderLine] = []
    total_cents: int = 0


@registry.event
class OrderPlaced(Event):
    type = "OrderPlaced"
    customer_id: str
    lines: list[OrderLine]
    total_cents: int


@registry.event
class OrderPaid(Event):
    type = "OrderPaid"
    amount_cents: int


@registry.event
class OrderShipped(Event):
    type = "OrderShipped"


@registry.event
class OrderCancelled(Event):
    type = "OrderCancelled"
    reason: str


class Order(Aggregate[OrderState]):
    stream_type = "order"
    State = OrderState

    def apply(self, event: Event) -> None:
        match event:
            case OrderPlaced(customer_id=customer_id, lines=lines, total_cents=total_cents):
                self.state = OrderState(
                    customer_id=customer_id, status="placed", lines=lines, total_cents=total_cents
                )
            case OrderPaid():
                self.state.status = "paid"
            case OrderShipped():
                self.state.status = "shipped"
            case OrderCancelled():
                self.state.status = "cancelled"
            case _:
                raise TypeError(f"order cannot apply {type(event).__name__}")

    def require_new(self) -> None:
        self.require(self.state.status == "new", f"order {self.id} already exists ({self.state.status})")

    def require_status(self, action: str, *allowed: Status) -> None:
        """RuleViolation ``cannot <action> order <id>: it is <status>`` unless the status is allowed."""
        status = self.state.status
        self.require(status != "new", f"order {self.id} does not exist")
        self.require(status in allowed, f"cannot {action} order {self.id}: it is {status}")

    def place(self, customer_id: str, lines: list[OrderLine]) -> None:
        self.require_new()
        total = sum(line.quantity * line.unit_price_cents for line in lines)
        self.record(OrderPlaced(customer_id=customer_id, lines=lines, total_cents=total))

    def pay(self) -> None:
        self.require_status("pay", "placed")
        self.record(OrderPaid(amount_cents=self.state.total_cents))

    def ship(self) -> None:
        self.require(self.state.status != "placed", f"cannot ship an unpaid order {self.id}: it is placed")
        self.require_status("ship", "paid")
        self.record(OrderShipped())

    def cancel(self, reason: str) -> None:
        self.require_status("cancel", "placed", "paid")
        self.record(OrderCancelled(reason=reason))


def place_order(command: PlaceOrder, order_id: str, ctx: HandlerContext) -> None:
    """Checks, in this order: the order is new, the customer exists, each sku is known and each
    product has the stock; the first failure rejects the whole command and records nothing."""
    order = ctx.load(Order, order_id)
    order.require_new()
    customer = ctx.load(Customer, command.customer_id)
    order.require(customer.state.registered, f"customer {command.customer_id} does not exist")
    wanted = [(product_for_sku(ctx, requested.sku), requested.quantity) for requested in command.lines]
    order.place(command.customer_id, [_captured(product, quantity) for product, quantity in wanted])
    for product, quantity in wanted:  # after OrderPlaced: the events keep the order they are recorded in
        product.reserve(order_id, quantity)


def place_order_reads(command: PlaceOrder, order_id: str) -> list[Read]:
    """What ``place_order`` reads: the customer, and each line's sku and the product holding it."""
    return [StreamRead(Customer, command.customer_id),
            *(ClaimRead(SKU_SCOPE, line.sku, owner=Product) for line in command.lines)]


def _captured(product: Product, quantity: int) -> OrderLine:
    state = product.state
    return OrderLine(
        sku=state.sku,
        product_id=product.id,
        name=state.name,
        quantity=quantity,
        unit_price_cents=state.price_cents,
    )


def pay_order(command: PayOrder, order_id: str, ctx: HandlerContext) -> None:
    ctx.load(Order, order_id).pay()


def ship_order(command: ShipOrder, order_id: str, ctx: HandlerContext) -> None:
    ctx.load(Order, order_id).ship()


def cancel_order(command: CancelOrder, order_id: str, ctx: HandlerContext) -> None:
    order = ctx.load(Order, order_id)
    order.cancel(command.reason)
    _release_stock(ctx, order)


def cancel_unpaid_order(command: CancelUnpaidOrder, order_id: str, ctx: HandlerContext) -> None:
    order = ctx.load(Order, order_id)
    order.require_status("cancel unpaid", "placed")
    order.cancel(command.reason)
    _release_stock(ctx, order)


def _release_stock(ctx: HandlerContext, order: Order) -> None:
    for line in order.state.lines:
        ctx.load(Product, line.product_id).release(order.id, line.quantity)


class RequestedLine(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)
    sku: Sku
    quantity: Annotated[int, Field(strict=True, ge=1, le=MAX_QUANTITY)]


@registry.command(place_order, reads=place_order_reads)
class PlaceOrder(Command):
    type = "PlaceOrder"
    aggregate = Order
    customer_id: AggregateId
    lines: Annotated[list[RequestedLine], Field(min_length=1, max_length=MAX_LINES)]

    @field_validator("lines")
    @classmethod
    def _one_line_per_sku(cls, lines: list[RequestedLine]) -> list[RequestedLine]:
        seen: set[str] = set()
        for line in lines:
            if line.sku in seen:
                raise ValueError(f"sku {line.sku} appears on more than one line")
            seen.add(line.sku)
        return lines


@registry.command(pay_order)
class PayOrder(Command):
    type = "PayOrder"
    aggregate = Order


@registry.command(ship_order)
class ShipOrder(Command):
    type = "ShipOrder"
    aggregate = Order


def cancel_order_reads(command: CancelOrder, order_id: str) -> list[Read]:
    """What ``cancel_order`` reads beyond the order: the product of each of its lines (known once
    the order is loaded: the batch reads them all in its second round trip)."""
    return [FromTarget(lambda order: [StreamRead(Product, line.product_id) for line in order.state.lines])]


@registry.command(cancel_order, reads=cancel_order_reads)
class CancelOrder(Command):
    type = "CancelOrder"
    aggregate = Order
    reason: Annotated[MultiLine, Field(max_length=500)] = ""


@registry.command(cancel_unpaid_order, reads=cancel_order_reads, internal=True)
class CancelUnpaidOrder(Command):
    type = "CancelUnpaidOrder"
    aggregate = Order
    reason: Annotated[MultiLine, Field(max_length=500)] = "not paid in time"
