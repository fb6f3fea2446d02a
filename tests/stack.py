"""The whole pipeline as real processes, for the read side's process-level tests.

A ``Stack`` runs what the Procfile runs, each as its own process group logging JSON to a file:
command workers (``dramatiq cqrskit.app.processes:command_worker``), the event relay (``cqrskit relay``) and indexers
(``dramatiq cqrskit.app.processes:indexer_worker``), on one test's PostgreSQL database, RabbitMQ exchanges and
queues and index prefix, against a search server given by URL. It publishes commands with the
product's ``CommandProducer``, runs ``cqrskit`` commands as subprocesses, and knows when the
pipeline has drained:

- every command sent has an outcome (the write store);
- the relay's lag is zero: every committed event was published and fed to the indexer queue
  (the relay enqueues a batch, confirmed, before it moves its checkpoint);
- the indexer queue and its delay queue hold no message, ready or unacknowledged. AMQP only
  tells ready messages; ``rabbitmqctl`` tells both. An indexer acknowledges a batch after it
  is written, and Dramatiq enqueues a retry (or a delayed message coming due) before it
  acknowledges the original, so a batch is always counted somewhere; the condition must hold
  on two polls in a row because the two queues are not read in one instant.

Then ``verify`` compares every read model with a fresh projection from the write store.
Waiting is bounded polling against a deadline, never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch

from cqrskit.app.bootstrap import load_app
from cqrskit.infra.envelope import CommandEnvelope
from cqrskit.infra.settings import Settings
from cqrskit.app.setup import setup_all
from cqrskit.producers.commands import CommandProducer
from cqrskit.examples.shop.load import ShopLoad
from cqrskit.read_models.indices import alias
from cqrskit.read_models.parking import list_parked
from cqrskit.read_models.search import make_client
from cqrskit.read_models.verify import VerifyReport, verify
from tests.processes import PROJECT, WorkerProcess, WriteStore, worker_env
from cqrskit.infra.topology import indexer_partitions, indexer_queues
from cqrskit.workers.relay import relay_lag

POLL = 0.05
QUEUE_POLL = 0.3


def queue_depths(names: Sequence[str]) -> dict[str, int]:
    """Messages (ready + unacknowledged) in each named queue; absent queues count 0."""
    output = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages"],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    depths = dict.fromkeys(names, 0)
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in depths and parts[1].isdigit():
            depths[parts[0]] = int(parts[1])
    return depths


def unread_request_bytes(port: int) -> int:
    """Bytes sent to a local server on ``port`` that it has not read yet (the receive queues of
    its established IPv4 sockets, from /proc/net/tcp): with the server stopped, > 0 means a
    request is in flight."""
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, queues = int(fields[1].split(":")[1], 16), fields[3], fields[4]
        if local_port == port and state == "01":  # ESTABLISHED
            unread += int(queues.split(":")[1], 16)
    return unread


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


class LoadRunner(threading.Thread):
    """Sends a shop load phase by phase from a thread (each phase waits for its outcomes, since
    a later phase refers to what an earlier one created); ``join`` re-raises its failure. With
    ``hold_before``, it stops before that phase (``holding`` is set) until ``release()``."""

    def __init__(self, stack: Stack, load: ShopLoad, timeout: float, hold_before: str | None = None) -> None:
        super().__init__(name="shop-load", daemon=True)
        self.stack, self.load, self.timeout, self.hold_before = stack, load, timeout, hold_before
        self.command_ids: list[str] = []
        self.phases_done: list[str] = []
        self.error: BaseException | None = None
        self.holding, self.released = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            for name, envelopes in self.load.phases():
                if name == self.hold_before:
                    self.holding.set()
                    if not self.released.wait(self.timeout):
                        raise AssertionError(f"the load was held before {name} for {self.timeout}s")
                self.command_ids += self.stack.send_and_wait(envelopes, self.timeout)
                self.phases_done.append(name)
        except BaseException as exc:  # handed to the test by join()
            self.error = exc

    def release(self) -> None:
        self.released.set()

    def join(self, timeout: float | None = None) -> None:  # type: ignore[override]
        super().join(timeout)
        if self.is_alive():
            raise AssertionError(f"the shop load still runs after {timeout}s (done: {self.phases_done})")
        if self.error is not None:
            raise self.error


@dataclass
class Stack:
    """One test's pipeline; see the module docstring. ``close`` kills every process it started."""

    settings: Settings
    directory: Path
    started: list[WorkerProcess] = field(default_factory=list)
    commands: list[subprocess.Popen[bytes]] = field(default_factory=list)  # cqrskit runs in the background

    def __post_init__(self) -> None:
        self.write_store = WriteStore(self.settings.database_url, load_app(self.settings.app).registry)
        self.es: Elasticsearch = make_client(self.settings.elasticsearch_url, settings=self.settings)
        self._producer: CommandProducer | None = None

    @classmethod
    def create(cls, base: Settings, search_url: str, directory: Path) -> Stack:
        """``cqrskit setup`` (write store, broker topology, indices) for ``base`` on ``search_url``."""
        settings = base.model_copy(update={"elasticsearch_url": search_url, "min_backoff_ms": 50,
                                           "max_backoff_ms": 1000})
        setup_all(settings, say=lambda _line: None)
        return cls(settings, directory)

    # -- processes ---------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        return worker_env(s, CQRSKIT_APP=s.app, CQRSKIT_ELASTICSEARCH_URL=s.elasticsearch_url,
                          CQRSKIT_EVENTS_EXCHANGE=s.events_exchange, CQRSKIT_INDEXER_QUEUE=s.indexer_queue,
                          CQRSKIT_INDEX_PREFIX=s.index_prefix, CQRSKIT_INDEXER_PARTITIONS=str(s.indexer_partitions),
                          COLUMNS="240", **extra)

    def start_worker(self, threads: int = 4) -> WorkerProcess:
        queue = self.settings.commands_queue
        return self._spawn("worker", ["-m", "dramatiq", "cqrskit.app.processes:command_worker", "-p", "1", "-t", str(threads),
                                      "--queues", queue, f"{queue}.DQ"])

    def start_relay(self) -> WorkerProcess:
        return self._spawn("relay", ["-m", "cqrskit.app", "relay"])

    def start_indexer(self, threads: int = 2, partitions: list[int] | None = None) -> WorkerProcess:
        """An indexer process consuming ``partitions`` (default: every one)."""
        return self._spawn("indexer", ["-m", "dramatiq", "cqrskit.app.processes:indexer_worker", "-p", "1", "-t", str(threads),
                                       "--queues", *indexer_queues(self.settings, partitions)])

    def _spawn(self, kind: str, args: list[str]) -> WorkerProcess:
        same_kind = sum(p.log_path.name.startswith(kind) for p in self.started)
        log_path = self.directory / f"{kind}-{same_kind}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen([sys.executable, *args], cwd=PROJECT, env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        process = WorkerProcess(popen, log_path)
        self.started.append(process)
        return process

    @staticmethod
    def stop(process: WorkerProcess, timeout: float = 30.0) -> None:
        """SIGTERM the process group and wait for it to exit (SIGKILL if it will not)."""
        if process.alive:
            os.killpg(process.popen.pid, signal.SIGTERM)
            try:
                process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        process.kill()

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``cqrskit ARGS`` as an operator runs it, with this stack's environment."""
        return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def start_cli(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        """``cqrskit ARGS`` in the background; returns the process and the file of its output."""
        output = self.directory / f"cli-{'-'.join(args)}-{time.monotonic_ns()}.txt"
        with output.open("wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, env=self.env(),
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.commands.append(popen)
        return popen, output

    # -- commands ----------------------------------------------------------------------------
    @property
    def producer(self) -> CommandProducer:
        if self._producer is None:
            self._producer = CommandProducer.from_settings(self.settings)
        return self._producer

    def send(self, envelopes: Sequence[CommandEnvelope]) -> list[str]:
        """Publish with confirms; every command must be confirmed. Not thread-safe: one sender."""
        report = self.producer.send_many(envelopes)
        assert not report.failed and report.confirmed == len(envelopes), report.failed[:5]
        return [e.command_id for e in envelopes]

    def send_and_wait(self, envelopes: Sequence[CommandEnvelope], timeout: float = 120.0) -> list[str]:
        ids = self.send(envelopes)
        self.write_store.wait_for_outcomes(ids, timeout=timeout)
        return ids

    def start_load(self, load: ShopLoad, timeout: float = 180.0,
                   hold_before: str | None = None) -> LoadRunner:
        runner = LoadRunner(self, load, timeout, hold_before)
        runner.start()
        return runner

    def outcome_counts(self, command_ids: Sequence[str]) -> Counter[str]:
        return Counter(o.status.value for o in self.write_store.outcomes(command_ids).values())

    def assert_load_outcomes(self, load: ShopLoad, command_ids: Sequence[str]) -> None:
        """Every command of ``load`` has the fate the load expects (nothing dead, nothing lost)."""
        counts = self.outcome_counts(command_ids)
        expected = Counter(load.expected)
        expected["succeeded"] = len(command_ids) - sum(load.expected.values())
        assert counts == expected, (counts, expected)

    # -- the read side -----------------------------------------------------------------------
    @property
    def indexer_queues(self) -> list[str]:
        return indexer_queues(self.settings)

    def indexer_backlog(self) -> int:
        return sum(queue_depths(self.indexer_queues).values())

    def dead_indexer_batches(self) -> int:
        """Indexer messages Dramatiq gave up on (its dead-letter queue)."""
        names = [f"{p.queue}.XQ" for p in indexer_partitions(self.settings)]
        return sum(queue_depths(names).values())

    def wait_drained(self, timeout: float = 120.0, relay: bool = True) -> None:
        """Wait until the relay has relayed everything (unless ``relay`` is False: batches were
        enqueued by the test) and the indexer queues are empty, twice in a row."""
        deadline = time.monotonic() + timeout
        empty_polls = 0
        while empty_polls < 2:
            if time.monotonic() > deadline:
                lag = relay_lag(self.write_store.engine) if relay else None
                raise AssertionError(f"not drained after {timeout}s: relay lag {lag}, "
                                     f"indexer queues {queue_depths(self.indexer_queues)}")
            relayed = not relay or relay_lag(self.write_store.engine).events == 0
            drained = relayed and self.indexer_backlog() == 0
            empty_polls = empty_polls + 1 if drained else 0
            time.sleep(QUEUE_POLL)

    def verify(self) -> list[VerifyReport]:
        engine, registry = self.write_store.engine, self.write_store.store.registry
        prefix = self.settings.index_prefix
        models = load_app(self.settings.app).read_models  # the app the stack's processes run
        return [verify(engine, registry, self.es, prefix, model) for model in models]

    def assert_converged(self) -> list[VerifyReport]:
        """Every read model equals a fresh projection of the write store (G6), nothing parked and
        no indexer batch dead-lettered."""
        reports = self.verify()
        summary = {r.read_model: (r.checked, r.missing[:5], r.extra[:5], dict(list(r.different.items())[:5]))
                   for r in reports if not r.ok}
        assert not summary, f"read models differ from the write store: {summary}"
        assert list_parked(self.write_store.engine) == []
        assert self.dead_indexer_batches() == 0
        return reports

    def live_indices(self, model: str) -> set[str]:
        return set(self.es.indices.get_alias(name=alias(self.settings.index_prefix, model)))

    def close(self) -> None:
        for process in self.started:
            process.kill()
        for command in self.commands:
            command.kill()
            command.wait(timeout=30)
        if self._producer is not None:
            self._producer.close()
        try:
            names = list(self.es.indices.get(index=f"{self.settings.index_prefix}-*"))
            if names:
                self.es.indices.delete(index=",".join(names), ignore_unavailable=True)
        except (ApiError, TransportError):  # the search server may be the thing a test killed
            pass
        self.es.close()
        self.write_store.close()

