"""Coalescing: the batches an indexer process's threads hold at one moment, projected as one.

Each worker thread hands its message's batch to ``Coalescer.submit`` and waits. Up to
``max_windows`` threads at a time lead: a leader takes every batch waiting (up to ``max_events``
events), projects them in one pass (each document computed once per window, however many of the
batches touch it), and settles every batch of the window with the outcome. Two windows in flight
let one read the write store while the other waits for the search server. A leader leads until
its own batch is settled, then hands over to a waiting thread. So a batch's message is acknowledged only after a
window holding it was written: a process killed mid-window acknowledges none of them, and they
are delivered again (G6). Group commit, for read models.

A leader may wait for a fuller window first (``linger``, 0 by default: none): as long as
``cqrskit.workers.pacing.linger`` says at the rate batches arrived lately, for one batch of every
thread seen (or ``max_events``): no wait under a backlog, nor when batches come too rarely for the
wait to collect another, so the fixed cost of a window (a snapshot read, one bulk request per read
model, a search-server write) is shared by more batches only where that costs little latency.

A window that fails on something other than an outage (``transient``) is retried batch by
batch, so that one poison batch fails alone instead of taking the others of its window with it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cqrskit.workers.pacing import Arrivals, linger

Batch = list[dict[str, Any]]


class WindowFailed(Exception):
    """The window holding this batch was not written; the batch must be retried."""


@dataclass(eq=False)
class _Ticket:
    events: Batch
    done: bool = False
    error: BaseException | None = None


class Coalescer:
    """Group commit of concurrently submitted batches; see the module docstring."""

    def __init__(self, project: Callable[[list[Batch]], Any], max_events: int, max_windows: int = 2,
                 transient: tuple[type[BaseException], ...] = (), linger: float = 0.0) -> None:
        self.project = project
        self.max_events = max_events
        self.max_windows = max_windows
        self.transient = transient
        self._waiting: deque[_Ticket] = deque()
        self._cond = threading.Condition()
        self._leaders = 0
        self.linger = linger
        self._arrivals = Arrivals()  # batches submitted per second lately
        self._threads: set[int] = set()  # the threads that ever submitted: how many batches can wait
        self._first = True  # no window taken yet

    def submit(self, events: Batch) -> None:
        """Return once a window holding ``events`` was projected; raise WindowFailed otherwise."""
        ticket = _Ticket(events)
        with self._cond:
            self._arrivals.note()
            self._threads.add(threading.get_ident())
            self._waiting.append(ticket)
            self._cond.notify_all()  # a leader lingering for a fuller window
            while not ticket.done and self._leaders >= self.max_windows:
                self._cond.wait()
            lead = not ticket.done
            if lead:
                self._leaders += 1
        if lead:
            self._lead(ticket)
        if ticket.error is not None:
            raise WindowFailed(repr(ticket.error)[:500]) from ticket.error

    def _lead(self, own: _Ticket) -> None:
        """Project windows until ours is settled or nothing waits (another leader then holds it)."""
        try:
            while not own.done:
                window = self._take()
                if not window:
                    break
                self._settle(window, self._run(window))
        finally:
            with self._cond:
                self._leaders -= 1
                self._cond.notify_all()
        with self._cond:
            while not own.done:
                self._cond.wait()

    def _take(self) -> list[_Ticket]:
        with self._cond:
            if not self._waiting:
                return []
            self._fill()
            if not self._waiting:  # another leader took them while this one lingered
                return []
            window = [self._waiting.popleft()]
            events = len(window[0].events)
            while self._waiting and events + len(self._waiting[0].events) <= self.max_events:
                events += len(self._waiting[0].events)
                window.append(self._waiting.popleft())
        return window

    def _fill(self) -> None:
        """With the lock held: wait for a fuller window (module docstring). The process's first
        window waits, within the bound, for a second batch: at a start on a backlog every thread
        gets one within milliseconds, but no rate or thread count has been seen yet."""
        cap = len(self._threads)
        first, self._first = self._first, False
        wait = self.linger if first else linger(self._arrivals.rate(), len(self._waiting), cap, self.linger)
        if wait:
            self._cond.wait_for(lambda: len(self._waiting) >= (2 if first else cap) or self._events() >= self.max_events,
                                timeout=wait)

    def _events(self) -> int:
        return sum(len(t.events) for t in self._waiting)

    def _run(self, window: list[_Ticket]) -> list[BaseException | None]:
        try:
            self.project([t.events for t in window])
            return [None] * len(window)
        except Exception as exc:
            if len(window) == 1 or isinstance(exc, self.transient):
                return [exc] * len(window)
        return [self._run_alone(t) for t in window]

    def _run_alone(self, ticket: _Ticket) -> BaseException | None:
        try:
            self.project([ticket.events])
            return None
        except Exception as exc:
            return exc

    def _settle(self, window: list[_Ticket], errors: list[BaseException | None]) -> None:
        with self._cond:
            for ticket, error in zip(window, errors, strict=True):
                ticket.done, ticket.error = True, error
            self._cond.notify_all()
