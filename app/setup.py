"""``cqrskit setup``: everything a deployment needs to exist, made idempotently: the write
store's schema (alembic), the broker's exchanges and queues (on the first node of a cluster
that answers; a classic dead-letter queue of an older cqrskit moved to a quorum one,
``cqrskit.infra.deadletter_queues``), the read models' indices."""

from __future__ import annotations

from collections.abc import Callable

from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import current_revision, upgrade
from cqrskit.infra.settings import EMBEDDED_SEARCH, Settings


def setup_all(settings: Settings, say: Callable[[str], None] = print) -> None:
    from cqrskit.app.preflight import preflight
    from cqrskit.infra.broker import make_broker
    from cqrskit.infra.topology import declare_command_topology, declare_read_side_topology

    preflight(settings, "setup")  # every service answers before anything is made
    engine = make_engine(settings.database_url)
    try:
        upgrade(engine)
        say(f"write store at revision {current_revision(engine)}")
        _ensure_lookups(settings, engine, say)
        _dead_letter_queues(settings, say)
        broker = make_broker(settings)
        declare_command_topology(broker, settings)
        declare_read_side_topology(broker, settings)
        broker.close()
        if settings.embedded_broker:
            say("embedded broker: nothing to declare")
        else:
            say(f"broker topology ready: {settings.commands_exchange} -> {settings.commands_queue}; "
                f"{settings.events_exchange}; {settings.indexer_queue}")
        if settings.elasticsearch_url != EMBEDDED_SEARCH:
            _ensure_indices(settings, engine, say)
    finally:
        engine.dispose()


def _ensure_indices(settings: Settings, engine, say: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
    from cqrskit.read_models.indices import alias, drift_line, ensure, mapping_drift
    from cqrskit.read_models.search import replicas_of, search_client
    from cqrskit.app import bootstrap

    es = search_client(settings)
    try:
        for model in bootstrap.app_of(settings).read_models:
            created = ensure(es, engine, settings.index_prefix, model, replicas=replicas_of(settings))
            drift = [] if created else mapping_drift(es, settings.index_prefix, model)
            if drift:
                say(drift_line(settings.index_prefix, model.name, drift))
            else:
                say(f"read model {alias(settings.index_prefix, model.name)}: " + (f"created {created}" if created else "exists"))
    finally:
        es.close()


def _ensure_lookups(settings: Settings, engine, say: Callable[[str], None]) -> None:  # type: ignore[no-untyped-def]
    from cqrskit.app import bootstrap
    from cqrskit.read_models.lookups import ensure_lookup_indexes

    for name in ensure_lookup_indexes(engine, bootstrap.app_of(settings).read_models):
        say(f"write store: made index {name} (a read model's fan-out lookup)")


def _dead_letter_queues(settings: Settings, say: Callable[[str], None]) -> None:
    """Every ``.XQ`` a quorum queue (with quorum queues), moving the messages of a classic one."""
    import pika

    from cqrskit.app.errors import BROKER, Problem
    from cqrskit.infra.broker import amqp_nodes
    from cqrskit.infra.deadletter_queues import QueueInUse, move_to_quorum
    from cqrskit.infra.settings import QueueType
    from cqrskit.infra.topology import indexer_partitions

    if settings.embedded_broker or settings.queue_type is not QueueType.quorum:
        return
    connection = pika.BlockingConnection(amqp_nodes(settings))
    try:
        for queue in (settings.commands_queue, *(p.queue for p in indexer_partitions(settings))):
            moved = move_to_quorum(connection, f"{queue}.XQ", [queue, f"{queue}.DQ"])
            if moved is not None:
                say(f"dead letters: {queue}.XQ is now a quorum queue ({moved} messages moved)")
    except QueueInUse as exc:
        raise Problem(BROKER, settings.broker_url, str(exc),
                      "stop the command workers and indexers, then run cqrskit setup again") from exc
    finally:
        if connection.is_open:
            connection.close()
