"""Putting a worker process together: runtime -> broker, middleware, actor."""

from __future__ import annotations

from collections.abc import Callable

import dramatiq

from cqrskit.infra.broker import make_broker
from cqrskit.workers.actors import declare_command_actor, declare_indexer_actors
from cqrskit.workers.metrics import COMMANDS, INDEXER, worker_metrics
from cqrskit.workers.middleware import DeadOutcomes, LogContext, Tracing
from cqrskit.workers.runtime import Runtime


def build_command_worker(runtime: Runtime, metrics_server: Callable[[], int] | None = None) -> dramatiq.Broker:
    """The broker of a command worker process, with its middleware and the command actor.
    ``metrics_server``: the fork that serves the group's metrics (see ``worker_metrics``)."""
    metrics = worker_metrics(runtime.settings, runtime, COMMANDS, metrics_server)
    broker = make_broker(runtime.settings, extra_middleware=[*metrics, Tracing(), LogContext(), DeadOutcomes(runtime)])
    declare_command_actor(broker, runtime)
    return broker


def build_indexer_worker(runtime: Runtime, metrics_server: Callable[[], int] | None = None) -> dramatiq.Broker:
    """The broker of an indexer process, with its middleware and the indexer actor."""
    metrics = worker_metrics(runtime.settings, runtime, INDEXER, metrics_server)
    broker = make_broker(runtime.settings, extra_middleware=[*metrics, Tracing(), LogContext()])
    declare_indexer_actors(broker, runtime)
    return broker
