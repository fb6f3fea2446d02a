"""What the command path costs below cqrskit's own code, measured in the bench's run.

- ``noop_worker``: a Dramatiq factory (``dramatiq bench.floor:noop_worker``) for a command worker
  process that is cqrskit's in every way (broker, consumer, middleware, actor name, queue) except
  that its actor does nothing. Draining the shop mix with it gives Dramatiq's floor: the rate and
  the worker CPU per message of Dramatiq with pika before any command is decided.
- ``ServiceCpu``: the CPU PostgreSQL and RabbitMQ spent during a drain, read from ``/proc``
  (Linux; empty elsewhere): PostgreSQL's backends of the bench's database plus its shared WAL
  writer, checkpointer and background writer; RabbitMQ's whole ``beam.smp``. Other sessions on
  the machine add to the shared processes' figures.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
POSTGRES_SHARED = ("walwriter", "checkpointer", "background writer")


def noop_worker() -> None:
    """Dramatiq factory: cqrskit's command worker with an actor that does nothing."""
    import dramatiq

    from cqrskit.app import bootstrap
    from cqrskit.infra.broker import COMMAND_ACTOR, make_broker
    from cqrskit.infra.settings import load_settings
    from cqrskit.workers.middleware import DeadOutcomes, LogContext

    settings = load_settings()
    runtime = bootstrap.runtime(settings, pool_size=1)  # never connects: the actor does nothing
    broker = make_broker(settings, extra_middleware=[LogContext(), DeadOutcomes(runtime)])

    def execute_command(body_b64: str, routing_key: str | None = None, producer: str | None = None,
                        on_behalf_of: str | None = None) -> None:
        return None

    dramatiq.actor(execute_command, broker=broker, actor_name=COMMAND_ACTOR, queue_name=settings.commands_queue,
                   max_retries=settings.max_retries)


def _ticks(pid: str, database: str) -> tuple[str, int] | None:
    """(what the process is, its CPU ticks so far), or None for a process of no interest:
    RabbitMQ, and PostgreSQL's backends of ``database`` and its shared writers."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    if stat[stat.index("(") + 1:stat.rindex(")")] == "beam.smp":
        return "rabbitmq", ticks
    ours = f" {database} " in title or any(f": {name}" in title for name in POSTGRES_SHARED)
    if title.startswith("postgres: ") and ours:
        return "postgres", ticks
    return None


@dataclass
class ServiceCpu:
    """CPU seconds of PostgreSQL (``database``'s backends and the shared writers) and RabbitMQ
    between ``start`` and ``stop``, summed over the intervals measured."""

    database: str
    seconds: dict[str, float] = field(default_factory=lambda: {"postgres": 0.0, "rabbitmq": 0.0})
    _start: dict[str, tuple[str, int]] = field(default_factory=dict)

    def _snapshot(self) -> dict[str, tuple[str, int]]:
        if not os.path.isdir("/proc"):
            return {}
        found = {pid: _ticks(pid, self.database) for pid in os.listdir("/proc") if pid.isdigit()}
        return {pid: got for pid, got in found.items() if got is not None}

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> None:
        for pid, (kind, ticks) in self._snapshot().items():
            before = self._start.get(pid, (kind, 0))[1]  # a backend born during the drain: all of it
            self.seconds[kind] += (ticks - before) / HZ


def wait_until_empty(queue: str, channel_factory, workers: subprocess.Popen, timeout: float) -> float:  # type: ignore[no-untyped-def,type-arg]
    """Poll the queue until no message is ready; the wall-clock time it was seen empty. The
    messages the workers still hold then (their prefetch) take a no-op actor milliseconds."""
    deadline = time.monotonic() + timeout
    with channel_factory() as channel:
        while time.monotonic() < deadline:
            if workers.poll() is not None:
                raise RuntimeError(f"no-op workers exited with status {workers.returncode}")
            if channel.queue_declare(queue, passive=True).method.message_count == 0:
                return time.time()
            time.sleep(0.02)
    raise TimeoutError(f"{queue} not drained after {timeout:.0f} s")
