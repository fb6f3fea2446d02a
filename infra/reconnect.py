"""A worker whose broker is down says so once per attempt, with a growing delay, not in a flood.

Dramatiq restarts each consumer thread (one per queue) every 3 s after a connection error and
logs two lines each time, and pika logs four more with tracebacks per failed attempt.
``ConsumeBackoff`` makes the consumers of one broker share one backoff (1 s, 2 s, 4 s... up to
30 s) and log one line per attempt: ``broker_unreachable`` with the endpoint (password masked),
the attempt and the next delay; ``broker_reachable`` once it answers again. ``quiet_restarts``
is the log filter that drops Dramatiq's own two lines (``cqrskit.infra.logs`` installs it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import structlog
from dramatiq.errors import BrokerConnectionError

log = structlog.get_logger(__name__)
FIRST_DELAY, MAX_DELAY = 1.0, 30.0


class ConsumeBackoff:
    """Mixin for a Dramatiq ``RabbitmqBroker``: a shared backoff between failed ``consume`` calls."""

    endpoint: str = "?"

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        state = self._backoff_state()
        with state["lock"]:
            wait = state["next_at"] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            consumer = super().consume(queue_name, prefetch=prefetch, timeout=timeout)  # type: ignore[misc]
        except BrokerConnectionError as exc:
            self._failed(state, exc)
            raise
        with state["lock"]:
            if state["attempt"]:
                log.info("broker_reachable", endpoint=self.endpoint, after_attempts=state["attempt"])
                state["attempt"], state["next_at"] = 0, 0.0
        return consumer

    def consume_failed(self, exc: BaseException) -> None:
        """A consumer lost its connection before it consumed anything: count it as a failed attempt."""
        self._failed(self._backoff_state(), exc)

    def _backoff_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_consume_backoff")
        if state is None:
            state = self.__dict__.setdefault("_consume_backoff", {"lock": threading.Lock(), "attempt": 0, "next_at": 0.0})
        return state

    def _failed(self, state: dict[str, Any], exc: BaseException) -> None:
        with state["lock"]:
            if time.monotonic() < state["next_at"]:
                return  # another consumer of this broker already reported this attempt
            state["attempt"] += 1
            delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (state["attempt"] - 1))
            state["next_at"] = time.monotonic() + delay
            log.warning("broker_unreachable", endpoint=self.endpoint, attempt=state["attempt"],
                        retry_in_seconds=delay, error=_first_line(exc))


def _first_line(exc: BaseException) -> str:
    cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}"[:200] if text else type(cause).__name__


RESTART_DELAY, ACK_RETRY_DELAY = 0.2, 0.2


def quick_restarts() -> None:
    """Dramatiq pauses 3 s before it restarts a consumer whose connection was lost, and a worker
    thread whose acknowledgement failed retries it every 5 s: after a node of a cluster dies,
    its consumers would wait 3 s to resume on the next node and its threads 5 s to take the next
    message. ``ConsumeBackoff`` paces the attempts while no node answers, so both pauses shrink
    to 0.2 s (Dramatiq reads them as module globals, for every broker of the process)."""
    import dramatiq.worker

    dramatiq.worker.CONSUMER_RESTART_DELAY_SECS = RESTART_DELAY
    dramatiq.worker.POST_PROCESS_MESSAGE_RETRY_DELAY_SECS = ACK_RETRY_DELAY


_DRAMATIQ_RESTARTS = ("Consumer encountered a connection error", "Restarting consumer in")


def quiet_restarts(record: logging.LogRecord) -> bool:
    """A log filter: False for Dramatiq's own lines about restarting a consumer after a
    connection error (``ConsumeBackoff`` reports each attempt once)."""
    return not (record.name.startswith("dramatiq.worker.ConsumerThread")
                and isinstance(record.msg, str) and record.msg.startswith(_DRAMATIQ_RESTARTS))
