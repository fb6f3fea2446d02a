"""A TCP load balancer of the test's own, in front of a cluster's nodes (as haproxy in ``mode tcp``
with ``check`` would be): each new client connection goes to the next healthy backend (round
robin); a backend is healthy while a TCP connect to it succeeds (checked every 0.5 s, and at once
when a connection to it fails). When a backend dies, the connections it carried are closed on the
client side too, so that clients reconnect, through the balancer, to a live node.

It runs an asyncio loop in a thread of the test process; ``close`` stops it and every connection.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence

CHECK_EVERY = 0.5


class TcpBalancer:
    def __init__(self, port: int, backends: Sequence[tuple[str, int]]) -> None:
        self.port, self.backends = port, list(backends)
        self.healthy = set(self.backends)
        self.connections = 0
        self._turn = itertools.cycle(range(len(self.backends)))
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-balancer", daemon=True)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> TcpBalancer:
        self._thread.start()
        if not self._started.wait(30):
            raise AssertionError("the TCP balancer did not start")
        return self

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        checks = self._loop.create_task(self._check_forever())
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            checks.cancel()
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _check_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._check(b) for b in self.backends))
            await asyncio.sleep(CHECK_EVERY)

    async def _check(self, backend: tuple[str, int]) -> None:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(*backend), 2)
            writer.close()
            self.healthy.add(backend)
        except (OSError, asyncio.TimeoutError):
            self.healthy.discard(backend)

    def _next_backend(self) -> tuple[str, int] | None:
        for _ in range(len(self.backends)):
            backend = self.backends[next(self._turn)]
            if backend in self.healthy:
                return backend
        return None

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        for _ in range(len(self.backends)):
            backend = self._next_backend()
            if backend is None:
                break
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*backend), 3)
            except (OSError, asyncio.TimeoutError):
                self.healthy.discard(backend)
                continue
            self.connections += 1
            await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
            return
        client_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends, then close this direction's writer (the other pipe then ends too)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
