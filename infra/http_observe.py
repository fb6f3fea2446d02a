"""Access logs and Prometheus metrics of the two HTTP services (the command gateway and the
query API), as one ASGI middleware and a ``GET /metrics`` route.

Every request logs one ``http.request`` line (method, path, route, status, duration in ms,
client; ``/health`` and ``/metrics`` at DEBUG so that probes do not bury the rest) and counts in
``cqrskit_http_requests_total{service,method,route,status}`` and
``cqrskit_http_request_duration_seconds{service,method,route}``. ``route`` is the matched
path template (``/commands/{command_id:path}``), never the raw path, so that ids do not multiply
the series. Each app has its own registry: with ``gateway --workers N`` each uvicorn process
serves its own numbers (scrape each, or run one worker per container).

When tracing is on (``cqrskit.infra.tracing``), every request but the probes is a server span
named ``METHOD route``, a child of the request's W3C ``traceparent`` when it carries a valid one,
with the HTTP semantic conventions' attributes; the access-log line carries its trace id.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cqrskit.infra import tracing

log = structlog.get_logger("cqrskit.access")
QUIET_PATHS = ("/health", "/metrics")


class Observed:
    """Pure ASGI middleware: one access-log line and the metrics of every HTTP request."""

    def __init__(self, app: Any, service: str, requests: Any, durations: Any) -> None:
        self.app, self.service, self.requests, self.durations = app, service, requests, durations

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with _server_span(scope) as span:
            try:
                await self.app(scope, receive, sending)
            finally:
                _close_span(span, scope, status[0])
                self._record(scope, status[0], time.perf_counter() - started)

    def _record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "?")
        self.requests.labels(self.service, method, route, str(status)).inc()
        self.durations.labels(self.service, method, route).observe(seconds)
        client = scope.get("client")
        (log.debug if scope.get("path") in QUIET_PATHS else log.info)(
            "http.request", service=self.service, method=method, path=scope.get("path"), route=route,
            status=status, duration_ms=round(seconds * 1000, 2), client=client[0] if client else None)


def _server_span(scope: dict[str, Any]) -> Any:
    """The request's server span (None when tracing is off, or for a probe): the framework's own
    when it made one (FastAPI's native telemetry, an ASGI instrumentation), else ours."""
    if not tracing.enabled() or scope.get("path") in QUIET_PATHS:
        return contextlib.nullcontext()
    current = trace.get_current_span()
    if current.is_recording() and getattr(current, "kind", None) is SpanKind.SERVER:
        return contextlib.nullcontext(current)
    raw = {k.decode("latin-1").lower(): v for k, v in scope.get("headers") or [] if k.lower() in _TRACE_HEADERS}
    client = scope.get("client")
    attributes = {"http.request.method": scope.get("method", "?"), "url.path": scope.get("path", ""),
                  "url.scheme": scope.get("scheme", "http"), "client.address": client[0] if client else None}
    attributes = {k: v for k, v in attributes.items() if v is not None}
    return tracing.active(scope.get("method", "?"), SpanKind.SERVER, context=tracing.context_of(raw),
                          attributes=attributes)


_TRACE_HEADERS = tuple(key.encode() for key in tracing.TRACE_KEYS)


def _close_span(span: Any, scope: dict[str, Any], status: int) -> None:
    if span is None:
        return
    route = getattr(scope.get("route"), "path", None)
    if route:
        span.update_name(f"{scope.get('method', '?')} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def observe(app: Any, service: str) -> Any:
    """Add the access log, the metrics and ``GET /metrics`` to a FastAPI ``app``; returns it."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from starlette.responses import Response

    registry = CollectorRegistry()
    requests = Counter("cqrskit_http_requests_total", "HTTP requests by route and status",
                       ["service", "method", "route", "status"], registry=registry)
    durations = Histogram("cqrskit_http_request_duration_seconds", "HTTP request durations",
                          ["service", "method", "route"], registry=registry)

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(Observed, service=service, requests=requests, durations=durations)
    return app
