"""Checks a process makes before it starts: every service it needs answers, and ``cqrskit setup``
ran (the write store's schema at this cqrskit's revision, the exchanges and queues declared, the
read models' aliases created). A failed check raises ``Problem``: one line naming the setting,
the value and the fix ("run cqrskit setup"), instead of a failure later, deep in a worker.

Each check makes one short-lived connection with a few seconds' timeout and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import time

import pika
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from cqrskit.app.errors import BROKER, DATABASE, SEARCH, Problem, explain
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings

TIMEOUT = 5.0
RECHECK = 2.0
log = structlog.get_logger(__name__)
SETUP = "run cqrskit setup"


@dataclass(frozen=True)
class Needs:
    """What a process needs: the write store (and its schema), exchanges and queues, indices."""

    schema: bool = False
    exchanges: Sequence[str] = ()
    queues: Sequence[str] = ()
    indices: bool = False
    reach: Sequence[str] = field(default_factory=tuple)  # services that must answer, set up or not


def needs_of(process: str, settings: Settings) -> Needs:
    """What each process of the Procfile (and ``send``) needs from ``setup``."""
    s = settings
    return {
        "worker": Needs(schema=True, exchanges=[s.commands_exchange], queues=[s.commands_queue]),
        "relay": Needs(schema=True, exchanges=[s.events_exchange], queues=[s.indexer_queue]),
        "indexer": Needs(schema=True, queues=[s.indexer_queue], indices=True),
        "gateway": Needs(schema=True, exchanges=[s.commands_exchange]),
        "process-managers": Needs(schema=True, exchanges=[s.commands_exchange]),
        "query": Needs(indices=True),
        "send": Needs(exchanges=[s.commands_exchange]),
        "send-wait": Needs(schema=True, exchanges=[s.commands_exchange]),
        "read-side": Needs(schema=True, indices=True),
        # rebuild makes the index it writes, and is the remedy when the search server lost them
        "rebuild": Needs(schema=True, reach=("search",)),
        "outcome": Needs(schema=True),
        "setup": Needs(reach=("database", "broker", "search")),
    }[process]


def preflight(settings: Settings, process: str) -> None:
    """Raise ``Problem`` unless everything ``process`` needs answers and was set up, checking
    again every 2 s for ``settings.preflight_wait`` seconds (one log line per check)."""
    deadline = time.monotonic() + settings.preflight_wait
    while True:
        try:
            return check(settings, needs_of(process, settings))
        except Problem as problem:
            if time.monotonic() + RECHECK > deadline:
                raise
            log.info("preflight.waiting", process=process, problem=problem.line())
            time.sleep(RECHECK)


def check(settings: Settings, needs: Needs) -> None:
    try:
        if needs.schema or "database" in needs.reach:
            revision = write_store_revision(settings.database_url)
            if needs.schema:
                _schema_current(settings, revision)
        if (needs.exchanges or needs.queues or "broker" in needs.reach) and not settings.embedded_broker:
            _topology(settings, needs.exchanges, needs.queues)
        if (needs.indices or "search" in needs.reach) and settings.elasticsearch_url != EMBEDDED_SEARCH:
            _indices(settings, needs.indices)
    except Problem:
        raise
    except Exception as exc:
        problem = explain(exc, settings)
        if problem is None:
            raise
        raise problem from exc


# -- the write store ------------------------------------------------------------------------------
@contextmanager
def probe_engine(url: str) -> Iterator[Engine]:
    """An engine that gives up connecting after a few seconds and keeps no pool."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "postgresql":
        engine = sa.create_engine(sa_url.set(drivername="postgresql+psycopg"), poolclass=NullPool,
                                  connect_args={"connect_timeout": int(TIMEOUT)})
    else:
        engine = sa.create_engine(sa_url, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def write_store_revision(url: str) -> str | None:
    """The alembic revision of the write store at ``url`` (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
        from pathlib import Path

        if not Path(sa_url.database).exists():  # connecting would create an empty file
            return None
    with probe_engine(url) as engine, engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _schema_current(settings: Settings, revision: str | None) -> None:
    from cqrskit.infra.migrate import head_revision

    head = head_revision()
    if revision is None:
        raise Problem(DATABASE, settings.database_url, "the write store has no schema yet", SETUP)
    if revision != head:
        raise Problem(DATABASE, settings.database_url,
                      f"the write store is at revision {revision}, this cqrskit needs {head}", SETUP)


# -- the broker -----------------------------------------------------------------------------------
def _topology(settings: Settings, exchanges: Iterable[str], queues: Iterable[str]) -> None:
    from cqrskit.infra.broker import amqp_nodes

    # The first node of a cluster that answers: a cluster with a node down still serves.
    connection = pika.BlockingConnection(amqp_nodes(settings, TIMEOUT))
    try:
        for kind, names in (("exchange", exchanges), ("queue", queues)):
            for name in names:
                if not _exists(connection, kind, name):
                    raise Problem(BROKER, settings.broker_url, f"the {kind} {name!r} does not exist", SETUP)
    finally:
        if connection.is_open:
            connection.close()


def _exists(connection: pika.BlockingConnection, kind: str, name: str) -> bool:
    channel = connection.channel()
    try:
        if kind == "exchange":
            channel.exchange_declare(name, passive=True)
        else:
            channel.queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        return False
    finally:
        if channel.is_open:
            channel.close()


# -- the search server ----------------------------------------------------------------------------
def _indices(settings: Settings, aliases: bool) -> None:
    """The search server answers (``GET /``: the operator's processes, whose role holds the
    cluster's ``monitor``), or every read model's alias exists with the mapping the app declares
    (``HEAD /_alias/<name>``, ``GET /<alias>/_mapping``: what the indexer's and the query side's
    roles may ask, ``view_index_metadata`` on their aliases). A drifted mapping stops the process
    before it parks every document it touches: ``cqrskit rebuild NAME`` first."""
    from cqrskit.app import bootstrap
    from cqrskit.read_models.indices import alias, drift_line, mapping_drift
    from cqrskit.read_models.search import search_client

    es = search_client(settings, timeout=TIMEOUT)
    try:
        if not aliases:
            es.info()
        for model in bootstrap.app_of(settings).read_models if aliases else ():
            name = alias(settings.index_prefix, model.name)
            if not es.indices.exists_alias(name=name):
                raise Problem(SEARCH, settings.elasticsearch_url, f"the read model {name!r} has no index", SETUP)
            if drift := mapping_drift(es, settings.index_prefix, model):
                problem, _, fix = drift_line(settings.index_prefix, model.name, drift).rpartition("; ")
                raise Problem(SEARCH, settings.elasticsearch_url, problem, fix)
    finally:
        es.close()
