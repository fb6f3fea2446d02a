"""Hotel reservations, the task-based example of the CQRS literature ("book hotel room", not "set
reservation status"), written only against cqrskit's public API.

Rules:
- a room has a unique number, a type and a nightly rate;
- a booking holds one room for the nights from ``check_in`` (included) to ``check_out``
  (excluded), at most ``MAX_NIGHTS``; its rate is the room's at booking time;
- a room is never booked twice for the same night: each night is a unique claim
  (``room.night``, ``<room id>/<date>``) taken in the booking's transaction, so of two
  concurrent bookings of one night exactly one commits; the other is decided again, sees the
  night taken and is rejected (G4);
- only a booking that is booked (not checked in, out or cancelled) can be cancelled; cancelling
  gives its nights back;
- a guest checks in on a night of the booking (by the command's clock), and checks out after
  checking in.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from cqrskit.app.api import (
    Aggregate, ClaimRead, Command, Event, FromTarget, HandlerContext, Read, Registry, RuleViolation,
    StreamRead)

MAX_NIGHTS = 30
NIGHT_SCOPE = "room.night"
NUMBER_SCOPE = "room.number"
_LINE = r"^[^\x00-\x1f\x7f]*$"
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=_LINE)]
RoomId = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
Email = Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+$")]
RoomType = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[a-z][a-z0-9 -]*$")]
Status = Literal["new", "booked", "checked_in", "checked_out", "cancelled"]

registry = Registry()


def _claim(ctx: HandlerContext, scope: str, key: str, owner: str, taken: str) -> None:
    """Take a unique claim, or reject with ``taken`` (however the claim was found taken: before
    this command, or by a concurrent one that committed while it was being decided)."""
    try:
        ctx.claim(scope, key, owner=owner)
    except RuleViolation:
        raise RuleViolation(taken) from None


# ---------------------------------------------------------------- rooms

class RoomState(BaseModel):
    number: str = ""
    room_type: str = ""
    rate_cents: int = 0
    added: bool = False


@registry.event
class RoomAdded(Event):
    type = "RoomAdded"
    number: str
    room_type: str
    rate_cents: int


class Room(Aggregate[RoomState]):
    stream_type = "room"
    State = RoomState

    def apply(self, event: Event) -> None:
        match event:
            case RoomAdded(number=number, room_type=room_type, rate_cents=rate):
                self.state.number, self.state.room_type, self.state.rate_cents = number, room_type, rate
                self.state.added = True
            case _:
                raise TypeError(f"room cannot apply {type(event).__name__}")


def add_room(command: AddRoom, room_id: str, ctx: HandlerContext) -> None:
    room = ctx.load(Room, room_id)
    room.require(not room.state.added, f"room {room_id} exists already")
    _claim(ctx, NUMBER_SCOPE, command.number, room_id, f"room number {command.number} is taken")
    room.record(RoomAdded(number=command.number, room_type=command.room_type, rate_cents=command.rate_cents))


@registry.command(add_room)
class AddRoom(Command):
    type = "AddRoom"
    aggregate = Room
    number: Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9-]+$")]
    room_type: RoomType
    rate_cents: int = Field(gt=0, le=10**8)


# ---------------------------------------------------------------- bookings

class BookingState(BaseModel):
    room_id: str = ""
    guest_name: str = ""
    guest_email: str = ""
    check_in: date | None = None
    check_out: date | None = None
    rate_cents: int = 0
    status: Status = "new"
    cancel_reason: str | None = None

    @property
    def nights(self) -> list[date]:
        if self.check_in is None or self.check_out is None:
            return []
        return [self.check_in + timedelta(days=n) for n in range((self.check_out - self.check_in).days)]


@registry.event
class RoomBooked(Event):
    type = "RoomBooked"
    room_id: str
    guest_name: str
    guest_email: str
    check_in: date
    check_out: date
    rate_cents: int


@registry.event
class BookingCancelled(Event):
    type = "BookingCancelled"
    reason: str | None = None


@registry.event
class GuestCheckedIn(Event):
    type = "GuestCheckedIn"


@registry.event
class GuestCheckedOut(Event):
    type = "GuestCheckedOut"


class Booking(Aggregate[BookingState]):
    stream_type = "booking"
    State = BookingState

    def apply(self, event: Event) -> None:
        state = self.state
        match event:
            case RoomBooked():
                state.room_id, state.guest_name, state.guest_email = event.room_id, event.guest_name, event.guest_email
                state.check_in, state.check_out, state.rate_cents = event.check_in, event.check_out, event.rate_cents
                state.status = "booked"
            case BookingCancelled(reason=reason):
                state.status, state.cancel_reason = "cancelled", reason
            case GuestCheckedIn():
                state.status = "checked_in"
            case GuestCheckedOut():
                state.status = "checked_out"
            case _:
                raise TypeError(f"booking cannot apply {type(event).__name__}")

    def require_status(self, status: str, doing: str) -> None:
        self.require(self.state.status != "new", f"booking {self.id} does not exist")
        self.require(self.state.status == status,
                     f"cannot {doing} booking {self.id}: it is {self.state.status.replace('_', ' ')}")


def _night(room_id: str, night: date) -> str:
    return f"{room_id}/{night.isoformat()}"


def book_room(command: BookRoom, booking_id: str, ctx: HandlerContext) -> None:
    booking = ctx.load(Booking, booking_id)
    booking.require(booking.state.status == "new", f"booking {booking_id} exists already")
    room = ctx.load(Room, command.room_id)
    room.require(room.state.added, f"room {command.room_id} does not exist")
    booking.record(RoomBooked(room_id=command.room_id, guest_name=command.guest_name, guest_email=command.guest_email,
                              check_in=command.check_in, check_out=command.check_out,
                              rate_cents=room.state.rate_cents))
    for night in booking.state.nights:
        _claim(ctx, NIGHT_SCOPE, _night(command.room_id, night), booking_id,
               f"room {room.state.number} is already booked on the night of {night.isoformat()}")


def book_room_reads(command: BookRoom, booking_id: str) -> list[Read]:
    """What ``book_room`` reads: the room, and the claim of each night (read in one round trip
    for a whole batch of bookings)."""
    nights = ((command.check_in + timedelta(days=n)) for n in range((command.check_out - command.check_in).days))
    return [StreamRead(Room, command.room_id), *(ClaimRead(NIGHT_SCOPE, _night(command.room_id, night))
                                                 for night in nights)]


def cancel_booking(command: CancelBooking, booking_id: str, ctx: HandlerContext) -> None:
    booking = ctx.load(Booking, booking_id)
    booking.require_status("booked", "cancel")
    for night in booking.state.nights:
        ctx.release(NIGHT_SCOPE, _night(booking.state.room_id, night), owner=booking_id)
    booking.record(BookingCancelled(reason=command.reason))


def check_in(command: CheckIn, booking_id: str, ctx: HandlerContext) -> None:
    booking = ctx.load(Booking, booking_id)
    booking.require_status("booked", "check in")
    today = ctx.now().date()
    booking.require(today in booking.state.nights,
                    f"check-in of booking {booking_id} is for the nights {booking.state.check_in} to "
                    f"{booking.state.check_out}, not {today}")
    booking.record(GuestCheckedIn())


def check_out(command: CheckOut, booking_id: str, ctx: HandlerContext) -> None:
    booking = ctx.load(Booking, booking_id)
    booking.require_status("checked_in", "check out")
    booking.record(GuestCheckedOut())


@registry.command(book_room, reads=book_room_reads)
class BookRoom(Command):
    type = "BookRoom"
    aggregate = Booking
    room_id: RoomId
    guest_name: Name
    guest_email: Email
    check_in: date
    check_out: date

    @model_validator(mode="after")
    def _stay(self) -> BookRoom:
        nights = (self.check_out - self.check_in).days
        if nights < 1:
            raise ValueError("check_out must be after check_in")
        if nights > MAX_NIGHTS:
            raise ValueError(f"a booking holds at most {MAX_NIGHTS} nights")
        return self


def cancel_booking_reads(command: CancelBooking, booking_id: str) -> list[Read]:
    """What ``cancel_booking`` reads beyond the booking: the claim of each night it holds."""
    return [FromTarget(lambda booking: [ClaimRead(NIGHT_SCOPE, _night(booking.state.room_id, night))
                                        for night in booking.state.nights])]


@registry.command(cancel_booking, reads=cancel_booking_reads)
class CancelBooking(Command):
    type = "CancelBooking"
    aggregate = Booking
    reason: Annotated[str, Field(max_length=500, pattern=_LINE)] | None = None


@registry.command(check_in)
class CheckIn(Command):
    type = "CheckIn"
    aggregate = Booking


@registry.command(check_out)
class CheckOut(Command):
    type = "CheckOut"
    aggregate = Booking


def mark_no_show(command: MarkNoShow, booking_id: str, ctx: HandlerContext) -> None:
    """A booking still not checked in when its no-show deadline came: its nights are freed (as a
    cancellation with the reason ``no-show``); rejected once the guest checked in or cancelled."""
    booking = ctx.load(Booking, booking_id)
    booking.require_status("booked", "mark as no-show")
    for night in booking.state.nights:
        ctx.release(NIGHT_SCOPE, _night(booking.state.room_id, night), owner=booking_id)
    booking.record(BookingCancelled(reason="no-show"))


@registry.command(mark_no_show, reads=cancel_booking_reads, internal=True)  # sent only by the no-show deadline
class MarkNoShow(Command):
    type = "MarkNoShow"
    aggregate = Booking
