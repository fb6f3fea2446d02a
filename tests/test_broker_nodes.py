"""Several broker URLs (the nodes of one cluster) on the machine's RabbitMQ, with a port nothing
listens on standing for a dead node: the list is validated at settings time, and every client
goes past the dead node at once (G1: a publication is confirmed on the live node); ``setup``
moves a classic dead-letter queue to a quorum one without losing a message (G3); ``status``
lists the nodes, the dead one down, and exits 0 (the cluster serves). The kill of a real node
of a real cluster: tests/test_rabbitmq_cluster.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import pika
import pytest

from cqrskit.app.errors import Problem
from cqrskit.app.preflight import preflight
from cqrskit.app.setup import _dead_letter_queues
from cqrskit.infra.amqp import AmqpPublisher, OutgoingMessage
from cqrskit.infra.broker import make_broker
from cqrskit.infra.deadletter_queues import QUORUM
from cqrskit.infra.nodes import NodeList
from cqrskit.infra.settings import Settings
from cqrskit.infra.topology import declare_command_topology
from tests.processes import PROJECT, worker_env


def dead_node() -> str:
    """The URL of a node that is down: a local port nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/%2F"


@pytest.fixture
def cluster_settings(amqp_settings: Settings) -> Settings:
    """The test's topology with a dead node listed first, then the live one."""
    return amqp_settings.model_copy(update={"broker_url": f"{dead_node()},{amqp_settings.broker_url}"})


@pytest.mark.parametrize("value, fragment", [
    ("amqp://u:pw@a:1/%2F,", "comma-separated"),
    ("amqp://u:pw@a:1/%2F,http://u:pw@b:2/", "comma-separated"),
    ("amqp://u:pw@a:1/%2F,amqp://u:pw@a:1/%2F", "names one node twice"),
    ("amqp://u:pw@a:1/one,amqp://u:pw@b:1/two", "same user and virtual host"),
    ("amqp://u:pw@a:1/%2F,amqp://v:pw@b:1/%2F", "same user and virtual host"),
    ("memory://,amqp://u:pw@a:1/%2F", "comma-separated"),
])
def test_a_bad_url_list_is_one_clear_line_without_its_password(value: str, fragment: str) -> None:
    """G10 for an operator: one line naming CQRSKIT_BROKER_URL, the masked value and what is wrong."""
    result = subprocess.run([sys.executable, "-m", "cqrskit.app", "status"], cwd=PROJECT, text=True,
                            capture_output=True, timeout=60,
                            env=worker_env(Settings(), CQRSKIT_BROKER_URL=value))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CQRSKIT_BROKER_URL" in lines[0] and fragment in lines[0], result.stderr
    assert ":pw@" not in result.stderr, result.stderr


def test_settings_keep_the_nodes_in_order() -> None:
    settings = Settings(broker_url=" amqp://u:p@a:1/%2F , amqp://u:p@b:2/%2F")
    assert settings.broker_urls == ["amqp://u:p@a:1/%2F", "amqp://u:p@b:2/%2F"]
    assert Settings(broker_url="amqp://u:p@a:1/%2F").broker_urls == ["amqp://u:p@a:1/%2F"]


def test_a_node_list_starts_anywhere_and_passes_over_a_lost_node() -> None:
    nodes = [{"host": "127.0.0.1", "port": port} for port in (1, 2, 3)]
    starts = {NodeList(nodes).ordered()[0].port for _ in range(200)}
    assert starts == {1, 2, 3}  # connections spread
    listed = NodeList(nodes, start=0)

    class Connection:  # what pika's BlockingConnection exposes of the node it reached
        def __init__(self, port: int) -> None:
            self._impl = type("impl", (), {"params": pika.ConnectionParameters("127.0.0.1", port)})()

    listed.lost(Connection(1))
    assert [n.port for n in listed.ordered()] == [2, 3, 1]  # never the lost node first
    listed.lost(Connection(1))  # a late report of the old loss changes nothing
    assert listed.preferred == "127.0.0.1:2"
    listed.reached(Connection(3))
    assert [n.port for n in listed.ordered()] == [3, 1, 2]


@pytest.mark.timeout(60)
def test_the_publisher_goes_past_a_dead_node_and_confirms_on_a_live_one(amqp_settings: Settings) -> None:
    """G1: whichever node a publisher starts on, every message is confirmed, within a second or two."""
    queue = f"{amqp_settings.commands_queue}.probe"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    connection.channel().queue_declare(queue, durable=True, arguments=QUORUM)
    try:
        for _ in range(4):  # it starts on a random node: both orders come up
            publisher = AmqpPublisher([dead_node(), amqp_settings.broker_url], "")
            started = time.monotonic()
            try:
                report = publisher.publish_many([OutgoingMessage(b"{}", queue, str(uuid.uuid4())) for _ in range(20)])
            finally:
                publisher.close()
            assert report.confirmed == 20 and not report.failed
            assert time.monotonic() - started < 5
        assert connection.channel().queue_declare(queue, passive=True).method.message_count == 80
    finally:
        connection.channel().queue_delete(queue)
        connection.close()


@pytest.mark.timeout(60)
def test_workers_broker_preflight_and_setup_go_past_a_dead_node(cluster_settings: Settings) -> None:
    """The Dramatiq broker declares and enqueues, preflight passes (a cluster with a node down)."""
    for _ in range(3):
        broker = make_broker(cluster_settings)
        try:
            declare_command_topology(broker, cluster_settings)
        finally:
            broker.close()
    preflight(cluster_settings, "worker")
    preflight(cluster_settings, "setup")


@pytest.mark.timeout(60)
def test_status_lists_the_nodes_says_which_is_down_and_exits_0(cluster_settings: Settings, search_url: str) -> None:
    broker = make_broker(cluster_settings)
    declare_command_topology(broker, cluster_settings)
    broker.close()
    result = subprocess.run([sys.executable, "-m", "cqrskit.app", "status", "--json"], cwd=PROJECT, text=True,
                            capture_output=True, timeout=60,
                            env=worker_env(cluster_settings, CQRSKIT_ELASTICSEARCH_URL=search_url))
    status = json.loads(result.stdout)
    assert status["components"]["broker"]["reachable"], status["components"]
    dead, live = status["broker_nodes"]
    assert (dead["reachable"], live["reachable"]) == (False, True) and "cannot connect" in dead["error"]
    assert status["queues"]["commands"]["exists"]
    assert "guest:guest" not in result.stdout
    assert result.returncode == 0, result.stderr  # degraded, not failed (the write store and search answer)
    screen = subprocess.run([sys.executable, "-m", "cqrskit.app", "status"], cwd=PROJECT, text=True,
                            capture_output=True, timeout=60, env=worker_env(cluster_settings, COLUMNS="200", CQRSKIT_ELASTICSEARCH_URL=search_url))
    assert screen.returncode == 0 and "down" in screen.stdout and "guest:guest" not in screen.stdout


@pytest.mark.timeout(60)
def test_setup_moves_a_classic_dead_letter_queue_to_a_quorum_one_with_every_message(
        cluster_settings: Settings) -> None:
    """G3: the dead letters an older cqrskit parked in a classic ``.XQ`` (7-day TTL, one node) are
    all in the quorum ``.XQ`` after setup, headers and order kept; setup refuses while workers consume."""
    xq = f"{cluster_settings.commands_queue}.XQ"
    live = cluster_settings.broker_urls[1]
    connection = pika.BlockingConnection(pika.URLParameters(live))
    channel = connection.channel()
    channel.queue_declare(xq, durable=True, arguments={"x-message-ttl": 7 * 86_400_000})  # as Dramatiq does
    bodies = [b"\xff\xfe garbage", b"", b"[1, 2, 3]"]
    for index, body in enumerate(bodies):
        channel.basic_publish("", xq, body, pika.BasicProperties(delivery_mode=2, headers={"n": index}))
    broker = make_broker(cluster_settings)  # workers of this version keep using the classic one until setup
    try:
        declare_command_topology(broker, cluster_settings)
    finally:
        broker.close()
    consumer = channel.basic_consume(cluster_settings.commands_queue, lambda *args: None)
    with pytest.raises(Problem, match="classic queue"):
        _dead_letter_queues(cluster_settings, say=lambda _line: None)
    channel.basic_cancel(consumer)
    said: list[str] = []
    _dead_letter_queues(cluster_settings, say=said.append)
    assert said == [f"dead letters: {xq} is now a quorum queue (3 messages moved)"]
    channel.queue_declare(xq, durable=True, arguments=QUORUM)  # it is one: no PRECONDITION_FAILED
    taken = [channel.basic_get(xq, auto_ack=True) for _ in range(4)]
    headers = [{k: v for k, v in props.headers.items() if k != "x-delivery-count"} for _m, props, _b in taken[:3]]
    assert [(h, body) for h, (_m, _p, body) in zip(headers, taken)] == [({"n": i}, b) for i, b in enumerate(bodies)]
    assert taken[3][0] is None
    _dead_letter_queues(cluster_settings, say=said.append)  # idempotent
    assert len(said) == 1
    connection.close()


@pytest.mark.timeout(60)
def test_a_nacked_publisher_reports_each_nack_then_confirms_again(amqp_settings: Settings) -> None:
    """G1: a nack (here: a full queue that refuses, ``x-overflow: reject-publish``) fails that
    message with its reason; the publisher reconnects (at most once a second, as it does when a
    quorum queue changed leader) and the next message to a queue that takes it is confirmed."""
    full, open_ = f"{amqp_settings.commands_queue}.full", f"{amqp_settings.commands_queue}.open"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    channel = connection.channel()
    channel.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    channel.queue_declare(open_, durable=True)
    publisher = AmqpPublisher(amqp_settings.broker_url, "")
    try:
        refused = publisher.publish_many([OutgoingMessage(b"{}", full, str(i)) for i in range(5)])
        assert refused.confirmed == 0 and {why for _id, why in refused.failed} == {"nacked by broker"}
        publisher.publish(OutgoingMessage(b"{}", open_, "after"))
        assert channel.queue_declare(open_, passive=True).method.message_count == 1
    finally:
        publisher.close()
        channel.queue_delete(full)
        channel.queue_delete(open_)
        connection.close()
