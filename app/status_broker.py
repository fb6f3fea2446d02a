"""The broker's part of ``cqrskit status`` (``cqrskit.app.status``): each node of the broker URL,
reachable or not, and the queues as the first node that answers sees them.

A cluster serves while one node answers (quorum queues need a majority of their members, which
``rabbitmqctl`` shows, AMQP does not): the broker component is reachable then, and the nodes that
do not answer are listed as down (``PipelineStatus.degraded``), which does not make the snapshot
unhealthy. Every node is reached with one short connection attempt; nothing is written.
"""

from __future__ import annotations

import pika
from pydantic import BaseModel, Field

from cqrskit.app.errors import explain, mask
from cqrskit.infra.settings import Settings
from cqrskit.infra.topology import indexer_partitions

TIMEOUT = 5.0


class Component(BaseModel):
    reachable: bool
    error: str | None = None
    endpoint: str | None = Field(default=None, description="What was checked (a URL, password masked).")


class BrokerNode(BaseModel):
    """One node of ``CQRSKIT_BROKER_URL`` (a cluster's, or the single broker)."""

    endpoint: str = Field(description="The node's URL, password masked.")
    reachable: bool
    error: str | None = None


class QueueState(BaseModel):
    name: str
    exists: bool = True
    ready: int | None = Field(default=None, description="Messages ready for delivery (unacknowledged ones excluded).")
    consumers: int | None = None


Inspection = tuple[Component, list[BrokerNode], dict[str, QueueState], dict[str, int | None]]


def queue_roles(settings: Settings) -> dict[str, str]:
    """Role (``commands``, ``commands.DQ``, ``indexer.p1.XQ``...) -> the queue's name under ``settings``."""
    roles = {}
    for role, name in (("commands", settings.commands_queue), *indexer_roles(settings).items()):
        roles.update({role: name, f"{role}.DQ": f"{name}.DQ", f"{role}.XQ": f"{name}.XQ"})
    return roles


def indexer_roles(settings: Settings) -> dict[str, str]:
    """Each indexer partition's role (``indexer``, then ``indexer.p1``...) -> its queue."""
    return {"indexer" if p.index == 0 else f"indexer.p{p.index}": p.queue for p in indexer_partitions(settings)}


def inspect_broker(settings: Settings) -> Inspection:
    """The broker component, its nodes, its queues by role and the dead letters (``.XQ`` depths)."""
    if settings.embedded_broker:
        return Component(reachable=False, error="embedded in-process broker: nothing to inspect"), [], {}, {}
    nodes, connection = _reach_nodes(settings)
    if connection is None:
        down = "; ".join(f"{n.endpoint}: {n.error}" for n in nodes)
        error = f"no node answers ({down})" if len(nodes) > 1 else nodes[0].error
        return Component(reachable=False, error=error), nodes, {}, {}
    try:
        queues = {role: _queue_state(connection, name) for role, name in queue_roles(settings).items()}
        component = Component(reachable=True)
    except (pika.exceptions.AMQPError, OSError) as exc:
        queues, component = {}, Component(reachable=False, error=error_text(exc))
    finally:
        if connection.is_open:
            connection.close()
    dead = {"commands": _ready(queues, ["commands.XQ"]),
            "indexer": _ready(queues, [f"{role}.XQ" for role in indexer_roles(settings)])}
    return component, nodes, queues, dead


def _reach_nodes(settings: Settings) -> tuple[list[BrokerNode], pika.BlockingConnection | None]:
    """Try every node once; keep the first connection made (for the queues), close the others."""
    from cqrskit.infra.broker import amqp_parameters

    nodes, kept = [], None
    for url in settings.broker_urls:
        parameters = amqp_parameters(url, TIMEOUT)
        try:
            connection = pika.BlockingConnection(parameters)
        except (pika.exceptions.AMQPError, OSError) as exc:
            where = f"{parameters.host}:{parameters.port}{parameters.virtual_host}"
            nodes.append(BrokerNode(endpoint=mask(url), reachable=False,
                                    error=f"cannot connect to {where}: {error_text(exc)}"))
            continue
        nodes.append(BrokerNode(endpoint=mask(url), reachable=True))
        if kept is None:
            kept = connection
        else:
            connection.close()
    return nodes, kept


def _queue_state(connection: pika.BlockingConnection, name: str) -> QueueState:
    channel = connection.channel()
    try:
        declared = channel.queue_declare(name, passive=True).method
        return QueueState(name=name, ready=declared.message_count, consumers=declared.consumer_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        return QueueState(name=name, exists=False)
    finally:
        if channel.is_open:
            channel.close()


def _ready(queues: dict[str, QueueState], roles: list[str]) -> int | None:
    """Messages ready in the queues of ``roles``, summed (None when none was inspected)."""
    found = [queues[role] for role in roles if role in queues]
    return None if not found else sum(q.ready or 0 for q in found)


def consumers(queues: dict[str, QueueState], roles: list[str]) -> int | None:
    """The consumers of the least-served queue of ``roles`` (None when none was inspected)."""
    found = [queues[role] for role in roles if role in queues]
    return None if not found else min(q.consumers or 0 for q in found)


def error_text(exc: BaseException) -> str:
    problem = explain(exc)
    if problem is not None:
        return f"{problem.problem}; {problem.fix}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}"[:300] if text else type(exc).__name__
