"""The hotel app end to end on real PostgreSQL, RabbitMQ and osmem, through the Procfile's
processes started with ``CQRSKIT_APP=cqrskit.examples.hotel:app`` under honcho (two command
worker processes, the relay, two indexers, the query API and the gateway): nothing of cqrskit is
edited or configured for it but that one setting.

- a double-booking race: many concurrent BookRoom commands for overlapping nights of one room,
  sent at once over AMQP and through the gateway; exactly one wins, every other is rejected with
  the night it wanted (G4, G3);
- the winner is found by a search that waits for its consistency token (G8), the room's
  occupancy reflects it, and every read model equals a fresh projection (G6);
- the CLI verbs run the hotel too: search, verify, status.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cqrskit.infra.settings import Settings
from cqrskit.producers.commands import new_command
from tests.stack import Stack, wait_until
from tests.test_procfile_stack import Honcho, _answers, free_base_port, procfile_ports, ready_consumers

pytestmark = pytest.mark.slow
HOTEL = "cqrskit.examples.hotel:app"
RACERS = 24


@pytest.fixture
def stack(amqp_settings: Settings, search_url: str, tmp_path: Path) -> Iterator[Stack]:
    built = Stack.create(amqp_settings.model_copy(update={"app": HOTEL}), search_url, tmp_path)
    yield built
    built.close()


def racer(n: int, room: str, start: datetime) -> dict[str, str]:
    check_in = (start + timedelta(days=n % 2)).date()  # every racer wants the second night
    return {"room_id": room, "guest_name": f"Racer {n} Lovelace", "guest_email": f"racer{n}@example.com",
            "check_in": check_in.isoformat(), "check_out": (check_in + timedelta(days=2)).isoformat()}


@pytest.mark.timeout(240)
def test_the_hotel_runs_on_the_procfile_stack_and_one_booking_wins_a_race(stack: Stack) -> None:
    base = free_base_port()
    ports = procfile_ports(base)
    honcho = Honcho(stack, base)
    tag = uuid.uuid4().hex[:6]
    today = datetime.now(UTC)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['gateway.1']}", timeout=60) as gateway, \
                httpx.Client(base_url=f"http://127.0.0.1:{ports['query.1']}", timeout=60) as query:
            wait_until(lambda: _answers(gateway) and _answers(query), 90, f"the APIs; honcho says:\n{honcho.tail()}")
            wait_until(lambda: ready_consumers(stack.settings) == (2, 2), 60, f"workers; honcho:\n{honcho.tail()}")
            rooms = [new_command("AddRoom", f"r{n}-{tag}", {"number": f"{n}{tag}", "room_type": kind,
                                                            "rate_cents": 9000 + 1000 * n})
                     for n, kind in enumerate(("double", "double", "suite"))]
            stack.send_and_wait(rooms, timeout=60)
            room = f"r0-{tag}"
            racers = [new_command("BookRoom", f"b{n}-{tag}", racer(n, room, today + timedelta(days=30)))
                      for n in range(RACERS)]
            half = RACERS // 2
            body = b"[" + b",".join(e.to_json() for e in racers[:half]) + b"]"
            sent = gateway.post("/commands/batch", content=body, headers={"content-type": "application/json"})
            assert sent.status_code == 202, sent.text
            stack.send(racers[half:])
            ids = [e.command_id for e in racers]
            stack.write_store.wait_for_outcomes(ids, timeout=90)
            outcomes = stack.write_store.outcomes(ids)
            assert Counter(o.status.value for o in outcomes.values()) == {"succeeded": 1, "rejected": RACERS - 1}
            (winner,) = [e for e in racers if outcomes[e.command_id].status.value == "succeeded"]
            for e in racers:
                if e is not winner:
                    assert "is already booked on the night of" in (outcomes[e.command_id].reason or "")
            token = gateway.get(f"/commands/{winner.command_id}", params={"wait": 10}).json()["consistency_token"]
            name = winner.payload["guest_name"]
            found = query.get("/bookings", params={"text": name, "consistent_with": token, "wait": 10,
                                                   "facets": "true"})
            assert found.status_code == 200, found.text
            page = found.json()
            assert [(b["booking_id"], b["guest"]["name"], b["room"]["type"]) for b in page["items"]][:1] == \
                   [(winner.aggregate_id, name, "double")]
            assert page["facets"]["room_type"] == [{"key": "double", "count": page["total"]["value"]}]
            occupancy = query.get(f"/rooms/{room}", params={"consistent_with": token, "wait": 10}).json()
            assert (occupancy["bookings"], occupancy["nights_booked"]) == (1, 2)
            spec = json.loads(query.get("/openapi.json").text)
            assert {"/bookings", "/rooms", "/bookings/{doc_id}", "/bookings/front-desk"} <= set(spec["paths"])
            assert not [p for p in spec["paths"] if "order" in p]
        stack.wait_drained(timeout=90)
        stack.assert_converged()
        assert_cli_runs_the_hotel(stack, winner.aggregate_id)
        assert honcho.popen.poll() is None, honcho.tail()
    finally:
        honcho.stop()


def assert_cli_runs_the_hotel(stack: Stack, booking_id: str) -> None:
    searched = stack.cli("search", "bookings", "--status", "booked", "--json")
    assert searched.returncode == 0, searched.stderr
    assert [b["booking_id"] for b in json.loads(searched.stdout)["items"]] == [booking_id]
    verified = stack.cli("verify")
    assert verified.returncode == 0 and "bookings" in verified.stdout and "rooms" in verified.stdout, verified.stdout
    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)["read_models"]) == {"bookings", "rooms"}
    rebuilt = stack.cli("rebuild", "rooms")
    assert rebuilt.returncode == 0 and "alias swapped" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
    assert stack.cli("verify", "rooms").returncode == 0
    early = stack.cli("send", "CheckIn", "--aggregate", booking_id, "--wait", "30")
    assert early.returncode == 0 and "rejected" in early.stdout and "not 20" in early.stdout, early.stdout
    command_id = early.stdout.split()[0]
    shown = stack.cli("outcome", command_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["type"] == "CheckIn", shown.stdout + shown.stderr
    for verb in (("parked", "list"), ("dlq", "list")):
        listed = stack.cli(*verb)
        assert listed.returncode == 0, listed.stdout + listed.stderr
    front = stack.cli("search", "bookings/front-desk", "--start", "2026-01-01", "--end", "2026-01-03")
    assert front.returncode == 0 and len(json.loads(front.stdout)["days"]) == 2, front.stdout + front.stderr
    wrong = stack.cli("search", "orders")
    assert wrong.returncode == 2 and "unknown read model 'orders' of the app 'hotel'" in wrong.stderr
