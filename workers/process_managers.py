"""The process-managers process: events in, reactions committed, timers fired, the commands sent
published (G13, with G2 for those commands).

Three loops share one process (``ProcessManagers.run``):

- **events**: the committed events are read from the write store in the relay's commit-safe order
  (``cqrskit.workers.relay.read_batch``: no event is ever skipped, G5), from a checkpoint of this
  partition's own (a ``relay_checkpoints`` row, ``process-managers.p<i>of<n>``). Each event a
  manager handles, whose instance has its home in this partition (the indexers' jump hash of
  ``<manager>:<key>``), is reacted to in its own transaction with its handled record
  (``cqrskit.infra.write_store.reactions``), so the events of one instance are handled in their
  order, and an event read again (after a crash, or by a second process on the same partition)
  changes nothing. The checkpoint moves after the batch: a crash before re-reads, never skips.
  Reading the log rather than a queue keeps each instance's order under retries and restarts.
  A reaction that raises is retried with backoff and holds its partition (never skipped).
- **timers**: every process fires the timers due (``ReactionStore.fire_due``: one transaction per
  timer, ``FOR UPDATE SKIP LOCKED``, so two processes never fire one timer); lateness is logged
  and kept (``lateness``).
- **outbox**: commands sent are published to the commands exchange with publisher confirms
  (routing key = type, ``message_id`` = the derived command id), then marked published in the
  transaction that took them; a crash in between publishes them again, and the command side's
  dedup makes that one command (G2).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from sqlalchemy import Engine

from cqrskit.domain.ports import ConcurrencyConflict
from cqrskit.domain.process import ProcessManager
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.tracing_hooks import reacting
from cqrskit.infra.write_store.port import StoredEvent
from cqrskit.infra.write_store.reactions import Fired, ReactionStore
from cqrskit.read_models.partitions import Partition
from cqrskit.workers.relay import read_batch, read_checkpoint, write_checkpoint

log = structlog.get_logger("cqrskit.process_managers")
Publish = Callable[[list[CommandEnvelope]], None]  # returns once the broker confirmed every one, else raises
IDLE_POLL = 0.2


@dataclass
class Lateness:
    """How late timers fired (seconds): the count, the latest, and a bounded sample for quantiles."""

    fired: int = 0
    sample: list[float] = field(default_factory=list)

    def note(self, fired: list[Fired]) -> None:
        self.fired += len(fired)
        self.sample = (self.sample + [f.lateness for f in fired])[-10_000:]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.sample)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class ProcessManagers:
    """One process-managers process (see the module docstring)."""

    def __init__(self, engine: Engine, reactions: ReactionStore, publish: Publish,
                 partition: Partition = Partition(0, 1), batch_size: int = 500) -> None:
        self.engine, self.reactions, self.publish = engine, reactions, publish
        self.partition, self.batch_size = partition, batch_size
        self.checkpoint_name = checkpoint_name(partition)
        self.handled = 0
        self.lateness = Lateness()

    # -- one step of each loop ------------------------------------------------------------------
    def consume_once(self) -> int:
        """React to the next batch of events after this partition's checkpoint; returns how many
        events were read (0: none new). Raises what a reaction raises (the checkpoint stays)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            checkpoint = read_checkpoint(conn, self.checkpoint_name)
            batch = read_batch(conn, checkpoint, self.batch_size)
        for stored in batch:
            for manager in self.reactions.handles(stored.type):
                if self.partition.owns(f"{manager.name}:{self.reactions.instance_key(manager, stored)}"):
                    self._react(manager, stored)
        if batch:
            self._advance(batch[-1].tx_id or 0, batch[-1].position)
        return len(batch)

    def fire_once(self, now: datetime | None = None) -> list[Fired]:
        fired = self.reactions.fire_due(now or datetime.now(UTC))
        self.lateness.note(fired)
        for f in fired:
            log.info("process_manager.timer_fired", manager=f.manager, instance=f.key, timer=f.name,
                     due_at=f.due_at.isoformat(), lateness_s=round(f.lateness, 3), commands=f.commands)
        return fired

    def publish_once(self) -> int:
        """Publish the outbox's unpublished commands (confirmed), then mark them; returns how many."""
        with self.reactions.take_unpublished() as commands:
            if commands:
                self.publish([c.envelope for c in commands])
                log.info("process_manager.commands_published", count=len(commands),
                         command_ids=[c.envelope.command_id for c in commands])
        return len(commands)

    @reacting  # a span in the trace of the command that wrote the event
    def _react(self, manager: ProcessManager, stored: StoredEvent) -> None:
        for attempt in range(20):
            try:
                if self.reactions.react(manager, stored):
                    self.handled += 1
                    log.info("process_manager.reacted", manager=manager.name, event_id=stored.event_id,
                             event_type=stored.type, correlation_id=(stored.metadata or {}).get("correlation_id"),
                             causation_id=stored.event_id)
                return
            except ConcurrencyConflict:
                time.sleep(0.01 * (attempt + 1))  # another process moved the instance: read it again
        raise ConcurrencyConflict(f"{manager.name}: the instance kept moving")

    def _advance(self, tx_id: int, position: int) -> None:
        with self.engine.begin() as conn:
            write_checkpoint(conn, self.checkpoint_name, tx_id, position)

    # -- the process ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """The three loops, on three threads, until ``stop`` is set. Never dies of a transient
        failure: each loop logs it and retries with backoff."""
        log.info("process_managers.started", partition=self.partition.index, partitions=self.partition.count,
                 managers=sorted(self.reactions.managers))
        loops = [("events", lambda: self.consume_once() >= self.batch_size),
                 ("timers", lambda: len(self.fire_once()) >= 100), ("outbox", lambda: self.publish_once() >= 500)]
        threads = [threading.Thread(target=_loop, args=(name, step, stop), name=f"pm-{name}", daemon=True)
                   for name, step in loops]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log.info("process_managers.stopped")

    def lag(self) -> int:
        """Committed events after this partition's checkpoint."""
        with self.engine.connect() as conn:
            checkpoint = read_checkpoint(conn, self.checkpoint_name)
        return self.reactions.events_after(checkpoint[1])


def _loop(name: str, step: Callable[[], bool], stop: threading.Event) -> None:
    failures = 0
    while not stop.is_set():
        try:
            busy = step()
            failures = 0
        except Exception as exc:  # outlive every outage; what failed is retried, never skipped
            failures += 1
            wait = min(0.25 * 2 ** (failures - 1), 10.0)
            log.warning("process_managers.error", loop=name, error=repr(exc)[:500], retry_in=wait,
                        failures=failures, exc_info=failures == 1)
            stop.wait(wait)
            continue
        if not busy:
            stop.wait(IDLE_POLL)


def checkpoint_name(partition: Partition) -> str:
    return f"process-managers.p{partition.index}of{partition.count}"


class CommandsNotConfirmed(Exception):
    """The broker did not confirm every command of an outbox batch; the batch stays unpublished."""


class CommandOutlet:
    """The outbox's way to the commands exchange: persistent messages, routing key = type,
    ``message_id`` = command id, ``mandatory`` (a missing binding fails the batch), confirmed."""

    def __init__(self, broker_url: str, exchange: str) -> None:
        from cqrskit.infra.amqp import AmqpPublisher

        self.publisher = AmqpPublisher(broker_url, exchange, confirm_timeout=15.0, reconnect_attempts=2)

    def __call__(self, envelopes: list[CommandEnvelope]) -> None:
        from cqrskit.infra.amqp import OutgoingMessage

        report = self.publisher.publish_many(
            OutgoingMessage(body=e.to_json(), routing_key=e.type, message_id=e.command_id) for e in envelopes)
        if report.failed:
            raise CommandsNotConfirmed(f"{len(report.failed)} of {len(envelopes)} commands not confirmed, "
                                       f"e.g. {report.failed[0][0]}: {report.failed[0][1]}")

    def close(self) -> None:
        self.publisher.close()


class ProcessManagerMetrics:
    """A prometheus_client collector over one running ``ProcessManagers``: events reacted to,
    timers fired and their lateness, this partition's lag, timers pending and overdue."""

    def __init__(self, process: ProcessManagers) -> None:
        self.process = process
        self.server: object = None

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from cqrskit.infra.write_store.reactions import process_manager_state

        p = self.process
        yield CounterMetricFamily("cqrskit_process_manager_events_handled", "Events reacted to (committed).",
                                  value=p.handled)
        yield CounterMetricFamily("cqrskit_process_manager_timers_fired", "Timers fired (committed).",
                                  value=p.lateness.fired)
        lateness = GaugeMetricFamily("cqrskit_process_manager_timer_lateness_seconds",
                                     "How late timers fired lately, by quantile.", labels=["quantile"])
        for q in (0.5, 0.99):
            lateness.add_metric([str(q)], p.lateness.quantile(q))
        yield lateness
        try:
            lag = p.lag()
            with p.engine.connect() as conn:
                state = process_manager_state(conn)
        except Exception:  # noqa: BLE001 - the write store is down: report what this process knows
            return
        yield GaugeMetricFamily("cqrskit_process_manager_lag_events", "Committed events after this partition's "
                                "checkpoint.", value=lag)
        yield GaugeMetricFamily("cqrskit_process_manager_timers_pending", "Timers set, not fired.",
                                value=state.timers_pending)
        yield GaugeMetricFamily("cqrskit_process_manager_timers_overdue", "Timers due more than 5 s ago.",
                                value=state.timers_overdue)


def serve_metrics(port: int | None, host: str, process: ProcessManagers) -> ProcessManagerMetrics | None:
    """Serve ``process``'s metrics on ``port`` from a thread (None: metrics off, or the port is taken)."""
    if port is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    metrics = ProcessManagerMetrics(process)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    try:
        metrics.server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("metrics.unavailable", port=port, error=str(exc))
        return None
    return metrics
