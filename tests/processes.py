"""Real command-worker processes and a plain-pika producer, for the process-level tests.

The producer here follows only the documented AMQP contract (docs/commands.md): a JSON envelope
published to the commands exchange (topic, durable) with the command type as routing key,
persistent, ``application/json``, ``message_id`` = command id, publisher confirms and
``mandatory``. It uses nothing of ``producers/``, as a producer in another language would not.

Waiting is bounded polling against a deadline (outcomes in the write store, lines in a worker's
log, messages in a queue), never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from cqrskit.domain.registry import Registry
from cqrskit.examples.shop.domain import registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.outcomes import Outcome
from cqrskit.infra.schema import command_outcomes, events
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore

PROJECT = Path(__file__).resolve().parent.parent
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux only
POLL = 0.05
PORT_BANDS = range(20000, 32000, 1000)  # below Linux's ephemeral ports (32768 and up)


def port_bands() -> list[int]:
    """The first ports of the 1,000-port bands this test process may choose fixed ports in (honcho's
    ``$PORT`` and its hundreds): under pytest-xdist, worker ``gwN`` of ``M`` gets every M-th band
    from the N-th, so that two workers never pick the same ports, even while one's processes are
    still booting and have bound nothing yet; without xdist, every band."""
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return list(PORT_BANDS[index % len(PORT_BANDS) :: count])


# -- worker processes -------------------------------------------------------------------------
def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker for ``settings`` (plus ``extra`` CQRSKIT_* overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env.update(
        CQRSKIT_DATABASE_URL=settings.database_url,
        CQRSKIT_BROKER_URL=settings.broker_url,
        CQRSKIT_COMMANDS_EXCHANGE=settings.commands_exchange,
        CQRSKIT_COMMANDS_QUEUE=settings.commands_queue,
        CQRSKIT_QUEUE_TYPE=settings.queue_type.value,
        CQRSKIT_MIN_BACKOFF_MS=str(settings.min_backoff_ms),
        CQRSKIT_MAX_BACKOFF_MS=str(settings.max_backoff_ms),
        CQRSKIT_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """One ``dramatiq cqrskit.app.processes:command_worker`` process group (the parent and its worker children)."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the dramatiq parent and every worker child) and reap."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=30)
        _wait_group_gone(self.popen.pid)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def children(self) -> list[int]:
        """The pids of the worker processes Dramatiq forked (the group minus the parent)."""
        return [pid for pid in _group_members(self.popen.pid) if pid != self.popen.pid]

    def threads_blocked_writing(self) -> int:
        """How many threads of the worker processes are blocked writing to a full pipe."""
        blocked = 0
        for pid in self.children():
            for wchan in _thread_wait_channels(pid):
                blocked += "pipe_write" in wchan
        return blocked

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (Dramatiq's own plain lines are skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(record, dict) and "event" in record:
                records.append(record)
        return records

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` JSON log records satisfy ``predicate``; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.log_records() if predicate(r)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(found)} of {count} log records after {timeout}s; log:\n{self.tail()}"
                )
            time.sleep(POLL)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _thread_wait_channels(pid: int) -> list[str]:
    channels = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            channels.append((task / "wchan").read_text())
    except OSError:
        pass
    return channels


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no live process of group ``pgid`` is left (children die asynchronously after -9;
    zombies left to a non-reaping init count as gone)."""
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process group {pgid} still has processes {timeout}s after SIGKILL")
        time.sleep(POLL)


@dataclass
class Workers:
    """Starts command-worker processes for one test and kills every one of them at the end."""

    settings: Settings
    directory: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(
        self, threads: int = 4, processes: int = 1, *, stall_logs: bool = False, **env: str
    ) -> WorkerProcess:
        """Start ``dramatiq cqrskit.app.processes:command_worker`` on the commands queue and its delay queue, logging JSON
        to a file. With ``stall_logs`` its output goes to a pipe nobody reads: once ~70 KB are
        written every worker thread blocks on its next log line, which for a command that
        succeeded is written after its commit and before its ack."""
        queue = self.settings.commands_queue
        log_path = self.directory / f"worker-{len(self.started)}.log"
        command = [
            sys.executable,
            "-m",
            "dramatiq",
            "cqrskit.app.processes:command_worker",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            queue,
            f"{queue}.DQ",
        ]
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                command,
                cwd=PROJECT,
                env=worker_env(self.settings, **env),
                stdout=subprocess.PIPE if stall_logs else log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if popen.stdout is not None:
            fcntl.fcntl(popen.stdout.fileno(), F_SETPIPE_SZ, 4096)
        worker = WorkerProcess(popen, log_path)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()


def declare_topology(settings: Settings) -> None:
    """What ``cqrskit setup`` declares on the broker: exchange, queues, binding."""
    from cqrskit.infra.broker import make_broker
    from cqrskit.infra.topology import declare_command_topology

    broker = make_broker(settings)
    try:
        declare_command_topology(broker, settings)
    finally:
        broker.close()


# -- a producer that knows only the documented contract -----------------------------------------
def envelope(
    type: str, aggregate_id: str, payload: dict[str, Any], command_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A command envelope as a producer writes it (a fresh UUID command id unless given)."""
    body = {
        "envelope_version": 1,
        "command_id": command_id or str(uuid.uuid4()),
        "type": type,
        "aggregate_id": aggregate_id,
        "payload": payload,
        "metadata": {"issuer": "tests.processes", "issued_at": "2026-11-22T10:00:00Z"},
    }
    body.update(extra)
    return body


class PikaProducer:
    """Publishes to the commands exchange with plain pika: confirms, mandatory, persistent."""

    def __init__(self, url: str, exchange: str) -> None:
        params = pika.URLParameters(url)
        params.heartbeat = 10
        params.blocked_connection_timeout = 30
        self.exchange = exchange
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish_bytes(self, body: bytes, routing_key: str, message_id: str | None = None) -> None:
        """Returns once the broker confirmed; raises pika's UnroutableError / NackError otherwise."""
        properties = pika.BasicProperties(
            delivery_mode=2, content_type="application/json", message_id=message_id
        )
        self.channel.basic_publish(self.exchange, routing_key, body, properties, mandatory=True)

    def publish(self, command: dict[str, Any]) -> str:
        self.publish_bytes(json.dumps(command).encode(), command["type"], command["command_id"])
        return command["command_id"]

    def publish_all(self, commands: Iterable[dict[str, Any]]) -> list[str]:
        return [self.publish(command) for command in commands]

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@contextmanager
def producer(settings: Settings) -> Iterator[PikaProducer]:
    publisher = PikaProducer(settings.broker_url, settings.commands_exchange)
    try:
        yield publisher
    finally:
        publisher.close()


def drain_queue(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Take (and ack) every message currently in ``queue``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        taken = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))
    finally:
        connection.close()


def wait_for_dead_letters(url: str, queue: str, count: int, timeout: float = 30.0) -> list[bytes]:
    """Wait until ``count`` messages have been taken from the dead-letter queue ``queue``."""
    deadline = time.monotonic() + timeout
    bodies: list[bytes] = []
    while True:
        bodies += [body for _props, body in drain_queue(url, queue)]
        if len(bodies) >= count:
            return bodies
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(bodies)} of {count} dead letters in {queue} after {timeout}s")
        time.sleep(POLL)


# -- the write store, as the tests read it -------------------------------------------------------
class WriteStore:
    """Reads outcomes and events of one test's database."""

    def __init__(self, database_url: str, domain: Registry = registry) -> None:
        self.engine: Engine = make_engine(database_url, pool_size=2)
        self.store = EventStore(self.engine, domain)

    def close(self) -> None:
        self.engine.dispose()

    def outcomes(self, command_ids: Sequence[str]) -> dict[str, Outcome]:
        found: dict[str, Outcome] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(command_ids), 1000):
                chunk = list(command_ids[start : start + 1000])
                rows = conn.execute(
                    sa.select(command_outcomes).where(command_outcomes.c.command_id.in_(chunk))
                )
                found.update((row.command_id, Outcome.from_row(row._mapping)) for row in rows)
        return found

    def count_outcomes(self, command_ids: Sequence[str] | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(command_outcomes)
        if command_ids is not None:
            query = query.where(command_outcomes.c.command_id.in_(list(command_ids)))
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def wait_for_outcomes(self, command_ids: Sequence[str], timeout: float = 60.0) -> dict[str, Outcome]:
        """Every id's outcome, waiting (bounded) until all exist; AssertionError names the missing."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.outcomes(command_ids)
            if len(found) == len(set(command_ids)):
                return found
            if time.monotonic() > deadline:
                missing = [c for c in command_ids if c not in found]
                raise AssertionError(
                    f"{len(missing)} commands without an outcome after {timeout}s, e.g. {missing[:5]}"
                )
            time.sleep(POLL)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(POLL)

    def events_by_command(self) -> dict[str, list[str]]:
        """Event types recorded for each command id (from the events' metadata), in position order."""
        query = sa.select(events.c.metadata["command_id"].as_string(), events.c.type).order_by(
            events.c.position
        )
        result: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for command_id, type_ in conn.execute(query):
                result.setdefault(command_id, []).append(type_)
        return result

    def stream(self, stream_id: str) -> list[Any]:
        return self.store.read_stream(stream_id)

    def stream_version(self, stream_id: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT version FROM streams WHERE stream_id = :s"), {"s": stream_id}
            ).scalar()


# -- fixtures (imported by the process-level test modules) ---------------------------------------
@pytest.fixture
def commands_topology(amqp_settings: Settings) -> Settings:
    """``amqp_settings`` with the command topology declared, as ``cqrskit setup`` does."""
    declare_topology(amqp_settings)
    return amqp_settings


@pytest.fixture
def workers(commands_topology: Settings, tmp_path: Path) -> Iterator[Workers]:
    """Starts worker processes on the test's topology; every one is SIGKILLed at the end."""
    started = Workers(commands_topology, tmp_path)
    yield started
    started.kill_all()


@pytest.fixture
def write_store(pg_url: str) -> Iterator[WriteStore]:
    reader = WriteStore(pg_url)
    yield reader
    reader.close()
