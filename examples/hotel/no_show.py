"""The hotel's no-show deadline, a process manager: a booking not checked in by noon (UTC) of the
day after its arrival becomes a no-show through the internal command ``MarkNoShow``, which frees
its nights (``BookingCancelled`` with the reason ``no-show``). Checking in, or cancelling, first
cancels the timer; should both cross, the booking decides (``MarkNoShow`` is rejected once the
guest checked in)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from pydantic import BaseModel

from cqrskit.app.api import ProcessManager, Reaction
from cqrskit.examples.hotel.domain import BookingCancelled, GuestCheckedIn, MarkNoShow, RoomBooked

NOON = time(12, 0, tzinfo=UTC)


class Arrival(BaseModel):
    expected: bool = False


no_show = ProcessManager("hotel.no-show", Arrival)


def deadline(check_in: object) -> datetime:
    """Noon (UTC) of the day after ``check_in``."""
    return datetime.combine(check_in + timedelta(days=1), NOON)  # type: ignore[operator]


@no_show.on(RoomBooked)
def booked(event: RoomBooked, state: Arrival, react: Reaction) -> None:
    state.expected = True
    react.set_timer("arrival", at=deadline(event.check_in))


@no_show.on(GuestCheckedIn)
def arrived(event: GuestCheckedIn, state: Arrival, react: Reaction) -> None:
    state.expected = False
    react.cancel_timer("arrival")


@no_show.on(BookingCancelled)
def cancelled(event: BookingCancelled, state: Arrival, react: Reaction) -> None:
    state.expected = False
    react.cancel_timer("arrival")


@no_show.timer("arrival")
def missed(state: Arrival, react: Reaction) -> None:
    if state.expected:
        react.send(MarkNoShow(), react.key)
        state.expected = False
