"""AMQP publisher with publisher confirms, a confirm window and reconnects (pika SelectConnection).

Contract (G1, producer side): a message counts as published only once the broker has confirmed it
(basic.ack, and not returned as unroutable). Anything else -- a nack, a return, a channel closed by the
broker, a confirm that does not arrive within ``confirm_timeout``, a connection lost beyond the reconnect
budget, a close -- is reported as not confirmed. Messages unconfirmed when a connection drops are
republished on the next connection, so delivery is at-least-once: consumers deduplicate by message id.

One IO thread per publisher owns the connection and all confirm bookkeeping; caller threads only append
to an outbox, wake the IO loop and wait on their own batch. At most ``window`` messages per publisher are
queued or unconfirmed at any time, which bounds memory and gives pipelined (windowed) confirms.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import pika
import structlog
from pika import exceptions as pika_exc
from pika.adapters.select_connection import IOLoop

log = structlog.get_logger(__name__)

_FATAL_CONNECT_ERRORS = (pika_exc.ProbableAuthenticationError, pika_exc.AuthenticationError,
                         pika_exc.ProbableAccessDeniedError)  # retrying these cannot help


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


@dataclass(frozen=True)
class OutgoingMessage:
    body: bytes
    routing_key: str
    message_id: str | None = None
    headers: dict | None = None


class _Batch:
    """Settlement state of one publish/publish_many call: written by the IO thread, read by the caller."""

    __slots__ = ("cond", "submitted", "confirmed", "failed", "reported")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.submitted = 0  # written by the caller thread only
        self.confirmed = 0
        self.failed: list[tuple[str | None, str]] = []
        self.reported = 0  # confirmations already passed to on_confirmed

    @property
    def settled(self) -> int:
        return self.confirmed + len(self.failed)


class _Entry:
    __slots__ = ("message", "batch", "sent_at", "failure")

    def __init__(self, message: OutgoingMessage, batch: _Batch) -> None:
        self.message, self.batch, self.sent_at = message, batch, 0.0
        self.failure: str | None = None  # set when the broker returned the message as unroutable


class AmqpPublisher:
    """Publishes to one exchange with confirms; publish and publish_many may be called from many threads.

    Nothing connects before the first publish (or ``__enter__``). Every message handed to the publisher is
    eventually settled exactly once: confirmed, or failed with a reason.
    """

    def __init__(self, url: str, exchange: str, *, window: int = 1000, confirm_timeout: float = 30.0,
                 heartbeat: int = 5, blocked_connection_timeout: float = 30.0,
                 reconnect_attempts: int = 5, mandatory: bool = True) -> None:
        if window < 1 or confirm_timeout <= 0 or reconnect_attempts < 0:
            raise ValueError("window >= 1, confirm_timeout > 0 and reconnect_attempts >= 0 are required")
        self.exchange = exchange
        self.connection_name = f"cqrskit-publisher-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._params = pika.URLParameters(url)
        self._params.heartbeat = heartbeat
        self._params.blocked_connection_timeout = blocked_connection_timeout
        self._params.connection_attempts = 1  # retries are ours, counted against reconnect_attempts
        self._params.client_properties = {"connection_name": self.connection_name}
        self.republished = 0  # messages requeued for republishing after a connection loss (observability)
        self._window, self._confirm_timeout = window, confirm_timeout
        self._reconnect_attempts = reconnect_attempts
        self._mandatory = mandatory  # False: a message no queue is bound for is confirmed, not returned
        self._tick = min(1.0, confirm_timeout / 4)  # how often confirm timeouts are checked
        self._lock = threading.Lock()  # guards start, close and appends to the outbox
        self._slots = threading.Condition()  # guards _in_flight (queued + unconfirmed messages)
        self._in_flight, self._wake_pending, self._closed = 0, False, False
        self._outbox: collections.deque[_Entry] = collections.deque()
        self._ioloop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        # State below is owned by the IO thread.
        self._connection: pika.SelectConnection | None = None
        self._channel, self._ready, self._stopping = None, False, False
        self._pending: dict[int, _Entry] = {}  # delivery tag -> entry, in tag order
        self._retry: collections.deque[_Entry] = collections.deque()
        self._next_tag, self._low_tag, self._failures = 0, 1, 0
        self._reconnect_timer = None

    # ------------------------------------------------------------------ caller side
    def publish(self, message: OutgoingMessage) -> None:
        """Publish one message and block until the broker confirms it.

        Raises CommandNotConfirmed when it is not confirmed (the reason says why), PublisherClosed after
        close(), TypeError for something that is not an OutgoingMessage.
        """
        batch = _Batch()
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
        batch = _Batch()
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

    def _submit(self, batch: _Batch, message: OutgoingMessage) -> None:
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
            self._outbox.append(_Entry(message, batch))
        if not self._wake_pending:  # the IO thread clears the flag *before* draining: no lost wake-ups
            self._wake_pending = True
            self._ioloop.add_callback_threadsafe(self._drain)

    def _wait(self, batch: _Batch, on_confirmed: Callable[[int], None] | None) -> None:
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
    def _report_progress(batch: _Batch, on_confirmed: Callable[[int], None]) -> None:
        confirmed = batch.confirmed
        if confirmed != batch.reported:
            delta, batch.reported = confirmed - batch.reported, confirmed
            on_confirmed(delta)

    def _release_slots(self, n: int) -> None:
        with self._slots:
            self._in_flight -= n
            self._slots.notify_all()

    # ------------------------------------------------------------------ IO thread
    def _run(self) -> None:
        try:
            self._ioloop.call_later(self._tick, self._check_timeouts)
            self._ioloop.start()
        except Exception:
            log.exception("amqp_publisher.ioloop_crashed", connection_name=self.connection_name)
        finally:
            self._fail_all("publisher closed")
            self._ioloop.close()

    def _ensure_link(self) -> None:
        """Connect, or open the confirm channel, unless that is already under way."""
        if self._ready or self._stopping:
            return
        if self._connection is None:
            if self._reconnect_timer is None:
                self._connect()
        elif self._connection.is_open and self._channel is None:
            self._channel = self._connection.channel(on_open_callback=self._on_channel_open)
            self._channel.add_on_close_callback(self._on_channel_closed)  # also covers a failed open

    def _connect(self) -> None:
        log.info("amqp_publisher.connecting", connection_name=self.connection_name, failures=self._failures)
        self._connection = pika.SelectConnection(
            self._params, on_open_callback=lambda _conn: self._ensure_link(),
            on_open_error_callback=self._on_link_down, on_close_callback=self._on_link_down,
            custom_ioloop=self._ioloop)

    def _on_channel_open(self, channel) -> None:
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_selected)

    def _on_confirm_selected(self, _frame) -> None:
        self._ready = True
        self._next_tag, self._low_tag = 0, 1
        self._drain()

    def _drain(self) -> None:
        """Publish everything queued (republished messages first); connect lazily when needed."""
        self._wake_pending = False
        if self._stopping:
            return
        if not self._ready:
            if self._retry or self._outbox:
                self._ensure_link()
            return
        now, publish, exchange = time.monotonic(), self._channel.basic_publish, self.exchange
        while self._retry or self._outbox:
            entry = self._retry.popleft() if self._retry else self._outbox.popleft()
            m = entry.message
            props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                         message_id=m.message_id, headers=m.headers)
            try:
                publish(exchange, m.routing_key, m.body, props, mandatory=self._mandatory)
            except Exception as exc:  # channel/connection went away: the close callbacks take over
                log.warning("amqp_publisher.publish_error", error=repr(exc))
                self._retry.appendleft(entry)
                return
            self._next_tag += 1
            entry.sent_at, entry.failure = now, None
            self._pending[self._next_tag] = entry

    def _on_confirm(self, frame) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tag = method.delivery_tag
        tags = range(self._low_tag, tag + 1) if method.multiple else (tag,)
        entries = [e for e in map(self._pending.pop, tags, itertools.repeat(None)) if e is not None]
        if method.multiple:
            self._low_tag = max(self._low_tag, tag + 1)
        if ok:
            self._failures = 0  # progress: the reconnect budget starts afresh
        self._settle(entries, None if ok else "nacked by broker")

    def _on_return(self, _channel, method, props, body) -> None:
        """Mark a returned message; RabbitMQ sends its ack after the return, which settles it as failed."""
        reason = (f"unroutable: exchange {method.exchange!r} routed routing key {method.routing_key!r} to "
                  f"no queue ({method.reply_code} {method.reply_text})")
        for entry in self._pending.values():
            m = entry.message
            if (entry.failure is None and m.routing_key == method.routing_key
                    and m.message_id == props.message_id and m.body == body):
                entry.failure = reason
                return
        log.warning("amqp_publisher.unmatched_return", routing_key=method.routing_key,
                    message_id=props.message_id)

    def _on_channel_closed(self, channel, exc) -> None:
        """A channel error (404 no exchange, 403...) fails the unconfirmed messages; reopens lazily."""
        if channel is not self._channel:
            return
        self._channel, self._ready = None, False
        conn = self._connection
        if self._stopping or conn is None or conn.is_closing or conn.is_closed:
            return  # connection loss: _on_link_down republishes
        if isinstance(exc, pika_exc.ChannelClosedByBroker):
            reason = f"channel closed by broker: {exc.reply_code} {exc.reply_text}"
        else:
            reason = f"channel closed: {exc!r}"
        log.warning("amqp_publisher.channel_closed", reason=reason, unconfirmed=len(self._pending))
        entries = list(self._pending.values())
        self._pending.clear()
        self._settle(entries, reason)
        if self._retry or self._outbox:
            self._ensure_link()  # queued messages get a fresh channel

    def _on_link_down(self, conn, exc) -> None:
        """Connection failed or dropped: requeue unconfirmed messages; reconnect with backoff or give up."""
        if conn is not self._connection:
            return  # a stale callback from a connection already replaced
        self._connection, self._channel, self._ready = None, None, False
        if self._stopping:
            self._ioloop.stop()
            return
        returned = [e for e in self._pending.values() if e.failure is not None]
        requeue = [e for e in self._pending.values() if e.failure is None]
        self._retry.extendleft(reversed(requeue))
        self.republished += len(requeue)
        self._pending.clear()
        self._settle(returned, None)
        if not (self._retry or self._outbox):
            self._failures = 0
            log.info("amqp_publisher.disconnected_idle", error=repr(exc))
            return
        self._failures += 1
        if isinstance(exc, _FATAL_CONNECT_ERRORS) or self._failures > self._reconnect_attempts:
            attempts, self._failures = self._failures, 0
            log.error("amqp_publisher.gave_up", error=repr(exc), attempts=attempts)
            self._fail_all(f"connection lost and not re-established after {attempts} attempt(s): {exc!r}")
            return
        delay = min(0.25 * 2 ** (self._failures - 1), 5.0)
        log.warning("amqp_publisher.reconnecting", error=repr(exc), delay=delay,
                    requeued=len(self._retry), failures=self._failures)
        self._reconnect_timer = self._ioloop.call_later(delay, self._on_reconnect_timer)

    def _on_reconnect_timer(self) -> None:
        self._reconnect_timer = None
        self._ensure_link()

    def _check_timeouts(self) -> None:
        if self._stopping:
            return
        deadline = time.monotonic() - self._confirm_timeout
        expired = [tag for tag, entry in self._pending.items() if entry.sent_at < deadline]
        if expired:
            log.warning("amqp_publisher.confirm_timeout", expired=len(expired))
            self._settle([self._pending.pop(t) for t in expired],
                         f"no confirm within {self._confirm_timeout}s")
        self._ioloop.call_later(self._tick, self._check_timeouts)

    def _settle(self, entries: list[_Entry], reason: str | None) -> None:
        """Confirm entries (reason None and not returned) or fail them; release their window slots."""
        if not entries:
            return
        by_batch: dict[_Batch, list] = {}
        for entry in entries:
            counts = by_batch.setdefault(entry.batch, [0, []])
            why = entry.failure or reason
            if why is None:
                counts[0] += 1
            else:
                counts[1].append((entry.message.message_id, why))
        for batch, (confirmed, failed) in by_batch.items():
            with batch.cond:
                batch.confirmed += confirmed
                batch.failed.extend(failed)
                batch.cond.notify_all()
        self._release_slots(len(entries))

    def _fail_all(self, reason: str) -> None:
        entries = list(self._pending.values())
        self._pending.clear()
        for queue in (self._retry, self._outbox):
            while queue:
                entries.append(queue.popleft())
        self._settle(entries, reason)

    def _shutdown(self) -> None:
        self._stopping = True
        if self._reconnect_timer is not None:
            self._ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        self._fail_all("publisher closed")
        conn = self._connection
        if conn is None or conn.is_closing or conn.is_closed:
            self._ioloop.stop()
            return
        conn.close()  # _on_link_down stops the loop
        self._ioloop.call_later(5.0, self._ioloop.stop)
