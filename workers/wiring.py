"""Putting a command worker together: settings -> runtime, broker, middleware, actor."""

from __future__ import annotations

import dramatiq

from infra.settings import Settings
from workers.actors import declare_command_actor, declare_indexer_actor
from workers.broker import make_broker
from workers.metrics import COMMANDS, INDEXER, worker_metrics
from workers.middleware import DeadOutcomes, LogContext
from workers.runtime import Runtime


def build_command_worker(settings: Settings, threads: int = 8) -> tuple[dramatiq.Broker, Runtime]:
    runtime = Runtime(settings, pool_size=threads + 2)
    metrics = worker_metrics(settings, runtime, COMMANDS)
    broker = make_broker(settings, extra_middleware=[*metrics, LogContext(), DeadOutcomes(runtime)])
    declare_command_actor(broker, runtime)
    return broker, runtime


def build_indexer_worker(settings: Settings, threads: int = 4) -> tuple[dramatiq.Broker, Runtime]:
    runtime = Runtime(settings, pool_size=threads + 2)
    broker = make_broker(settings, extra_middleware=[*worker_metrics(settings, runtime, INDEXER), LogContext()])
    declare_indexer_actor(broker, runtime)
    return broker, runtime
