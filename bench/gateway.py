"""Gateway benchmark: commands/s through the HTTP gateway beside the raw producer, in one run.

    .venv/bin/python -m bench.gateway [--commands 5000] [--clients 32] [--workers 1] [--smoke]

Rows:
- ``POST /commands``: ``--clients`` concurrent keep-alive HTTP clients (asyncio, in this process)
  against ``run_gateway`` with ``--workers`` uvicorn processes; each answer a 202 after the
  broker's confirm. Beside it: ``AmqpPublisher.publish`` (one confirm each) from as many threads,
  the same envelopes, the same exchange and queue.
- ``POST /commands/batch``: the same commands in batches of ``--batch`` per request, beside
  ``AmqpPublisher.publish_many`` (1,000 confirms in flight) from one thread.

Every figure is the median of ``--runs`` interleaved rounds. The gateway, the clients and
RabbitMQ share the machine's cores: that is the deployment being measured. It declares its own
exchange and quorum queue and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pika
from rich.console import Console
from rich.table import Table

ADMIN_URL = os.environ.get("CQRSKIT_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("CQRSKIT_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
ONE = "gateway: POST /commands"
BATCH = "gateway: POST /commands/batch"
ROWS = (ONE, BATCH)
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


@dataclass
class Rates:
    ours: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)


# -- the commands and the broker --------------------------------------------------------------
def commands(count: int) -> list[dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    return [{"command_id": f"bench-{tag}-{i}", "type": "RegisterCustomer", "aggregate_id": f"c-{tag}-{i}",
             "payload": {"name": f"Customer {i}", "email": f"c{i}.{tag}@example.com"},
             "metadata": {"correlation_id": f"bench-{tag}", "issuer": "bench.gateway"}} for i in range(count)]


@contextmanager
def commands_queue(exchange: str) -> Iterator[Callable[[int], None]]:
    """A topic exchange bound with ``#`` to a quorum queue of the same name, as ``cqrskit setup``
    declares them; yields ``settle(expected)``, which checks the queue holds that many, then purges."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(exchange, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(exchange, exchange, routing_key="#")

    def settle(expected: int) -> None:
        depth = channel.queue_declare(exchange, passive=True).method.message_count
        channel.queue_purge(exchange)
        if depth != expected:
            raise RuntimeError(f"{depth} messages in the queue, {expected} expected")

    try:
        yield settle
    finally:
        channel.queue_delete(exchange)
        channel.exchange_delete(exchange)
        connection.close()


# -- the gateway, served ----------------------------------------------------------------------
@contextmanager
def gateway(exchange: str, workers: int) -> Iterator[tuple[str, int]]:
    """``run_gateway`` in a process of its own (plus its uvicorn workers) on a free port."""
    from cqrskit.infra.settings import Settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(broker_url=AMQP_URL, database_url=ADMIN_URL, commands_exchange=exchange,
                        log_level="WARNING", log_format="json", insecure=True)  # a local benchmark
    env = {**os.environ, **settings.environment()}
    code = ("from cqrskit.infra.logs import configure_logging; from cqrskit.infra.settings import load_settings; "
            "from cqrskit.producers.gateway import run_gateway; from cqrskit.app.bootstrap import app_of; "
            "settings = load_settings(); configure_logging(settings); "
            f"run_gateway(settings, app_of(settings).registry, '127.0.0.1', {port}, workers={workers}, "
            "factory='cqrskit.app.processes:gateway_app')")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(port, process, log)
            yield "127.0.0.1", port
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def wait_until_up(port: int, process: subprocess.Popen, log: Any) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the gateway exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the gateway did not start within 30 s")


# -- HTTP clients: lean keep-alive HTTP/1.1, so that the client is not what is measured ------------
def post(path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def client(connection: Connection, requests: Sequence[bytes], latencies: list[float]) -> None:
    reader, writer = connection
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH.search(head)
            body = await reader.readexactly(int(match.group(1)) if match else 0)
            latencies.append(time.perf_counter() - started)
            if head[9:12] != b"202":
                raise RuntimeError(f"the gateway answered {head[:12]!r}: {body[:500]!r}")
    finally:
        writer.close()
        await writer.wait_closed()


async def connect(address: tuple[str, int], count: int) -> list[Connection]:
    """``count`` keep-alive connections, opened one by one as a client pool would (opened all at
    once, the first uvicorn worker to wake accepts every one of them)."""
    connections = []
    for _ in range(count):
        connections.append(await asyncio.open_connection(*address))
        await asyncio.sleep(0.01)
    return connections


def http_rate(address: tuple[str, int], requests: Sequence[bytes], clients: int,
              commands: int) -> tuple[float, list[float]]:
    """Commands per second, and every request's latency, with ``clients`` connections."""
    latencies: list[float] = []

    async def run() -> float:
        shares = [share for share in (requests[i::clients] for i in range(clients)) if share]
        connections = await connect(address, len(shares))
        started = time.perf_counter()
        await asyncio.gather(*(client(c, share, latencies) for c, share in zip(connections, shares)))
        return time.perf_counter() - started

    return commands / asyncio.run(run()), latencies


# -- the raw producer -----------------------------------------------------------------------------
def publish_rate(exchange: str, messages: Sequence[Any], threads: int) -> float:
    """``AmqpPublisher.publish`` (a confirm each) from ``threads`` threads sharing one publisher."""
    from cqrskit.infra.amqp import AmqpPublisher

    with AmqpPublisher(AMQP_URL, exchange) as publisher:
        publisher.publish(messages[0])  # connected, confirm channel open
        shares = [messages[1:][i::threads] for i in range(threads)]
        workers = [threading.Thread(target=publish_each, args=(publisher, share)) for share in shares]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
    return (len(messages) - 1) / elapsed


def publish_each(publisher: Any, messages: Sequence[Any]) -> None:
    for message in messages:
        publisher.publish(message)


def publish_many_rate(exchange: str, messages: Sequence[Any]) -> float:
    from cqrskit.infra.amqp import AmqpPublisher

    with AmqpPublisher(AMQP_URL, exchange, window=1000) as publisher:
        publisher.publish(messages[0])
        started = time.perf_counter()
        report = publisher.publish_many(messages[1:])
        elapsed = time.perf_counter() - started
    if report.failed:
        raise RuntimeError(f"publish_many: {len(report.failed)} not confirmed")
    return (len(messages) - 1) / elapsed


# -- measuring ------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, console: Console) -> dict[str, Rates]:
    from cqrskit.infra.envelope import CommandEnvelope
    from cqrskit.producers.commands import outgoing

    exchange = f"bench.{uuid.uuid4().hex[:10]}.gateway"
    bodies = [json.dumps(c).encode() for c in commands(args.commands)]
    one = [post("/commands", b) for b in bodies]
    batches = [post("/commands/batch", b"[" + b",".join(bodies[i:i + args.batch]) + b"]")
               for i in range(0, len(bodies), args.batch)]
    messages = [outgoing(CommandEnvelope.model_validate_json(b)) for b in bodies]
    rates = {ONE: Rates(), BATCH: Rates()}
    with commands_queue(exchange) as settle, gateway(exchange, args.workers) as address:
        http_rate(address, one[: args.clients * 4], args.clients, args.clients * 4)  # warm-up: every worker
        settle(args.clients * 4)
        for round_ in range(args.runs):
            rate, latencies = http_rate(address, one, args.clients, len(bodies))
            settle(len(bodies))
            rates[ONE].ours.append(rate)
            rates[ONE].p50_ms.append(1000 * statistics.median(latencies))
            rates[ONE].p99_ms.append(1000 * statistics.quantiles(latencies, n=100)[98])
            rates[ONE].raw.append(publish_rate(exchange, messages, args.clients))
            settle(len(messages))
            batch_clients = min(args.clients, len(batches))
            rates[BATCH].ours.append(http_rate(address, batches, batch_clients, len(bodies))[0])
            settle(len(bodies))
            rates[BATCH].raw.append(publish_many_rate(exchange, messages))
            settle(len(messages))
            console.print(f"round {round_ + 1}/{args.runs}: gateway {rate:,.0f}/s, "
                          f"publish {rates[ONE].raw[-1]:,.0f}/s, batch {rates[BATCH].ours[-1]:,.0f}/s, "
                          f"publish_many {rates[BATCH].raw[-1]:,.0f}/s")
    return rates


def table(rates: dict[str, Rates], args: argparse.Namespace) -> Table:
    out = Table(title=f"command gateway vs raw producer (medians of {args.runs}, commands per second)",
                show_lines=True)
    for column, justify in (("measurement", "left"), ("gateway", "right"), ("raw producer", "left"),
                            ("raw", "right"), ("ratio", "right"), ("note", "left")):
        out.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    one, batch = rates[ONE], rates[BATCH]
    med = statistics.median
    out.add_row(ONE, f"{med(one.ours):,.0f}", f"AmqpPublisher.publish from {args.clients} threads",
                f"{med(one.raw):,.0f}", f"{med(one.ours) / med(one.raw):.2f}x",
                f"{args.clients} keep-alive clients, {args.workers} uvicorn worker(s); "
                f"latency p50 {med(one.p50_ms):.1f} ms, p99 {med(one.p99_ms):.1f} ms")
    out.add_row(BATCH, f"{med(batch.ours):,.0f}", "AmqpPublisher.publish_many (1,000 in flight)",
                f"{med(batch.raw):,.0f}", f"{med(batch.ours) / med(batch.raw):.2f}x",
                f"{args.batch} commands per request")
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=5000, help="commands per measurement")
    parser.add_argument("--clients", type=int, default=32,
                        help="concurrent HTTP clients (and publishing threads)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes of the gateway (on 2 cores, 2 were no faster)")
    parser.add_argument("--batch", type=int, default=100, help="commands per batch request")
    parser.add_argument("--runs", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.commands, args.clients, args.workers, args.runs = 300, 8, 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import Settings

    args = parse(argv)
    configure_logging(Settings(log_level="WARNING"))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"[bold]cores[/bold] {os.cpu_count()} | [bold]load average[/bold] "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    started = time.perf_counter()
    console.print(table(measure(args, console), args))
    console.print(f"measured in {time.perf_counter() - started:.0f} s; load average now "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
