"""OpenTelemetry traces of every process, set up from the standard ``OTEL_*`` environment (G12).

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``; unset, empty or
``none``: off; ``OTEL_SDK_DISABLED=true`` wins). Off costs nothing: the SDK is not even imported,
no provider is set up, every hook returns what it was given, and no context is carried. On, the
SDK reads what users know: ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``_TRACES_ENDPOINT``, ``_PROTOCOL``
(``http/protobuf``, the default, or ``grpc``), ``_HEADERS``, ``OTEL_TRACES_SAMPLER`` / ``_ARG``,
``OTEL_BSP_*``, ``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_SERVICE_NAME`` wins over the name cqrskit
gives each process type (``cqrskit-commands``, ``-relay``, ``-indexer``, ``-gateway``,
``-query``). ``configure`` is called by the composition root when a process starts, never at import.

The context travels as W3C ``traceparent``/``tracestate`` (always that propagator, whatever
``OTEL_PROPAGATORS`` says, so that a producer of any language knows where to put it): in the
AMQP headers of a command (the producer's, the gateway's), in the Dramatiq message's options
(retries keep it), in the metadata of the events a command wrote (so the relay continues the
trace that wrote them), in the relay's messages (AMQP headers to the events exchange, options
to the indexers). Whatever a sender puts there is only parsed by the W3C propagator: a malformed
or oversized value is ignored, never an error. The hooks that the other modules call are in
``cqrskit.infra.tracing_hooks``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TracingError", "configure", "enabled", "shutdown", "headers", "context_of", "span_context_of",
           "start", "active", "log_ids", "TRACE_KEYS"]

TRACE_KEYS = ("traceparent", "tracestate")
MAX_VALUE = 512  # a traceparent is 55 characters; tracestate is at most 32 members
MAX_LINKS = 128
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")

_W3C = TraceContextTextMapPropagator()
_state = threading.local()
_tracer: trace.Tracer | None = None  # None: tracing is off in this process
_provider: Any = None


class TracingError(ValueError):
    """The ``OTEL_*`` environment asks for something cqrskit cannot do; one line for the operator."""


# -- set-up (the composition root) ------------------------------------------------------------
def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters ``environ`` asks for ([]: tracing off). Raises TracingError."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingError(f"OTEL_TRACES_EXPORTER={unknown[0]!r} is not supported: use otlp, console or none")
    if "otlp" in names:
        _protocol(environ)
    return names


def _protocol(environ: Mapping[str, str]) -> str:
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise TracingError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc")
    return protocol


def configure(service: str, environ: Mapping[str, str] = os.environ, *, exporter: Any = None) -> bool:
    """Set up tracing for this process as ``environ`` says; returns whether it is on. ``service``:
    the process type's name (``OTEL_SERVICE_NAME`` wins). ``exporter``: a span exporter of the
    caller's own (tests), used instead of ``OTEL_TRACES_EXPORTER``'s, with a simple processor.
    A later call that turns tracing on replaces the earlier set-up (its spans are flushed first).
    Raises TracingError."""
    global _tracer, _provider
    names = exporter_names(environ)
    if not names and exporter is None:
        return enabled()  # off unless the process set it up already (a test's own exporter)
    shutdown()
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER / _ARG
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names if exporter is None else []:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
    _provider, _tracer = provider, provider.get_tracer("cqrskit")
    _flush_at_exit(provider)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)  # the app's own spans join ours (settable once per process)
    return True


def _flush_at_exit(provider: Any) -> None:
    """Export what is left when the process ends: ``atexit`` (the provider's own) for most, and
    multiprocessing's exit finalizers for Dramatiq's worker processes, which end through
    ``os._exit`` (a stop, or a second SIGTERM that kills them at once)."""
    import multiprocessing.util

    multiprocessing.util.Finalize(provider, provider.force_flush, args=(5_000,), exitpriority=10)


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if _protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: OTEL_EXPORTER_OTLP_*


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_ms: int = 10_000) -> None:
    """Export every span ended so far (a process about to exit without running ``atexit``:
    Dramatiq's worker processes end through multiprocessing's ``os._exit``)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Flush and stop this process's tracing (it is off afterwards)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


# -- carrying the context ---------------------------------------------------------------------
def headers(context: Any = None) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of ``context`` (None: the current one); {} when off
    or when no valid span is current."""
    if _tracer is None:
        return {}
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier


def _value(carrier: Any, key: str) -> str | None:
    value = carrier.get(key) if isinstance(carrier, Mapping) else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) and len(value) <= MAX_VALUE else None


def context_of(carrier: Any) -> Any:
    """The OpenTelemetry context a carrier (AMQP headers, message options, event metadata) holds;
    None when it holds none that is valid."""
    values = {k: v for k in TRACE_KEYS if (v := _value(carrier, k)) is not None}
    if "traceparent" not in values:
        return None
    context = _W3C.extract(values)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def span_context_of(carrier: Any) -> SpanContext | None:
    context = context_of(carrier)
    return None if context is None else trace.get_current_span(context).get_span_context()


def links_of(carriers: Any) -> list[Link]:
    """One link per distinct valid context among ``carriers`` (at most MAX_LINKS)."""
    seen: dict[tuple[int, int], Link] = {}
    for carrier in carriers:
        found = carrier if isinstance(carrier, SpanContext) else span_context_of(carrier)
        if found is not None and (found.trace_id, found.span_id) not in seen:
            seen[(found.trace_id, found.span_id)] = Link(found)
            if len(seen) >= MAX_LINKS:
                break
    return list(seen.values())


# -- spans ------------------------------------------------------------------------------------
@contextmanager
def active(name: str, kind: SpanKind = SpanKind.INTERNAL, *, context: Any = None, links: Any = (),
           attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span made current for the block (None when off); an exception escaping the block is
    recorded on it and marks it as an error. ``context``: the parent (None: the current span)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, context=context, kind=kind, links=list(links),
                                       attributes=dict(attributes or {})) as span:
        yield span


def start(name: str, kind: SpanKind, *, context: Any = None, links: Any = (),
          attributes: Mapping[str, Any] | None = None) -> None:
    """Start a span and make it current on this thread until ``finish`` (a pair of hooks, such
    as Dramatiq's before/after_process_message). Nothing when off."""
    if _tracer is None:
        return
    span = _tracer.start_span(name, context=context, kind=kind, links=list(links), attributes=dict(attributes or {}))
    token = otel_context.attach(trace.set_span_in_context(span))
    _stack().append((span, token))


def finish(exception: BaseException | None = None, **attributes: Any) -> None:
    """End the span ``start`` made current on this thread (recording ``exception``)."""
    stack = _stack()
    if not stack:
        return
    span, token = stack.pop()
    try:
        if attributes:
            span.set_attributes(attributes)
        if exception is not None:
            span.record_exception(exception)
            span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"[:300]))
    finally:
        otel_context.detach(token)
        span.end()


def _stack() -> list[tuple[Span, Any]]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack  # type: ignore[no-any-return]


def annotate(**attributes: Any) -> None:
    """Set attributes (None values left out) on the current span, if one is recording."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def rename(name: str, **attributes: Any) -> None:
    """Rename the current span (and set ``attributes``), if one is recording."""
    span = trace.get_current_span() if _tracer is not None else None
    if span is not None and span.is_recording():
        span.update_name(name)
        span.set_attributes(attributes)


def current_span_context() -> SpanContext | None:
    if _tracer is None:
        return None
    found = trace.get_current_span().get_span_context()
    return found if found.is_valid else None


def log_ids(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` of the current span, when one is active."""
    if _tracer is not None and "trace_id" not in event:
        found = trace.get_current_span().get_span_context()
        if found.is_valid:
            event["trace_id"], event["span_id"] = f"{found.trace_id:032x}", f"{found.span_id:016x}"
    return event
