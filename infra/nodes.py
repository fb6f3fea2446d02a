"""The nodes of a RabbitMQ cluster, in the order one broker of a process tries them.

``CQRSKIT_BROKER_URL`` may name several nodes of one cluster (comma-separated). A process does
not always start on the first: each ``NodeList`` starts on a node chosen at random, so that the
connections of many processes spread over the cluster. Every new connection tries the nodes in
order from the preferred one, which moves:

- to the node a connection was just made to (``reached``), so that later connections join it;
- past the node a connection was just lost on (``lost``), so that the next attempt goes to the
  next node at once and the lost node is tried last, never waited for.

Thread-safe: a Dramatiq process opens one connection per thread from one list.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import pika


class NodeList:
    """pika connection parameters of one broker's nodes, from the preferred one on."""

    def __init__(self, parameters: Sequence[dict[str, Any]], start: int | None = None) -> None:
        if not parameters:
            raise ValueError("a broker needs at least one node")
        self._nodes = [pika.ConnectionParameters(**p) for p in parameters]
        self._first = random.randrange(len(self._nodes)) if start is None else start % len(self._nodes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._nodes)

    def ordered(self) -> list[pika.ConnectionParameters]:
        """Every node, the preferred first: what ``pika.BlockingConnection`` is given."""
        with self._lock:
            first = self._first
        return self._nodes[first:] + self._nodes[:first]

    @property
    def preferred(self) -> str:
        """host:port of the node the next connection tries first."""
        node = self.ordered()[0]
        return f"{node.host}:{node.port}"

    def reached(self, connection: Any) -> None:
        """A connection was made (to whichever node answered): prefer that node."""
        index = self._index(connection)
        if index is not None:
            with self._lock:
                self._first = index

    def lost(self, connection: Any) -> None:
        """A connection was lost: if it was on the preferred node, prefer the next one."""
        index = self._index(connection)
        if index is not None:
            with self._lock:
                if self._first == index:
                    self._first = (index + 1) % len(self._nodes)

    def _index(self, connection: Any) -> int | None:
        params = getattr(getattr(connection, "_impl", None), "params", None)
        if params is None:
            return None
        where = (params.host, params.port)
        return next((i for i, node in enumerate(self._nodes) if (node.host, node.port) == where), None)
