"""The hotel's read models, with their declared queries.

- ``bookings``: one document per booking, denormalised with the guest and the room (number,
  type); searchable by guest name or email, by status, by room type and by the nights it holds
  (``from``/``until``: bookings holding any night in that range), faceted by room type and status.
- ``rooms``: one document per room with its occupancy: the nights booked (cancelled bookings
  aside), the bookings that hold it, and whether a guest is in it now.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import Field

from cqrskit.app.api import (
    FRESH, HELD, STREAMS, Document, Facet, Metric, Queries, Range, Term, View, WriteStoreSource, iso,
    positions_by_stream, streams_of, text_keyword)
from cqrskit.examples.hotel.domain import Booking, Room

KEYWORD, LONG, INT, DATE, BOOL = ({"type": t} for t in ("keyword", "long", "integer", "date", "boolean"))
Status = Literal["booked", "checked_in", "checked_out", "cancelled"]
HOLDING = ("booked", "checked_in", "checked_out")  # the statuses whose nights count as occupied


class GuestView(View):
    name: str
    email: str


class RoomRef(View):
    id: str
    number: str | None = None
    type: str | None = None


class BookingView(View):
    booking_id: str
    status: str
    guest: GuestView
    room: RoomRef
    check_in: date
    check_out: date
    nights: int
    total_cents: int
    booked_at: datetime | None = None
    score: float | None = Field(None, description="Relevance (sort=relevance only).")


class RoomView(View):
    room_id: str
    number: str
    type: str
    rate_cents: int
    bookings: int
    nights_booked: int
    occupied: bool
    guest: str | None = None
    score: float | None = None




class BookingsModel:
    name = "bookings"
    stream_type = "booking"
    id_field = "booking_id"
    reflects = {"booking": HELD, "room": FRESH}
    lookups = (("booking", "room_id"),)  # a room's bookings (indexed by `cqrskit setup`)
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "booking_id": KEYWORD, "status": KEYWORD,
            "guest": {"properties": {"name": text_keyword(), "email": text_keyword()}},
            "room": {"properties": {"id": KEYWORD, "number": KEYWORD, "type": KEYWORD}},
            "check_in": DATE, "check_out": DATE, "nights": INT, "total_cents": LONG, "booked_at": DATE,
            "streams": STREAMS,
        },
    }
    queries = Queries(
        view=BookingView, description="Bookings with their guest and room (denormalised).",
        text={"guest.name": 3, "guest.email": 1},
        text_description="Words that all appear in the guest's name, or all in their email.",
        filters={
            "status": Term("status", Status, many=4),
            "room_type": Term("room.type", description="Bookings of rooms of this type."),
            "room_id": Term("room.id"),
            "from": Range("check_out", "gt", date, "Holding a night on or after this date."),
            "until": Range("check_in", "lt", date, "Holding a night before this date."),
        },
        sorts={"check_in": ("check_in", "asc"), "guest": ("guest.name.keyword", "asc"),
               "total": ("total_cents", "desc"), "booked_at": ("booked_at", "desc")},
        default_sort="check_in",
        facets={"room_type": Facet("room.type", 20), "status": Facet("status", 10)},
        metrics={"nights": Metric("nights", "sum", "Nights of the matching bookings.")},
        columns=("booking_id", "status", "guest.name", "room.number", "room.type", "check_in", "check_out",
                 "total_cents"),
    )

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        touched = positions_by_stream(events, "booking")
        rooms = positions_by_stream(events, "room")
        for room_id, booking_ids in source.ids_where("booking", "room_id", rooms).items():
            for booking_id in booking_ids:
                touched[booking_id] += rooms[room_id]
        return touched

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        bookings = {i: b for i, b in source.aggregates(Booking, ids).items() if b.state.status != "new"}
        rooms = source.aggregates(Room, {b.state.room_id for b in bookings.values()})
        booked = source.event_times("booking", bookings, first_only=True)
        return {i: self._document(b, rooms.get(b.state.room_id), booked[i].get("RoomBooked"))
                for i, b in bookings.items()}

    def _document(self, booking: Booking, room: Room | None, booked_at: datetime | None) -> Document:
        s = booking.state
        nights = len(s.nights)
        source = {
            "booking_id": booking.id, "status": s.status,
            "guest": {"name": s.guest_name, "email": s.guest_email},
            "room": {"id": s.room_id, "number": room.state.number if room else None,
                     "type": room.state.room_type if room else None},
            "check_in": s.check_in.isoformat() if s.check_in else None,
            "check_out": s.check_out.isoformat() if s.check_out else None,
            "nights": nights, "total_cents": nights * s.rate_cents, "booked_at": iso(booked_at),
            "streams": streams_of(booking, room),
        }
        return Document(booking.id, source=source)  # its version: the sum of its streams'


class RoomsModel:
    name = "rooms"
    stream_type = "room"
    id_field = "room_id"
    reflects = {"room": HELD, "booking": HELD}
    lookups = (("booking", "room_id"),)  # a room's bookings (indexed by `cqrskit setup`)
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {
            "room_id": KEYWORD, "number": KEYWORD, "type": KEYWORD, "rate_cents": LONG, "bookings": INT,
            "nights_booked": INT, "occupied": BOOL, "guest": text_keyword(), "streams": STREAMS,
        },
    }
    queries = Queries(
        view=RoomView, description="Rooms with their occupancy.",
        filters={"type": Term("type"), "occupied": Term("occupied", bool, description="A guest is in it now.")},
        sorts={"number": ("number", "asc"), "nights_booked": ("nights_booked", "desc"),
               "rate": ("rate_cents", "asc")},
        default_sort="number",
        facets={"type": Facet("type", 20)},
        metrics={"nights_booked": Metric("nights_booked", "sum", "Nights booked in the matching rooms.")},
    )

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        touched = positions_by_stream(events, "room")
        booked = positions_by_stream(events, "booking")
        for booking_id, booking in source.aggregates(Booking, booked).items():
            if booking.state.room_id:
                touched[booking.state.room_id] += booked[booking_id]
        return touched

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        rooms = {i: r for i, r in source.aggregates(Room, ids).items() if r.state.added}
        booking_ids = source.ids_where("booking", "room_id", rooms)
        bookings = source.aggregates(Booking, [b for ids_ in booking_ids.values() for b in ids_])
        docs = {}
        for i, room in rooms.items():
            mine = sorted((bookings[b] for b in booking_ids.get(i, []) if b in bookings), key=lambda b: b.id)
            holding = [b for b in mine if b.state.status in HOLDING]
            inside = next((b for b in mine if b.state.status == "checked_in"), None)
            docs[i] = Document(i, source={
                "room_id": i, "number": room.state.number, "type": room.state.room_type,
                "rate_cents": room.state.rate_cents, "bookings": len(holding),
                "nights_booked": sum(len(b.state.nights) for b in holding), "occupied": inside is not None,
                "guest": inside.state.guest_name if inside else None, "streams": streams_of(room, *mine),
            })
        return docs


HOTEL_READ_MODELS = (BookingsModel(), RoomsModel())
