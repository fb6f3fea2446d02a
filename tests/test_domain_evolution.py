"""A domain that changes once data exists: upcaster chains checked when the app is resolved, golden
events read through them, and only registered event types recorded (issue 22; G3, G10: a mistake
is one line at start-up, never a stored event no code can read)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cqrskit.domain.evolution import check_golden_events
from cqrskit.domain.model import Aggregate, Event, UnregisteredEvent
from cqrskit.domain.registry import Registry, UpcastError, merged
from cqrskit.domain.testing import InMemoryStore
from pydantic import BaseModel


class LoanState(BaseModel):
    days: int = 0


class Loan(Aggregate[LoanState]):
    stream_type = "Loan"
    State = LoanState

    def apply(self, event: Event) -> None:
        if isinstance(event, Lent):
            self.state = LoanState(days=event.days)


class Lent(Event):
    type = "Lent"
    schema_version = 3
    days: int
    by: str


def chain() -> Registry:
    registry = Registry()
    registry.event(Lent)

    @registry.upcaster("Lent", 1)
    def add_days(data: dict) -> dict:
        return {**data, "days": 10}

    @registry.upcaster("Lent", 2)
    def add_by(data: dict) -> dict:
        return {**data, "by": data.get("by", "desk")}

    return registry


def test_a_complete_chain_has_no_problems_and_reads_every_version() -> None:
    registry = chain()
    assert registry.problems() == []
    assert registry.decode_event("Lent", 1, {}) == Lent(days=10, by="desk")
    assert registry.decode_event("Lent", 2, {"days": 3}) == Lent(days=3, by="desk")
    assert registry.decode_event("Lent", 3, {"days": 3, "by": "web"}) == Lent(days=3, by="web")


def test_a_gap_an_unknown_type_and_a_dead_upcaster_are_each_one_line() -> None:
    registry = Registry()
    registry.event(Lent)
    registry.upcaster("Lent", 1)(lambda d: d)
    registry.upcaster("Returned", 1)(lambda d: d)
    registry.upcaster("Lent", 3)(lambda d: d)
    problems = registry.problems()
    assert len(problems) == 3, problems
    assert any("'Returned', which is not a registered event type" in p for p in problems)
    assert any("from version 3 of 'Lent', but Lent.schema_version is 3" in p for p in problems)
    assert any("'Lent' is at schema_version 3 but has no upcaster for 2 -> 3" in p for p in problems)
    assert all("\n" not in p for p in problems)


def test_two_upcasters_for_one_step_are_refused_also_when_merged() -> None:
    registry = chain()
    with pytest.raises(ValueError, match="upcaster \\('Lent', 1\\) registered twice"):
        registry.upcaster("Lent", 1)(lambda d: d)
    other = Registry()
    other.upcaster("Lent", 1)(lambda d: d)
    with pytest.raises(ValueError, match="registered twice"):
        merged(chain(), other)


def test_an_event_stored_by_newer_code_is_a_clear_error_not_a_validation_dump() -> None:
    with pytest.raises(UpcastError, match="stored at schema_version 4, but the running code knows 3"):
        chain().decode_event("Lent", 4, {"days": 1, "by": "x", "extra": 1})


def test_schema_version_below_one_is_refused_at_registration() -> None:
    class Bad(Event):
        type = "Bad"
        schema_version = 0

    with pytest.raises(ValueError, match="schema_version must be an int >= 1"):
        Registry().event(Bad)


def test_golden_events_read_through_the_chain(tmp_path: Path) -> None:
    (tmp_path / "Lent.v1.json").write_text(json.dumps({"data": {}, "expected": {"days": 10, "by": "desk"}}))
    (tmp_path / "Lent.v2.json").write_text(json.dumps({"data": {"days": 4}}))
    assert check_golden_events(chain(), tmp_path) == []


def test_golden_events_missing_wrong_or_unreadable_are_reported(tmp_path: Path) -> None:
    (tmp_path / "Lent.v1.json").write_text(json.dumps({"data": {}, "expected": {"days": 11, "by": "desk"}}))
    (tmp_path / "Lent.v9.json").write_text(json.dumps({"data": {}}))
    (tmp_path / "notes.json").write_text("{}")
    problems = check_golden_events(chain(), tmp_path)
    assert any(p.startswith("Lent.v1.json: reads as") for p in problems), problems
    assert any(p.startswith("Lent.v9.json: does not read") and "UpcastError" in p for p in problems), problems
    assert any(p.startswith("notes.json: a golden event is named") for p in problems), problems
    assert "Lent.v2.json is missing: every old version of 'Lent' keeps a golden event" in problems


def test_recording_an_unregistered_event_fails_where_the_handler_records_it() -> None:
    """G3: an event no registry knows would be stored and then unreadable by every process; the
    handler's own line raises instead (in a worker, a Scenario and the Harness alike)."""

    class Stray(Event):
        type = "Stray"

    class LentAgain(Lent):  # a subclass of a registered event is not registered by inheritance
        type = "LentAgain"

    chain()  # registers Lent
    loan = InMemoryStore().context().load(Loan, "l1")
    loan.record(Lent(days=1, by="x"))
    with pytest.raises(UnregisteredEvent, match="Stray .type 'Stray'. is not a registered event type"):
        loan.record(Stray())
    with pytest.raises(UnregisteredEvent, match="LentAgain"):
        loan.record(LentAgain(days=1, by="x"))
    assert len(loan.pending) == 1


def test_an_app_with_a_broken_chain_stops_every_verb_with_one_line(tmp_path: Path) -> None:
    """G10 at start-up: `cqrskit --app` of an app whose upcaster chain has a gap exits 2 with one
    line naming the event type, before any process starts."""
    (tmp_path / "brokenapp.py").write_text(textwrap.dedent("""
        from cqrskit.app import App
        from cqrskit.domain.model import Event
        from cqrskit.domain.registry import Registry

        registry = Registry()

        @registry.event
        class Lent(Event):
            type = "Lent"
            schema_version = 2
            days: int = 0

        app = App("broken", registry)
    """))
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "--app", "brokenapp:app", "status"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'Lent' is at schema_version 2 but has no upcaster for 1 -> 2" in lines[0]


def test_the_example_apps_publish_the_schema_of_every_event_version() -> None:
    """The schemas in docs/event-schemas/ are what the code writes: `cqrskit event-schemas --check`
    as a consumer's CI (or ours) would run it."""
    from tests.processes import PROJECT

    for app in ("cqrskit.examples.shop:app", "cqrskit.examples.hotel:app"):
        done = subprocess.run([sys.executable, "-m", "cqrskit.app", "--app", app, "event-schemas", "--check"],
                              cwd=PROJECT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_or_a_lost_published_schema_is_named(tmp_path: Path) -> None:
    from cqrskit.domain.evolution import event_schemas, schema_changes

    registry = chain()  # Lent at version 3
    assert schema_changes(registry, tmp_path) == [
        "Lent.v3.schema.json is not written (cqrskit event-schemas writes it)",
        "Lent.v1.schema.json is missing: the schema of every published version is kept",
        "Lent.v2.schema.json is missing: the schema of every published version is kept"]
    for name, text in event_schemas(registry).items():
        (tmp_path / name).write_text(text.replace('"by"', '"issued_by"'))
    (tmp_path / "Lent.v1.schema.json").write_text("{}")
    (tmp_path / "Lent.v2.schema.json").write_text("{}")
    [changed] = schema_changes(registry, tmp_path)
    assert changed.startswith("Lent.v3.schema.json differs from the code")
