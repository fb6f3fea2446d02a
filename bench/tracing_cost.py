"""What tracing costs the command workers (``python -m bench.command_side --only tracing``).

The same registrations drained by the same ``dramatiq cqrskit.app.processes:command_worker``
processes, with tracing off (no ``OTEL_*`` variable) and on (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_TRACES_SAMPLER=always_on``: every command a recorded, exported trace), rounds interleaved
so that a noisy moment hits both alike; worker CPU per command from getrusage of the reaped
workers, their start-up and shutdown subtracted. The spans go over OTLP/HTTP to a sink in this
process (it answers 200 and drops them: its CPU is not the workers'). A second row times the
hooks a command passes through with tracing off, in this process, against the CPU a command
costs: what "off costs nothing" amounts to.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRACING_CPU = "worker CPU per command, tracing on (100 % sampled) vs off"
TRACING_OFF = "tracing hooks of one command, tracing off"


@dataclass
class Received:
    exports: int = 0
    bytes: int = 0


@contextmanager
def otlp_sink() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP endpoint on 127.0.0.1 that accepts and drops every export (and counts them)."""
    received = Received()

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.bytes += len(self.rfile.read(int(self.headers.get("content-length", "0"))))
            received.exports += 1
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def measure_tracing(pool: Any, count: int, runs: int, drain_once: Callable[..., tuple[float, float, float]],
                    boot_cpu: Callable[[Any], float], children_cpu: Callable[[], float], console: Any,
                    row: Callable[..., Any]) -> list[Any]:
    """Rows of the tracing cost; ``pool``: the bench's ``Workers`` (its database and queue set up)."""
    from cqrskit.producers.commands import CommandProducer, new_command

    with otlp_sink() as (endpoint, received):
        on_env = (("OTEL_TRACES_EXPORTER", "otlp"), ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                  ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"), ("OTEL_TRACES_SAMPLER", "always_on"))
        pools = {"off": pool, "on": dataclasses.replace(pool, extra_env=on_env, py_spy_dir=None)}
        idle = {mode: boot_cpu(p) for mode, p in pools.items()}
        seen: dict[str, list[float]] = {"off": [], "on": []}
        expected = _outcomes_so_far(pool)
        with CommandProducer.from_settings(pool.settings) as producer:
            for round_ in range(runs):
                for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
                    tag = uuid.uuid4().hex[:8]
                    batch = [new_command("RegisterCustomer", f"{tag}-{i}", {"name": "Ada", "email": f"{tag}.{i}@x.org"})
                             for i in range(count)]
                    producer.send_many(batch)
                    expected += count
                    before = children_cpu()
                    _, started, finished = drain_once(pools[mode], f"tracing-{mode}", expected, count)
                    cpu = (children_cpu() - before - idle[mode]) / count
                    seen[mode].append(cpu)
                    console.log(f"tracing {mode}: {count} commands in {finished - started:.2f} s, "
                                f"{cpu * 1000:.2f} ms of worker CPU each")
    off, on = (statistics.median(seen[m]) for m in ("off", "on"))
    hooks = hooks_off_seconds()
    return [row(TRACING_CPU, 1 / on, "the same workers and commands, tracing off: commands per worker CPU-s", 1 / off,
                None, f"{count} RegisterCustomer x {runs} rounds, P={pool.processes} T={pool.threads}: "
                f"{on * 1000:.2f} ms on vs {off * 1000:.2f} ms off per command "
                f"(+{(on - off) * 1000:.2f} ms, {on / off - 1:+.0%}); spans exported over OTLP/HTTP: "
                f"{received.exports} exports, {received.bytes / runs / count:,.0f} bytes per command"),
            row(TRACING_OFF, 1 / hooks, "worker CPU of one command, tracing off (the row above)", 1 / off, None,
                f"{hooks * 1e6:.2f} µs per command for every hook a command passes through, "
                f"{hooks / off:.2%} of its {off * 1000:.2f} ms")]


def _outcomes_so_far(pool: Any) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(pool.settings.database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM command_outcomes")).scalar_one())
    finally:
        engine.dispose()


def hooks_off_seconds(rounds: int = 20_000) -> float:
    """Seconds per command of the hooks on its path (producer, consumer, group commit, outcome,
    metadata), with tracing off in this process."""
    from cqrskit.infra import tracing, tracing_hooks
    from cqrskit.infra.amqp_confirms import OutgoingMessage

    assert not tracing.enabled()
    message = OutgoingMessage(body=b"{}", routing_key="RegisterCustomer", message_id="c1")
    dramatiq_message = type("M", (), {"options": {}, "kwargs": {}, "queue_name": "q", "message_id": "m"})()
    batch = tracing_hooks.group_commit(lambda items: [])
    started = time.perf_counter()
    for _ in range(rounds):
        with tracing_hooks.publishing([message], "commands"):
            pass
        tracing_hooks.trace_options(None)
        tracing_hooks.message_started(dramatiq_message)
        tracing_hooks.traced_metadata({})
        batch([message])
        tracing_hooks.command_outcome(None)
        tracing_hooks.message_ended()
    return (time.perf_counter() - started) / rounds
