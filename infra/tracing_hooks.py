"""The tracing hooks the other modules call: one call each (a decorator, a wrapper or a context
manager), each a no-op returning what it was given when tracing is off (``cqrskit.infra.tracing``).

Spans (attributes after the semantic conventions for messaging, RabbitMQ, databases and HTTP,
plus cqrskit's own under ``cqrskit.*``):

- ``publish cqrskit.commands`` (producer): a command sent by ``CommandProducer`` or the gateway;
  its context goes into the AMQP headers;
- ``process <queue>`` (consumer): a Dramatiq message on a worker, a child of the context its
  options carry; on the commands queue it says the command's id, type, aggregate and outcome;
- ``group commit`` (client, PostgreSQL): one transaction deciding many commands, linked to each
  command's span, with the batch size;
- ``publish cqrskit.events`` (producer): a relayed batch, a child of the trace of its first event's
  command and linked to every command's span, with the number of events;
- ``index`` (client, Elasticsearch bulk): an indexer's window, linked to each batch's span, with
  the documents written, stale, skipped and parked;
- ``consistency wait`` on the query API: the read-your-writes wait, with its time;
- the HTTP server span of each request (``cqrskit.infra.http_observe``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry.trace import SpanKind

from cqrskit.infra import tracing

RABBITMQ = {"messaging.system": "rabbitmq"}


# -- producers: AMQP headers ------------------------------------------------------------------
def _with_headers(message: Any, headers: dict[str, str]) -> Any:
    if not headers:
        return message
    return dataclasses.replace(message, headers={**(message.headers or {}), **headers})


def publishing(messages: list[Any], exchange: str) -> AbstractContextManager[list[Any]]:
    """A producer span for sending ``messages`` (``OutgoingMessage``s) to ``exchange``; yields
    them with its ``traceparent`` in their headers (the very list when tracing is off)."""
    if not tracing.enabled() or not messages:
        return nullcontext(messages)
    return _publishing(messages, exchange)


@contextmanager
def _publishing(messages: list[Any], exchange: str) -> Iterator[list[Any]]:
    attributes = {**RABBITMQ, "messaging.operation.type": "send", "messaging.operation.name": "publish",
                  "messaging.destination.name": exchange, "messaging.batch.message_count": len(messages)}
    if len(messages) == 1:
        attributes |= {"messaging.message.id": messages[0].message_id or "",
                       "messaging.rabbitmq.destination.routing_key": messages[0].routing_key,
                       "cqrskit.command.id": messages[0].message_id or "", "cqrskit.command.type": messages[0].routing_key}
    with tracing.active(f"publish {exchange}", SpanKind.PRODUCER, attributes=attributes):
        headers = tracing.headers()
        yield [_with_headers(m, headers) for m in messages]


def traced_messages(messages: Any) -> Any:
    """``messages`` (an iterable of ``OutgoingMessage``) with the current context in their headers."""
    headers = tracing.headers()
    return messages if not headers else (_with_headers(m, headers) for m in messages)


def trace_options(headers: Any) -> dict[str, str]:
    """The Dramatiq options carrying the context of a delivery's AMQP ``headers`` ({} if none,
    or when tracing is off): what a producer of any language set, checked by the W3C parser."""
    if not tracing.enabled():
        return {}
    context = tracing.context_of(headers)
    return {} if context is None else tracing.headers(context)


def current_options() -> dict[str, str]:
    """The Dramatiq options carrying the current context ({} when off or none)."""
    return tracing.headers()


# -- Dramatiq workers -------------------------------------------------------------------------
def message_started(message: Any) -> None:
    """A consumer span for a Dramatiq message, made current on this thread (``message_ended``)."""
    if not tracing.enabled():
        return
    options = message.options if isinstance(message.options, dict) else {}
    kwargs = message.kwargs if isinstance(message.kwargs, dict) else {}
    attributes = {**RABBITMQ, "messaging.operation.type": "process", "messaging.operation.name": "process",
                  "messaging.destination.name": message.queue_name, "messaging.message.id": message.message_id,
                  "cqrskit.retries": int(options.get("retries", 0) or 0)}
    if isinstance(kwargs.get("routing_key"), str):
        attributes["messaging.rabbitmq.destination.routing_key"] = kwargs["routing_key"]
    tracing.start(f"process {message.queue_name}", SpanKind.CONSUMER, context=tracing.context_of(options),
                  attributes=attributes)


def message_ended(exception: BaseException | None = None) -> None:
    tracing.finish(exception)


def worker_stopped() -> None:
    """A worker process stops: its last spans are exported now (it exits without ``atexit``)."""
    tracing.flush()


def command_outcome(outcome: Any) -> Any:
    """Say ``outcome`` (a command's ``Outcome``) on the current span; returns it."""
    if tracing.enabled() and outcome is not None:
        tracing.annotate(**{"cqrskit.command.id": outcome.command_id, "cqrskit.command.type": outcome.type,
                            "cqrskit.aggregate.id": outcome.aggregate_id, "cqrskit.command.outcome": outcome.status.value,
                            "cqrskit.command.duplicate": bool(outcome.duplicate),
                            "cqrskit.command.reason": (outcome.reason or None) and outcome.reason[:300]})
    return outcome


def traced_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` (recorded with a command's events) plus the current context, so that the
    relay continues the trace that wrote them (the very dict when tracing is off)."""
    headers = tracing.headers()
    return {**metadata, **headers} if headers else metadata


def group_commit(run: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], list[Any]]:
    """``run`` (a group commit's batch runner) in a span linked to each command's span (each
    item's ``provenance`` holds its context: ``traced_metadata``)."""
    @functools.wraps(run)
    def traced(batch: list[Any]) -> list[Any]:
        if not tracing.enabled():
            return run(batch)
        attributes = {"db.system.name": "postgresql", "db.operation.name": "COMMIT",
                      "db.operation.batch.size": len(batch), "cqrskit.group_commit.size": len(batch)}
        links = tracing.links_of(getattr(item, "provenance", None) for item in batch)
        with tracing.active("group commit", SpanKind.CLIENT, links=links, attributes=attributes):
            deferred = run(batch)
            tracing.annotate(**{"cqrskit.group_commit.deferred": len(deferred)})
            return deferred
    return traced


# -- the relay --------------------------------------------------------------------------------
def relaying(publish: Callable[[Any, list[Any]], None]) -> Callable[[Any, list[Any]], None]:
    """``EventRelay._publish`` in a producer span: a child of the trace that wrote the batch's
    first event, linked to the command span of every event (their metadata holds the context)."""
    @functools.wraps(publish)
    def traced(relay: Any, batch: list[Any]) -> None:
        if not tracing.enabled() or not batch:
            return publish(relay, batch)
        metadata = [event.metadata for event in batch]
        attributes = {**RABBITMQ, "messaging.operation.type": "send", "messaging.operation.name": "publish",
                      "messaging.batch.message_count": len(batch),
                      "cqrskit.events.relayed": len(batch), "cqrskit.events.first_position": batch[0].position,
                      "cqrskit.events.last_position": batch[-1].position}
        parent = next((c for c in map(tracing.context_of, metadata) if c is not None), None)
        with tracing.active("publish events", SpanKind.PRODUCER, context=parent,
                            links=tracing.links_of(metadata), attributes=attributes):
            return publish(relay, batch)
    return traced


def relayed_to(exchange: str) -> dict[str, str]:
    """The current (relay) span's context as AMQP headers, the span named after ``exchange``."""
    if not tracing.enabled():
        return {}
    tracing.rename(f"publish {exchange}", **{"messaging.destination.name": exchange})
    return tracing.headers()


def reacting(react: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """A process manager's reaction ``react(self, manager, stored_event)`` in a span, a child of
    the trace of the command that wrote the event (its metadata holds the context)."""
    @functools.wraps(react)
    def traced(process: Any, manager: Any, stored: Any) -> None:
        if not tracing.enabled():
            return react(process, manager, stored)
        attributes = {"cqrskit.process_manager": getattr(manager, "name", "?"), "cqrskit.event.id": stored.event_id,
                      "cqrskit.event.type": stored.type, "cqrskit.event.position": stored.position}
        with tracing.active(f"react {getattr(manager, 'name', '?')}", context=tracing.context_of(stored.metadata),
                            attributes=attributes):
            return react(process, manager, stored)
    return traced


def in_current_context(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, run in the caller's trace context wherever it runs (another thread's pool)."""
    if not tracing.enabled():
        return function
    from opentelemetry import context as otel_context

    captured = otel_context.get_current()

    @functools.wraps(function)
    def carried(*args: Any, **kwargs: Any) -> Any:
        token = otel_context.attach(captured)
        try:
            return function(*args, **kwargs)
        finally:
            otel_context.detach(token)
    return carried


# -- indexers ---------------------------------------------------------------------------------
class TracedBatch(list):  # type: ignore[type-arg]
    """An indexer batch that remembers the span of the message that brought it."""

    span_context: Any = None


def tagged(events: list[Any]) -> list[Any]:
    """``events`` remembering the current span (the very list when tracing is off)."""
    found = tracing.current_span_context()
    if found is None:
        return events
    batch = TracedBatch(events)
    batch.span_context = found
    return batch


def index_window(project: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """``project`` (an indexer window: batches in, an ``IndexReport`` out) in a span linked to
    each batch's message span, saying the documents written, stale, skipped and parked."""
    @functools.wraps(project)
    def traced(batches: list[Any]) -> Any:
        if not tracing.enabled():
            return project(batches)
        links = tracing.links_of(c for b in batches if (c := getattr(b, "span_context", None)) is not None)
        attributes = {"db.system.name": "elasticsearch", "db.operation.name": "bulk",
                      "cqrskit.index.batches": len(batches), "cqrskit.index.events": sum(len(b) for b in batches)}
        with tracing.active("index", SpanKind.CLIENT, links=links, attributes=attributes):
            report = project(batches)
            tracing.annotate(**{"cqrskit.index.documents": getattr(report, "documents", None),
                                "cqrskit.index.written": getattr(report, "written", None),
                                "cqrskit.index.stale": getattr(report, "stale", None),
                                "cqrskit.index.skipped": getattr(report, "skipped", None),
                                "cqrskit.index.parked": len(getattr(report, "parked", None) or [])})
            return report
    return traced


# -- the query API ----------------------------------------------------------------------------
def command_trace(conn: Any, positions: list[int]) -> str | None:
    """The ``traceparent`` of the command that wrote the event at ``positions[0]`` (None when
    tracing is off or none was recorded): a consistency token carries it, so that the query
    API's wait for that write links to the command's span."""
    if not tracing.enabled() or not positions:
        return None
    import sqlalchemy as sa

    from cqrskit.infra.schema import events

    metadata = conn.execute(sa.select(events.c.metadata).where(events.c.position == positions[0])).scalar()
    context = tracing.context_of(metadata)
    return None if context is None else tracing.headers(context).get("traceparent")


def _token_links(side: Any, params: Any) -> list[Any]:
    from cqrskit.infra.tokens import ConsistencyToken, InvalidToken

    try:
        token = ConsistencyToken.decode(params.consistent_with, side.secret)
    except InvalidToken:
        return []
    return tracing.links_of([{"traceparent": token.trace}]) if token.trace else []


def consistency_wait(wait: Callable[..., Any]) -> Callable[..., Any]:
    """An async read-your-writes wait ``wait(side, model, params)`` in a span saying the read
    model, how long it waited and whether it timed out (no span when ``params`` asks for none),
    linked to the span of the command that made the token (``command_trace``)."""
    @functools.wraps(wait)
    async def traced(side: Any, model: Any, params: Any) -> Any:
        if not tracing.enabled() or getattr(params, "consistent_with", None) is None:
            return await wait(side, model, params)
        started, reflected = time.monotonic(), False
        with tracing.active("consistency wait", links=_token_links(side, params),
                            attributes={"cqrskit.read_model": model.name}):
            try:
                result = await wait(side, model, params)
                reflected = True
                return result
            finally:
                tracing.annotate(**{"cqrskit.consistency.wait_seconds": round(time.monotonic() - started, 6),
                                    "cqrskit.consistency.reflected": reflected})
    return traced
