"""Prometheus metrics of the worker processes (G12), served on ``CQRSKIT_METRICS_PORT``.

Command workers and indexers (Dramatiq process groups) get ``WorkerMetrics``: Dramatiq's own
Prometheus middleware (``dramatiq_messages_total``, ``..._errors_total``, ``..._retries_total``,
``..._rejects_total``, ``dramatiq_messages_inprogress``, ``dramatiq_message_duration_milliseconds``)
plus ours:

- ``cqrskit_commands_total{status}``: commands this group decided, by outcome status
  (``succeeded``, ``rejected``, ``invalid``), ``duplicate`` for deliveries that found an outcome
  already (G2), and ``dead`` for command messages Dramatiq gave up on (to the dead-letter queue);
- ``cqrskit_indexer_events_total`` and ``cqrskit_indexer_documents_total{result}`` (``written``,
  ``stale``: the index held that version or a newer one, ``parked``: G7).

How Dramatiq 2.2's middleware behaves, and what we change. Its worker processes write their
values to files (prometheus_client's multiprocess mode) in ONE directory per host
(``$TMPDIR/dramatiq-prometheus``, never cleared despite its comment), and it forks one HTTP
server per process group on ONE port (9191): a second group on the host (``honcho -c
commands=2``, or commands and indexers side by side) fails to bind ("Address already in use")
and its metrics are gone, while the first group's server sums the files of every group and
of every earlier run. So each group here gets its own directory (``<CQRSKIT_METRICS_DIR>/
group-<pid of the Dramatiq parent>``; stale ones of dead groups are removed when a group
starts serving) and its own port (``CQRSKIT_METRICS_PORT``; the Procfile passes each process
its ``$PORT``). Counters of a worker process that died stay in the sum (Prometheus counters
never go down); its in-progress gauges are dropped.

The event relay (one process) gets ``serve_relay_metrics``: ``cqrskit_relay_events_published_total``
(confirmed by the broker), ``cqrskit_relay_events_fed_total`` (enqueued for the indexers),
``cqrskit_relay_lag_events`` and ``cqrskit_relay_lag_seconds`` (``relay_lag``, read when scraped),
``cqrskit_relay_lease_held`` (1 on the active relay, 0 on a standby) and ``cqrskit_relay_up``
(0 when the write store could not be read for the lag) and ``cqrskit_parked_documents{read_model}``.
``docs/grafana-dashboard.json`` charts them.

prometheus_client is imported only once the process knows its directory: it decides at import
whether values go to files. With ``CQRSKIT_METRICS_PORT`` unset nothing here is installed.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import prometheus as dramatiq_prometheus

from cqrskit.infra.settings import Settings
from cqrskit.infra.broker import COMMAND_ACTOR

log = structlog.get_logger("cqrskit.metrics")
COMMANDS, INDEXER = "commands", "indexer"


def worker_metrics(settings: Settings, runtime: Any, kind: str,
                   server: Callable[[], int] | None = None) -> list[dramatiq.Middleware]:
    """The middleware to put first in a worker's ``extra_middleware`` ([] when metrics are off).
    ``kind``: ``commands`` or ``indexer``. ``server``: the process entry point (a module-level
    function, which Dramatiq forks by its import path) that serves the group's metrics, usually
    ``serve_metrics`` behind the composition root's reading of the settings."""
    if settings.metrics_port is None:
        return []
    return [WorkerMetrics(settings, runtime, kind, server)]


def group_directory(settings: Settings) -> Path:
    """Where the processes of this Dramatiq group (workers and the metrics server, all children
    of one Dramatiq parent) keep their metric files."""
    return group_directory_of(settings, os.getppid())


def group_directory_of(settings: Settings, parent_pid: int) -> Path:
    """The metric files of the worker group whose Dramatiq parent is ``parent_pid``."""
    return _base_directory(settings) / f"group-{parent_pid}"


def _base_directory(settings: Settings) -> Path:
    """The metrics folder, made private to this user (0700); an existing one must be a real
    directory this user owns that nobody else may write: a shared temporary folder is where
    another local user would plant files or a link (raises PermissionError saying which)."""
    base = Path(settings.metrics_dir) if settings.metrics_dir else Path(tempfile.gettempdir()) / "cqrskit-metrics"
    try:
        base.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    found = os.lstat(base)
    if stat.S_ISLNK(found.st_mode) or not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() \
            or found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"the metrics folder {base} must be a directory owned by this user (uid "
                              f"{os.getuid()}) that no one else may write; set CQRSKIT_METRICS_DIR to one")
    return base


class WorkerMetrics(dramatiq_prometheus.Prometheus):
    """Dramatiq's Prometheus middleware with a directory and a port per process group, plus the
    cqrskit counters (module docstring). At process boot it observes ``runtime.executor`` (commands:
    every outcome it returns is counted) or wraps ``runtime.indexer`` (indexer: every index report); the actors
    are unchanged. Must come before Retries (first in ``extra_middleware``): ``dead`` is counted
    in ``after_process_message`` once Retries has decided that a message failed."""

    def __init__(self, settings: Settings, runtime: Any, kind: str, server: Callable[[], int] | None) -> None:
        super().__init__()
        if kind not in (COMMANDS, INDEXER):
            raise ValueError(f"kind must be {COMMANDS} or {INDEXER}, not {kind!r}")
        self.settings, self.runtime, self.kind, self.server = settings, runtime, kind, server

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [] if self.server is None else [self.server]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        directory = group_directory(self.settings)
        directory.mkdir(parents=True, exist_ok=True)
        if "prometheus_client" in sys.modules and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            log.error("metrics.late_setup", detail="prometheus_client was imported before process boot: "
                      "this process's metrics stay in memory and are not served")
        os.environ["dramatiq_prom_db"] = str(directory)
        dramatiq_prometheus.DB_PATH = str(directory)  # Dramatiq's middleware reads this module constant
        super().after_process_boot(broker)
        import prometheus_client as prom

        if self.kind == COMMANDS:
            self.commands = prom.Counter("cqrskit_commands", "Commands by outcome status (duplicate: an outcome "
                                         "was there already; dead: given up, dead-lettered).", ["status"], registry=None)
            commands = self.commands
            self.runtime.executor.observers.append(
                lambda outcome: commands.labels("duplicate" if outcome.duplicate else outcome.status.value).inc())
        else:
            events = prom.Counter("cqrskit_indexer_events", "Events projected by the indexer.", registry=None)
            documents = prom.Counter("cqrskit_indexer_documents", "Documents computed, by what became of them.",
                                     ["result"], registry=None)
            self.runtime.indexer = MeasuredIndexer(self.runtime.indexer, events, documents)

    def after_process_message(self, broker, message, *, result=None, exception=None):  # type: ignore[no-untyped-def]
        super().after_process_message(broker, message, result=result, exception=exception)
        if exception is not None and message.failed and message.actor_name == COMMAND_ACTOR:
            self.commands.labels("dead").inc()


class MeasuredIndexer:
    """An indexer that counts the events and documents of every batch it writes."""

    def __init__(self, indexer: Any, events: Any, documents: Any) -> None:
        self.indexer, self.events, self.documents = indexer, events, documents

    def index_events(self, events: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        return self._counted(self.indexer.index_events(events, *args, **kwargs))

    def index_batches(self, batches: list[list[dict[str, Any]]], *args: Any, **kwargs: Any) -> Any:
        """A coalesced window (of a partition): every event delivered counts, as in ``index_events``."""
        return self._counted(self.indexer.index_batches(batches, *args, **kwargs))

    def _counted(self, report: Any) -> Any:
        self.events.inc(report.events)
        for result, count in (("written", report.written), ("stale", report.stale), ("parked", len(report.parked))):
            self.documents.labels(result).inc(count)
        return report

    def __getattr__(self, name: str) -> Any:
        return getattr(self.indexer, name)


def serve_metrics(settings: Settings) -> int:
    """The body of a Dramatiq fork: serve this process group's metrics on ``settings.metrics_port``
    until the group stops. Returns 1 (the fork ends, the workers go on) when the port cannot be
    bound."""
    directory = group_directory(settings)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_dead_groups(_base_directory(settings))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    try:
        server, thread = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as exc:
        log.error("metrics.unavailable", port=settings.metrics_port, error=str(exc))
        return 1
    log.info("metrics.serving", port=settings.metrics_port, directory=str(directory))
    thread.join()
    return 0


def _remove_dead_groups(base: Path) -> None:
    for group in base.glob("group-*"):
        pid = group.name.removeprefix("group-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(group, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the event relay --------------------------------------------------------------------------
class RelayMetrics:
    """A prometheus_client collector over one running ``EventRelay`` (module docstring). Counts
    what the relay's outlets return from (confirmed), by wrapping them."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.published = self.fed = 0
        self.server: Any = None
        if relay.publish_events is not None:
            relay.publish_events = self._counting(relay.publish_events, "published")
        if relay.feed_indexer is not None:
            relay.feed_indexer = self._counting(relay.feed_indexer, "fed")

    def _counting(self, outlet: Callable[[list[Any]], None], attribute: str) -> Callable[[list[Any]], None]:
        def counted(items: list[Any]) -> None:
            outlet(items)
            setattr(self, attribute, getattr(self, attribute) + len(items))
        return counted

    def collect(self) -> Iterator[Any]:
        import sqlalchemy as sa
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from cqrskit.workers.relay import relay_lag

        yield CounterMetricFamily("cqrskit_relay_events_published", "Events confirmed by the broker on the "
                                  "events exchange.", value=self.published)
        yield CounterMetricFamily("cqrskit_relay_events_fed", "Events enqueued for the indexers.", value=self.fed)
        yield GaugeMetricFamily("cqrskit_relay_lease_held", "1 on the active relay, 0 on a standby.",
                                value=int(self.relay.lease.held))
        try:
            lag = relay_lag(self.relay.engine)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("metrics.lag_unavailable", error=repr(exc)[:300])
            yield GaugeMetricFamily("cqrskit_relay_up", "0 when the write store could not be read.", value=0)
            return
        yield GaugeMetricFamily("cqrskit_relay_up", "0 when the write store could not be read.", value=1)
        yield GaugeMetricFamily("cqrskit_relay_lag_events", "Committed events not yet relayed.", value=lag.events)
        yield GaugeMetricFamily("cqrskit_relay_lag_seconds", "Age of the oldest event not yet relayed.",
                                value=lag.oldest_age)
        try:
            yield self._parked(GaugeMetricFamily)
        except sa.exc.SQLAlchemyError as exc:  # the relay's gauges are served whatever becomes of this one
            log.warning("metrics.parked_unavailable", error=repr(exc)[:300])

    def _parked(self, family: Any) -> Any:
        """Parked documents per read model (G7), counted in the write store when scraped."""
        import sqlalchemy as sa

        from cqrskit.infra.schema import parked_documents

        parked = family("cqrskit_parked_documents", "Documents the indexer parked, per read model.",
                        labels=["read_model"])
        with self.relay.engine.connect() as conn:
            rows = conn.execute(sa.select(parked_documents.c.read_model, sa.func.count())
                                .group_by(parked_documents.c.read_model)).all()
        for read_model, count in rows:
            parked.add_metric([read_model], count)
        return parked

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def serve_relay_metrics(settings: Settings, relay: Any) -> RelayMetrics | None:
    """Serve ``relay``'s metrics on ``CQRSKIT_METRICS_PORT`` from a thread; None when metrics are
    off, or when the port cannot be bound (logged: the relay runs on without metrics)."""
    if settings.metrics_port is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    metrics = RelayMetrics(relay)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    try:
        metrics.server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host,
                                                    registry=registry)
    except OSError as exc:
        log.error("metrics.unavailable", port=settings.metrics_port, error=str(exc))
        return None
    log.info("metrics.serving", port=settings.metrics_port)
    return metrics
