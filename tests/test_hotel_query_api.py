"""The query API derived from another app's declarations: the hotel's routes, parameters and
responses come from ``Queries`` alone, the OpenAPI schema states what the server enforces, and
generated requests never get a server error (schemathesis, as for the shop)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cqrskit.app.testing import SECRET, Harness
from cqrskit.examples.hotel import app as hotel
from cqrskit.infra.settings import Settings
from cqrskit.read_models.api import create_app
from tests.test_gateway import serving
from api_checks import ALL_CHECKS


@pytest.fixture(scope="module")
def api(search_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, httpx.Client]]:
    path: Path = tmp_path_factory.mktemp("hotel-api")
    with Harness(hotel, f"sqlite:///{path / 'hotel.db'}", search_url) as pipeline:
        today = datetime.now(UTC).date()
        for n, kind in enumerate(("single", "double", "suite", "double")):
            pipeline.send("AddRoom", f"r{n}", {"number": str(100 + n), "room_type": kind, "rate_cents": 9000})
        for n in range(12):
            start = today + timedelta(days=n)
            pipeline.send("BookRoom", f"b{n}", {"room_id": f"r{n % 4}", "guest_name": f"Guest {n} Lovelace",
                                                "guest_email": f"g{n}@example.com", "check_in": start.isoformat(),
                                                "check_out": (start + timedelta(days=2)).isoformat()})
        pipeline.drain()
        settings_ = Settings(elasticsearch_url=search_url, index_prefix=pipeline.prefix, token_secret=SECRET)
        with serving(create_app(settings_, hotel.read_models, hotel.queries, max_wait=1.0)) as url, \
                httpx.Client(base_url=url, timeout=30) as client:
            yield pipeline, client


SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(elasticsearch_url="http://unused:9"), hotel.read_models, hotel.queries).openapi())


def parameters(path: str) -> dict[str, Any]:
    operation = SCHEMA.raw_schema["paths"][path]["get"]
    return {p["name"]: p["schema"] for p in operation["parameters"]}


def test_the_routes_and_parameters_are_the_declarations() -> None:
    assert set(SCHEMA.raw_schema["paths"]) == {
        "/bookings", "/rooms", "/bookings/{doc_id}", "/rooms/{doc_id}", "/bookings/front-desk", "/health"}
    bookings = parameters("/bookings")
    assert {"text", "status", "room_type", "room_id", "from", "until", "sort", "order", "size", "cursor", "facets",
            "consistent_with", "wait"} == set(bookings)
    assert bookings["status"]["items"]["enum"] == ["booked", "checked_in", "checked_out", "cancelled"]
    assert bookings["status"]["maxItems"] == 4 and bookings["size"]["maximum"] == 100
    assert {"format": "date", "type": "string"} in bookings["from"]["anyOf"]
    assert bookings["sort"]["anyOf"][0]["enum"] == ["check_in", "guest", "total", "booked_at", "relevance"]
    assert set(parameters("/rooms")) >= {"type", "occupied", "sort", "facets"} and "text" not in parameters("/rooms")


def test_searches_filters_facets_and_lookups(api: tuple[Harness, httpx.Client]) -> None:
    pipeline, client = api
    today = datetime.now(UTC).date()
    page = client.get("/bookings", params={"room_type": "double", "facets": "true", "size": 3}).json()
    assert [b["room"]["type"] for b in page["items"]] == ["double"] * 3 and page["total"]["value"] == 6
    assert page["facets"]["room_type"] == [{"key": "double", "count": 6}] and page["metrics"] == {"nights": 12.0}
    rest = client.get("/bookings", params={"room_type": "double", "size": 3, "cursor": page["next_cursor"]}).json()
    assert len({b["booking_id"] for b in page["items"] + rest["items"]}) == 6
    window = client.get("/bookings", params={"from": (today + timedelta(days=10)).isoformat()}).json()
    assert [b["booking_id"] for b in window["items"]] == ["b9", "b10", "b11"]  # holding a night from day 10 on
    assert client.get("/rooms/r1").json()["nights_booked"] == 6
    missing = client.get("/rooms/nope")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    stray = client.get("/bookings", params={"sku": "x"})
    assert stray.status_code == 422 and "sku" in stray.text
    refused = client.get("/bookings", params={"status": "lost"})
    assert refused.status_code == 422
    done = pipeline.send("CheckIn", "b0", {})
    found = client.get("/rooms/r0", params={"consistent_with": done.token, "wait": 1})
    assert found.status_code == 504  # the harness has not drained: the API waits, then says so (G8)
    pipeline.drain()
    assert client.get("/rooms/r0", params={"consistent_with": done.token}).json()["occupied"] is True


@pytest.mark.slow
@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_on_any_generated_request(case: Any, api: tuple[Harness, httpx.Client]) -> None:
    """G10: every check schemathesis ships, on the API derived from the hotel's declarations (it found
    a required parameter documented as optional and a date read from a number)."""
    case.call_and_validate(base_url=str(api[1].base_url), timeout=30, checks=ALL_CHECKS)
