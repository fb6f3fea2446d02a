"""The IO-thread half of ``AmqpPublisher`` (``cqrskit.infra.amqp``): the connection, the confirm
channel, delivery tags, returns, confirm timeouts and reconnects with backoff.

Every method here runs on the publisher's IO thread (the pika ``IOLoop``), except
``_release_slots``, which any thread may call. A message handed over is settled exactly once:
confirmed, or failed with a reason, and its window slot is released then.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import pika
import structlog
from pika import exceptions as pika_exc
from pika.adapters.select_connection import IOLoop

log = structlog.get_logger("cqrskit.infra.amqp")

STALL_SECONDS = 5.0  # on a cluster, no confirm for this long moves the publisher to the next node
NACK_RECONNECT_SECONDS = 1.0  # a nack makes the publisher reconnect at most this often
_FATAL_CONNECT_ERRORS = (pika_exc.ProbableAuthenticationError, pika_exc.AuthenticationError,
                         pika_exc.ProbableAccessDeniedError)  # retrying these cannot help


@dataclass(frozen=True)
class OutgoingMessage:
    body: bytes
    routing_key: str
    message_id: str | None = None
    headers: dict | None = None


class Batch:
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


class Entry:
    __slots__ = ("message", "batch", "sent_at", "failure")

    def __init__(self, message: OutgoingMessage, batch: Batch) -> None:
        self.message, self.batch, self.sent_at = message, batch, 0.0
        self.failure: str | None = None  # set when the broker returned the message as unroutable


class ConfirmLoop:
    """The IO side of a publisher: ``AmqpPublisher`` sets this state up and hands work over through
    ``_outbox`` (and ``_drain``, ``_ensure_link``, ``_shutdown`` scheduled on ``_ioloop``)."""

    exchange: str
    connection_name: str
    republished: int
    _nodes: list[pika.URLParameters]  # the cluster's nodes (one for a single broker)
    _node: int  # the node connected to, or tried next
    _user_id: str | None
    _mandatory: bool
    _confirm_timeout: float
    _tick: float
    _reconnect_attempts: int
    _slots: threading.Condition
    _in_flight: int
    _wake_pending: bool
    _outbox: collections.deque[Entry]
    _ioloop: IOLoop | None
    # owned by the IO thread
    _connection: pika.SelectConnection | None
    _channel: Any
    _ready: bool
    _stopping: bool
    _pending: dict[int, Entry]  # delivery tag -> entry, in tag order
    _retry: collections.deque[Entry]
    _next_tag: int
    _low_tag: int
    _failures: int
    _reconnect_timer: Any
    _confirmed_at: float  # when the broker last confirmed (or nacked) anything
    _nack_reconnect_at: float  # when a nack last made the publisher reconnect

    def _release_slots(self, n: int) -> None:
        with self._slots:
            self._in_flight -= n
            self._slots.notify_all()

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
        params = self._nodes[self._node]
        log.info("amqp_publisher.connecting", connection_name=self.connection_name, failures=self._failures,
                 node=f"{params.host}:{params.port}")
        self._connection = pika.SelectConnection(
            params, on_open_callback=lambda _conn: self._ensure_link(),
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
                                         message_id=m.message_id, headers=m.headers, user_id=self._user_id)
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
        self._confirmed_at = time.monotonic()
        if ok:
            self._failures = 0  # progress: the reconnect budget starts afresh
        self._settle(entries, None if ok else "nacked by broker")
        if not ok:
            self._reconnect_after_nack()

    def _reconnect_after_nack(self) -> None:
        """After a quorum queue changed leader, RabbitMQ 3.10 may nack every message a connection
        publishes from then on, for minutes: a fresh connection (to the next node of a cluster, or
        through a load balancer to a live one) is not. At most one such reconnect per
        ``NACK_RECONNECT_SECONDS``, so that a queue that rightly refuses (``x-overflow:
        reject-publish``) costs no storm of connections."""
        now = time.monotonic()
        conn = self._connection
        if conn is None or not conn.is_open or now - self._nack_reconnect_at < NACK_RECONNECT_SECONDS:
            return
        self._nack_reconnect_at = now
        log.warning("amqp_publisher.nacked", node=self._node_name(), unconfirmed=len(self._pending))
        conn.close()  # _on_link_down republishes the other unconfirmed messages on the new connection

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
        """Connection failed or dropped: requeue unconfirmed messages; reconnect or give up. The
        next attempt goes to the next node at once; only a whole round of failed nodes waits (a
        backoff), and ``reconnect_attempts`` rounds give up."""
        if conn is not self._connection:
            return  # a stale callback from a connection already replaced
        self._connection, self._channel, self._ready = None, None, False
        if self._stopping:
            self._ioloop.stop()
            return
        self._node = (self._node + 1) % len(self._nodes)  # never the lost node first
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
        nodes = len(self._nodes)
        if isinstance(exc, _FATAL_CONNECT_ERRORS) or self._failures > self._reconnect_attempts * nodes:
            attempts, self._failures = self._failures, 0
            log.error("amqp_publisher.gave_up", error=repr(exc), attempts=attempts)
            self._fail_all(f"connection lost and not re-established after {attempts} attempt(s): {exc!r}")
            return
        rounds, other_nodes_left = divmod(self._failures, nodes)
        delay = 0.0 if other_nodes_left else min(0.25 * 2 ** (rounds - 1), 5.0)
        log.warning("amqp_publisher.reconnecting", error=repr(exc), delay=delay, node=self._node_name(),
                    requeued=len(self._retry), failures=self._failures)
        self._reconnect_timer = self._ioloop.call_later(delay, self._on_reconnect_timer)

    def _node_name(self) -> str:
        params = self._nodes[self._node]
        return f"{params.host}:{params.port}"

    def _on_reconnect_timer(self) -> None:
        self._reconnect_timer = None
        self._ensure_link()

    def _check_timeouts(self) -> None:
        if self._stopping:
            return
        self._check_stall()
        deadline = time.monotonic() - self._confirm_timeout
        expired = [tag for tag, entry in self._pending.items() if entry.sent_at < deadline]
        if expired:
            log.warning("amqp_publisher.confirm_timeout", expired=len(expired))
            self._settle([self._pending.pop(t) for t in expired],
                         f"no confirm within {self._confirm_timeout}s")
        self._ioloop.call_later(self._tick, self._check_timeouts)

    def _check_stall(self) -> None:
        """On a cluster, confirms that stop coming (a quorum queue's leader died as the message
        reached it: RabbitMQ 3.10 may then confirm it only much later, or never) move the
        publisher to the next node: its unconfirmed messages are sent again there (at least once,
        consumers deduplicate by message id) instead of waiting out ``confirm_timeout``."""
        if len(self._nodes) < 2 or not self._pending or self._connection is None or not self._connection.is_open:
            return
        stalled_since = time.monotonic() - STALL_SECONDS
        oldest = next(iter(self._pending.values()))
        if oldest.sent_at < stalled_since and self._confirmed_at < stalled_since:
            log.warning("amqp_publisher.confirms_stalled", node=self._node_name(), unconfirmed=len(self._pending),
                        seconds=STALL_SECONDS)
            self._connection.close()  # _on_link_down requeues them and connects to the next node

    def _settle(self, entries: list[Entry], reason: str | None) -> None:
        """Confirm entries (reason None and not returned) or fail them; release their window slots."""
        if not entries:
            return
        by_batch: dict[Batch, list] = {}
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
