"""Authentication of the gateway and the query API, on real RabbitMQ, PostgreSQL and osmem (G11):
every request but /health needs a live API key (hashed in the write store); a key sends only the
command types of its scope and reads only its read models; the gateway records the key, not the
body, as the issuer; real services refuse to start without authentication; consistency waits are
capped per client; a POST without Content-Type is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from cqrskit.app import bootstrap
from cqrskit.app.security import Insecure, http_authentication
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.grants import ProducerGrants
from cqrskit.infra.schema import api_keys, events
from cqrskit.infra.settings import Settings
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.examples.shop import app as shop_app
from cqrskit.producers.gateway import create_app
from cqrskit.read_models.api import create_app as create_query_app
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.search import make_client
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from tests.processes import (  # noqa: F401  (fixtures)
    PROJECT,
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    workers,
    write_store,
)
from tests.test_gateway import serving

SECRET = "a-test-secret-of-at-least-32-characters!"


def gateway_app(settings: Settings, **options: Any) -> Any:
    return create_app(settings, registry=shop_app.registry, **options)


def query_app(settings: Settings, **options: Any) -> Any:
    return create_query_app(settings, shop_app.read_models, shop_app.queries, **options)


@pytest.fixture
def keys(pg_url: str) -> Iterator[ApiKeys]:
    engine = make_engine(pg_url)
    yield ApiKeys(engine, ttl=0)
    engine.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.timeout(90)
def test_the_gateway_authenticates_scopes_and_records_the_key_as_issuer(
    workers: Workers, write_store: WriteStore, keys: ApiKeys, pg_url: str
) -> None:
    """G11, issue finding 3: no key, a wrong key, a revoked key: 401; a type outside the key's scope:
    403; a sent command's issuer is the key (the body's claim kept as claimed_issuer); another
    key cannot read the outcome."""
    settings = workers.settings.model_copy(update={"token_secret": SECRET})
    ProducerGrants(keys.engine).grant("guest", ["*"], on_behalf=True)  # the gateway's RabbitMQ user
    web, web_token = keys.create("web-shop", ["RegisterCustomer"], [])
    _other, other_token = keys.create("reports", ["AddProduct"], ["orders"])
    workers.start(threads=2)
    command = envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "a@example.com"})
    command["metadata"]["issuer"] = "admin"
    with serving(gateway_app(settings, authenticate=keys.authenticate)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        for headers in ({}, bearer("ck_0000000000000000_" + "x" * 43), bearer(web_token[:-1] + ("A" if web_token[-1] != "A" else "B")),
                        {"authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="}, {"authorization": b"Bearer ck_\xff\xfe"}):
            refused = http.post("/commands", json=command, headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert http.get(f"/commands/{command['command_id']}").status_code == 401
        other_type = envelope("AddProduct", "p-1", {"sku": "S", "name": "n", "price_cents": 1, "stock": 1})
        forbidden = http.post("/commands", json=other_type, headers=bearer(web_token))
        assert forbidden.status_code == 403 and "may not send AddProduct" in forbidden.json()["detail"]
        batch = http.post("/commands/batch", json=[other_type], headers=bearer(web_token))
        assert batch.status_code == 403
        assert http.post("/commands", json=command, headers=bearer(web_token)).status_code == 202
        outcome = http.get(f"/commands/{command['command_id']}", params={"wait": 20}, headers=bearer(web_token))
        assert outcome.status_code == 200 and outcome.json()["status"] == "succeeded"
        assert http.get(f"/commands/{command['command_id']}", headers=bearer(other_token)).status_code == 404
        keys.revoke(web.key_id)
        assert http.post("/commands", json=command, headers=bearer(web_token)).status_code == 401
    with write_store.engine.connect() as conn:
        meta = conn.execute(sa.select(events.c.metadata)).scalar_one()
    assert (meta["issuer"], meta["producer"], meta["claimed_issuer"]) == ("key:web-shop", "guest", "admin")


def test_api_keys_are_stored_hashed(keys: ApiKeys) -> None:
    """G11: the table holds a SHA-256 of the secret, never the token."""
    key, token = keys.create("web", ["*"], ["*"])
    with keys.engine.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()
    secret = token.split("_", 2)[2]  # ck_<id>_<secret>; the secret itself may hold "_"
    assert len(secret) == 43 and secret not in json.dumps([str(v) for v in row])
    assert keys.authenticate(token) == key.__class__(**{**key.__dict__, "created_at": row.created_at})


@pytest.mark.timeout(60)
def test_the_query_api_authenticates_and_scopes_read_models(pg_url: str, search_url: str, index_prefix: str,
                                                            keys: ApiKeys) -> None:
    """G11, issue finding 3: customers' names and emails only for a key with ``customers``."""
    settings = Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET)
    _key, orders_only = keys.create("orders-reader", [], ["orders"])
    with serving(query_app(settings, authenticate=keys.authenticate)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/customers").status_code == 401
        assert http.get("/customers/c-1", headers={"x-api-key": "nope"}).status_code == 401
        assert http.get("/customers", headers=bearer(orders_only)).status_code == 403
        assert http.get("/customers/c-1", headers=bearer(orders_only)).status_code == 403
        assert http.get("/orders", headers=bearer(orders_only)).status_code not in (401, 403)
        assert http.get("/openapi.json", headers=bearer(orders_only)).status_code == 200
        assert http.get("/openapi.json").status_code == 401
        assert http.get("/docs", headers=bearer(orders_only)).status_code in (200, 404)


def test_real_services_refuse_to_serve_without_authentication(amqp_settings: Settings, search_url: str) -> None:
    """G11, issue findings 3 and 4: on real services, no development token secret and no missing
    key store; --insecure for a local run; the embedded default needs nothing."""
    assert http_authentication(Settings(), "gateway") is None and http_authentication(Settings(), "query") is None
    real = amqp_settings.model_copy(update={"elasticsearch_url": search_url})
    with pytest.raises(Insecure, match="CQRSKIT_TOKEN_SECRET"):
        bootstrap.gateway_app(real)
    with pytest.raises(Insecure, match="CQRSKIT_AUTH_DATABASE_URL"):
        bootstrap.query_app(real.model_copy(update={"token_secret": SECRET}))
    assert http_authentication(real.model_copy(update={"token_secret": SECRET}), "gateway") is not None
    assert http_authentication(real.model_copy(update={"insecure": True}), "query") is None
    env = {**{k: v for k, v in real.environment().items()}, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "query", "--port", "1"], env=env, cwd=PROJECT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to serve the query" in done.stderr and "--insecure" in done.stderr


@pytest.mark.timeout(60)
def test_consistency_waits_are_capped_per_client(search_url: str, index_prefix: str, keys: ApiKeys) -> None:
    """Issue finding 4/6: clients holding tokens that never resolve cannot take every slot:
    beyond CQRSKIT_MAX_CONSISTENCY_WAITS per key a wait is 429, and other keys still get theirs."""
    settings = Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET,
                        max_consistency_waits=2)
    _a, greedy = keys.create("greedy", [], ["*"])
    _b, polite = keys.create("polite", [], ["*"])
    token = ConsistencyToken((("order:o-never", 99),)).encode(SECRET)
    es = make_client(search_url)
    for model in SHOP_READ_MODELS:
        ensure(es, keys.engine, index_prefix, model)
    with serving(query_app(settings, max_wait=5, authenticate=keys.authenticate)) as url:
        def wait_as(key: str, results: list[int]) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                results.append(http.get("/orders/o-never", params={"consistent_with": token, "wait": 5},
                                        headers=bearer(key)).status_code)
        greedy_answers: list[int] = []
        polite_answers: list[int] = []
        threads = [threading.Thread(target=wait_as, args=(greedy, greedy_answers)) for _ in range(4)]
        threads.append(threading.Thread(target=wait_as, args=(polite, polite_answers)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(greedy_answers) == [429, 429, 504, 504]  # two waited (in vain), two were refused at once
    assert polite_answers == [504]  # another key still got its wait
    es.indices.delete(index=f"{index_prefix}-*")
    es.close()


def test_a_post_without_content_type_is_refused(commands_topology: Settings) -> None:
    """Issue finding 7: the body is JSON only if it says so: 415."""
    with serving(gateway_app(commands_topology)) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = json.dumps(envelope("RegisterCustomer", "c-1", {"name": "A", "email": "a@x.io"})).encode()
        refused = http.post("/commands", content=body)
        assert refused.status_code == 415 and refused.headers["content-type"] == "application/problem+json"
        assert http.post("/commands", content=body, headers={"content-type": "text/json+x"}).status_code == 415


def signed(payload: bytes, secret: str = SECRET) -> str:
    """A token over ``payload`` signed with the right secret (what a holder of the secret could make)."""
    import base64
    import hashlib
    import hmac

    body = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


BAD_TOKENS = {
    "non-ASCII": "a.\u00e9",
    "non-ASCII signature": signed(b'{"v":1,"s":[]}')[:-1] + "\u00e9",
    "version 1e400": signed(b'{"v":1,"s":[["order:o-1",1e400]]}'),
    "version a float": signed(b'{"v":1,"s":[["order:o-1",1.5]]}'),
    "version 10**40": signed(b'{"v":1,"s":[["order:o-1",' + b"1" + b"0" * 40 + b"]]}"),
    "lone surrogate stream id": signed(b'{"v":1,"s":[["\\ud800",1]]}'),
    "stream id a number": signed(b'{"v":1,"s":[[7,1]]}'),
    "deep nesting": signed(b'{"v":1,"s":' + b"[" * 100_00 + b"]" * 100_00 + b"}")[:19_000],
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_a_malformed_token_is_a_400_never_a_500(search_url: str, index_prefix: str, name: str) -> None:
    """Issue finding 5 (G10): tokens a holder of the secret could sign, and non-ASCII ones, are 400
    problems (they were 500s: compare_digest on non-ASCII, OverflowError, UnicodeEncodeError)."""
    settings = Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET)
    with serving(query_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.get("/orders", params={"consistent_with": BAD_TOKENS[name]})
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("invalid-token")


def test_docs_are_off_on_real_services_unless_asked(amqp_settings: Settings, search_url: str, pg_url: str) -> None:
    """Issue finding 7: Swagger UI loads from a CDN: no /docs in production unless CQRSKIT_HTTP_DOCS."""
    real = amqp_settings.model_copy(update={"elasticsearch_url": search_url, "token_secret": SECRET,
                                            "auth_database_url": pg_url})
    for make in (bootstrap.gateway_app, bootstrap.query_app):
        assert "/docs" not in {getattr(route, "path", None) for route in make(real).routes}
        assert "/docs" in {getattr(route, "path", None) for route in make(real.model_copy(update={"http_docs": True})).routes}
    assert "/docs" in {getattr(route, "path", None) for route in query_app(Settings(elasticsearch_url=search_url)).routes}


@pytest.mark.timeout(30)
def test_a_slow_body_is_cut_off(commands_topology: Settings) -> None:
    """Issue finding 6: a client that sends its body slowly holds the connection only
    CQRSKIT_HTTP_BODY_TIMEOUT seconds, then gets a 408."""
    import socket
    import time

    settings = commands_topology.model_copy(update={"http_body_timeout": 1.0})
    with serving(gateway_app(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /commands HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"command_id\":")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.9 < time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_metrics_listen_on_loopback_by_default(workers: Workers) -> None:
    """Issue finding 7: unauthenticated metrics are not offered to the network by default."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers.start(threads=1, CQRSKIT_METRICS_PORT=str(port))
    deadline = time.monotonic() + 30
    while True:
        try:
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "no metrics on 127.0.0.1"
            time.sleep(0.2)
    listening = open("/proc/net/tcp").read().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # LISTEN
    assert f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local
