"""structlog configured once per process: JSON in production, readable on a terminal.

Context (command_id, correlation_id, causation_id, type, aggregate_id) is bound with
``structlog.contextvars`` by the worker middleware, so every line logged while a command runs
carries it, whichever module logs. While a trace is active (``cqrskit.infra.tracing``), every line
also carries its ``trace_id`` and ``span_id`` (hex, as trace viewers show them).
"""

from __future__ import annotations

import logging
import sys

import structlog

from cqrskit.infra import tracing
from cqrskit.infra.reconnect import quiet_restarts
from cqrskit.infra.settings import LogFormat, Settings

_configured = False
# Libraries' own lines, at every level (DEBUG included): pika reports each failed connection attempt in four ERROR
# lines with tracebacks (the caller reports the failure once); the search client logs every
# request at INFO and each failed node at WARNING (the caller reports the error).
LIBRARY_LEVELS = {
    "pika": logging.CRITICAL,
    "alembic": logging.WARNING,
    "elastic_transport": logging.WARNING,
    "elastic_transport.node_pool": logging.ERROR,
    "urllib3": logging.WARNING,
}


def configure_logging(settings: Settings, *, stream=None) -> None:
    """Configure structlog and the stdlib root logger. Idempotent: later calls reconfigure."""
    global _configured
    stream = stream or sys.stderr
    use_json = settings.log_format == LogFormat.json or (
        settings.log_format == LogFormat.auto and not stream.isatty()
    )
    shared = [
        structlog.contextvars.merge_contextvars,
        tracing.log_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else (lambda _l, _m, e: e),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(quiet_restarts)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name, level in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    _configured = True
