"""A command pipeline inside this process: the command actor on worker threads, fed by a
producer, over the configured broker (the embedded in-process one by default, or RabbitMQ) and
write store. Used by ``cqrskit demo`` and ``cqrskit send`` on the embedded default; it runs the
same actor, executor and store as the deployed ``commands`` processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import dramatiq
import sqlalchemy as sa

from infra.migrate import upgrade
from infra.schema import command_outcomes
from infra.settings import Settings
from infra.store import EventStore
from producers.commands import CommandProducer
from workers.topology import declare_command_topology
from workers.wiring import build_command_worker


class LocalPipeline:
    """Context manager: migrates, declares the topology, starts worker threads, and gives a
    ``producer``; ``wait_for`` blocks until given commands all have outcomes."""

    def __init__(self, settings: Settings, threads: int = 2) -> None:
        self.settings = settings
        self.threads = threads

    def __enter__(self) -> LocalPipeline:
        self.broker, self.runtime = build_command_worker(self.settings, threads=self.threads)
        upgrade(self.runtime.engine)
        declare_command_topology(self.broker, self.settings)
        self.worker = dramatiq.Worker(self.broker, worker_timeout=50, worker_threads=self.threads)
        self.worker.start()
        self.producer = CommandProducer.from_settings(self.settings, broker=self.broker)
        return self

    @property
    def store(self) -> EventStore:
        return self.runtime.store

    def wait_for(self, command_ids: Sequence[str], timeout: float = 600.0,
                 on_progress: Callable[[int], None] | None = None) -> int:
        """Wait until every id has an outcome (or ``timeout``); returns how many have one."""
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            now_done = count_outcomes(self.store, command_ids)
            if on_progress and now_done > done:
                on_progress(now_done - done)
            done = now_done
            if done >= len(command_ids) or time.monotonic() > deadline:
                return done
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.producer.close()
        self.worker.stop()
        self.broker.close()
        self.runtime.close()


def count_outcomes(store: EventStore, command_ids: Sequence[str]) -> int:
    total = 0
    with store.engine.connect() as conn:
        for start in range(0, len(command_ids), 500):
            chunk = list(command_ids[start : start + 500])
            query = sa.select(sa.func.count()).where(command_outcomes.c.command_id.in_(chunk))
            total += conn.execute(query).scalar_one()
    return total
