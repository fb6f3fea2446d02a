"""The command and indexer actors: thin by design (decode the transport, call the executor or the
indexer, return)."""

from __future__ import annotations

import base64

import dramatiq
import structlog

from elastic_transport import TransportError
from elasticsearch import ApiError
from sqlalchemy.exc import OperationalError

from cqrskit.infra.broker import COMMAND_ACTOR
from cqrskit.infra.delivery import Delivery
from cqrskit.infra.event_wire import EventMessage
from cqrskit.infra.tracing_hooks import command_outcome, index_window, tagged
from cqrskit.infra.topology import indexer_partitions
from cqrskit.read_models.partitions import Partition
from cqrskit.read_models.writer import TransientIndexError
from cqrskit.workers.coalescing import Coalescer
from cqrskit.workers.execution import BadCommand
from cqrskit.workers.runtime import Runtime

log = structlog.get_logger("cqrskit.indexer")


def declare_command_actor(broker: dramatiq.Broker, runtime: Runtime) -> dramatiq.Actor:
    """Declare ``execute_command`` on ``broker``'s commands queue. Retries: Dramatiq's, for
    infrastructure failures only; ``BadCommand`` goes straight to the dead-letter queue."""
    settings = runtime.settings

    def execute_command(body_b64: str, routing_key: str | None = None, producer: str | None = None,
                        on_behalf_of: str | None = None, vouched_by: str | None = None) -> None:
        command_outcome(runtime.executor.execute(base64.b64decode(body_b64),
                                                 Delivery(routing_key, producer, on_behalf_of, vouched_by)))

    return dramatiq.actor(
        execute_command,
        broker=broker,
        actor_name=COMMAND_ACTOR,
        queue_name=settings.commands_queue,
        max_retries=settings.max_retries,
        min_backoff=settings.min_backoff_ms,
        max_backoff=settings.max_backoff_ms,
        throws=(BadCommand,),
    )


def declare_indexer_actors(broker: dramatiq.Broker, runtime: Runtime) -> list[dramatiq.Actor]:
    """Declare ``index_events`` on the indexer queue of every partition (``infra.topology``): a
    batch of events (wire-format dicts) in, the documents of that partition written. Which
    partitions a process consumes is its choice of queues (``cqrskit indexer --partition``). The
    batches a partition's threads hold at once are projected as one window (``Coalescer``). Any
    failure retries the whole batch, for as long as a search outage lasts
    (``CQRSKIT_INDEXER_MAX_RETRIES``); the batch is acknowledged only once written."""
    count = runtime.settings.indexer_partitions
    return [_indexer_actor(broker, runtime, p.queue, p.actor, Partition(p.index, count))
            for p in indexer_partitions(runtime.settings)]


def _indexer_actor(broker: dramatiq.Broker, runtime: Runtime, queue: str, name: str,
                   partition: Partition) -> dramatiq.Actor:
    settings = runtime.settings
    coalescer = Coalescer(index_window(lambda batches: runtime.indexer.index_batches(batches, partition)),
                          settings.indexer_window_events,
                          transient=(TransientIndexError, TransportError, ApiError, OperationalError),
                          linger=settings.indexer_linger_ms / 1000)

    def index_events(events: list[dict]) -> None:  # type: ignore[type-arg]
        check_batch(events)
        try:
            coalescer.submit(tagged(events))  # remembers its message's span (tracing)
        except Exception as exc:  # retried as a whole; logged without the batch (Dramatiq would log it all)
            log.warning("indexer.batch_failed", events=len(events), error=repr(exc)[:500])
            raise dramatiq.Retry(repr(exc)[:500]) from exc

    return dramatiq.actor(
        index_events,
        broker=broker,
        actor_name=name,
        queue_name=queue,
        max_retries=settings.indexer_max_retries,
        min_backoff=settings.min_backoff_ms,
        max_backoff=settings.max_backoff_ms,
        throws=(MalformedBatch,),
    )


class MalformedBatch(Exception):
    """A batch that is not a list of events as the relay publishes them: dead-lettered at once
    (``indexer.XQ``), never retried (G10): retrying cannot make it readable."""


def check_batch(events: object) -> None:
    if not isinstance(events, list):
        raise MalformedBatch(f"an indexer batch is a list of events, not {type(events).__name__}")
    for index, event in enumerate(events):
        try:
            EventMessage.model_validate(event)
        except ValueError as exc:
            raise MalformedBatch(f"event {index} of the batch is not an event message: {str(exc)[:300]}") from None
