"""Group commit across the threads of one worker process (leader and followers).

Each Dramatiq worker thread hands its command to ``GroupCommit.submit`` and waits. One waiting
thread at a time (at most ``leaders`` at once) becomes the leader: it takes every command queued
so far (at most ``max_batch``) and runs them as one batch (``run``: one transaction, see
``cqrskit.workers.execution``), while the commands that arrive meanwhile queue up for the next
batch. The batch's outcomes are handed to their threads only after its commit, and each thread
returns to Dramatiq, which acks its message, only then (G1). Under load batches grow by themselves,
up to the number of threads.

Before it takes its batch a leader may wait for a fuller one: up to ``linger`` seconds for a full
one (0 by default), and, at a moderate rate, as long as ``cqrskit.workers.pacing.linger`` says at
the rate commands arrived lately, at most ``adaptive`` seconds, for one command of every thread
seen: no wait under a backlog (the batch is full) nor when commands come too rarely for the wait to
collect another, so a transaction's fixed cost (its round trips and its commit's flush) is shared
by more commands only where that costs little latency.

``run`` returns the commands it put off (a lock held elsewhere): they go back to the head of
the queue, in their order, ahead of anything that arrived later. ``run`` must not raise: it
settles every command it does not put off (an outcome, an error, or "decide it alone").
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cqrskit.infra.outcomes import Outcome
from cqrskit.workers.pacing import Arrivals, linger


@dataclass(eq=False)
class Pending:
    """One command waiting in a group: what to decide, then what became of it."""

    envelope: Any
    command: Any
    provenance: dict[str, Any] = field(default_factory=dict)  # issuer, producer: recorded in the events
    wait_key: int | None = None  # a lock this command found busy: its next transaction waits for it first
    outcome: Outcome | None = None
    error: BaseException | None = None
    alone: bool = False  # its batch failed: the command's own thread decides it alone
    batch_size: int = 0
    done: bool = field(default=False, repr=False)
    wake: Any = field(default=None, repr=False)  # notified when settled, or to lead

    def settle(self, outcome: Outcome | None = None, *, error: BaseException | None = None,
               alone: bool = False) -> None:
        self.outcome, self.error, self.alone, self.done = outcome, error, alone, True


class GroupCommit:
    def __init__(self, run: Callable[[list[Pending]], list[Pending]], *, max_batch: int = 32,
                 leaders: int = 1, linger: float = 0.0, adaptive: float = 0.0) -> None:
        self.run, self.max_batch, self.leaders, self.linger = run, max_batch, leaders, linger
        self.adaptive = adaptive
        self.arrivals = Arrivals()  # commands submitted per second lately
        self.threads: set[int] = set()  # the threads that ever submitted: how full a batch can get
        self.lock = threading.Condition()
        self.queue: deque[Pending] = deque()
        self.leading = 0

    def submit(self, item: Pending) -> Pending:
        """Queue ``item`` and return it once settled (this thread may lead batches meanwhile).
        Only the threads whose commands were settled are woken, plus one to lead the next batch."""
        item.wake = threading.Condition(self.lock)
        with self.lock:
            self.arrivals.note()
            self.threads.add(threading.get_ident())
            self.queue.append(item)
            self.lock.notify()  # a leader lingering for a fuller batch
            while not item.done:
                if self.leading >= self.leaders or not self.queue:
                    item.wake.wait()
                    continue
                self.leading += 1  # from here: no other thread leads meanwhile (``leaders``)
                self._fill()
                batch = [self.queue.popleft() for _ in range(min(len(self.queue), self.max_batch))]
                deferred: list[Pending] = []
                self.lock.release()
                try:
                    deferred = self._run(batch)
                finally:
                    self.lock.acquire()
                    self.leading -= 1
                    self.queue.extendleft(reversed(deferred))
                    for settled in batch:
                        if settled.done:
                            settled.wake.notify()
                    for waiting in list(self.queue)[: self.leaders - self.leading]:
                        waiting.wake.notify()  # to lead the next batch
        return item

    def _fill(self) -> None:
        """With the lock held: wait for a fuller batch (module docstring)."""
        if self.linger:
            self.lock.wait_for(lambda: len(self.queue) >= self.max_batch, timeout=self.linger)
        cap = min(self.max_batch, len(self.threads))
        wait = linger(self.arrivals.rate(), len(self.queue), cap, self.adaptive)
        if wait:
            self.lock.wait_for(lambda: len(self.queue) >= cap, timeout=wait)

    def _run(self, batch: list[Pending]) -> list[Pending]:
        for item in batch:
            item.batch_size = len(batch)
        try:
            return self.run(batch)
        except BaseException as exc:  # run settles its commands; this is the last line of defence
            for item in batch:
                if not item.done:
                    item.settle(error=exc)
            return []
