"""AMQP publisher with publisher confirms, a confirm window and reconnects (pika SelectConnection).

Contract (G1, producer side): a message counts as published only once the broker has confirmed it
(basic.ack, and not returned as unroutable). Anything else -- a nack, a return, a channel closed by the
broker, a confirm that does not arrive within ``confirm_timeout``, a connection lost beyond the reconnect
budget, a close -- is reported as not confirmed. Messages unconfirmed when a connection drops are
republished on the next connection, so delivery is at-least-once: consumers deduplicate by message id.
Given the nodes of a cluster (several URLs), a publisher starts on a random one and, when its
connection drops, connects to the next node at once: it waits (with backoff) only once every node
has failed in a row.

One IO thread per publisher owns the connection and all confirm bookkeeping; caller threads only append
to an outbox, wake the IO loop and wait on their own batch. At most ``window`` messages per publisher are
queued or unconfirmed at any time, which bounds memory and gives pipelined (windowed) confirms.
"""
from __future__ import annotations

import collections
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pika
from pika.adapters.select_connection import IOLoop

from cqrskit.infra.amqp_confirms import Batch, ConfirmLoop, Entry, OutgoingMessage

__all__ = ["AmqpPublisher", "CommandNotConfirmed", "OutgoingMessage", "PublishReport", "PublisherClosed"]


class CommandNotConfirmed(Exception):
    """Raised when the broker did not confirm a message: nacked, returned as unroutable, connection lost
    beyond the reconnect budget, or timed out."""

    def __init__(self, message_id: str | None, reason: str) -> None:
        super().__init__(f"message {message_id!r} not confirmed: {reason}")
        self.message_id = message_id
        self.reason = reason


class PublisherClosed(RuntimeError):
    """Raised when publishing on a publisher that was closed (a programming error, not a broker failure)."""


@dataclass
class PublishReport:
    confirmed: int
    failed: list[tuple[str | None, str]]  # (message_id, reason) for each message not confirmed


class AmqpPublisher(ConfirmLoop):
    """Publishes to one exchange with confirms; publish and publish_many may be called from many threads.

    Nothing connects before the first publish (or ``__enter__``). Every message handed to the publisher is
    eventually settled exactly once: confirmed, or failed with a reason.
    """

    def __init__(self, url: str | Sequence[str], exchange: str, *, window: int = 1000, confirm_timeout: float = 30.0,
                 heartbeat: int = 5, blocked_connection_timeout: float = 30.0,
                 reconnect_attempts: int = 5, mandatory: bool = True) -> None:
        if window < 1 or confirm_timeout <= 0 or reconnect_attempts < 0:
            raise ValueError("window >= 1, confirm_timeout > 0 and reconnect_attempts >= 0 are required")
        self.exchange = exchange
        self.connection_name = f"cqrskit-publisher-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        urls = url.split(",") if isinstance(url, str) else list(url)
        self._nodes = [self._node_parameters(u, heartbeat, blocked_connection_timeout, len(urls) > 1) for u in urls]
        self._node = random.randrange(len(self._nodes))  # where this publisher connects first (spread)
        # RabbitMQ checks user_id against the connection's user, so consumers can trust it (G11).
        self._user_id = self._nodes[0].credentials.username
        self.republished = 0  # messages requeued for republishing after a connection loss (observability)
        self._window, self._confirm_timeout = window, confirm_timeout
        self._reconnect_attempts = reconnect_attempts
        self._mandatory = mandatory  # False: a message no queue is bound for is confirmed, not returned
        self._tick = min(1.0, confirm_timeout / 4)  # how often confirm timeouts are checked
        self._lock = threading.Lock()  # guards start, close and appends to the outbox
        self._slots = threading.Condition()  # guards _in_flight (queued + unconfirmed messages)
        self._in_flight, self._wake_pending, self._closed = 0, False, False
        self._outbox: collections.deque[Entry] = collections.deque()
        self._ioloop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        # State below is owned by the IO thread.
        self._connection: pika.SelectConnection | None = None
        self._channel, self._ready, self._stopping = None, False, False
        self._pending: dict[int, Entry] = {}  # delivery tag -> entry, in tag order
        self._retry: collections.deque[Entry] = collections.deque()
        self._next_tag, self._low_tag, self._failures = 0, 1, 0
        self._reconnect_timer = None
        self._confirmed_at = self._nack_reconnect_at = 0.0

    def _node_parameters(self, url: str, heartbeat: int, blocked_timeout: float, cluster: bool) -> pika.URLParameters:
        params = pika.URLParameters(url.strip())
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = blocked_timeout
        params.connection_attempts = 1  # retries are ours, counted against reconnect_attempts
        if cluster:  # a node that does not answer is passed over for the next one within seconds
            params.socket_timeout, params.stack_timeout = 3.0, 6.0
        params.client_properties = {"connection_name": self.connection_name}
        return params

    @property
    def node(self) -> str:
        """host:port of the node this publisher is connected (or connecting) to."""
        return self._node_name()

    # ------------------------------------------------------------------ caller side
    def publish(self, message: OutgoingMessage) -> None:
        """Publish one message and block until the broker confirms it.

        Raises CommandNotConfirmed when it is not confirmed (the reason says why), PublisherClosed after
        close(), TypeError for something that is not an OutgoingMessage.
        """
        batch = Batch()
        self._submit(batch, message)
        self._wait(batch, None)
        if batch.failed:
            raise CommandNotConfirmed(*batch.failed[0])

    def publish_many(self, messages: Iterable[OutgoingMessage],
                     on_confirmed: Callable[[int], None] | None = None) -> PublishReport:
        """Stream messages with up to ``window`` unconfirmed in flight; return once every one is settled.

        Individual failures never raise: they are listed in the report. ``on_confirmed(n)`` is called in
        this thread with the number of newly confirmed messages as confirms arrive. Raises PublisherClosed,
        TypeError for a non-OutgoingMessage, and whatever ``messages`` or ``on_confirmed`` raise (messages
        already handed over are still settled in the background).
        """
        batch = Batch()
        for message in messages:
            self._submit(batch, message)
            if on_confirmed is not None and batch.confirmed != batch.reported:
                self._report_progress(batch, on_confirmed)
        self._wait(batch, on_confirmed)
        return PublishReport(confirmed=batch.confirmed, failed=list(batch.failed))

    def close(self) -> None:
        """Wait (up to confirm_timeout) for messages other threads have in flight, then disconnect.

        Idempotent. Messages still unconfirmed are failed with reason 'publisher closed'; later publishes
        raise PublisherClosed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + self._confirm_timeout
        with self._slots:
            while self._in_flight and thread.is_alive() and time.monotonic() < deadline:
                self._slots.wait(0.2)
        if thread.is_alive():
            self._ioloop.add_callback_threadsafe(self._shutdown)
            thread.join(timeout=15)

    def __enter__(self) -> AmqpPublisher:
        """Start the IO thread and begin connecting in the background (errors surface on publish)."""
        with self._lock:
            self._start_locked()
        self._ioloop.add_callback_threadsafe(self._ensure_link)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_locked(self) -> None:
        if self._closed:
            raise PublisherClosed("publisher is closed")
        if self._thread is None:
            self._ioloop = IOLoop()
            self._thread = threading.Thread(target=self._run, name=self.connection_name, daemon=True)
            self._thread.start()
        elif not self._thread.is_alive():
            raise PublisherClosed("publisher IO thread has stopped")

    def _submit(self, batch: Batch, message: OutgoingMessage) -> None:
        if not isinstance(message, OutgoingMessage):
            raise TypeError(f"expected OutgoingMessage, got {type(message).__name__}")
        if not isinstance(message.body, (bytes, bytearray)):
            raise TypeError(f"OutgoingMessage.body must be bytes, got {type(message.body).__name__}")
        with self._lock:
            self._start_locked()
        with self._slots:  # backpressure: at most `window` queued or unconfirmed messages
            while self._in_flight >= self._window and self._thread.is_alive():
                self._slots.wait(1.0)
            self._in_flight += 1
        with self._lock:
            try:
                self._start_locked()
            except PublisherClosed:
                self._release_slots(1)
                raise
            batch.submitted += 1
            self._outbox.append(Entry(message, batch))
        if not self._wake_pending:  # the IO thread clears the flag *before* draining: no lost wake-ups
            self._wake_pending = True
            self._ioloop.add_callback_threadsafe(self._drain)

    def _wait(self, batch: Batch, on_confirmed: Callable[[int], None] | None) -> None:
        while True:
            with batch.cond:
                done = batch.settled >= batch.submitted
                if not done and (on_confirmed is None or batch.confirmed == batch.reported):
                    batch.cond.wait(0.5)
                    done = batch.settled >= batch.submitted
            if on_confirmed is not None:
                self._report_progress(batch, on_confirmed)
            if done:
                return
            if not self._thread.is_alive():  # never expected; settle leftovers rather than hang
                self._fail_all("publisher IO thread stopped")

    @staticmethod
    def _report_progress(batch: Batch, on_confirmed: Callable[[int], None]) -> None:
        confirmed = batch.confirmed
        if confirmed != batch.reported:
            delta, batch.reported = confirmed - batch.reported, confirmed
            on_confirmed(delta)

