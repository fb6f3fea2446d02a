"""The composition root: which app cqrskit runs (``CQRSKIT_APP``, resolved here, once per
process) and how each process is put together from one ``Settings``. Every CLI verb and every
Procfile process starts here; nothing below this package chooses a domain, reads the environment
or wires a broker."""

from __future__ import annotations

import functools
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq

from cqrskit.app.declaration import App
from cqrskit.infra import defaults, tracing
from cqrskit.infra.broker import make_broker
from cqrskit.infra.settings import Settings
from cqrskit.infra.write_store.opening import open_store
from cqrskit.infra.write_store.port import WriteStore
from cqrskit.read_models.model import declaration_problems
from cqrskit.workers.actors import declare_command_actor, declare_indexer_actors
from cqrskit.workers.metrics import COMMANDS, INDEXER, worker_metrics
from cqrskit.workers.middleware import DeadOutcomes, LogContext, Tracing
from cqrskit.workers.runtime import Runtime


class AppError(ValueError):
    """``CQRSKIT_APP`` names no usable app; the message is one line for the operator."""


@functools.cache
def load_app(spec: str) -> App:
    """The ``App`` that ``spec`` (``module:attribute``) names, imported once per process. The
    current directory is importable (as with ``dramatiq module`` and uvicorn), after everything
    installed. Raises AppError."""
    module_name, _, attribute = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module_name) or not re.fullmatch(r"[A-Za-z_][\w.]*", attribute):
        raise AppError(f"CQRSKIT_APP must be module:attribute (e.g. myhotel.app:app), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # last: a file in the directory never shadows an installed module
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AppError(f"app {spec!r}: no module named {exc.name!r} (run from the project's directory, "
                           f"or put its package on PYTHONPATH)") from None
        raise AppError(f"app {spec!r}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # the app's own module is broken: say how, in one line
        raise AppError(f"app {spec!r}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise AppError(f"app {spec!r}: {module_name} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not isinstance(found, App):
        raise AppError(f"app {spec!r} is a {type(found).__name__}, not a cqrskit.app.App")
    problems = found.registry.problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AppError(f"app {spec!r}: {problems[0]}{more}")
    try:
        found.searchable  # noqa: B018 - derive the declared queries now: a mistake is the app's, said once
    except ValueError as exc:
        raise AppError(f"app {spec!r}: {exc}") from None
    declared = [problem for model in found.read_models for problem in declaration_problems(model)]
    if declared:
        more = f" (and {len(declared) - 1} more)" if len(declared) > 1 else ""
        raise AppError(f"app {spec!r}: {declared[0]}{more}")
    return found


def app_of(settings: Settings) -> App:
    """The app ``settings`` select (``CQRSKIT_APP``). Raises AppError."""
    return load_app(settings.app)


def build_runtime(settings: Settings, app: App, *, pool_size: int = 8, search_url: str | None = None) -> Runtime:
    """THE builder of a process's resources from one ``Settings`` and the ``App``: its engine,
    write store, command executor, indexer and search client (made lazily, released by
    ``Runtime.close``). Every command worker and indexer, the local pipeline of the demo and the
    ``Harness`` take theirs from here, so they run the same executor with the same settings."""
    return Runtime(settings, app.registry, app.read_models, pool_size=pool_size, search_url=search_url,
                   process_managers=app.process_managers)


@contextmanager
def write_store(settings: Settings, *, pool_size: int = 2) -> Iterator[WriteStore]:
    """A CLI verb's write store, for the app ``settings`` select (opened by ``open_store``, the
    one place that picks the adapter from the URL), closed when the block ends. Raises AppError."""
    store = open_store(settings.database_url, app_of(settings).registry, pool_size=pool_size)
    try:
        yield store
    finally:
        store.close()


def runtime(settings: Settings, *, pool_size: int = 8, search_url: str | None = None) -> Runtime:
    """``build_runtime`` for the app ``settings`` select. Raises AppError."""
    return build_runtime(settings, app_of(settings), pool_size=pool_size, search_url=search_url)


COMMAND_POOL = 8  # connections of a command worker process beyond 2 (and as many again in overflow)


def command_worker(settings: Settings, threads: int = defaults.COMMAND_THREADS,
                   metrics_server: Callable[[], int] | None = None) -> tuple[dramatiq.Broker, Runtime]:
    """A command worker process: its runtime and its broker (set as the process's broker).
    ``metrics_server``: the Dramatiq fork that serves the group's metrics, when they are on.
    Its threads mostly wait for the batch that holds their command (group commit): a batch
    takes one connection, so the pool is capped well below the thread count (``COMMAND_POOL``)."""
    tracing.configure("cqrskit-commands")
    rt = runtime(settings, pool_size=min(threads, COMMAND_POOL) + 2)
    metrics = worker_metrics(settings, rt, COMMANDS, metrics_server)
    broker = make_broker(settings, extra_middleware=[*metrics, Tracing(), LogContext(), DeadOutcomes(rt)])
    declare_command_actor(broker, rt)
    return broker, rt


def indexer_worker(settings: Settings, threads: int = defaults.INDEXER_THREADS,
                   metrics_server: Callable[[], int] | None = None) -> tuple[dramatiq.Broker, Runtime]:
    """An indexer process: its runtime and its broker (set as the process's broker)."""
    tracing.configure("cqrskit-indexer")
    rt = runtime(settings, pool_size=threads + 2)
    metrics = worker_metrics(settings, rt, INDEXER, metrics_server)
    broker = make_broker(settings, extra_middleware=[*metrics, Tracing(), LogContext()])
    declare_indexer_actors(broker, rt)
    return broker, rt


def until_signalled(run: Callable[[threading.Event], None]) -> None:
    """``run(stop)`` with ``stop`` set by SIGTERM or SIGINT (a long-running process's main loop);
    the previous handlers are put back when it returns or raises."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_relay(settings: Settings) -> None:
    """Run the relay of ``settings`` until SIGTERM or SIGINT (the Procfile's ``relay``). Needs
    RabbitMQ: the embedded broker lives inside another process. Never migrates the write store."""
    from cqrskit.infra.db import make_engine
    from cqrskit.workers.metrics import serve_relay_metrics
    from cqrskit.workers.relay import EventRelay

    if settings.embedded_broker:
        raise ValueError("the relay process needs a real broker: set CQRSKIT_BROKER_URL=amqp://...")
    tracing.configure("cqrskit-relay")
    engine = make_engine(settings.database_url, pool_size=2)
    relay = EventRelay.for_rabbitmq(settings, engine)
    metrics = serve_relay_metrics(settings, relay)  # None unless CQRSKIT_METRICS_PORT is set
    try:
        until_signalled(relay.run)
    finally:
        if metrics is not None:
            metrics.close()
        relay.close()
        engine.dispose()
        tracing.shutdown()  # the last spans are exported


def run_process_managers(settings: Settings, partition: int = 0, partitions: int = 1) -> None:
    """Run the app's process managers (``cqrskit process-managers``) until SIGTERM or SIGINT: this
    partition's events, every due timer, the outbox. Needs RabbitMQ (the commands go to the
    commands exchange); never migrates the write store. Raises ValueError for a bad partition."""
    from cqrskit.read_models.partitions import Partition
    from cqrskit.workers.process_managers import CommandOutlet, ProcessManagers, serve_metrics

    if settings.embedded_broker:
        raise ValueError("the process-managers process needs a real broker: set CQRSKIT_BROKER_URL=amqp://...")
    chosen = Partition(partition, partitions)
    app = app_of(settings)
    if not app.process_managers:
        raise ValueError(f"the app {app.name!r} declares no process managers (App(..., process_managers=(...)))")
    tracing.configure("cqrskit-process-managers")
    rt = build_runtime(settings, app, pool_size=4)
    outlet = CommandOutlet(settings.broker_url, settings.commands_exchange)
    process = ProcessManagers(rt.engine, rt.reactions, outlet, chosen)
    metrics = serve_metrics(settings.metrics_port, settings.metrics_host, process)  # None unless the port is set
    try:
        until_signalled(process.run)
    finally:
        if metrics is not None:
            metrics.server.shutdown()  # type: ignore[attr-defined]
        outlet.close()
        rt.close()
        tracing.shutdown()  # the last spans are exported


def gateway_app(settings: Settings) -> Any:
    """The HTTP command gateway of ``settings``, authenticated as ``app.security`` decides (raises
    ``Insecure`` when it would serve real services without authentication)."""
    from cqrskit.app.security import docs_served, http_authentication
    from cqrskit.producers.gateway import create_app

    tracing.configure("cqrskit-gateway")
    return create_app(settings, registry=app_of(settings).registry,
                      authenticate=http_authentication(settings, "gateway"), docs=docs_served(settings))


def query_app(settings: Settings) -> Any:
    """The HTTP query API of ``settings``, authenticated as ``app.security`` decides."""
    from cqrskit.app.security import docs_served, http_authentication
    from cqrskit.read_models.api import create_app

    app = app_of(settings)
    tracing.configure("cqrskit-query")
    return create_app(settings, app.read_models, app.queries, authenticate=http_authentication(settings, "query"),
                      docs=docs_served(settings), parked=_parked_notes(settings))


def _parked_notes(settings: Settings) -> Any:
    """A timed-out consistency wait names the parked documents it waited for, read through the
    query role (``CQRSKIT_AUTH_DATABASE_URL``); without it, nothing is read."""
    if settings.auth_database_url is None:
        return None
    from cqrskit.producers.gateway import read_only_engine
    from cqrskit.read_models.consistency import parked_notes

    return parked_notes(read_only_engine(settings.auth_database_url))
