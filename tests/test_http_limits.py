"""What one client can hold of an HTTP process, on the real server processes (``cqrskit query``,
``cqrskit gateway``) and real sockets (G11, issue finding 6): a request head sent slowly
(slowloris) and a body that never ends are cut off while normal requests keep answering fast;
consistency waits are capped per process as well as per client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from cqrskit.infra.db import make_engine
from cqrskit.infra.settings import Settings
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.search import make_client
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from tests.processes import PROJECT, commands_topology  # noqa: F401  (fixture)
from tests.test_gateway import serving

SLOW = 300  # slow connections at once
SECRET = "a-test-secret-of-at-least-32-characters!"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server_process(verb: str, settings: Settings, **env: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``cqrskit VERB --port P --insecure`` as its own process, until it answers /health."""
    port = free_port()
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")},
                   **settings.environment(), **env}
    process = subprocess.Popen([sys.executable, "-m", "cqrskit.app", verb, "--port", str(port), "--insecure"],
                               cwd=PROJECT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"cqrskit {verb} did not start"
            time.sleep(0.1)
        yield port, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def closed_within(sockets: list[socket.socket], seconds: float, trickle: bytes = b"") -> list[bytes]:
    """Keep sending ``trickle`` on every socket (a byte every 0.2 s: a slowloris) until the server
    closes each one or ``seconds`` pass; returns what each received before its end (b"" if none)."""
    received = {id(s): b"" for s in sockets}
    open_ = list(sockets)
    deadline = time.monotonic() + seconds
    while open_ and time.monotonic() < deadline:
        for sock in list(open_):
            try:
                if trickle:
                    sock.send(trickle)
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:  # reset, or broken pipe: closed by the server
                open_.remove(sock)
                continue
            received[id(sock)] += chunk
            if not chunk:
                open_.remove(sock)
        time.sleep(0.2)
    assert not open_, f"{len(open_)} of {len(sockets)} slow connections still open after {seconds} s"
    return [received[id(s)] for s in sockets]


@contextmanager
def slow_sockets(port: int, count: int, first: bytes) -> Iterator[list[socket.socket]]:
    """``count`` connections that sent ``first`` (non-blocking from then on), closed at the end."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(sock)
            sock.sendall(first)
            sock.setblocking(False)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def indices(search_url: str, index_prefix: str, sqlite_url: str) -> Iterator[Settings]:
    """The shop's (empty) read models on osmem; settings of a local query API over them."""
    engine = make_engine(sqlite_url)
    es = make_client(search_url)
    for model in SHOP_READ_MODELS:
        ensure(es, engine, index_prefix, model)
    yield Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET)
    es.indices.delete(index=f"{index_prefix}-*")
    es.close()
    engine.dispose()


def timed_get(url: str) -> float:
    started = time.monotonic()
    assert httpx.get(url, timeout=10).status_code == 200
    return time.monotonic() - started


@pytest.mark.timeout(120)
def test_slow_request_heads_are_closed_and_normal_requests_answer_fast(indices: Settings) -> None:
    """G11, issue finding 6: 300 connections sending their request head a byte at a time are
    answered 408 and closed after CQRSKIT_HTTP_HEADER_TIMEOUT, connections that never send a
    byte too; meanwhile (and after) a normal request answers at once. Before, uvicorn held them all
    for as long as the client liked."""
    with server_process("query", indices, CQRSKIT_HTTP_HEADER_TIMEOUT="2") as (port, _process):
        url = f"http://127.0.0.1:{port}/health"
        started = time.monotonic()
        with slow_sockets(port, SLOW, b"GET /orders HTTP/1.1\r\nHost: q\r\n") as slow, \
                slow_sockets(port, 20, b"") as silent:
            during = [timed_get(url) for _ in range(5)]
            answers = closed_within(slow, 15, trickle=b"X") + closed_within(silent, 5)
        took = time.monotonic() - started
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
        assert 2 <= took < 15, took
        assert max(during) < 1.0 and timed_get(url) < 1.0, during


@pytest.mark.timeout(120)
def test_a_body_that_never_ends_is_closed_on_the_query_api_too(indices: Settings) -> None:
    """G11, issue finding 6: a route that reads no body (every query-API route) answers, and the
    connection whose body never ends is closed once CQRSKIT_HTTP_BODY_TIMEOUT (plus a grace) passed."""
    with server_process("query", indices, CQRSKIT_HTTP_BODY_TIMEOUT="1") as (port, _process):
        started = time.monotonic()
        with slow_sockets(port, 50, b"GET /health HTTP/1.1\r\nHost: q\r\nContent-Length: 100000\r\n\r\n{") as slow:
            closed_within(slow, 10, trickle=b" ")
        assert 1 <= time.monotonic() - started < 10
        assert timed_get(f"http://127.0.0.1:{port}/health") < 1.0


@pytest.mark.timeout(120)
def test_the_gateway_process_cuts_slow_heads_too(commands_topology: Settings) -> None:  # noqa: F811
    """G11, issue finding 6: the same deadline on the gateway's server."""
    with server_process("gateway", commands_topology, CQRSKIT_HTTP_HEADER_TIMEOUT="1") as (port, _process):
        with slow_sockets(port, 50, b"POST /commands HTTP/1.1\r\nHost: g\r\n") as slow:
            answers = closed_within(slow, 10, trickle=b"X")
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
        assert timed_get(f"http://127.0.0.1:{port}/health") < 1.0


@pytest.mark.timeout(60)
def test_consistency_waits_are_capped_per_process(indices: Settings) -> None:
    """G8, G11, issue finding 6: whoever holds them, at most CQRSKIT_MAX_CONSISTENCY_WAITS_TOTAL
    waits at once per process; beyond, 429 with a problem document; others' plain queries answer."""
    from cqrskit.examples.shop import app as shop_app
    from cqrskit.read_models.api import create_app

    settings = indices.model_copy(update={"max_consistency_waits": 0, "max_consistency_waits_total": 3})
    token = ConsistencyToken((("order:o-never", 9),)).encode(SECRET)
    answers: list[httpx.Response] = []
    with serving(create_app(settings, shop_app.read_models, shop_app.queries, max_wait=3)) as url:
        def wait() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                answers.append(http.get("/orders/o-never", params={"consistent_with": token, "wait": 3}))
        threads = [threading.Thread(target=wait) for _ in range(6)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        plain = httpx.get(f"{url}/orders", timeout=10)
        for thread in threads:
            thread.join()
    assert plain.status_code == 200
    assert sorted(a.status_code for a in answers) == [429, 429, 429, 504, 504, 504]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["content-type"] == "application/problem+json" and refused.headers["retry-after"] == "1"
    assert "this server holds its 3 requests" in refused.json()["detail"]


@pytest.mark.timeout(60)
def test_outcome_long_polls_are_capped_on_the_gateway(commands_topology: Settings) -> None:  # noqa: F811
    """G11, issue finding 6 (200 long polls slowed POST /commands fifty-fold): a client holds at most
    CQRSKIT_MAX_CONSISTENCY_WAITS outcome long polls (``?wait=``) at once, beyond which it gets a 429
    problem at once, and commands are still accepted meanwhile."""
    from cqrskit.examples.shop.domain import registry
    from cqrskit.producers.gateway import create_app
    from tests.processes import envelope

    settings = commands_topology.model_copy(update={"max_consistency_waits": 2})
    answers: list[httpx.Response] = []
    with serving(create_app(settings, registry=registry, max_wait=2)) as url:
        def poll() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                answers.append(http.get("/commands/never-sent", params={"wait": 2}))
        threads = [threading.Thread(target=poll) for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        command = envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "ann@example.com"})
        started = time.monotonic()
        accepted = httpx.post(f"{url}/commands", json=command, timeout=10)
        took = time.monotonic() - started
        for thread in threads:
            thread.join()
    assert accepted.status_code == 202 and took < 1.0, (accepted.text, took)
    assert sorted(a.status_code for a in answers) == [404, 404, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["content-type"] == "application/problem+json"
    assert "at most 2 requests with wait" in refused.json()["detail"]
