"""Hotel reservations, built only on cqrskit's public API (``CQRSKIT_APP=cqrskit.examples.hotel:app``):
rooms and bookings (never two bookings of one room on one night), the read models ``bookings``
and ``rooms`` with their declared queries, and the front desk's arrivals and departures through
the escape hatch."""

from __future__ import annotations

from cqrskit.app import App
from cqrskit.examples.hotel.domain import registry
from cqrskit.examples.hotel.queries import FUNCTIONS
from cqrskit.examples.hotel.read_models import HOTEL_READ_MODELS

app = App("hotel", registry, read_models=HOTEL_READ_MODELS, queries=FUNCTIONS,
          description="Hotel reservations: rooms, bookings, check-in and check-out.")
