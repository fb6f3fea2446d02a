"""Snapshots cannot go stale (issue 22), on PostgreSQL and SQLite: a snapshot taken under another
shape of an aggregate's state is never trusted; the aggregate is folded again from its events.
G4/G6: a state field added without a ``state_version`` bump used to keep its default forever for
every aggregate stored before the change (and `verify` could not see it: both sides read the
same snapshot)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from cqrskit.domain.model import Aggregate, Event
from cqrskit.domain.registry import Registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.store import EventStore

registry = Registry()


@registry.event
class Lent(Event):
    type = "Lent"
    title: str
    days: int


class StateBefore(BaseModel):
    title: str = ""


class StateAfter(BaseModel):  # the field a new release added, with its default
    title: str = ""
    loan_days: int = 0


class LoanBefore(Aggregate[StateBefore]):
    stream_type = "Loan"
    State = StateBefore

    def apply(self, event: Event) -> None:
        self.state = StateBefore(title=event.title)


class LoanAfter(Aggregate[StateAfter]):
    stream_type = "Loan"
    State = StateAfter  # state_version unchanged: the trap of the issue

    def apply(self, event: Event) -> None:
        assert isinstance(event, Lent)
        self.state = StateAfter(title=event.title, loan_days=event.days)


@pytest.fixture
def loans(store_url: str):
    engine = make_engine(store_url)
    yield EventStore(engine, registry)
    engine.dispose()


def stored_snapshot_version(store: EventStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT state_version FROM streams WHERE stream_id = 'Loan:l1'")).scalar_one()


def test_a_state_field_added_without_a_version_bump_is_folded_from_the_events(loans: EventStore) -> None:
    assert LoanBefore.state_version == LoanAfter.state_version == 1
    assert LoanBefore.snapshot_version() != LoanAfter.snapshot_version()
    with loans.unit_of_work() as uow:
        uow.load(LoanBefore, "l1").record(Lent(title="Dune", days=10))
        uow.commit({})
    assert stored_snapshot_version(loans) == LoanBefore.snapshot_version()
    with loans.unit_of_work() as uow:
        loan = uow.load(LoanAfter, "l1")
        assert (loan.version, loan.state.title, loan.state.loan_days) == (1, "Dune", 10)
        loan.record(Lent(title="Dune", days=14))
        uow.commit({})
    assert stored_snapshot_version(loans) == LoanAfter.snapshot_version()  # written anew, under the new shape
    with loans.unit_of_work() as uow:
        assert uow.load(LoanAfter, "l1").state.loan_days == 14


def test_the_snapshot_version_keeps_the_declared_version_and_refuses_a_bad_one() -> None:
    assert LoanAfter.snapshot_version() >> 20 == 1
    assert 0 < LoanAfter.snapshot_version() < 2**31

    class Bumped(LoanAfter):
        state_version = 2

    class Bad(LoanAfter):
        state_version = 4096

    assert Bumped.snapshot_version() >> 20 == 2
    assert Bumped.snapshot_version() & 0xFFFFF == LoanAfter.snapshot_version() & 0xFFFFF
    with pytest.raises(ValueError, match="Bad.state_version must be an int in 1..2047"):
        Bad.snapshot_version()


@registry.event
class Returned(Event):
    type = "Returned"
    title: str


@pytest.fixture(params=["postgresql", "sqlite", "memory"])
def any_loans(request: pytest.FixtureRequest):
    from cqrskit.infra.write_store.opening import MEMORY_URL, open_store

    url = MEMORY_URL if request.param == "memory" else request.getfixturevalue(
        {"postgresql": "pg_url", "sqlite": "sqlite_url"}[request.param])
    store = open_store(url, registry)
    yield store
    if isinstance(store, EventStore):
        store.engine.dispose()


def test_one_commands_events_keep_the_order_the_handler_recorded_them_in_across_aggregates(any_loans) -> None:
    """G5/G6: positions follow the handler's order, not the order the aggregates were loaded in, on
    every store (PostgreSQL writes the whole command as one statement, SQLite row by row)."""
    loans = any_loans
    with loans.unit_of_work() as uow:
        first, second = uow.load(LoanBefore, "a"), uow.load(LoanBefore, "b")
        second.record(Lent(title="B1", days=1))
        first.record(Lent(title="A1", days=1))
        second.record(Returned(title="B2"))
        positions = uow.commit({})
    stored = loans.read_all(0)
    assert [e.position for e in stored] == positions
    assert [(e.stream_id, e.data["title"]) for e in stored] == [("Loan:b", "B1"), ("Loan:a", "A1"), ("Loan:b", "B2")]
    assert [e.version for e in stored] == [1, 1, 2]


def test_the_in_memory_store_returns_them_in_that_order_too() -> None:
    from cqrskit.domain.testing import InMemoryStore

    ctx = InMemoryStore().context()
    first, second = ctx.load(LoanBefore, "a"), ctx.load(LoanBefore, "b")
    second.record(Lent(title="B1", days=1))
    first.record(Lent(title="A1", days=1))
    assert [e.title for e in ctx.commit()] == ["B1", "A1"]


def test_verify_finds_an_apply_that_changed_meaning_without_a_bump(store_url: str) -> None:
    """G6 on the write side: `cqrskit verify`'s snapshot check folds a sample of aggregates from
    their events and names those whose trusted snapshot disagrees (the one change a fingerprint of
    the state's shape cannot see), then a `state_version` bump makes them folded again."""
    from cqrskit.domain.model import Command
    from cqrskit.infra.write_store.snapshots import check_snapshots

    class LoanDoubled(LoanAfter):  # same State, same state_version, apply changed meaning
        def apply(self, event: Event) -> None:
            self.state = StateAfter(title=event.title, loan_days=event.days * 2)

    class LoanBumped(LoanDoubled):
        state_version = 2

    def registry_of(aggregate: type[Aggregate]) -> Registry:  # type: ignore[type-arg]
        found = Registry()
        found.event(Lent)

        class Lend(Command):
            type = "Lend"

        Lend.aggregate = aggregate  # type: ignore[misc]
        found.command(lambda command, aggregate_id, ctx: None)(Lend)
        return found

    engine = make_engine(store_url)
    store = EventStore(engine, registry)
    for loan_id in ("l1", "l2"):
        with store.unit_of_work() as uow:
            uow.load(LoanAfter, loan_id).record(Lent(title="Dune", days=10))
            uow.commit({})
    [same] = check_snapshots(engine, registry_of(LoanAfter))
    assert (same.stream_type, same.checked, same.ok) == ("Loan", 2, True)
    [changed] = check_snapshots(engine, registry_of(LoanDoubled), sample=1)
    assert changed.checked == 1 and list(changed.different.values()) == [["loan_days"]], changed
    [bumped] = check_snapshots(engine, registry_of(LoanBumped))
    assert bumped.checked == 0  # no snapshot of version 2 yet: each is folded from its events on load
    with store.unit_of_work() as uow:
        assert uow.load(LoanBumped, "l1").state.loan_days == 20
    engine.dispose()
