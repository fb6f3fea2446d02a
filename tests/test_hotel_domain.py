"""The hotel's rules, given/when/then on the in-memory store (``cqrskit.domain.testing.Scenario``):
what each command records, and what it refuses. The concurrency of the one-booking-a-night rule
is proven end to end on PostgreSQL in test_hotel_stack.py."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from pydantic import ValidationError

from cqrskit.domain.testing import Scenario
from cqrskit.examples.hotel.domain import (
    BookingCancelled, GuestCheckedIn, GuestCheckedOut, Room, RoomAdded, RoomBooked, registry)

NOW = datetime(2027, 3, 10, 15, 0, tzinfo=UTC)
ROOM = RoomAdded(number="101", room_type="double", rate_cents=12000)


def booking(check_in: str = "2027-03-10", check_out: str = "2027-03-12", room: str = "r1",
            guest: str = "Ada Lovelace") -> dict[str, str]:
    return {"room_id": room, "guest_name": guest, "guest_email": "ada@example.com",
            "check_in": check_in, "check_out": check_out}


def hotel() -> Scenario:
    return Scenario(registry, now=NOW).given(Room, "r1", ROOM)


def test_add_room_records_the_room_and_its_number_is_unique() -> None:
    scenario = Scenario(registry)
    scenario.when("AddRoom", "r1", {"number": "101", "room_type": "double", "rate_cents": 12000}).then(ROOM)
    scenario.when("AddRoom", "r2", {"number": "101", "room_type": "single", "rate_cents": 9000}) \
        .then_rejected("room number 101 is taken")
    scenario.when("AddRoom", "r1", {"number": "102", "room_type": "single", "rate_cents": 9000}) \
        .then_rejected("exists already")


def test_book_room_captures_the_rate_of_the_room() -> None:
    hotel().when("BookRoom", "b1", booking()).then(RoomBooked(
        room_id="r1", guest_name="Ada Lovelace", guest_email="ada@example.com", check_in=date(2027, 3, 10),
        check_out=date(2027, 3, 12), rate_cents=12000))


def test_a_room_is_never_booked_twice_for_one_night() -> None:
    """G4 (the rule; its concurrency is tested end to end)."""
    scenario = hotel().given_command("BookRoom", "b1", booking("2027-03-10", "2027-03-13"))
    scenario.when("BookRoom", "b2", booking("2027-03-12", "2027-03-14")) \
        .then_rejected("room 101 is already booked on the night of 2027-03-12")
    scenario.when("BookRoom", "b3", booking("2027-03-13", "2027-03-15")).then_succeeded()  # checkout day is free
    scenario.when("BookRoom", "b4", booking("2027-03-08", "2027-03-10")).then_succeeded()


def test_cancelling_gives_the_nights_back() -> None:
    scenario = hotel().given_command("BookRoom", "b1", booking())
    scenario.when("CancelBooking", "b1", {"reason": "plans changed"}).then(BookingCancelled(reason="plans changed"))
    scenario.when("BookRoom", "b2", booking()).then_succeeded()
    scenario.when("CancelBooking", "b1", {}).then_rejected("it is cancelled")


def test_check_in_on_a_night_of_the_booking_then_check_out() -> None:
    scenario = hotel().given_command("BookRoom", "b1", booking())
    scenario.when("CheckOut", "b1", {}).then_rejected("it is booked")
    scenario.when("CheckIn", "b1", {}).then(GuestCheckedIn())
    scenario.when("CancelBooking", "b1", {}).then_rejected("it is checked in")
    scenario.when("CheckIn", "b1", {}).then_rejected("it is checked in")
    scenario.when("CheckOut", "b1", {}).then(GuestCheckedOut())


def test_no_check_in_outside_the_nights_booked() -> None:
    hotel().given_command("BookRoom", "b1", booking("2027-03-11", "2027-03-12")) \
        .when("CheckIn", "b1", {}).then_rejected("not 2027-03-10")


def test_commands_on_missing_aggregates_are_rejected() -> None:
    Scenario(registry).when("BookRoom", "b1", booking()).then_rejected("room r1 does not exist")
    Scenario(registry).when("CheckIn", "nope", {}).then_rejected("booking nope does not exist")


@pytest.mark.parametrize("change, message", [
    ({"check_out": "2027-03-10"}, "check_out must be after check_in"),
    ({"check_out": "2027-05-10"}, "at most 30 nights"),
    ({"guest_email": "no-at-sign"}, "guest_email"),
    ({"room_id": "a/b"}, "room_id"),
    ({"check_in": "tomorrow"}, "check_in"),
])
def test_bad_bookings_are_invalid(change: dict[str, str], message: str) -> None:
    """G10: a bad payload is refused before any rule runs."""
    with pytest.raises(ValidationError, match=message):
        hotel().when("BookRoom", "b1", {**booking(), **change})


def test_scenario_failures_say_what_happened() -> None:
    decided = hotel().when("BookRoom", "b1", booking())
    with pytest.raises(AssertionError, match="was not rejected"):
        decided.then_rejected()
    with pytest.raises(AssertionError, match="BookRoom recorded"):
        decided.then(GuestCheckedIn())
    with pytest.raises(AssertionError, match="was rejected: room r2 does not exist"):
        hotel().when("BookRoom", "b1", booking(room="r2")).then_succeeded()
