"""The loss of a RabbitMQ node, on a 3-node cluster of the test's own (tests/rabbit_cluster.py:
its own node names, ports, cookie and epmd; never the machine's RabbitMQ).

The Procfile stack (command workers x2, the relay, indexers x2, as processes: tests/stack.py)
is given the three node URLs (``CQRSKIT_BROKER_URL``, comma-separated) and a shop load; mid-load
one node is killed with -9 and not restarted: the node most of the stack's processes are
connected to, or the node leading the commands queue. The oracle:

- outcomes flow again within 10 s of the kill: the load's outcomes never stop for longer (the
  first new outcome and the longest time without one are measured and printed), and a fresh
  producer holds a confirm within 10 s (the command then has its outcome);
- nothing lost or doubled (G1, G2): every command of the load has the outcome it expects, each
  succeeded command's events are in the write store once;
- the dead letters survive (G3): the unreadable bodies dead-lettered before the kill are all in
  ``commands.XQ`` (a quorum queue) after it;
- every committed event reached the events exchange (G5): a quorum queue of the test's own
  bound to it holds every event id;
- the read models converge (G6).

Before those (slow) tests, quick ones on the machine's RabbitMQ with a port nothing listens on
standing for a dead node: the URL list is validated, the publisher, Dramatiq's broker, preflight,
``setup`` and ``status`` go past the dead node, and ``setup`` moves a classic dead-letter queue
to a quorum one with every message.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa

from cqrskit.examples.shop.load import ShopLoad
from cqrskit.infra.amqp import AmqpPublisher, OutgoingMessage
from cqrskit.infra.outcomes import Status
from cqrskit.producers.commands import CommandNotConfirmed, CommandProducer, new_command
from cqrskit.infra.schema import events
from cqrskit.infra.settings import QueueType, Settings
from tests.bad_inputs import BAD_INPUTS
from tests.processes import port_bands
from tests.rabbit_cluster import Node, RabbitCluster
from tests.stack import Stack, wait_until
from tests.tcp_balancer import TcpBalancer

RECOVERY_LIMIT = 10.0
DEAD_BODIES = [(name, body("x")) for name, body, (fate, _why) in BAD_INPUTS if fate == "dead-letter"]


class ClusterStack(Stack):
    """A ``Stack`` whose queue depths come from the test's cluster, not the machine's RabbitMQ."""

    cluster: RabbitCluster

    def _depths(self, names: list[str]) -> dict[str, int]:
        table = self.cluster.queue_table()
        return {n: int(table[n]["messages"]) if n in table else 0 for n in names}

    def indexer_backlog(self) -> int:
        return sum(self._depths(self.indexer_queues).values())

    def dead_indexer_batches(self) -> int:
        return sum(self._depths([f"{q}.XQ" for q in self.indexer_queues if not q.endswith(".DQ")]).values())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    started = RabbitCluster(tmp_path_factory.mktemp("rabbit"), port_bands()[0] + 900)
    try:
        yield started.start()
    finally:
        started.close()


@pytest.fixture
def whole_cluster(cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with every node running (a node an earlier test killed is started again)."""
    for node in cluster.nodes:
        if not node.alive:
            cluster.start_node(node)
            cluster.await_startup(node)
    cluster.wait_running(cluster.nodes)
    return cluster


@pytest.fixture
def cluster_stack(whole_cluster: RabbitCluster, pg_url: str, search_url: str, tmp_path: Path) -> Iterator[ClusterStack]:
    """The stack on the three node URLs."""
    yield from make_stack(whole_cluster, ",".join(whole_cluster.urls), pg_url, search_url, tmp_path)


@pytest.fixture
def balanced_stack(whole_cluster: RabbitCluster, pg_url: str, search_url: str, tmp_path: Path) -> Iterator[ClusterStack]:
    """The stack on one URL: a TCP load balancer with health checks in front of the three nodes."""
    balancer = TcpBalancer(whole_cluster.first_port + 30, [("127.0.0.1", n.amqp_port) for n in whole_cluster.nodes])
    balancer.start()
    try:
        yield from make_stack(whole_cluster, balancer.url, pg_url, search_url, tmp_path)
    finally:
        balancer.close()


def make_stack(cluster: RabbitCluster, broker_url: str, pg_url: str, search_url: str, tmp_path: Path
               ) -> Iterator[ClusterStack]:
    tag = uuid.uuid4().hex[:10]
    base = Settings(database_url=pg_url, broker_url=broker_url,
                    commands_exchange=f"test.{tag}.commands", commands_queue=f"test.{tag}.commands",
                    events_exchange=f"test.{tag}.events", indexer_queue=f"test.{tag}.indexer",
                    index_prefix=f"t{tag}", queue_type=QueueType.quorum)
    ClusterStack.cluster = cluster
    stack = ClusterStack.create(base, search_url, tmp_path)
    try:
        yield stack
    finally:
        stack.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killing_the_node_the_stack_is_connected_to(cluster_stack: ClusterStack) -> None:
    """G1, G2, G3, G5, G6: kill -9 the node holding most of the stack's connections, mid-load."""
    run_failover(cluster_stack, busiest, "connected node")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killing_the_commands_queue_leader(cluster_stack: ClusterStack) -> None:
    """G1, G2, G3, G5, G6: kill -9 the node leading the commands queue (a quorum queue), mid-load."""
    def leader(stack: ClusterStack) -> Node:
        return stack.cluster.node_named(stack.cluster.queue_table()[stack.settings.commands_queue]["leader"])

    run_failover(cluster_stack, leader, "commands queue leader")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killing_a_node_behind_a_tcp_load_balancer(balanced_stack: ClusterStack) -> None:
    """G1, G2, G3, G5, G6: one broker URL, a health-checked TCP balancer in front of the nodes;
    kill -9 the node holding most of the stack's connections, mid-load."""
    run_failover(balanced_stack, busiest, "node behind the balancer")


def busiest(stack: ClusterStack) -> Node:
    """The node most of the stack's processes hold a connection on."""
    held = connected_processes(stack)
    name = max(held, key=lambda n: len(held[n]))
    assert held[name], f"no process of the stack is connected to any node: {held}"
    return stack.cluster.node_named(name)


# -- the scenario ---------------------------------------------------------------------------------
def run_failover(stack: ClusterStack, victim_of: Callable[[ClusterStack], Node], what: str) -> None:
    cluster, settings = stack.cluster, stack.settings
    tap = tap_events(stack)
    for _ in range(2):
        stack.start_worker()
        stack.start_indexer()
    stack.start_relay()
    settle(stack, tap)
    dead_letter_bodies(stack)
    victim = victim_of(stack)  # chosen before the load (rabbitmqctl takes seconds on a loaded machine)
    on_victim = connected_processes(stack)[victim.name]
    load = ShopLoad(size=2400, seed=25)
    runner = stack.start_load(load, timeout=240)
    wait_until(lambda: stack.write_store.count_outcomes() >= 400, 120, "400 outcomes before the kill", poll=0.05)
    monitor = OutcomeMonitor(stack)
    killed_at = time.monotonic()
    cluster.kill(victim)
    confirmed, probe = probe_after(stack, killed_at)
    runner.join(timeout=300)
    first, stall, after = monitor.stop(killed_at)
    report(what, victim, on_victim, confirmed, first, stall)
    assert after >= 1000, f"only {after} outcomes after the kill: it came too late to test anything"
    assert stall <= RECOVERY_LIMIT and confirmed <= RECOVERY_LIMIT, (stall, confirmed)
    assert stack.write_store.wait_for_outcomes([probe], timeout=120)[probe].status is Status.succeeded

    stack.assert_load_outcomes(load, runner.command_ids)
    assert_each_effect_once(stack, runner.command_ids)
    stack.wait_drained(timeout=180)
    stack.assert_converged()
    assert sorted(body for _p, body in drain(stack, f"{settings.commands_queue}.XQ")) == sorted(b for _n, b in DEAD_BODIES)
    assert_every_event_published(stack, tap)
    assert all(p.alive for p in stack.started), [p.tail() for p in stack.started if not p.alive]


def tap_events(stack: ClusterStack) -> str:
    """A quorum queue of the test's own bound to the events exchange (as another system's)."""
    name = f"{stack.settings.events_exchange}.tap"
    with channel_on(stack) as channel:
        channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(name, stack.settings.events_exchange, routing_key="#")
    return name


def settle(stack: ClusterStack, tap: str) -> None:
    """Every quorum queue with a leader and three members online, every process consuming (a
    quorum queue killed under a second after its declaration comes back leaderless)."""
    s = stack.settings
    queues = [q for base in (s.commands_queue, s.indexer_queue) for q in (base, f"{base}.DQ", f"{base}.XQ")] + [tap]
    stack.cluster.wait_settled(queues, members=3)

    def consuming() -> bool:
        table = stack.cluster.queue_table()
        return all(int(table[q]["consumers"]) >= 2 for q in (s.commands_queue, s.indexer_queue))

    wait_until(consuming, 120, "two consumers on the commands and the indexer queue", poll=0.5)


def dead_letter_bodies(stack: ClusterStack) -> None:
    """Publish the unreadable bodies (no command id: dead-lettered at once, G10) and wait for them in the XQ."""
    publisher = AmqpPublisher(stack.settings.broker_url, stack.settings.commands_exchange)
    try:
        for _name, body in DEAD_BODIES:
            publisher.publish(OutgoingMessage(body=body, routing_key="RegisterCustomer"))
    finally:
        publisher.close()
    xq = f"{stack.settings.commands_queue}.XQ"
    wait_until(lambda: int(stack.cluster.queue_table()[xq]["messages"]) == len(DEAD_BODIES), 60,
               "the unreadable bodies in the dead-letter queue", poll=0.5)


def connected_processes(stack: ClusterStack) -> dict[str, set[str]]:
    """Node -> the stack's processes (``worker-0``, ``relay-0``...) with a connection on it."""
    pids = {pid: p.log_path.stem for p in stack.started for pid in [p.popen.pid, *p.children()]}
    held: dict[str, set[str]] = {n.name: set() for n in stack.cluster.nodes}
    for node, names in stack.cluster.connections().items():
        for name in names:
            pid = int(name.split("-")[2]) if name.split("-")[2].isdigit() else None
            if pid in pids:
                held.setdefault(node, set()).add(pids[pid])
    return held


def probe_after(stack: ClusterStack, killed_at: float) -> tuple[float, str]:
    """Seconds from the kill until a fresh producer on the cluster's URLs holds the confirm of a
    command (publishing again what was not confirmed, as a producer does), and its command id."""
    with CommandProducer.from_settings(stack.settings) as publisher:
        while True:
            probe = uuid.uuid4().hex[:8]
            try:
                command_id = publisher.send(new_command("RegisterCustomer", f"probe-{probe}",
                                                        {"name": "Probe", "email": f"probe-{probe}@example.com"}))
            except CommandNotConfirmed:  # not accepted: a producer sends another (G1 holds for confirmed ones)
                assert time.monotonic() - killed_at < 120, "no command confirmed within 120 s of the kill"
                continue
            return time.monotonic() - killed_at, command_id


class OutcomeMonitor(threading.Thread):
    """Samples the count of outcomes every 50 ms; ``stop`` gives the longest time after the kill
    that no new outcome was recorded (until the load ended)."""

    def __init__(self, stack: ClusterStack) -> None:
        super().__init__(name="outcome-monitor", daemon=True)
        self.stack, self.samples, self.done = stack, [], threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), self.stack.write_store.count_outcomes()))
            self.done.wait(0.05)

    def stop(self, since: float) -> tuple[float, float, int]:
        """Seconds from ``since`` to the first new outcome, the longest time without one (from
        ``since`` until the load ended), and how many outcomes were recorded after ``since``."""
        self.done.set()
        self.join(timeout=30)
        changes = [t for (t, n), (_t0, before) in zip(self.samples[1:], self.samples) if n != before and t >= since]
        marks = [since, *changes]
        at_kill = next((n for t, n in reversed(self.samples) if t < since), self.samples[0][1])
        first = changes[0] - since if changes else float("inf")
        return first, max((b - a for a, b in zip(marks, marks[1:])), default=float("inf")), self.samples[-1][1] - at_kill


def assert_each_effect_once(stack: ClusterStack, command_ids: list[str]) -> None:
    """G2: each succeeded command's events were appended once (its outcome's positions, no more)."""
    by_command = {cid: len(types) for cid, types in stack.write_store.events_by_command().items()}
    outcomes = stack.write_store.outcomes(command_ids)
    wrong = {cid: (by_command.get(cid, 0), o.positions) for cid, o in outcomes.items()
             if o.status is Status.succeeded and by_command.get(cid, 0) != len(o.positions)}
    assert not wrong, f"{len(wrong)} commands whose events differ from their outcome, e.g. {list(wrong.items())[:3]}"


def assert_every_event_published(stack: ClusterStack, tap: str) -> None:
    """G5: every committed event is on the test's queue bound to the events exchange (at least once)."""
    import json

    with stack.write_store.engine.connect() as conn:
        committed = set(conn.execute(sa.select(events.c.event_id)).scalars())
    published = {json.loads(body)["event_id"] for _props, body in drain(stack, tap)}
    missing = committed - published
    assert not missing, f"{len(missing)} of {len(committed)} events never reached the events exchange"


def drain(stack: ClusterStack, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    taken = []
    with channel_on(stack) as channel:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))


class channel_on:
    """A channel on the first live node of the stack's cluster."""

    def __init__(self, stack: ClusterStack) -> None:
        self.url = stack.cluster.live().url

    def __enter__(self) -> pika.adapters.blocking_connection.BlockingChannel:
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        return self.connection.channel()

    def __exit__(self, *exc_info: object) -> None:
        self.connection.close()


def report(what: str, victim: Node, on_victim: set[str], confirmed: float, first: float, stall: float) -> None:
    load = os.getloadavg()
    print(f"\nkill -9 of the {what} {victim.name} (processes on it: {sorted(on_victim) or 'none'}): first new outcome "
          f"{first:.1f} s after the kill, longest time without an outcome {stall:.1f} s, a fresh producer's first "
          f"confirm {confirmed:.1f} s (limit {RECOVERY_LIMIT} s each); load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}", flush=True)
