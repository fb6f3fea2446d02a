"""One trace from the producer to the search result, on the Procfile stack (G12).

``honcho start`` runs every process type of the Procfile on real PostgreSQL, RabbitMQ and the
search server, with tracing on by the standard variables only (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an OTLP/HTTP receiver of the test's own). The test
is the client: it sends a command with a ``traceparent`` of its own, once through the gateway
and once straight over AMQP (as a producer in another language would: the header
docs/commands.md names), then reads its write back through the query API with the same trace
and the command's consistency token. Each trace must hold, parent by parent, the spans of every
process the command went through: the gateway's request and its publication, the worker's
command (with its outcome), the relay's publication, the indexer's message and its bulk write,
the query API's request and its consistency wait. And the worker's log line of the command
carries the trace id.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pika
import pytest
from honcho.environ import expand_processes, parse_procfile

from cqrskit.infra.settings import Settings
from cqrskit.producers.commands import new_command
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.processes import PROJECT, port_bands
from tests.stack import Stack, wait_until
from tests.test_procfile_stack import Honcho, _answers, _free, ready_consumers

pytestmark = pytest.mark.slow
CONCURRENCY = {"commands": 1, "indexer": 1}


@pytest.fixture
def stack(amqp_settings: Settings, search_url: str, tmp_path: Path) -> Iterator[Stack]:
    built = Stack.create(amqp_settings, search_url, tmp_path)
    yield built
    built.close()


def procfile_ports(base: int) -> dict[str, int]:
    procfile = parse_procfile((PROJECT / "Procfile").read_text())
    return {p.name: int(p.env["PORT"]) for p in expand_processes(procfile.processes, CONCURRENCY, port=base)}


def free_base_port() -> int:
    """A base port whose every $PORT is free (a stack stopped just before may hold them a moment)."""
    found: list[int] = []

    def free() -> bool:
        found[:] = [b for b in port_bands() if all(_free(port) for port in procfile_ports(b).values())]
        return bool(found)

    wait_until(free, 60, f"a free range of ports for the Procfile in the bands {port_bands()}", poll=0.5)
    return found[0]


class ClientTrace:
    """The test's own trace: one trace id, a new span id for each request it makes."""

    def __init__(self) -> None:
        self.trace_id = secrets.token_hex(16)
        self.span_ids: list[str] = []

    def traceparent(self) -> str:
        self.span_ids.append(secrets.token_hex(8))
        return f"00-{self.trace_id}-{self.span_ids[-1]}-01"


@pytest.mark.timeout(300)
def test_one_trace_holds_every_process_of_a_command_sent_over_http_and_over_amqp(stack: Stack) -> None:
    """G12: a command's trace, from the client's own traceparent, holds the gateway's request, the
    worker's command, the relay's publication, the indexer's write and the query API's
    consistency wait, each the child of the one before; the same for a command published over
    AMQP with a ``traceparent`` header; the worker's log line of the command carries the trace id."""
    base = free_base_port()
    ports = procfile_ports(base)
    with OtlpReceiver() as receiver:
        honcho = Honcho(stack, base, concurrency=CONCURRENCY, OTEL_TRACES_EXPORTER="otlp",
                        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                        OTEL_BSP_SCHEDULE_DELAY="200", OTEL_SERVICE_NAME="")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{ports['gateway.1']}", timeout=60) as gateway, \
                    httpx.Client(base_url=f"http://127.0.0.1:{ports['query.1']}", timeout=60) as query:
                wait_until(lambda: _answers(gateway) and _answers(query), 90, f"the HTTP services:\n{honcho.tail()}")
                wait_until(lambda: ready_consumers(stack.settings) == (1, 1), 180,
                           f"a command worker and an indexer consuming:\n{honcho.tail()}")
                over_http = ClientTrace()
                command_id = send_over_http(gateway, over_http)
                read_back(gateway, query, over_http, command_id)
                assert_one_trace(receiver, stack.settings, over_http, command_id, via_gateway=True)

                over_amqp = ClientTrace()
                command_id = send_over_amqp(stack.settings, over_amqp)
                read_back(gateway, query, over_amqp, command_id)
                assert_one_trace(receiver, stack.settings, over_amqp, command_id, via_gateway=False)
            assert_logged_with_trace(honcho.log, command_id, over_amqp.trace_id)
            assert honcho.popen.poll() is None, honcho.tail()
        finally:
            honcho.stop()


@pytest.mark.timeout(240)
def test_a_worker_that_stops_exports_its_last_spans(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """G12: a command worker stopped by SIGTERM exports the spans it still holds (Dramatiq's
    worker processes exit without running atexit), even with a batch delay of ten minutes."""
    with OtlpReceiver() as receiver:
        for name, value in {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                            "OTEL_BSP_SCHEDULE_DELAY": "600000"}.items():
            monkeypatch.setenv(name, value)  # the worker's environment (the test process sets nothing up)
        worker = stack.start_worker(threads=2)
        tag = uuid.uuid4().hex[:10]
        envelope = new_command("RegisterCustomer", f"c-{tag}", {"name": "Ada", "email": f"{tag}@example.com"})
        stack.send_and_wait([envelope], timeout=120)
        assert not [s for s in receiver.spans if s.attributes.get("cqrskit.command.id") == envelope.command_id]
        stack.stop(worker)
        spans = [s for s in receiver.spans if s.attributes.get("cqrskit.command.id") == envelope.command_id]
        assert [(s.service, s.kind, s.attributes["cqrskit.command.outcome"]) for s in spans] == [
            ("cqrskit-commands", "consumer", "succeeded")], worker.log_path.read_text()[-3000:]


def _register(tag: str) -> bytes:
    return new_command("RegisterCustomer", f"c-{tag}", {"name": f"Ada {tag}", "email": f"{tag}@example.com"},
                       command_id=f"traced-{tag}").to_json()


def send_over_http(gateway: httpx.Client, client: ClientTrace) -> str:
    tag = uuid.uuid4().hex[:10]
    response = gateway.post("/commands", content=_register(tag),
                            headers={"content-type": "application/json", "traceparent": client.traceparent()})
    assert response.status_code == 202, response.text
    return f"traced-{tag}"


def send_over_amqp(settings: Settings, client: ClientTrace) -> str:
    """Published the way a producer in any language does: the JSON envelope, the command type as
    routing key, the W3C ``traceparent`` (and a ``tracestate``) as AMQP headers."""
    tag = uuid.uuid4().hex[:10]
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(settings.commands_exchange, "RegisterCustomer", _register(tag), mandatory=True,
                              properties=pika.BasicProperties(
                                  content_type="application/json", delivery_mode=2, message_id=f"traced-{tag}",
                                  headers={"traceparent": client.traceparent(), "tracestate": "test=amqp"}))
    finally:
        connection.close()
    return f"traced-{tag}"


def read_back(gateway: httpx.Client, query: httpx.Client, client: ClientTrace, command_id: str) -> None:
    """The outcome's token, then the customer through the query API, waiting for the write."""
    outcome = gateway.get(f"/commands/{command_id}", params={"wait": 60})
    assert outcome.status_code == 200 and outcome.json()["status"] == "succeeded", outcome.text
    token = outcome.json()["consistency_token"]
    customer_id = "c-" + command_id.removeprefix("traced-")
    found = query.get(f"/customers/{customer_id}", params={"consistent_with": token, "wait": 30},
                      headers={"traceparent": client.traceparent()})
    assert found.status_code == 200, found.text


def assert_one_trace(receiver: OtlpReceiver, settings: Settings, client: ClientTrace, command_id: str,
                     via_gateway: bool) -> None:
    def one(spans: list[ReceivedSpan], service: str, test: Callable[[ReceivedSpan], bool]) -> ReceivedSpan | None:
        return next((s for s in spans if s.service == service and test(s)), None)

    def chain() -> dict[str, ReceivedSpan | None]:
        spans = receiver.trace(client.trace_id)
        found: dict[str, ReceivedSpan | None] = {}
        if via_gateway:
            found["request"] = one(spans, "cqrskit-gateway", lambda s: s.kind == "server" and s.name == "POST /commands")
            found["publish"] = one(spans, "cqrskit-gateway", lambda s: s.kind == "producer")
        found["command"] = one(spans, "cqrskit-commands",
                               lambda s: s.kind == "consumer" and s.attributes.get("cqrskit.command.id") == command_id)
        found["relay"] = one(spans, "cqrskit-relay", lambda s: s.kind == "producer")
        found["indexer"] = one(spans, "cqrskit-indexer", lambda s: s.kind == "consumer")
        found["index"] = one(spans, "cqrskit-indexer", lambda s: s.name == "index")
        found["query"] = one(spans, "cqrskit-query", lambda s: s.kind == "server" and s.attributes.get(
            "url.path", "").startswith("/customers/"))
        found["wait"] = one(spans, "cqrskit-query", lambda s: s.name == "consistency wait")
        return found

    try:
        wait_until(lambda: all(chain().values()), 60, "every span of the command's trace")
    except AssertionError:
        raise AssertionError(f"spans missing: {[k for k, v in chain().items() if v is None]}; the trace holds "
                             f"{[(s.service, s.name) for s in receiver.trace(client.trace_id)]}") from None
    found = {k: v for k, v in chain().items() if v is not None}
    spans = {s.span_id: s for s in receiver.trace(client.trace_id)}

    def under(child: ReceivedSpan, ancestor: str) -> bool:
        """``ancestor`` is ``child``'s parent, or its parent's... (framework spans may lie between)."""
        parent = child.parent_span_id
        while parent and parent != ancestor and parent in spans:
            parent = spans[parent].parent_span_id
        return parent == ancestor

    first = client.span_ids[0]
    if via_gateway:
        assert found["request"].parent_span_id == first
        assert under(found["publish"], found["request"].span_id)
        assert found["publish"].attributes["messaging.destination.name"] == settings.commands_exchange
        assert found["command"].parent_span_id == found["publish"].span_id
    else:  # the producer's own span is the command's parent
        assert found["command"].parent_span_id == first
    command = found["command"]
    assert command.attributes["cqrskit.command.outcome"] == "succeeded"
    assert command.attributes["cqrskit.command.type"] == "RegisterCustomer"
    assert command.attributes["messaging.system"] == "rabbitmq"
    assert command.attributes["messaging.destination.name"] == settings.commands_queue
    relay = found["relay"]
    assert relay.parent_span_id == command.span_id  # from the trace context stored with the events
    assert relay.attributes["messaging.destination.name"] == settings.events_exchange
    assert relay.attributes["cqrskit.events.relayed"] >= 1
    assert found["indexer"].parent_span_id == relay.span_id
    index = found["index"]
    assert under(index, found["indexer"].span_id)
    assert index.attributes["db.system.name"] == "elasticsearch" and index.attributes["cqrskit.index.written"] >= 1
    assert found["query"].parent_span_id == client.span_ids[-1]
    wait = found["wait"]
    assert under(wait, found["query"].span_id)
    assert wait.attributes["cqrskit.read_model"] == "customers" and wait.attributes["cqrskit.consistency.reflected"]
    assert wait.attributes["cqrskit.consistency.wait_seconds"] >= 0
    assert (command.trace_id, command.span_id) in wait.links  # the token carried the command's context


def assert_logged_with_trace(log: Path, command_id: str, trace_id: str) -> None:
    lines = [line.split("|", 1)[-1].strip() for line in log.read_text(errors="replace").splitlines()
             if command_id in line and '"command.succeeded"' in line]
    assert lines, f"no log line of {command_id}"
    record = json.loads(lines[0])
    assert record["trace_id"] == trace_id and len(record["span_id"]) == 16, record


if os.environ.get("OTEL_TRACES_EXPORTER"):  # the stack must not inherit a developer's own exporter
    pytest.skip("OTEL_TRACES_EXPORTER is set in the test's environment", allow_module_level=True)
