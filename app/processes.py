"""Entry points of the processes that other programs start: Dramatiq's CLI
(``dramatiq cqrskit.app.processes:command_worker``) and uvicorn's factory mode.

Each is a ``module:callable`` factory: importing this module wires nothing. The parent (``cqrskit
worker``, ``cqrskit indexer``, ``cqrskit gateway --workers N``) hands every effective setting,
flags included, to its children through the ``CQRSKIT_*`` environment
(``Settings.environment()``); each factory reads them back once.
"""

from __future__ import annotations

import os
from typing import Any

from cqrskit.app import bootstrap
from cqrskit.infra import defaults
from cqrskit.infra.http_auth import server_limits
from cqrskit.infra.logs import configure_logging
from cqrskit.infra.settings import Settings, load_settings

THREADS = "CQRSKIT_PROCESS_THREADS"  # set by the parent: the pool size follows the thread count


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings)
    return settings


def _threads(default: int) -> int:
    return int(os.environ.get(THREADS, default))


def command_worker() -> None:
    """Dramatiq factory: a command worker process (sets the process's broker)."""
    bootstrap.command_worker(_settings(), threads=_threads(defaults.COMMAND_THREADS), metrics_server=worker_metrics_server)


def indexer_worker() -> None:
    """Dramatiq factory: an indexer process (sets the process's broker)."""
    bootstrap.indexer_worker(_settings(), threads=_threads(defaults.INDEXER_THREADS), metrics_server=worker_metrics_server)


def worker_metrics_server() -> int:
    """Dramatiq fork of a worker group (by import path): serves the group's metrics."""
    from cqrskit.workers.metrics import serve_metrics

    return serve_metrics(_settings())


def gateway_app() -> Any:
    """uvicorn factory: the HTTP command gateway of one uvicorn worker process."""
    return bootstrap.gateway_app(_http_settings())


def query_app() -> Any:
    """uvicorn factory: the HTTP query API of one uvicorn worker process."""
    return bootstrap.query_app(_http_settings())


def _http_settings() -> Settings:
    """The settings, with this process's request deadlines set from them (uvicorn's worker
    processes import the protocol class by name, without its parent's deadlines)."""
    settings = _settings()
    server_limits(settings)
    return settings
