"""The whole pipeline inside this process: the command actor and the indexer actor on worker
threads, the event relay on a thread, fed by a producer; over the configured broker (the
embedded in-process one by default, or RabbitMQ), write store and search server (an embedded
osmem by default). Used by ``cqrskit demo`` and by ``cqrskit send`` on the embedded default; it
runs the same actors, executor, relay and indexer as the deployed processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

import dramatiq

from cqrskit.infra.migrate import upgrade
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.producers.commands import CommandProducer
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.search import EmbeddedSearch
from cqrskit.app import bootstrap
from cqrskit.read_models.verify import VerifyReport, verify
from cqrskit.workers.actors import declare_command_actor, declare_indexer_actors
from cqrskit.infra.broker import index_message, make_broker
from cqrskit.workers.middleware import DeadOutcomes, LogContext
from cqrskit.workers.relay import EventRelay, default_holder
from cqrskit.infra.topology import declare_command_topology


class LocalPipeline:
    """Context manager: migrates, declares the topology and indices, starts the worker threads
    and the relay, and gives a ``producer``. ``wait_for`` blocks until commands have outcomes,
    ``wait_converged`` until every read model equals the write store."""

    def __init__(self, settings: Settings, threads: int = 2, search_log: IO[str] | None = None) -> None:
        self.settings = settings
        self.threads = threads
        self.search_log = search_log
        self.stop = threading.Event()

    def __enter__(self) -> LocalPipeline:
        self.search = EmbeddedSearch(self.settings, stderr=self.search_log).__enter__()
        self.runtime = bootstrap.runtime(self.settings, pool_size=self.threads + 4, search_url=self.search.url)
        self.broker = make_broker(self.settings, extra_middleware=[LogContext(), DeadOutcomes(self.runtime)])
        declare_command_actor(self.broker, self.runtime)
        declare_indexer_actors(self.broker, self.runtime)
        upgrade(self.runtime.engine)
        declare_command_topology(self.broker, self.settings)
        for model in self.runtime.read_models:
            ensure(self.runtime.search, self.runtime.engine, self.settings.index_prefix, model)
        self.worker = dramatiq.Worker(self.broker, worker_timeout=50, worker_threads=self.threads)
        self.worker.start()
        self.relay = self._relay()
        self.relay_thread = threading.Thread(target=self.relay.run, args=(self.stop,), name="relay", daemon=True)
        self.relay_thread.start()
        self.producer = CommandProducer.from_settings(self.settings, broker=self.broker)
        return self

    def _relay(self) -> EventRelay:
        if not self.settings.embedded_broker:
            return EventRelay.for_rabbitmq(self.settings, self.runtime.engine)
        queue = self.settings.indexer_queue
        self.broker.declare_queue(queue)
        feed = lambda batch: self.broker.enqueue(index_message(batch, queue))  # noqa: E731
        return EventRelay(self.settings, self.runtime.engine, None, feed, default_holder())

    @property
    def store(self) -> EventStore:
        return self.runtime.store

    def wait_for(self, command_ids: Sequence[str], timeout: float = 600.0,
                 on_progress: Callable[[int], None] | None = None) -> int:
        """Wait until every id has an outcome (or ``timeout``); returns how many have one."""
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            now_done = self.store.count_outcomes(command_ids)
            if on_progress and now_done > done:
                on_progress(now_done - done)
            done = now_done
            if done >= len(command_ids) or time.monotonic() > deadline:
                return done
            time.sleep(0.05)

    def wait_converged(self, timeout: float = 120.0) -> list[VerifyReport]:
        """Wait until the relay has caught up and ``verify`` finds every read model equal to the
        write store; returns the last reports (check ``ok``: it may have timed out)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.relay.lag().events == 0:
                reports = self.verify()
                if all(r.ok for r in reports) or time.monotonic() > deadline:
                    return reports
            elif time.monotonic() > deadline:
                return self.verify()
            time.sleep(0.2)

    def verify(self) -> list[VerifyReport]:
        es, engine, prefix = self.runtime.search, self.runtime.engine, self.settings.index_prefix
        return [verify(engine, self.runtime.registry, es, prefix, model) for model in self.runtime.read_models]

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.relay_thread.join(timeout=10)
        self.producer.close()
        self.worker.stop()
        self.broker.close()
        self.relay.close()
        self.runtime.close()
        self.search.__exit__()
