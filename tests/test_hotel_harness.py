"""The hotel through the in-process pipeline harness (``cqrskit.app.testing.Harness``): the same
executor, indexer and declared queries as the deployed processes, on a real search server, driven
step by step with no broker and no sleeps. Also the documentation's examples of the harness."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cqrskit.app.testing import Harness
from cqrskit.examples.hotel import app as hotel


@pytest.fixture
def pipeline(search_url: str, tmp_path: Path) -> Any:
    with Harness(hotel, f"sqlite:///{tmp_path / 'hotel.db'}", search_url) as harness:
        yield harness


def stay(room: str, start: date, nights: int, guest: str) -> dict[str, Any]:
    return {"room_id": room, "guest_name": guest, "guest_email": f"{guest.split()[0].lower()}@example.com",
            "check_in": start.isoformat(), "check_out": (start + timedelta(days=nights)).isoformat()}


def test_bookings_are_searchable_once_reflected(pipeline: Harness) -> None:
    """G8 (read-your-writes, deterministic) and G6 (the read models equal the write store)."""
    today = datetime.now(UTC).date()
    for room, number, kind in (("r1", "101", "double"), ("r2", "102", "single"), ("r3", "201", "suite")):
        assert pipeline.send("AddRoom", room, {"number": number, "room_type": kind, "rate_cents": 10000}).status \
            == "succeeded"
    pipeline.send("BookRoom", "b1", stay("r1", today, 2, "Ada Lovelace"))
    pipeline.send("BookRoom", "b2", stay("r2", today + timedelta(days=5), 3, "Grace Hopper"))
    pipeline.send("BookRoom", "b3", stay("r3", today + timedelta(days=1), 1, "Ada Byron"))
    refused = pipeline.send("BookRoom", "b4", stay("r1", today + timedelta(days=1), 2, "Alan Turing"))
    assert (refused.status, refused.outcome.reason) == ("rejected", f"room 101 is already booked on the night of "
                                                                    f"{(today + timedelta(days=1)).isoformat()}")
    checked_in = pipeline.send("CheckIn", "b1", {})
    page = pipeline.search("bookings", consistent_with=checked_in.token, text="ada", facets=True)
    assert [(b.booking_id, b.status) for b in page.items] == [("b1", "checked_in"), ("b3", "booked")]
    assert [(f.key, f.count) for f in page.facets.room_type] == [("double", 1), ("suite", 1)]
    assert page.metrics == {"nights": 3.0}
    later = pipeline.search("bookings", **{"from": (today + timedelta(days=4)).isoformat()})
    assert [b.booking_id for b in later.items] == ["b2"]
    room = pipeline.get("rooms", "r1", consistent_with=checked_in.token)
    assert (room.occupied, room.guest, room.nights_booked, room.bookings) == (True, "Ada Lovelace", 2, 1)
    cancelled = pipeline.send("CancelBooking", "b2", {"reason": "ill"})
    assert pipeline.get("rooms", "r2", consistent_with=cancelled.token).nights_booked == 0
    desk = pipeline.query("bookings/front-desk", start=today.isoformat(), end=(today + timedelta(days=3)).isoformat())
    assert [(d.arrivals, d.departures) for d in desk.days] == [(1, 0), (1, 0), (0, 2)]
    assert all(r.ok for r in pipeline.verify())


def test_a_token_the_pipeline_cannot_reflect_fails_at_once(pipeline: Harness) -> None:
    """The harness never waits on time: a drained pipeline that misses a write fails the test now."""
    done = pipeline.send("AddRoom", "r1", {"number": "101", "room_type": "double", "rate_cents": 10000})
    pipeline.drain()
    (index,) = pipeline.es.indices.get_alias(name=f"{pipeline.prefix}-rooms")
    pipeline.es.delete(index=index, id="r1", refresh=True)  # as if the write were lost
    with pytest.raises(AssertionError, match="room:r1 at version 1"):
        pipeline.get("rooms", "r1", consistent_with=done.token)
