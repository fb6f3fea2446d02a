"""Adaptive lingers (``cqrskit.workers.pacing``) at the stages that batch: a linger never holds a
batch under a backlog nor when nothing more can come, stays within its bound (G8's bounded waits
rely on it), and a batch that lingered is still settled only once it ran (G1 for the group
commit, G6 for the indexer's windows); an idle relay backs off and still relays the next event (G5)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine

from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.examples.shop.domain import registry
from cqrskit.workers.coalescing import Coalescer
from cqrskit.workers.group_commit import GroupCommit, Pending
from cqrskit.workers.pacing import Arrivals, IdleBackoff, linger
from tests.test_relay import Overlapping, engine, register, relay_settings, run_in_thread, wait_for  # noqa: F401


def test_a_linger_is_none_under_a_backlog_or_when_nothing_more_comes_and_bounded_otherwise() -> None:
    """G8: the wait a linger adds is 0 for a full batch or a rare item, and never above its bound."""
    assert linger(rate=1000.0, waiting=64, full=64, bound=0.05) == 0.0  # a backlog: full at once
    assert linger(rate=5.0, waiting=1, full=64, bound=0.05) == 0.0  # 0.25 expected within the bound
    assert linger(rate=100.0, waiting=1, full=64, bound=0.05) == 0.05  # moderate: the bound
    assert linger(rate=1000.0, waiting=60, full=64, bound=0.05) == pytest.approx(0.004)  # fills in 4 ms
    assert linger(rate=1000.0, waiting=1, full=64, bound=0.0) == 0.0  # off


def test_arrivals_decay_to_nothing_and_idle_polls_back_off_to_their_bound() -> None:
    """G5 at rest: the rate measured falls while nothing comes; the idle polls grow to their bound."""
    arrivals = Arrivals(horizon=0.05)
    arrivals.note(100)
    assert arrivals.rate() > 100
    time.sleep(0.6)  # twelve time constants
    assert arrivals.rate() < 1
    backoff = IdleBackoff(0.025, 0.5, hold=0.2)
    assert backoff.next() == 0.025  # it found something just now
    time.sleep(0.3)
    waits = [backoff.next() for _ in range(12)]
    assert waits[0] == 0.025 and waits == sorted(waits) and waits[-1] == 0.5
    backoff.reset()
    assert [backoff.next() for _ in range(3)] == [0.025] * 3


def staggered(submit: Any, items: list[Any], gap: float) -> None:
    """Each of ``items`` submitted from a thread of its own, ``gap`` seconds apart; all joined."""
    threads = []
    for item in items:
        threads.append(threading.Thread(target=submit, args=(item,)))
        threads[-1].start()
        time.sleep(gap)
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_an_indexer_window_lingers_for_batches_at_a_moderate_rate_and_settles_each_once_written() -> None:
    """G6: batches arriving a few milliseconds apart share a window when the indexer lingers, and
    each submit returns only after a window holding its batch was projected."""
    projected: list[list[str]] = []
    written: set[str] = set()

    def project(batches: list[list[dict[str, Any]]]) -> None:
        projected.append([b[0]["event_id"] for b in batches])
        written.update(b[0]["event_id"] for b in batches)

    coalescer = Coalescer(project, max_events=1000, linger=1.0)
    for n in range(10):  # a rate: ten batches within the last second, one at a time
        coalescer.submit([{"event_id": f"warm{n}", "position": n}])
    returned: list[str] = []

    def submit(event_id: str) -> None:
        coalescer.submit([{"event_id": event_id, "position": 100}])
        assert event_id in written  # settled only once written
        returned.append(event_id)

    staggered(submit, [f"b{n}" for n in range(4)], gap=0.02)
    assert sorted(returned) == [f"b{n}" for n in range(4)]
    windows = [w for w in projected if w[0].startswith("b")]
    assert sum(len(w) for w in windows) == 4 and len(windows) <= 2, windows


@pytest.mark.timeout(60)
def test_a_group_commit_lingers_for_commands_at_a_moderate_rate_and_settles_each_after_its_batch() -> None:
    """G1: commands arriving a few milliseconds apart share a batch when the adaptive linger allows
    it, and each thread gets its command back only after the batch holding it ran."""
    batches: list[list[str]] = []
    ran: set[str] = set()

    def run(batch: list[Pending]) -> list[Pending]:
        batches.append([p.envelope for p in batch])
        ran.update(p.envelope for p in batch)
        for item in batch:
            item.settle(None)
        return []

    group = GroupCommit(run, max_batch=64, adaptive=1.0)
    for n in range(10):
        group.submit(Pending(f"warm{n}", None))

    def submit(name: str) -> None:
        item = group.submit(Pending(name, None))
        assert item.done and name in ran

    staggered(submit, [f"c{n}" for n in range(4)], gap=0.02)
    grouped = [b for b in batches if b[0].startswith("c")]
    assert sum(len(b) for b in grouped) == 4 and len(grouped) <= 2, grouped


@pytest.mark.timeout(60)
def test_an_idle_relay_backs_off_and_still_relays_the_next_event(relay_settings: Settings, engine: Engine) -> None:
    """G5 at rest: while nothing is committed the relay's reads back off to
    CQRSKIT_RELAY_IDLE_POLL_MS (a few a second instead of forty), and an event committed after the
    quiet spell is relayed all the same."""
    settings = relay_settings.model_copy(update={"relay_idle_poll_ms": 300})
    reads: list[float] = []
    published: list[int] = []

    class Counting(Overlapping):
        def _read(self, after: tuple[int, int] | None) -> Any:
            reads.append(time.monotonic())
            return super()._read(after)

    def publish(messages: list[EventMessage]) -> None:
        published.extend(m.position for m in messages)
        relay.published.update(m.position for m in messages)

    relay = Counting(settings, engine, publish)
    store = EventStore(engine, registry)
    stop, thread = run_in_thread(relay)
    try:
        register(store, 1)
        wait_for(lambda: len(published) == 1, 30)
        time.sleep(4.5)  # a quiet spell (2 s at full pace, then backing off): what the relay does is the measurement
        quiet = [t for t in reads if t > time.monotonic() - 1.5]
        assert len(quiet) <= 1.5 / 0.3 + 2, f"{len(quiet)} reads in 1.5 s of rest"
        register(store, 1)
        wait_for(lambda: len(published) == 2, 30)
    finally:
        stop.set()
        thread.join(timeout=10)
        relay.close()


@pytest.mark.timeout(90)
def test_a_relay_at_a_moderate_rate_batches_what_committed_while_it_lingered(
        relay_settings: Settings, engine: Engine) -> None:
    """G5 with the linger: events committed one by one every few milliseconds go out in batches of
    several (what committed during CQRSKIT_RELAY_LINGER_MS), every one published once, in relay
    order, the checkpoint never past an unpublished event."""
    settings = relay_settings.model_copy(update={"relay_linger_ms": 500})
    batches: list[list[int]] = []

    def publish(messages: list[EventMessage]) -> None:
        batches.append([m.position for m in messages])
        relay.published.update(m.position for m in messages)

    relay = Overlapping(settings, engine, publish)
    store = EventStore(engine, registry)
    stop, thread = run_in_thread(relay)
    try:
        for _ in range(40):
            register(store, 1)
            time.sleep(0.01)  # the producer's pace: a moderate, steady rate
        wait_for(lambda: sum(len(b) for b in batches) == 40, 30)
    finally:
        stop.set()
        thread.join(timeout=10)
        relay.close()
    assert [p for b in batches for p in b] == list(range(1, 41))
    assert len(batches) <= 20, f"{len(batches)} batches for 40 events: {batches}"
    assert relay.checkpoints == sorted(relay.checkpoints)
