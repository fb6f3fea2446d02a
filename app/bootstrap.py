"""The composition root: which domain and read models cqrskit runs, and how each process is put
together from one ``Settings``. Every CLI verb and every Procfile process starts here; nothing
below this package chooses a domain, reads the environment or wires a broker."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dramatiq

from cqrskit.domain.registry import Registry
from cqrskit.infra.settings import Settings
from cqrskit.read_models.model import ReadModel
from cqrskit.workers.runtime import Runtime
from cqrskit.workers.wiring import build_command_worker, build_indexer_worker


def registry() -> Registry:
    """The domain every process runs: the reference shop."""
    from cqrskit.domain.shop import registry as shop

    return shop


def read_models() -> Sequence[ReadModel]:
    """The read models every process keeps and serves: the shop's."""
    from cqrskit.read_models.shop import SHOP_READ_MODELS

    return SHOP_READ_MODELS


def read_model(name: str) -> ReadModel | None:
    return next((m for m in read_models() if m.name == name), None)


def runtime(settings: Settings, *, pool_size: int = 8, search_url: str | None = None) -> Runtime:
    """The resources of one process (made lazily, released by ``Runtime.close``)."""
    return Runtime(settings, registry(), read_models(), pool_size=pool_size, search_url=search_url)


def command_worker(settings: Settings, threads: int = 8,
                   metrics_server: Callable[[], int] | None = None) -> tuple[dramatiq.Broker, Runtime]:
    """A command worker process: its runtime and its broker (set as the process's broker).
    ``metrics_server``: the Dramatiq fork that serves the group's metrics, when they are on."""
    rt = runtime(settings, pool_size=threads + 2)
    return build_command_worker(rt, metrics_server), rt


def indexer_worker(settings: Settings, threads: int = 4,
                   metrics_server: Callable[[], int] | None = None) -> tuple[dramatiq.Broker, Runtime]:
    """An indexer process: its runtime and its broker (set as the process's broker)."""
    rt = runtime(settings, pool_size=threads + 2)
    return build_indexer_worker(rt, metrics_server), rt


def run_relay(settings: Settings) -> None:
    """Run the relay of ``settings`` until SIGTERM or SIGINT (the Procfile's ``relay``). Needs
    RabbitMQ: the embedded broker lives inside another process. Never migrates the write store."""
    import signal
    import threading

    from cqrskit.infra.db import make_engine
    from cqrskit.workers.metrics import serve_relay_metrics
    from cqrskit.workers.relay import EventRelay

    if settings.embedded_broker:
        raise ValueError("the relay process needs a real broker: set CQRSKIT_BROKER_URL=amqp://...")
    engine = make_engine(settings.database_url, pool_size=2)
    relay = EventRelay.for_rabbitmq(settings, engine)
    metrics = serve_relay_metrics(settings, relay)  # None unless CQRSKIT_METRICS_PORT is set
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        relay.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics is not None:
            metrics.close()
        relay.close()
        engine.dispose()
