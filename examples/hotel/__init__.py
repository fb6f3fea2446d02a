"""Hotel reservations, built only on cqrskit's public API (``CQRSKIT_APP=cqrskit.examples.hotel:app``):
rooms and bookings (never two bookings of one room on one night), the read models ``bookings``
and ``rooms`` with their declared queries, and the front desk's arrivals and departures through
the escape hatch."""

from __future__ import annotations

from cqrskit.app.api import App
from cqrskit.examples.hotel.domain import registry
from cqrskit.examples.hotel.load import HotelLoad
from cqrskit.examples.hotel.no_show import no_show
from cqrskit.examples.hotel.queries import FUNCTIONS
from cqrskit.examples.hotel.read_models import HOTEL_READ_MODELS
from cqrskit.examples.hotel.showcase import showcase


def demo_load(size: int, seed: int) -> HotelLoad:
    return HotelLoad(size=size, seed=seed)


app = App("hotel", registry, read_models=HOTEL_READ_MODELS, queries=FUNCTIONS, demo=demo_load, showcase=showcase,
          process_managers=(no_show,), description="Hotel reservations: rooms, bookings, check-in and check-out.")
