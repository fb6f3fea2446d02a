"""The shop's payment deadline, a process manager: an order not paid within
``SHOP_PAYMENT_TIMEOUT_SECONDS`` (default 1800) of its placement is cancelled through the internal
command ``CancelUnpaidOrder`` (``OrderCancelled`` and one ``StockReleased`` per line, as
``CancelOrder`` records). Paying, or cancelling, first cancels the timer; should a payment and the
deadline cross, the order decides: ``CancelUnpaidOrder`` is rejected for a paid order.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel

from cqrskit.app.api import ProcessManager, Reaction
from cqrskit.examples.shop.orders import CancelUnpaidOrder, OrderCancelled, OrderPaid, OrderPlaced

DEFAULT_TIMEOUT_SECONDS = 1800


def payment_timeout() -> timedelta:
    """``SHOP_PAYMENT_TIMEOUT_SECONDS`` (read when an order is placed); raises ValueError unless positive."""
    raw = os.environ.get("SHOP_PAYMENT_TIMEOUT_SECONDS", str(DEFAULT_TIMEOUT_SECONDS))
    seconds = float(raw)
    if not seconds > 0:
        raise ValueError(f"SHOP_PAYMENT_TIMEOUT_SECONDS must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


class PaymentWindow(BaseModel):
    status: Literal["new", "awaiting", "paid", "closed", "expired"] = "new"


payment_deadline = ProcessManager("shop.payment-deadline", PaymentWindow)


@payment_deadline.on(OrderPlaced)
def placed(event: OrderPlaced, state: PaymentWindow, react: Reaction) -> None:
    state.status = "awaiting"
    react.set_timer("payment", after=payment_timeout())


@payment_deadline.on(OrderPaid)
def paid(event: OrderPaid, state: PaymentWindow, react: Reaction) -> None:
    state.status = "paid"
    react.cancel_timer("payment")


@payment_deadline.on(OrderCancelled)
def cancelled(event: OrderCancelled, state: PaymentWindow, react: Reaction) -> None:
    if state.status == "awaiting":
        state.status = "closed"
    react.cancel_timer("payment")


@payment_deadline.timer("payment")
def expired(state: PaymentWindow, react: Reaction) -> None:
    if state.status == "awaiting":
        react.send(CancelUnpaidOrder(), react.key)
        state.status = "expired"
