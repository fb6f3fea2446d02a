"""Adaptive lingers: how long a stage's batch may wait for more before it goes out.

Each batch costs a stage a fixed price (a round trip, a commit, a confirm round, a bulk request)
whatever it holds, so a command costs far more at a moderate rate, where every batch holds one,
than in a backlog. A stage therefore waits a bounded time for a fuller batch, but only where
waiting pays:

- none under a backlog: a batch that is full (or that holds everything that can come) goes at once;
- none when items come too rarely for the wait to collect more (fewer than ``least`` expected
  within the bound): an idle or slow stage adds no latency;
- otherwise the time the batch is expected to take to fill up at the rate measured, at most the
  bound (``CQRSKIT_*_LINGER_MS``): longer while batches come out small, never longer than that.

``Arrivals`` measures the rate (an exponentially decaying count, so it falls to zero while
nothing comes); ``IdleBackoff`` stretches the polls of a stage that has found nothing for a while.
"""

from __future__ import annotations

import math
import threading
import time


class Arrivals:
    """Items per second lately: a count decaying with time constant ``horizon`` seconds."""

    def __init__(self, horizon: float = 1.0) -> None:
        self.horizon = horizon
        self._score = 0.0
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def note(self, count: int = 1) -> None:
        with self._lock:
            self._decay(time.monotonic())
            self._score += count

    def rate(self) -> float:
        with self._lock:
            self._decay(time.monotonic())
            return self._score / self.horizon

    def _decay(self, now: float) -> None:
        self._score *= math.exp(-(now - self._at) / self.horizon)
        self._at = now


def linger(rate: float, waiting: int, full: int, bound: float, least: float = 1.0) -> float:
    """Seconds a batch of ``waiting`` items (of at most ``full``) may wait for more, items coming
    at ``rate`` per second; see the module docstring."""
    if bound <= 0 or waiting >= full or rate * bound < least:
        return 0.0
    return min(bound, (full - waiting) / rate)


class IdleBackoff:
    """Poll intervals for a stage that keeps finding nothing: ``first`` for ``hold`` seconds after it
    last found something (``reset``), then ``factor`` times longer each time, up to ``most``."""

    def __init__(self, first: float, most: float, factor: float = 1.5, hold: float = 2.0) -> None:
        self.first, self.most, self.factor, self.hold = first, max(first, most), factor, hold
        self._next = first
        self._found = time.monotonic()

    def reset(self) -> None:
        self._next = self.first
        self._found = time.monotonic()

    def next(self) -> float:
        if time.monotonic() - self._found < self.hold:
            return self.first
        wait, self._next = self._next, min(self.most, self._next * self.factor)
        return wait
