"""The Procfile stack as an operator runs it: ``honcho start -c commands=2,indexer=2`` on real
PostgreSQL, RabbitMQ and osmem, every process type of the Procfile scaled by count alone.

A shop load of about 3,000 commands goes in phase by phase, half of each phase through the
gateway (``POST /commands/batch``) and half over AMQP (``CommandProducer``). Every command must
reach the outcome the load expects, every read model must equal a fresh projection of the write
store (``verify``), the query API (when the Procfile runs one) must serve the documents, each
worker process must serve its own metrics on its ``$PORT``, and SIGTERM to honcho must leave no
process of the stack behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from honcho.environ import expand_processes, parse_procfile

from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.schema import events
from cqrskit.infra.settings import Settings
from cqrskit.examples.shop.load import ShopLoad
from tests.processes import PROJECT, port_bands
from tests.stack import Stack, wait_until
from tests.test_ops import metric_samples, ready

pytestmark = pytest.mark.slow
CONCURRENCY = {"commands": 2, "indexer": 2}
SIZE = 2400  # about 3,100 commands
BATCH = 500
BIN = Path(sys.executable).parent


@pytest.fixture
def stack(amqp_settings: Settings, search_url: str, tmp_path: Path) -> Iterator[Stack]:
    built = Stack.create(amqp_settings, search_url, tmp_path)
    yield built
    built.close()


def procfile_ports(base: int) -> dict[str, int]:
    """The $PORT honcho gives each process (``commands.1``...), from the Procfile's order."""
    procfile = parse_procfile((PROJECT / "Procfile").read_text())
    return {p.name: int(p.env["PORT"]) for p in expand_processes(procfile.processes, CONCURRENCY, port=base)}


def free_base_port() -> int:
    """A base port such that every process's $PORT is free (in this test process's own bands)."""
    for base in port_bands():
        if all(_free(port) for port in procfile_ports(base).values()):
            return base
    raise AssertionError(f"no free range of ports for the Procfile in the bands {port_bands()}")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class Honcho:
    """``honcho start`` in its own session, its output in a file."""

    def __init__(self, stack: Stack, base: int, project: Path = PROJECT,
                 concurrency: dict[str, int] = CONCURRENCY, **env_overrides: str) -> None:
        """``honcho start`` of ``project``'s Procfile (and its .env), from ``project``'s directory."""
        self.log = stack.directory / "honcho.log"
        env = stack.env(PORT=str(base), PYTHONPATH=str(project), PATH=f"{BIN}:{os.environ['PATH']}",
                        CQRSKIT_INSECURE="true")  # local run: authentication is tested in test_http_auth.py
        env = {k: v for k, v in {**env, **env_overrides}.items() if v}
        scaled = ",".join(f"{name}={n}" for name, n in concurrency.items())
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen([str(BIN / "honcho"), "start", "-f", "Procfile", "-c", scaled,
                                           "--no-colour"], cwd=project, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.tag = f"CQRSKIT_INDEX_PREFIX={stack.settings.index_prefix}".encode()

    def stop(self) -> None:
        """SIGTERM honcho (it terminates each process type), then check nothing is left."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        finally:
            wait_until(lambda: not self.leftovers(), 15, "every process of the stack gone")

    def leftovers(self) -> list[int]:
        """Live processes carrying this stack's environment (whatever their parent)."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and self.tag in (entry / "environ").read_bytes().split(b"\0") \
                        and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def send_through_gateway(client: httpx.Client, envelopes: list[CommandEnvelope]) -> list[str]:
    ids = []
    for start in range(0, len(envelopes), BATCH):
        chunk = envelopes[start:start + BATCH]
        body = b"[" + b",".join(e.to_json() for e in chunk) + b"]"
        response = client.post("/commands/batch", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 202, response.text[:2000]
        assert response.json()["confirmed"] == len(chunk), response.text[:2000]
        ids += [e.command_id for e in chunk]
    return ids


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return metric_samples(response.read().decode())


def summed(ports: list[int], name: str) -> float:
    return sum(scrape(port).get(name, 0.0) for port in ports)


@pytest.mark.timeout(180)
def test_the_procfile_stack_scaled_per_process_type_takes_commands_over_http_and_amqp(stack: Stack) -> None:
    base = free_base_port()
    ports = procfile_ports(base)
    honcho = Honcho(stack, base)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['gateway.1']}", timeout=60) as gateway:
            wait_until(lambda: _answers(gateway), 60, f"the gateway; honcho says:\n{honcho.tail()}")
            settings = stack.settings
            wait_until(lambda: ready_consumers(settings) == (2, 2), 180, f"2 command workers and 2 indexers "
                       f"consuming; honcho says:\n{honcho.tail()}")
            load = ShopLoad(size=SIZE, seed=11)
            command_ids: list[str] = []
            for _name, phase in load.phases():
                half = len(phase) // 2
                sent = send_through_gateway(gateway, phase[:half]) + stack.send(phase[half:])
                stack.write_store.wait_for_outcomes(sent, timeout=90)
                command_ids += sent
        assert len(command_ids) > 3000
        stack.assert_load_outcomes(load, command_ids)
        stack.wait_drained(timeout=90)
        stack.assert_converged()
        if "query.1" in ports:  # the query API, when the Procfile runs it
            assert_query_api_serves(ports["query.1"], load)
        assert_metrics(stack, ports, stack.outcome_counts(command_ids))
        assert honcho.popen.poll() is None, honcho.tail()
    finally:
        honcho.stop()
    assert "sending SIGTERM to commands.2" in honcho.log.read_text()


def assert_query_api_serves(port: int, load: ShopLoad) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as query:
        wait_until(lambda: _answers(query), 30, "the query API")
        order = query.get(f"/orders/{load.orders[1]}")
        assert order.status_code == 200 and order.json()["order_id"] == load.orders[1], order.text[:1000]


def _answers(gateway: httpx.Client) -> bool:
    try:
        return gateway.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def ready_consumers(settings: Settings) -> tuple[int, int]:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        return tuple(int(channel.queue_declare(q, passive=True).method.consumer_count)  # type: ignore[return-value]
                     for q in (settings.commands_queue, settings.indexer_queue))
    finally:
        connection.close()


def assert_metrics(stack: Stack, ports: dict[str, int], outcomes: Counter[str]) -> None:
    """Each process serves its own metrics on its $PORT; together they count every command and
    every event exactly once."""
    workers = [ports["commands.1"], ports["commands.2"]]
    indexers = [ports["indexer.1"], ports["indexer.2"]]
    with stack.write_store.engine.connect() as conn:
        total_events = conn.execute(sa.select(sa.func.count()).select_from(events)).scalar_one()
    for status in ("succeeded", "rejected", "invalid"):
        assert summed(workers, f'cqrskit_commands_total{{status="{status}"}}') == outcomes[status], status
    assert all(scrape(port).get('cqrskit_commands_total{status="succeeded"}', 0) > 0 for port in workers)
    relay: dict[str, Any] = scrape(ports["relay.1"])
    assert relay["cqrskit_relay_events_published_total"] == total_events
    assert (relay["cqrskit_relay_lag_events"], relay["cqrskit_relay_lease_held"]) == (0, 1)
    assert summed(indexers, "cqrskit_indexer_events_total") == total_events
    assert summed(indexers, 'cqrskit_indexer_documents_total{result="parked"}') == 0
    assert ready(stack.settings, f"{stack.settings.commands_queue}.XQ") == 0
