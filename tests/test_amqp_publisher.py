"""AmqpPublisher against the real RabbitMQ (no mocks).

Each test declares its own uniquely named exchange and queue and deletes them afterwards, and only ever
kills its own publisher connection (found by connection_name), so tests can run next to others on the
same broker.
"""
from __future__ import annotations

import subprocess
import threading
import time
import uuid

import pika
import pytest

from cqrskit.infra.amqp import (AmqpPublisher, CommandNotConfirmed, OutgoingMessage, PublisherClosed,
                            PublishReport)

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BODY = b'{"type":"PlaceOrder","payload":{"order":1}}'


@pytest.fixture
def admin():
    try:
        connection = pika.BlockingConnection(pika.URLParameters(URL))
    except pika.exceptions.AMQPConnectionError as exc:
        pytest.skip(f"RabbitMQ not reachable at {URL}: {exc!r}")
    yield connection.channel()
    connection.close()


@pytest.fixture
def topology(admin):
    """A fresh direct exchange with one durable queue bound on routing key 'cmd'; both deleted afterwards."""
    name = f"test-amqp-pub-{uuid.uuid4().hex[:10]}"
    admin.exchange_declare(name, "direct", durable=True)
    admin.queue_declare(name, durable=True)
    admin.queue_bind(name, name, routing_key="cmd")
    yield name
    admin.queue_delete(name)
    admin.exchange_delete(name)


def drain(channel, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Consume everything currently in the queue (auto-ack); stops after 1 s without deliveries."""
    out = []
    for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1.0):
        if method is None:
            break
        out.append((props, body))
    channel.cancel()
    return out


def messages(n: int, prefix: str) -> list[OutgoingMessage]:
    return [OutgoingMessage(BODY, "cmd", message_id=f"{prefix}-{i}") for i in range(n)]


def broker_connection_pids(connection_name: str) -> list[str]:
    """Broker-side pids of the connections whose client_properties carry connection_name."""
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    marker = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t")[0] for line in listing.splitlines() if marker in line]


def close_broker_connection(pid: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test"],
                   capture_output=True, text=True, timeout=30, check=True)


def killing_at(batch: list[OutgoingMessage], at: int, pid: str, tail: int = 3000):
    """Yield the batch; on reaching `at`, start closing connection `pid` from the broker side without
    waiting, so the kill lands while the stream runs at full speed with a full window in flight. If
    the kill has not landed when only `tail` messages are left (rabbitmqctl boots an Erlang VM: on a
    busy machine that can outlast the stream), the rest trickle out, one every half millisecond, until
    it has: the stream never ends before the kill."""
    for i, message in enumerate(batch):
        if i == at:
            killer = subprocess.Popen(["rabbitmqctl", "-q", "close_connection", pid, "test"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif i >= len(batch) - tail and killer.poll() is None:
            time.sleep(0.0005)
        yield message
    assert killer.wait(timeout=30) == 0


@pytest.mark.timeout(60)
def test_publish_many_confirms_every_message_and_delivers_exactly_those(admin, topology):
    batch = messages(5000, "many")
    progress = []
    with AmqpPublisher(URL, topology, window=500) as publisher:
        report = publisher.publish_many(batch, on_confirmed=progress.append)
    assert report == PublishReport(confirmed=5000, failed=[])
    assert sum(progress) == 5000
    ids = [props.message_id for props, _ in drain(admin, topology)]
    assert len(ids) == 5000
    assert set(ids) == {m.message_id for m in batch}


@pytest.mark.timeout(30)
def test_publish_single_message_with_properties(admin, topology):
    with AmqpPublisher(URL, topology) as publisher:
        publisher.publish(OutgoingMessage(BODY, "cmd", message_id="one-1", headers={"producer": "tests"}))
    [(props, body)] = drain(admin, topology)
    assert body == BODY
    assert props.delivery_mode == 2
    assert props.message_id == "one-1"
    assert props.content_type == "application/json"
    assert props.headers == {"producer": "tests"}


@pytest.mark.timeout(30)
def test_unroutable_messages_are_not_confirmed(admin, topology):
    with AmqpPublisher(URL, topology) as publisher:
        with pytest.raises(CommandNotConfirmed) as info:
            publisher.publish(OutgoingMessage(BODY, "nobody-bound", message_id="lost-1"))
        assert "unroutable" in info.value.reason and "nobody-bound" in info.value.reason
        assert info.value.message_id == "lost-1"
        mixed = [OutgoingMessage(BODY, "cmd" if i % 2 else "nobody-bound", message_id=f"mix-{i}")
                 for i in range(200)]
        report = publisher.publish_many(mixed)
    assert report.confirmed == 100
    assert sorted(mid for mid, _ in report.failed) == sorted(f"mix-{i}" for i in range(0, 200, 2))
    assert all("unroutable" in reason for _, reason in report.failed)
    assert {p.message_id for p, _ in drain(admin, topology)} == {f"mix-{i}" for i in range(1, 200, 2)}


@pytest.mark.timeout(30)
def test_missing_exchange_is_a_clear_error_not_a_hang(topology):
    missing = f"{topology}-does-not-exist"
    with AmqpPublisher(URL, missing, confirm_timeout=10) as publisher:
        started = time.monotonic()
        with pytest.raises(CommandNotConfirmed) as info:
            publisher.publish(OutgoingMessage(BODY, "cmd", message_id="nowhere-1"))
        assert "404" in info.value.reason and missing in info.value.reason
        report = publisher.publish_many(messages(50, "nowhere"))
        assert report.confirmed == 0 and len(report.failed) == 50
        assert all("404" in reason for _, reason in report.failed)
        assert time.monotonic() - started < 5
    # The publisher recovers its channel: publishing to the real exchange still works afterwards.
    with AmqpPublisher(URL, topology) as publisher:
        publisher.publish(OutgoingMessage(BODY, "cmd", message_id="somewhere-1"))


@pytest.mark.timeout(120)
def test_connection_killed_mid_stream_republishes_unconfirmed(admin, topology):
    """G1 at-least-once: the broker kills the publisher's connection while 20,000 messages stream; the
    publisher reconnects and republishes everything unconfirmed, so every message is confirmed and every
    message id reaches the queue at least once (duplicates allowed: consumers deduplicate by id)."""
    batch = [OutgoingMessage(BODY * 20, "cmd", message_id=f"killed-{i}") for i in range(20_000)]
    with AmqpPublisher(URL, topology, window=1000) as publisher:  # connects in the background
        deadline = time.monotonic() + 10
        while not (pids := broker_connection_pids(publisher.connection_name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 1
        report = publisher.publish_many(killing_at(batch, 2000, pids[0]))
        assert publisher.republished > 0, "the kill did not land mid-stream; kill earlier or stream longer"
        assert broker_connection_pids(publisher.connection_name) not in ([], pids)  # it reconnected
    assert report.failed == []
    assert report.confirmed == 20_000
    ids = [props.message_id for props, _ in drain(admin, topology)]
    assert set(ids) == {m.message_id for m in batch}
    assert len(ids) >= 20_000


@pytest.mark.timeout(30)
def test_unreachable_broker_fails_after_reconnect_budget():
    publisher = AmqpPublisher("amqp://guest:guest@127.0.0.1:1/%2F", "x", reconnect_attempts=2)
    started = time.monotonic()
    with pytest.raises(CommandNotConfirmed) as info:
        publisher.publish(OutgoingMessage(BODY, "cmd", message_id="unreachable-1"))
    assert "3 attempt(s)" in info.value.reason
    assert time.monotonic() - started < 10
    publisher.close()


@pytest.mark.timeout(30)
def test_publish_after_close_raises(topology):
    publisher = AmqpPublisher(URL, topology)
    publisher.publish(OutgoingMessage(BODY, "cmd", message_id="before-close"))
    publisher.close()
    publisher.close()  # idempotent
    with pytest.raises(PublisherClosed, match="closed"):
        publisher.publish(OutgoingMessage(BODY, "cmd", message_id="after-close"))
    with pytest.raises(PublisherClosed):
        publisher.publish_many(messages(3, "after-close"))
    never_used = AmqpPublisher(URL, topology)  # nothing connects until first use
    never_used.close()
    with pytest.raises(PublisherClosed):
        never_used.publish(OutgoingMessage(BODY, "cmd"))


@pytest.mark.timeout(30)
def test_concurrent_publish_from_threads(admin, topology):
    errors = []
    with AmqpPublisher(URL, topology, window=50) as publisher:
        def work(t: int) -> None:
            try:
                for i in range(50):
                    publisher.publish(OutgoingMessage(BODY, "cmd", message_id=f"t{t}-{i}"))
            except Exception as exc:  # pragma: no cover - surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    ids = {props.message_id for props, _ in drain(admin, topology)}
    assert ids == {f"t{t}-{i}" for t in range(8) for i in range(50)}
