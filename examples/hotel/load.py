"""The hotel's demo load (``cqrskit --app cqrskit.examples.hotel:app demo``): rooms, then bookings
over the next weeks (some for nights already taken: rejected), arrivals today, then
cancellations and departures. A few commands are wrong on purpose."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

from cqrskit.app.api import CommandEnvelope, new_command

TYPES = {"single": 8000, "double": 12000, "suite": 30000}
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Margaret", "Niklaus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus", "Hamilton", "Wirth"]


class HotelLoad:
    """About ``size`` commands in four phases; ``expected``: outcomes that happen on purpose."""

    def __init__(self, size: int = 2000, seed: int = 7, today: date | None = None) -> None:
        self.rng = random.Random(seed)
        self.today = today or datetime.now(UTC).date()
        self.rooms = [f"room-{n}" for n in range(max(3, size // 20))]
        self.bookings: dict[str, tuple[str, date]] = {}  # booking id -> (room, check-in)
        self.size = size
        self.expected = {"rejected": 1, "invalid": 2}

    def phases(self) -> Iterator[tuple[str, list[CommandEnvelope]]]:
        yield "rooms", [self._room(n, room) for n, room in enumerate(self.rooms)]
        yield "bookings", self._bookings()
        yield "arrivals", [new_command("CheckIn", b, {}) for b, (_, start) in self.bookings.items()
                           if start == self.today]
        yield "changes", self._changes()

    def _room(self, n: int, room: str) -> CommandEnvelope:
        kind = ("single", "double", "double", "suite")[n % 4]
        return new_command("AddRoom", room, {"number": str(100 + n), "room_type": kind, "rate_cents": TYPES[kind]})

    def _bookings(self) -> list[CommandEnvelope]:
        out = [self._booking(f"booking-today-{n}", room, self.today) for n, room in enumerate(self.rooms[:3])]
        for n in range(self.size // 2):
            start = self.today + timedelta(days=self.rng.randint(1, 60))
            out.append(self._booking(f"booking-{n}", self.rng.choice(self.rooms), start))
        taken = out[0].payload
        out.append(new_command("BookRoom", "booking-twice", taken))  # the same room and night: rejected
        out.append(new_command("BookRoom", "booking-bad", {**taken, "check_out": taken["check_in"]}))  # invalid
        out.append(new_command("BookSuite", "booking-what", {}))  # an unknown type: invalid
        return out

    def _booking(self, booking_id: str, room: str, start: date) -> CommandEnvelope:
        nights = self.rng.randint(1, 5)
        guest = f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"
        self.bookings[booking_id] = (room, start)
        return new_command("BookRoom", booking_id, {
            "room_id": room, "guest_name": guest, "guest_email": f"{guest.replace(' ', '.').lower()}@example.com",
            "check_in": start.isoformat(), "check_out": (start + timedelta(days=nights)).isoformat()})

    def _changes(self) -> list[CommandEnvelope]:
        later = [b for b, (_, start) in self.bookings.items() if start > self.today]
        cancelled = self.rng.sample(later, k=min(len(later), max(1, len(later) // 10)))
        return [*(new_command("CancelBooking", b, {"reason": "plans changed"}) for b in cancelled),
                new_command("CheckOut", "booking-today-0", {})]
