"""What ``cqrskit demo`` shows after the hotel's load: a search, the facets, the rooms."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from cqrskit.app.api import searchable
from cqrskit.examples.hotel.read_models import HOTEL_READ_MODELS


def showcase(es: Any, prefix: str, console: Console) -> None:
    bookings, rooms = (searchable(m) for m in HOTEL_READ_MODELS)
    assert bookings is not None and rooms is not None
    page = bookings.search(es, prefix, bookings.query_model(text="Ada", status=["booked"], sort="check_in", size=5))
    table = Table("booking", "guest", "room", "type", "check in", "nights",
                  title=f"Coming bookings of guests named Ada, soonest first ({page.total.value} found)")
    for b in page.items:
        table.add_row(b.booking_id, b.guest.name, b.room.number or "", b.room.type or "", str(b.check_in), str(b.nights))
    console.print(table)
    every = bookings.search(es, prefix, bookings.query_model(size=1, facets=True))
    table = Table("facet", "value", "bookings", title=f"Facets over all bookings ({every.metrics['nights']:g} nights)")
    for name in ("status", "room_type"):
        for bucket in getattr(every.facets, name):
            table.add_row(name, bucket.key, str(bucket.count))
    console.print(table)
    busiest = rooms.search(es, prefix, rooms.query_model(sort="nights_booked", size=5))
    table = Table("room", "type", "bookings", "nights booked", "guest in", title="Busiest rooms")
    for r in busiest.items:
        table.add_row(r.number, r.type, str(r.bookings), str(r.nights_booked), r.guest or "")
    console.print(table)
