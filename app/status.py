"""The operator's view (G12): one snapshot of the whole pipeline, as a pydantic model that
``cqrskit status`` prints as tables or as JSON.

What each number is, and where it comes from:

- ``queues``: per Dramatiq queue (commands, indexer and each further indexer partition's
  ``indexer.pN``, each with its ``.DQ`` delay queue and ``.XQ`` dead-letter queue), ``ready``
  messages and ``consumers``, from an AMQP passive ``queue_declare``. Messages delivered to a worker and not yet acknowledged are NOT counted
  (AMQP does not tell them; ``rabbitmqctl list_queues messages`` does). A queue that does not
  exist (``cqrskit setup`` not run) has ``exists: false``.
- ``dead_letters``: the ``.XQ`` depths: commands Dramatiq gave up on (``cqrskit dlq``), indexer
  batches that outlived their retries (summed over the partitions).
- ``outcomes``: terminal outcomes recorded in the write store, by status (G3).
- ``relay``: committed events not yet published and the age of the oldest
  (``cqrskit.workers.relay.relay_lag``: exact), the checkpoint, and the lease: which relay is active,
  until when (the database's clock; a lease that expired means no relay is running).
- ``read_models``: per read model, documents in the live index, parked documents (G7), and the
  lag. The indexers keep no checkpoint per read model, so the lag is measured on the documents
  themselves: every document records the version of each stream it was computed from
  (``streams``), so for the newest ``lag_window`` events of the model's own stream type (bookings
  for ``bookings``...), ``lag_events`` counts those whose stream version the document does not
  reflect yet and ``lag_seconds`` is the age of the oldest of them. This covers everything
  ahead of the index: events the relay has not published, batches waiting in the indexer
  queue or being retried, documents being written, and parked documents (which stay unreflected
  until retried). It does not count fan-out from other streams (a guest's rename reaching their
  bookings: ``cqrskit verify`` checks that). When every event of the window is unreflected the
  true lag may be larger: ``lag_exact`` is then false.
- ``workers``: consumers on the commands and indexer queues (a Dramatiq worker process holds
  one consumer per queue; for the indexer, those of the least-served partition, so that 0 says
  some partition is indexed by nobody) and the relay holding the lease.

Every component is reached with short timeouts; one that cannot be reached is reported in
``components`` with its error and its numbers are null. Nothing here writes anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch
from pydantic import BaseModel, Field
from sqlalchemy import Connection, Engine

from cqrskit.app.errors import mask
from cqrskit.app.status_broker import (  # noqa: F401  (queue_roles: part of this module's interface)
    TIMEOUT, BrokerNode, Component, QueueState, consumers, error_text as _error, indexer_roles, inspect_broker,
    queue_roles)
from cqrskit.infra.schema import command_outcomes, events, leases, parked_documents, read_model_indices, streams
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings
from cqrskit.infra.utc import as_utc
from cqrskit.infra.write_store.reactions import ProcessManagersState, process_manager_state
from cqrskit.read_models.indices import alias
from cqrskit.read_models.model import ReadModel

STATUSES = ("succeeded", "rejected", "invalid", "dead")
LAG_WINDOW = 2000


class RelayState(BaseModel):
    unpublished_events: int | None = None
    oldest_unpublished_seconds: float | None = None
    checkpoint_position: int | None = None
    holder: str | None = Field(default=None, description="The relay holding an unexpired lease, if any.")
    lease_expires_at: datetime | None = None
    last_holder: str | None = Field(default=None, description="Whoever held the lease last (even if expired).")


class ReadModelState(BaseModel):
    alias: str
    indices: list[str] = Field(default_factory=list, description="Physical indices behind the live alias.")
    building: list[str] = Field(default_factory=list, description="Indices a rebuild is filling.")
    documents: int | None = None
    parked: int | None = None
    lag_events: int | None = None
    lag_seconds: float | None = None
    lag_exact: bool | None = None
    lag_window: int = LAG_WINDOW
    mapping_drift: str | None = Field(default=None, description="The live index's mapping lacks what the read model "
                                      "declares: the line naming the fix (cqrskit rebuild NAME).")


class Workers(BaseModel):
    commands: int | None = Field(default=None, description="Consumers on the commands queue (worker processes).")
    indexer: int | None = Field(default=None, description="Consumers on the indexer queue (indexer processes); with "
                                "partitions, on the least-served partition's queue (0: a partition nobody indexes).")
    relay: str | None = Field(default=None, description="The active relay (lease holder).")


class Rates(BaseModel):
    """Per second, between two snapshots ``window_seconds`` apart (null when a side was unreachable)."""

    window_seconds: float
    commands: float | None = Field(default=None, description="Outcomes recorded (commands decided).")
    events: float | None = Field(default=None, description="Events appended to the write store.")
    published: float | None = Field(default=None, description="Events the relay published.")
    documents: float | None = Field(default=None, description="New documents in the read models.")


class PipelineStatus(BaseModel):
    """The pipeline at one moment (``cqrskit status``); not a command's outcome status."""

    taken_at: datetime
    components: dict[str, Component]
    broker_nodes: list[BrokerNode] = Field(default_factory=list, description="Each node of the broker URL: a "
                                           "cluster serves (the broker is reachable) while one answers.")
    queues: dict[str, QueueState] = Field(default_factory=dict)
    dead_letters: dict[str, int | None] = Field(default_factory=dict)
    outcomes: dict[str, int] | None = None
    relay: RelayState = Field(default_factory=RelayState)
    read_models: dict[str, ReadModelState] = Field(default_factory=dict)
    workers: Workers = Field(default_factory=Workers)
    rates: Rates | None = None
    process_managers: ProcessManagersState | None = None

    @property
    def healthy(self) -> bool:
        """Every component answers and no read model's mapping drifted (a broker cluster with a node
        down still serves: degraded, healthy)."""
        return all(c.reachable for c in self.components.values()) and not any(
            m.mapping_drift for m in self.read_models.values())

    @property
    def degraded(self) -> list[str]:
        """The broker nodes that do not answer while the cluster serves."""
        return [n.endpoint for n in self.broker_nodes if not n.reachable]

    def totals(self) -> dict[str, int | None]:
        """The counters that ``with_rates`` differentiates."""
        r = self.relay
        appended = None if r.checkpoint_position is None or r.unpublished_events is None \
            else r.checkpoint_position + r.unpublished_events
        documents = [m.documents for m in self.read_models.values()]
        return {"commands": None if self.outcomes is None else sum(self.outcomes.values()), "events": appended,
                "published": r.checkpoint_position,
                "documents": None if not documents or None in documents else sum(documents)}  # type: ignore[arg-type]

    def with_rates(self, before: PipelineStatus) -> PipelineStatus:
        """This snapshot with the rates since ``before``."""
        window = (self.taken_at - before.taken_at).total_seconds()
        if window <= 0:
            return self
        now, then = self.totals(), before.totals()
        per_second = {k: None if now[k] is None or then[k] is None else round(max(0, now[k] - then[k]) / window, 1)
                      for k in now}  # type: ignore[operator]
        self.rates = Rates(window_seconds=round(window, 2), **per_second)
        return self


def gather_status(settings: Settings, models: Sequence[ReadModel] | None = None, lag_window: int = LAG_WINDOW) -> PipelineStatus:
    """A snapshot of the pipeline of ``settings`` (see the module docstring). Never raises for
    a component that cannot be reached: it is reported unreachable and its numbers stay null."""
    if models is None:
        from cqrskit.app import bootstrap

        models = bootstrap.app_of(settings).read_models
    status = PipelineStatus(taken_at=datetime.now(UTC), components={})
    status.read_models = {m.name: ReadModelState(alias=alias(settings.index_prefix, m.name), lag_window=lag_window)
                          for m in models}
    (status.components["broker"], status.broker_nodes, status.queues,
     status.dead_letters) = inspect_broker(settings)
    with _write_store(settings.database_url) as engine:
        store_ok = _gather_write_store(engine, status, settings)
        with _search(settings) as es:
            if es is None:
                status.components["search"] = Component(reachable=False, error="embedded search server: it "
                                                        "lives inside `cqrskit demo`; set CQRSKIT_ELASTICSEARCH_URL")
            else:
                _gather_documents(es, status, models, settings.index_prefix)
            if store_ok and es is not None and status.components["search"].reachable:
                _gather_lag(engine, es, models, lag_window, status)
    endpoints = {"broker": settings.broker_url, "write_store": settings.database_url,
                 "search": settings.elasticsearch_url}
    for name, component in status.components.items():
        component.endpoint = mask(endpoints.get(name, ""))
    status.workers = Workers(commands=consumers(status.queues, ["commands"]),
                             indexer=consumers(status.queues, list(indexer_roles(settings))), relay=status.relay.holder)
    return status


# -- the write store --------------------------------------------------------------------------
@contextmanager
def _write_store(url: str) -> Iterator[Engine]:
    """An engine that gives up connecting after a few seconds, keeps no pool and creates no file."""
    from cqrskit.app.preflight import probe_engine

    with probe_engine(url) as engine:
        yield engine


def _gather_write_store(engine: Engine, status: PipelineStatus, settings: Settings) -> bool:
    from cqrskit.workers.relay import relay_lag

    if settings.sqlite_path is not None and not settings.sqlite_path.exists():
        status.components["write_store"] = Component(
            reachable=False, error=f"no SQLite file at {settings.sqlite_path}: set CQRSKIT_DATABASE_URL, or run cqrskit setup")
        return False
    try:
        lag = relay_lag(engine)
        with engine.connect() as conn:
            status.outcomes = _outcomes(conn)
            status.relay = _relay_state(conn, lag.events, lag.oldest_age)
            status.process_managers = process_manager_state(conn)
            parked = _parked(conn)
            roles = conn.execute(sa.select(read_model_indices.c.read_model, read_model_indices.c.index_name,
                                           read_model_indices.c.role)).all()
    except sa.exc.SQLAlchemyError as exc:
        status.components["write_store"] = Component(reachable=False, error=_error(exc))
        return False
    status.components["write_store"] = Component(reachable=True)
    for name, state in status.read_models.items():
        state.parked = parked.get(name, 0)
        state.building = sorted(index for model, index, role in roles if model == name and role == "building")
    return True


def _outcomes(conn: Connection) -> dict[str, int]:
    counted = dict(conn.execute(sa.select(command_outcomes.c.status, sa.func.count())
                                .group_by(command_outcomes.c.status)).all())
    return {s: counted.pop(s, 0) for s in STATUSES} | counted


def _parked(conn: Connection) -> dict[str, int]:
    return dict(conn.execute(sa.select(parked_documents.c.read_model, sa.func.count())
                             .group_by(parked_documents.c.read_model)).all())


def _relay_state(conn: Connection, unpublished: int, oldest_age: float) -> RelayState:
    from cqrskit.workers.relay import NAME, read_checkpoint

    state = RelayState(unpublished_events=unpublished, oldest_unpublished_seconds=round(oldest_age, 3),
                       checkpoint_position=read_checkpoint(conn)[1])
    lease = conn.execute(sa.select(leases.c.holder, leases.c.expires_at).where(leases.c.name == NAME)).first()
    if lease is not None:
        now = conn.execute(sa.select(sa.func.now())).scalar_one() if conn.dialect.name == "postgresql" \
            else datetime.now(UTC)  # the relay's lease runs on the database's clock on PostgreSQL
        state.last_holder, state.lease_expires_at = lease.holder, as_utc(lease.expires_at)
        state.holder = lease.holder if state.lease_expires_at > as_utc(now) else None
    return state


# -- the search server ------------------------------------------------------------------------
@contextmanager
def _search(settings: Settings) -> Iterator[Elasticsearch | None]:
    if settings.elasticsearch_url == EMBEDDED_SEARCH:
        yield None
        return
    from cqrskit.read_models.search import search_client

    es = search_client(settings, timeout=TIMEOUT)
    try:
        yield es
    finally:
        es.close()


def _gather_documents(es: Elasticsearch, status: PipelineStatus, models: Sequence[ReadModel], prefix: str) -> None:
    from cqrskit.read_models.indices import drift_line, mapping_drift

    try:
        for model in models:
            state = status.read_models[model.name]
            if es.indices.exists_alias(name=state.alias):
                state.indices = sorted(es.indices.get_alias(name=state.alias))
                state.documents = es.count(index=state.alias)["count"]
                drift = mapping_drift(es, prefix, model)
                state.mapping_drift = drift_line(prefix, model.name, drift) if drift else None
    except (ApiError, TransportError) as exc:
        status.components["search"] = Component(reachable=False, error=_error(exc))
        return
    status.components["search"] = Component(reachable=True)


def _gather_lag(engine: Engine, es: Elasticsearch, models: Sequence[ReadModel], window: int, status: PipelineStatus) -> None:
    now = datetime.now(UTC)
    try:
        for model in models:
            state = status.read_models[model.name]
            if state.indices:
                with engine.connect() as conn:
                    recent = _recent_events(conn, model.stream_type, window)
                _measure_lag(es, state, recent, now, window)
    except sa.exc.SQLAlchemyError as exc:
        status.components["write_store"] = Component(reachable=False, error=_error(exc))
    except (ApiError, TransportError) as exc:
        status.components["search"] = Component(reachable=False, error=_error(exc))


def _recent_events(conn: Connection, stream_type: str, window: int) -> list[Any]:
    """The newest ``window`` events of a stream type: (aggregate id, stream id, version, recorded_at)."""
    return conn.execute(
        sa.select(streams.c.aggregate_id, events.c.stream_id, events.c.version, events.c.recorded_at)
        .join(streams, streams.c.stream_id == events.c.stream_id)
        .where(events.c.stream_type == stream_type)
        .order_by(events.c.position.desc()).limit(window)).all()


def _measure_lag(es: Elasticsearch, state: ReadModelState, recent: list[Any], now: datetime, window: int) -> None:
    reflected = _reflected_versions(es, state.alias, {row.aggregate_id: row.stream_id for row in recent})
    behind = [row for row in recent if row.version > reflected.get(row.stream_id, 0)]
    state.lag_events = len(behind)
    oldest = min((as_utc(row.recorded_at) for row in behind), default=None)
    state.lag_seconds = 0.0 if oldest is None else round(max(0.0, (now - oldest).total_seconds()), 3)
    state.lag_exact = not (len(recent) == window and len(behind) == window)


def _reflected_versions(es: Elasticsearch, index: str, stream_of: dict[str, str]) -> dict[str, int]:
    """stream id -> the version of that stream the document of its aggregate was computed from."""
    if not stream_of:
        return {}
    found = es.mget(index=index, ids=list(stream_of), source_includes=["streams"])["docs"]
    versions = {}
    for doc in found:
        if doc.get("found"):
            sid = stream_of[doc["_id"]]
            versions[sid] = max((s["version"] for s in doc["_source"].get("streams", []) if s.get("id") == sid),
                                default=0)
    return versions


