"""Tracing set-up, context carrying and the group commit's links (G12), without the whole stack
(tests/test_tracing_stack.py runs it): off sets nothing up, a sender's bad ``traceparent`` is
ignored (G10), OTEL_* mistakes are one line, log lines carry the trace, and a group commit on
PostgreSQL links to every command's span while each command's events keep their own context."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from cqrskit.infra import tracing, tracing_hooks
from cqrskit.infra.amqp_confirms import OutgoingMessage
from cqrskit.infra.logs import configure_logging
from cqrskit.infra.outcomes import Status
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.producers.commands import new_command
from cqrskit.workers.execution import CommandExecutor

BIN = Path(sys.executable).parent
VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure("cqrskit-test", {}, exporter=exporter)
    yield exporter
    tracing.shutdown()


def _traceparent(span) -> str:  # type: ignore[no-untyped-def]
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


OFF_SCRIPT = """
import sys
from opentelemetry import trace
from cqrskit.infra import tracing, tracing_hooks
from cqrskit.infra.amqp_confirms import OutgoingMessage
from cqrskit.infra.settings import Settings
from cqrskit.app import bootstrap

settings = Settings(database_url="sqlite:///" + sys.argv[1], broker_url="memory://")
broker, runtime = bootstrap.command_worker(settings, threads=2)  # the composition root, as a process starts
assert not tracing.enabled()
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
assert "opentelemetry.sdk" not in sys.modules, "the SDK was imported"
message = OutgoingMessage(body=b"{}", routing_key="RegisterCustomer", message_id="c1")
with tracing_hooks.publishing([message], "commands") as sent:
    assert sent[0] is message and message.headers is None
assert tracing_hooks.trace_options({"traceparent": "%s"}) == {}
metadata = {"command_id": "c1"}
assert tracing_hooks.traced_metadata(metadata) is metadata
run = lambda batch: batch
assert tracing_hooks.group_commit(run)([1]) == [1]
print("off")
"""


def test_with_tracing_off_nothing_is_set_up_and_nothing_is_carried(tmp_path: Path) -> None:
    """G12 at no cost: without OTEL_TRACES_EXPORTER a process that starts as a command worker has
    no SDK imported, no provider, and every hook hands back what it was given."""
    done = subprocess.run([sys.executable, "-c", OFF_SCRIPT % VALID, str(tmp_path / "w.db")], env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "off", done.stderr[-3000:]


def test_exporter_none_and_sdk_disabled_are_off() -> None:
    """G12: the standard switches mean what users know them to mean."""
    assert tracing.exporter_names({}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]


@pytest.mark.parametrize("env, says", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported"),
])
def test_a_tracing_setting_cqrskit_cannot_honour_is_one_line(env: dict[str, str], says: str) -> None:
    """G10: a mistake in the OTEL_* environment is one line on the CLI, before any process starts."""
    done = subprocess.run([str(BIN / "cqrskit"), "schema", "--check"], env={**_clean_env(), **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_otel_service_name_wins_over_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """G12: OTEL_SERVICE_NAME names the process; without it, the process type does."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-workers")
    try:
        assert tracing.configure("cqrskit-commands", {}, exporter=InMemorySpanExporter())
        assert tracing._provider.resource.attributes["service.name"] == "billing-workers"
        monkeypatch.delenv("OTEL_SERVICE_NAME")
        tracing.configure("cqrskit-relay", {}, exporter=InMemorySpanExporter())
        assert tracing._provider.resource.attributes["service.name"] == "cqrskit-relay"
    finally:
        tracing.shutdown()


@pytest.mark.parametrize("headers", [
    {"traceparent": "garbage"},
    {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},  # an all-zero trace id
    {"traceparent": VALID + "x" * 600},
    {"traceparent": 12345},
    {"traceparent": ["a", "b"]},
    {"tracestate": "a=b"},
    None,
    "traceparent",
])
def test_a_bad_traceparent_from_a_sender_is_ignored(spans: InMemorySpanExporter, headers: object) -> None:
    """G10: whatever a producer puts in its headers, a bad trace context is dropped, never an error."""
    assert tracing_hooks.trace_options(headers) == {}


def test_a_producers_traceparent_is_carried_as_sent(spans: InMemorySpanExporter) -> None:
    """G12: the W3C header of another language's producer, as bytes or text, reaches the options."""
    assert tracing_hooks.trace_options({"traceparent": VALID.encode(), "tracestate": "vendor=1"}) == {
        "traceparent": VALID, "tracestate": "vendor=1"}


def test_a_published_command_carries_its_producer_span(spans: InMemorySpanExporter) -> None:
    """G12: a command sent inside a trace has its producer span's traceparent in its headers,
    beside the headers it already had."""
    message = OutgoingMessage(body=b"{}", routing_key="RegisterCustomer", message_id="c1",
                              headers={"cqrskit-issuer": "key-1"})
    with tracing_hooks.publishing([message], "cqrskit.commands") as sent:
        pass
    (span,) = spans.get_finished_spans()
    assert span.kind is SpanKind.PRODUCER and span.name == "publish cqrskit.commands"
    assert span.attributes["messaging.destination.name"] == "cqrskit.commands"
    assert sent[0].headers["cqrskit-issuer"] == "key-1"
    assert sent[0].headers["traceparent"] == _traceparent(span)


def test_log_lines_carry_the_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    """G12: a line logged inside a span names it; a line outside names none."""
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    log = structlog.get_logger("cqrskit.test")
    with tracing.active("work") as span:
        log.info("inside")
    log.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert inside["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert "trace_id" not in outside


def test_a_group_commit_links_to_every_command_and_keeps_each_context_with_its_events(
        pg_store: EventStore, spans: InMemorySpanExporter) -> None:
    """G12 (and G2): commands held at once by a worker's threads commit in one batch whose span
    links to each command's span; each command's events record its own trace context, which the
    relay continues."""
    executor = CommandExecutor(pg_store, pg_store.registry, max_batch=32, linger=0.2)
    commands = [new_command("RegisterCustomer", f"c{i}", {"name": f"N{i}", "email": f"n{i}@example.com"})
                for i in range(6)]
    outcomes = {}

    def one(command):  # type: ignore[no-untyped-def]
        with tracing.active(f"process {command.command_id}", SpanKind.CONSUMER):
            outcomes[command.command_id] = tracing_hooks.command_outcome(executor.execute(command.to_json()))

    threads = [threading.Thread(target=one, args=(c,)) for c in commands]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {o.status for o in outcomes.values()} == {Status.succeeded}
    finished = spans.get_finished_spans()
    command_spans = {s.attributes["cqrskit.command.id"]: s for s in finished if s.kind is SpanKind.CONSUMER}
    assert set(command_spans) == {c.command_id for c in commands}
    assert {s.attributes["cqrskit.command.outcome"] for s in command_spans.values()} == {"succeeded"}
    batches = [s for s in finished if s.name == "group commit"]
    linked = {link.context.span_id for batch in batches for link in batch.links}
    assert linked == {s.context.span_id for s in command_spans.values()}
    assert max(b.attributes["cqrskit.group_commit.size"] for b in batches) > 1  # the linger held them together
    assert all(b.attributes["db.system.name"] == "postgresql" for b in batches)
    for event in pg_store.read_all(0):
        span = command_spans[event.metadata["command_id"]]
        assert event.metadata["traceparent"] == _traceparent(span)


def test_a_consistency_token_carries_the_commands_trace_and_refuses_a_bad_one() -> None:
    """G12 and G8: the token of a traced command names its trace (the query API's wait links to
    it); a token without one, as before, still decodes; a signed token whose trace is not text
    is refused like any malformed token."""
    import base64

    from cqrskit.infra.tokens import ConsistencyToken, InvalidToken, _sign

    traced = ConsistencyToken((("customer:c1", 1),), VALID)
    assert ConsistencyToken.decode(traced.encode("s3cret"), "s3cret") == traced
    plain = ConsistencyToken((("customer:c1", 1),))
    assert ConsistencyToken.decode(plain.encode("s3cret"), "s3cret").trace is None
    payload = base64.urlsafe_b64encode(json.dumps({"v": 1, "s": [["customer:c1", 1]], "t": ["x"]}).encode())
    payload = payload.rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        ConsistencyToken.decode(f"{payload}.{_sign('s3cret', payload)}", "s3cret")


def test_a_process_managers_reaction_continues_the_trace_that_wrote_the_event(spans: InMemorySpanExporter) -> None:
    """G12 (G13's reactions): a process manager's reaction to an event is a span in the trace of
    the command that wrote it (the event's metadata carries the context)."""
    from types import SimpleNamespace

    reacted = []
    react = tracing_hooks.reacting(lambda process, manager, stored: reacted.append(stored.event_id))
    stored = SimpleNamespace(event_id="e-1", type="OrderPlaced", position=7,
                             metadata={"command_id": "c-1", "traceparent": VALID})
    react(object(), SimpleNamespace(name="shop.payment-deadline"), stored)
    (span,) = spans.get_finished_spans()
    assert reacted == ["e-1"] and span.name == "react shop.payment-deadline"
    assert f"{span.context.trace_id:032x}" == VALID.split("-")[1]
    assert f"{span.parent.span_id:016x}" == VALID.split("-")[2]
    assert span.attributes["cqrskit.event.type"] == "OrderPlaced"
