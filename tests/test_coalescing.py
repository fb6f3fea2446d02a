"""The indexer's coalescing of concurrently delivered batches (``cqrskit.workers.coalescing``), in
process: every batch is settled exactly once with the outcome of the window that held it (G6: a
batch is acknowledged only once written), a poison batch fails alone (G7), and batches waiting
together share one window."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cqrskit.workers.coalescing import Coalescer, WindowFailed

Batch = list[dict[str, Any]]


class Outage(Exception):
    pass


def batch(n: int, size: int = 3) -> Batch:
    return [{"event_id": f"{n}-{i}", "position": n * 10 + i} for i in range(size)]


def submit_all(coalescer: Coalescer, batches: list[Batch]) -> dict[int, BaseException | None]:
    outcomes: dict[int, BaseException | None] = {}

    def one(k: int) -> None:
        try:
            coalescer.submit(batches[k])
            outcomes[k] = None
        except WindowFailed as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    return outcomes


@pytest.mark.timeout(60)
def test_every_batch_is_projected_once_and_waiting_batches_share_a_window() -> None:
    """G6: each submit returns only after a window holding its batch was projected."""
    gate = threading.Event()
    windows: list[list[Batch]] = []

    def project(batches: list[Batch]) -> None:
        windows.append(batches)
        gate.wait(5)  # the first window is slow: the others pile up behind the two leaders

    coalescer = Coalescer(project, max_events=1000, max_windows=2)
    batches = [batch(n) for n in range(12)]
    timer = threading.Timer(0.3, gate.set)
    timer.start()
    outcomes = submit_all(coalescer, batches)
    assert outcomes == dict.fromkeys(range(12))
    projected = [b for window in windows for b in window]
    assert sorted(map(id, projected)) == sorted(map(id, batches))  # each exactly once
    assert len(windows) < len(batches)  # some batches shared a window


@pytest.mark.timeout(60)
def test_a_poison_batch_fails_alone_and_an_outage_fails_the_whole_window() -> None:
    """G7: a window failing on a bad batch is retried batch by batch; only the bad one fails.
    An outage (``transient``) fails every batch of the window, without retrying one by one."""
    gate = threading.Event()
    calls: list[int] = []

    def project(batches: list[Batch]) -> None:
        calls.append(len(batches))
        gate.wait(5)
        if any(b and b[0]["event_id"].startswith("poison") for b in batches):
            raise ValueError("projection bug")
        if any(b and b[0]["event_id"].startswith("down") for b in batches):
            raise Outage("search server down")

    coalescer = Coalescer(project, max_events=1000, max_windows=1, transient=(Outage,))
    poison = [{"event_id": "poison-1", "position": 1}]
    batches = [batch(0), poison, batch(2), batch(3)]
    threading.Timer(0.3, gate.set).start()
    outcomes = submit_all(coalescer, batches)
    assert isinstance(outcomes[1], WindowFailed) and isinstance(outcomes[1].__cause__, ValueError)
    assert sorted(k for k, error in outcomes.items() if error is None) == [0, 2, 3]

    gate.clear()
    calls.clear()
    first = threading.Thread(target=coalescer.submit, args=(batch(5),))
    first.start()  # leads alone and holds the window open until the gate opens
    while not calls:
        threading.Event().wait(0.01)
    down = [{"event_id": "down-1", "position": 5}]
    threading.Timer(0.3, gate.set).start()
    outcomes = submit_all(coalescer, [batch(6), down, batch(7)])
    first.join(timeout=10)
    assert all(isinstance(error, WindowFailed) for error in outcomes.values()), outcomes
    assert all(isinstance(error.__cause__, Outage) for error in outcomes.values())  # type: ignore[union-attr]
    assert calls == [1, 3]  # the outage failed the window of three at once, no one-by-one retries


def test_a_window_holds_at_most_max_events_unless_one_batch_is_larger() -> None:
    windows: list[int] = []
    coalescer = Coalescer(lambda bs: windows.append(sum(len(b) for b in bs)), max_events=5)
    coalescer.submit(batch(1, size=9))  # alone, larger than the bound: still projected
    assert windows == [9]
