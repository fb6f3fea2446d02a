"""Customers of the reference shop: register, rename, change email.

Rules:
- a customer id is registered at most once;
- an email address is held by at most one customer (unique claim scope ``customer.email``,
  owner = customer id); changing email releases the old address for others;
- renaming to the current name, or changing the email to the current one, succeeds and records
  nothing (idempotent), so a producer may resend a desired state without tripping a rule.

This module also defines the text field types the shop's commands share (``Name``,
``SingleLine``, ``MultiLine``): they refuse control characters (NUL above all: PostgreSQL rejects
it in text and jsonb) and lone surrogates, so such payloads are ``invalid`` (G10), never an
infrastructure failure at append time.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

from cqrskit.app.api import Aggregate, ClaimRead, Command, Event, HandlerContext, Registry, RuleViolation

_SINGLE_LINE = r"^[^\x00-\x1f\x7f]*$"
_MULTI_LINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # tab, LF and CR allowed
SingleLine = Annotated[str, Field(pattern=_SINGLE_LINE)]
MultiLine = Annotated[str, Field(pattern=_MULTI_LINE)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=_SINGLE_LINE)]
AggregateId = Annotated[str, Field(min_length=1, max_length=200, pattern=_SINGLE_LINE)]

EMAIL_SCOPE = "customer.email"
_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_EMAIL = re.compile(rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?:{_LABEL}\.)+[a-z]{{2,63}}")


def _email(value: str) -> str:
    """Lower-case an address of the usual ``local@cqrskit.domain.tld`` shape, or raise ValueError."""
    lowered = value.lower()
    match = _EMAIL.fullmatch(lowered)
    if match is None or len(match["local"]) > 64:
        raise ValueError("not a valid email address")
    return lowered


_SCHEMA_PATTERN = "^" + _EMAIL.pattern.replace("a-z", "A-Za-z") + "$"  # the JSON Schema says what _email takes
Email = Annotated[str, Field(max_length=254, json_schema_extra={"pattern": _SCHEMA_PATTERN, "format": "email"}),
                  AfterValidator(_email)]
registry = Registry()


class CustomerState(BaseModel):
    name: str = ""
    email: str = ""
    registered: bool = False


@registry.event
class CustomerRegistered(Event):
    type = "CustomerRegistered"
    name: str
    email: str


@registry.event
class CustomerRenamed(Event):
    type = "CustomerRenamed"
    name: str


@registry.event
class CustomerEmailChanged(Event):
    type = "CustomerEmailChanged"
    email: str


class Customer(Aggregate[CustomerState]):
    stream_type = "customer"
    State = CustomerState

    def apply(self, event: Event) -> None:
        match event:
            case CustomerRegistered(name=name, email=email):
                self.state.name, self.state.email, self.state.registered = name, email, True
            case CustomerRenamed(name=name):
                self.state.name = name
            case CustomerEmailChanged(email=email):
                self.state.email = email
            case _:
                raise TypeError(f"customer cannot apply {type(event).__name__}")

    def require_registered(self) -> None:
        self.require(self.state.registered, f"customer {self.id} does not exist")

    def register(self, name: str, email: str) -> None:
        """Rejected when the customer exists already; the email claim is the handler's job."""
        self.require(not self.state.registered, f"customer {self.id} already exists")
        self.record(CustomerRegistered(name=name, email=email))

    def rename(self, name: str) -> None:
        """Rejected when the customer does not exist; the same name records nothing."""
        self.require_registered()
        if name != self.state.name:
            self.record(CustomerRenamed(name=name))

    def change_email(self, email: str) -> None:
        """Rejected when the customer does not exist; the same email records nothing."""
        self.require_registered()
        if email != self.state.email:
            self.record(CustomerEmailChanged(email=email))


def _claim_email(ctx: HandlerContext, email: str, customer_id: str) -> None:
    """Take ``email`` for ``customer_id``; RuleViolation when another customer holds it."""
    if ctx.owner_of(EMAIL_SCOPE, email) not in (None, customer_id):
        raise RuleViolation(f"email {email} is already in use")
    ctx.claim(EMAIL_SCOPE, email, owner=customer_id)


def register_customer(command: RegisterCustomer, customer_id: str, ctx: HandlerContext) -> None:
    customer = ctx.load(Customer, customer_id)
    customer.require(not customer.state.registered, f"customer {customer_id} already exists")
    _claim_email(ctx, command.email, customer_id)
    customer.register(command.name, command.email)


def rename_customer(command: RenameCustomer, customer_id: str, ctx: HandlerContext) -> None:
    ctx.load(Customer, customer_id).rename(command.name)


def change_customer_email(command: ChangeCustomerEmail, customer_id: str, ctx: HandlerContext) -> None:
    customer = ctx.load(Customer, customer_id)
    customer.require_registered()
    old = customer.state.email
    if command.email == old:
        return
    _claim_email(ctx, command.email, customer_id)
    ctx.release(EMAIL_SCOPE, old, owner=customer_id)
    customer.change_email(command.email)


@registry.command(register_customer, reads=lambda command, _: [ClaimRead(EMAIL_SCOPE, command.email)])
class RegisterCustomer(Command):
    type = "RegisterCustomer"
    aggregate = Customer
    name: Name
    email: Email


@registry.command(rename_customer)
class RenameCustomer(Command):
    type = "RenameCustomer"
    aggregate = Customer
    name: Name


@registry.command(change_customer_email, reads=lambda command, _: [ClaimRead(EMAIL_SCOPE, command.email)])
class ChangeCustomerEmail(Command):
    type = "ChangeCustomerEmail"
    aggregate = Customer
    email: Email

