"""``cqrskit setup --privileges`` provisions the roles of docs/operations.md, and each process works
under its own role and is refused what it must not do (G11), on real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pika
import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.app.privileges import provision
from cqrskit.examples.shop import app as shop_app
from cqrskit.examples.shop.domain import registry
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.outcomes import Status
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore, stream_versions
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.producers.gateway import create_app, read_only_engine
from cqrskit.read_models.api import create_app as create_query_app
from cqrskit.workers.execution import CommandExecutor
from tests.access import rabbitmqctl
from tests.conftest import _admin_dsn
from tests.processes import (PROJECT, PikaProducer, Workers, WorkerProcess, WriteStore, commands_topology,  # noqa: F401
                             envelope, workers, write_store)
from tests.stack import Stack
from tests.test_gateway import serving
from tests.test_http_limits import free_port

MODELS = ["orders", "products", "customers"]


@pytest.fixture
def provisioned(commands_topology: Settings) -> Iterator[tuple[Settings, str, dict[str, str]]]:
    """``setup --privileges`` with a unique prefix (roles and users are global); all removed after."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    settings = commands_topology
    lines: list[str] = []
    made = provision(settings, MODELS, prefix=prefix, producers=[f"{prefix}-billing"], say=lines.append)
    try:
        yield settings, prefix, made
    finally:
        database = make_url(settings.database_url).database
        with psycopg.connect(make_url(_admin_dsn()).set(database=database).render_as_string(hide_password=False),
                             autocommit=True) as conn:
            for name in made:
                if name.startswith(f"{prefix}_"):
                    conn.execute(f'DROP OWNED BY "{name}"')
        with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
            for name in made:
                if name.startswith(f"{prefix}_"):
                    conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        for name in made:
            if name.startswith(f"{prefix}-"):
                try:
                    rabbitmqctl("delete_user", name)
                except RuntimeError:
                    pass


def pg_as(settings: Settings, role: str, password: str) -> str:
    return make_url(settings.database_url).set(username=role, password=password).render_as_string(hide_password=False)


def amqp_as(settings: Settings, user: str, password: str) -> str:
    parts = urlsplit(settings.broker_url)
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password)}@{parts.hostname}:{parts.port or 5672}"))


def refused_sql(url: str, statement: str) -> bool:
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def test_setup_privileges_is_idempotent_and_each_role_is_refused_what_it_must_not_do(provisioned) -> None:
    """G11: a second run creates nothing; the worker runs a command and changes no schema; the
    query role reads API keys only; the gateway, the relay and the indexer write nothing of others'."""
    settings, prefix, made = provisioned
    assert {f"{prefix}_{r}" for r in ("worker", "relay", "indexer", "gateway", "query", "operator")} <= set(made)
    assert provision(settings, MODELS, prefix=prefix, producers=[f"{prefix}-billing"], say=lambda _: None) == {}
    as_role = {r: pg_as(settings, f"{prefix}_{r}", made[f"{prefix}_{r}"]) for r in ("worker", "query", "gateway",
                                                                                     "relay", "indexer")}
    # the worker runs commands, and can change no schema
    engine = make_engine(as_role["worker"])
    outcome = CommandExecutor(EventStore(engine, registry), registry).execute(json.dumps(
        envelope("RegisterCustomer", "c-1", {"name": "Ann", "email": "a@example.com"})).encode())
    engine.dispose()
    assert outcome.status is Status.succeeded
    for statement in ("CREATE TABLE evil (x int)", "DROP TABLE events", "ALTER TABLE events ADD COLUMN x int",
                      "DELETE FROM events", "TRUNCATE command_outcomes", "INSERT INTO api_keys VALUES "
                      "('k','n','h','[]','[]',now(),null)", "INSERT INTO producer_grants VALUES ('w', '*')"):
        assert refused_sql(as_role["worker"], statement), statement
    # the query side reads API keys and nothing else of the write store
    assert not refused_sql(as_role["query"], "SELECT count(*) FROM api_keys")
    for statement in ("SELECT * FROM events", "SELECT * FROM unique_claims", "SELECT * FROM command_outcomes",
                      "UPDATE api_keys SET revoked_at = NULL", "CREATE TABLE evil (x int)"):
        assert refused_sql(as_role["query"], statement), statement
    # the gateway reads outcomes, never writes them; the relay and the indexer write only their own
    assert refused_sql(as_role["gateway"], "INSERT INTO command_outcomes (command_id, status, recorded_at) "
                                           "VALUES ('x', 'succeeded', now())")
    assert refused_sql(as_role["relay"], "UPDATE streams SET version = 0")
    assert refused_sql(as_role["indexer"], "DELETE FROM events")


def test_rabbitmq_users_may_do_only_their_part(provisioned) -> None:
    """G11: a producer publishes commands and reads or declares nothing; the indexer neither
    reads the commands queue nor publishes commands."""
    settings, prefix, made = provisioned
    billing = amqp_as(settings, f"{prefix}-billing", made[f"{prefix}-billing"])
    connection = pika.BlockingConnection(pika.URLParameters(billing))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(settings.commands_exchange, "RegisterCustomer", b"{}", mandatory=True)  # allowed
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as consume:
        channel.basic_get(settings.commands_queue)  # a producer reading the commands queue
    assert consume.value.reply_code == 403
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as declare:
        channel.queue_declare(f"{prefix}-mine")
    assert declare.value.reply_code == 403
    connection.close()
    indexer = amqp_as(settings, f"{prefix}-indexer", made[f"{prefix}-indexer"])
    connection = pika.BlockingConnection(pika.URLParameters(indexer))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as steal:
        connection.channel().basic_get(settings.commands_queue)
    assert steal.value.reply_code == 403
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as forge:
        channel.confirm_delivery()
        channel.basic_publish(settings.commands_exchange, "RegisterCustomer", b"{}")
    assert forge.value.reply_code == 403
    connection.close()


def test_only_the_workers_may_reach_the_commands_queue_through_the_default_exchange(provisioned) -> None:
    """G11, issue 19 finding 2: the relay's, the indexer's and the operator's users cannot write
    to ``amq.default`` (which reaches every queue: they once created customers "sent by the
    gateway" through it, and planted entries in ``commands.XQ``); the relay and the indexer reach
    the indexer queues through their own exchange; the worker keeps the default exchange for its
    retries."""
    from cqrskit.infra.broker import indexer_exchange, make_broker

    settings, prefix, made = provisioned
    declaring = make_broker(settings)  # as setup: the indexer queues, bound to their exchange
    declaring.declare_queue(settings.indexer_queue, ensure=True)
    declaring.close()
    user = {u: amqp_as(settings, f"{prefix}-{u}", made[f"{prefix}-{u}"]) for u in ("relay", "indexer", "operator",
                                                                                   "worker")}
    for name in ("relay", "indexer", "operator"):
        for queue in (settings.commands_queue, f"{settings.commands_queue}.XQ", f"{settings.commands_queue}.DQ"):
            assert refused_amqp(user[name], lambda channel: channel.basic_publish("", queue, b"{}")), (name, queue)
    for name in ("relay", "indexer"):
        for queue in (settings.indexer_queue, f"{settings.indexer_queue}.DQ"):
            assert not refused_amqp(user[name], lambda channel: channel.basic_publish(
                indexer_exchange(settings), queue, b"[]", mandatory=True)), (name, queue)
        with pytest.raises(pika.exceptions.UnroutableError):  # the exchange reaches no commands queue
            refused_amqp(user[name], lambda channel: channel.basic_publish(
                indexer_exchange(settings), settings.commands_queue, b"{}", mandatory=True))
    assert not refused_amqp(user["worker"], lambda channel: channel.basic_publish(
        "", f"{settings.commands_queue}.DQ", b"{}", mandatory=True))


@pytest.mark.timeout(90)
def test_a_worker_and_the_gateway_run_under_their_own_roles(provisioned, workers: Workers,
                                                            write_store: WriteStore) -> None:
    """G11: the command worker (worker role, worker user) and the gateway (gateway role, gateway
    user; API keys read through the query role) work end to end with nothing more."""
    settings, prefix, made = provisioned
    worker_db = pg_as(settings, f"{prefix}_worker", made[f"{prefix}_worker"])
    worker_amqp = amqp_as(settings, f"{prefix}-worker", made[f"{prefix}-worker"])
    workers.start(threads=2, CQRSKIT_DATABASE_URL=worker_db, CQRSKIT_BROKER_URL=worker_amqp)
    owner_keys = ApiKeys(make_engine(settings.database_url))
    _key, token = owner_keys.create("web", ["RegisterCustomer"], [])
    query_keys = ApiKeys(read_only_engine(pg_as(settings, f"{prefix}_query", made[f"{prefix}_query"])))
    gateway_settings = settings.model_copy(update={
        "database_url": pg_as(settings, f"{prefix}_gateway", made[f"{prefix}_gateway"]),
        "broker_url": amqp_as(settings, f"{prefix}-gateway", made[f"{prefix}-gateway"])})
    command = envelope("RegisterCustomer", "c-9", {"name": "Gil", "email": "g@example.com"})
    with serving(create_app(gateway_settings, registry=registry, authenticate=query_keys.authenticate)) as url, \
            httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {token}"}) as http:
        assert http.post("/commands", json=command).status_code == 202
        outcome = http.get(f"/commands/{command['command_id']}", params={"wait": 20})
    assert outcome.status_code == 200 and outcome.json()["status"] == "succeeded", outcome.text
    owner_keys.engine.dispose()
    query_keys.engine.dispose()


def spawn(stack: Stack, kind: str, args: list[str], **env: str) -> WorkerProcess:
    """A process of the stack (as ``Stack._spawn``) under the given CQRSKIT_* overrides (its role)."""
    log_path = stack.directory / f"{kind}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen([sys.executable, *args], cwd=PROJECT, env=stack.env(**env), stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    process = WorkerProcess(popen, log_path)
    stack.started.append(process)
    return process


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_relay_the_indexer_and_the_query_api_run_under_their_own_roles(provisioned, search_url: str,
                                                                          tmp_path: Path) -> None:
    """G11 (and G5, G6, G8 under least privilege): the command worker, the relay and the indexer,
    each under its own PostgreSQL role and RabbitMQ user, and the query API checking keys through
    the query role and reading the search server through a read-only front, carry a command from
    the producer to a read-your-writes query; every read model then equals the write store. Each
    role is refused what it must not do: the relay reading commands or writing events, the
    indexer doing DDL or writing events, the relay's and the indexer's users publishing commands
    or reading the commands queue."""
    settings, prefix, made = provisioned
    stack = Stack.create(settings, search_url, tmp_path)
    role = {r: pg_as(settings, f"{prefix}_{r}", made[f"{prefix}_{r}"]) for r in ("worker", "relay", "indexer", "query")}
    user = {u: amqp_as(settings, f"{prefix}-{u}", made[f"{prefix}-{u}"]) for u in ("worker", "relay", "indexer",
                                                                                   "billing")}
    owner = ApiKeys(make_engine(settings.database_url))
    _key, token = owner.create("reader", [], ["orders", "customers"])
    query_keys = ApiKeys(read_only_engine(role["query"]))
    queue = settings.commands_queue
    try:
        spawn(stack, "worker", ["-m", "dramatiq", "cqrskit.app.processes:command_worker", "-p", "1", "-t", "2",
                                "--queues", queue, f"{queue}.DQ"],
              CQRSKIT_DATABASE_URL=role["worker"], CQRSKIT_BROKER_URL=user["worker"])
        metrics_port = free_port()
        spawn(stack, "relay", ["-m", "cqrskit.app", "relay"], CQRSKIT_METRICS_PORT=str(metrics_port),
              CQRSKIT_DATABASE_URL=role["relay"], CQRSKIT_BROKER_URL=user["relay"])
        spawn(stack, "indexer", ["-m", "dramatiq", "cqrskit.app.processes:indexer_worker", "-p", "1", "-t", "2",
                                 "--queues", settings.indexer_queue, f"{settings.indexer_queue}.DQ"],
              CQRSKIT_DATABASE_URL=role["indexer"], CQRSKIT_BROKER_URL=user["indexer"])
        customer = envelope("RegisterCustomer", "c-7", {"name": "Ada", "email": "ada@example.com"})
        with ReadOnlySearch(search_url) as front:
            query_settings = Settings(elasticsearch_url=front.url, index_prefix=settings.index_prefix,
                                      token_secret=settings.token_secret)
            with serving(create_query_app(query_settings, shop_app.read_models, shop_app.queries,
                                          authenticate=query_keys.authenticate)) as url, \
                    httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {token}"}) as http:
                billing = PikaProducer(user["billing"], settings.commands_exchange)  # a producer, as itself
                billing.publish(customer)
                billing.close()
                outcome = stack.write_store.wait_for_outcomes([customer["command_id"]], timeout=60)
                succeeded = outcome[customer["command_id"]]
                assert succeeded.status is Status.succeeded, succeeded
                with stack.write_store.engine.connect() as conn:
                    streams = stream_versions(conn, succeeded.positions)
                consistency = ConsistencyToken(streams).encode(settings.token_secret)
                answer = http.get("/customers/c-7", params={"consistent_with": consistency, "wait": 10})
                assert answer.status_code == 200 and answer.json()["name"] == "Ada", answer.text
                assert http.get("/products").status_code == 403  # not in the key's scope
            assert front.requests and not front.refused, front.refused  # the query API needed only reads
            assert front.refuses("PUT", f"/{settings.index_prefix}-customers/_doc/x")
        stack.wait_drained(timeout=60)
        stack.assert_converged()
        # issue 19 finding 7: the relay's metrics under its own role (they answered 500 without
        # SELECT on parked_documents, so the documented lag alerts could not fire)
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200, scraped.text
        assert "cqrskit_relay_up 1.0" in scraped.text and "cqrskit_relay_lag_events 0.0" in scraped.text
        assert "# TYPE cqrskit_parked_documents gauge" in scraped.text
        for process in stack.started:
            assert process.alive, process.tail()
    except BaseException:
        for process in stack.started:
            print(process.log_path.name, process.tail(15), sep="\n")
        raise
    finally:
        stack.close()
        owner.engine.dispose()
        query_keys.engine.dispose()
    for statement in ("SELECT * FROM command_outcomes", "INSERT INTO events (stream_id) VALUES ('x')",
                      "CREATE TABLE evil (x int)", "SELECT * FROM streams", "DELETE FROM leases"):
        assert refused_sql(role["relay"], statement), statement
    for statement in ("CREATE INDEX evil ON events (stream_id)", "INSERT INTO events (stream_id) VALUES ('x')",
                      "UPDATE streams SET version = 0", "SELECT * FROM command_outcomes", "DROP TABLE parked_documents"):
        assert refused_sql(role["indexer"], statement), statement
    for name in ("relay", "indexer"):
        assert refused_amqp(user[name], lambda channel: channel.basic_get(settings.commands_queue)), name
        assert refused_amqp(user[name], lambda channel: channel.basic_publish(
            settings.commands_exchange, "RegisterCustomer", b"{}")), name
    assert refused_amqp(user["billing"], lambda channel: channel.basic_get(settings.indexer_queue))
    assert refused_amqp(user["worker"], lambda channel: channel.basic_publish(
        settings.events_exchange, "x", b"{}"))


def refused_amqp(url: str, act: Callable[[Any], Any]) -> bool:
    """Whether RabbitMQ refuses ``act`` on a confirming channel of the user of ``url`` (403)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        act(channel)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code == 403
    finally:
        if connection.is_open:
            connection.close()
    return False


READ_PRIVILEGE = re.compile(r"^/([^/_][^/]*/)?(_search|_count|_mget|_msearch|_field_caps|_doc/[^/]+|_source/[^/]+)$")


class ReadOnlySearch:
    """A front for the search server that lets through what Elasticsearch's ``read`` index
    privilege allows (search, count, get, mget) and the cluster's ``GET /``, and answers 403 to
    anything else, recording it: osmem has no security, so this stands in for the query role of
    ``setup --privileges`` (on a real cluster, Elasticsearch itself refuses the rest)."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.requests, self.refused = upstream, [], []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                path = self.path.split("?", 1)[0]
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                front.requests.append((self.command, path))
                if not front.allows(self.command, path):
                    front.refused.append((self.command, path))
                    self._answer(403, b'{"error":"read-only front: not allowed"}', "application/json", {})
                    return
                answer = httpx.request(self.command, front.upstream + self.path, content=body or None, timeout=30,
                                       headers={k: v for k, v in self.headers.items() if k.lower() in
                                                ("content-type", "accept")})
                self._answer(answer.status_code, answer.content, answer.headers.get("content-type", ""),
                             {k: v for k, v in answer.headers.items() if k.lower() == "x-elastic-product"})

            def _answer(self, status: int, body: bytes, content_type: str, extra: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in {"content-type": content_type, **extra}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def allows(method: str, path: str) -> bool:
        return (method in ("GET", "HEAD") and path == "/") or (
            method in ("GET", "POST", "HEAD") and READ_PRIVILEGE.match(path) is not None)

    def refuses(self, method: str, path: str) -> bool:
        return httpx.request(method, self.url + path, json={"x": 1}, timeout=10).status_code == 403

    def __enter__(self) -> ReadOnlySearch:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_indexer_and_relay_permissions_cover_every_partition_and_nothing_else() -> None:
    """G11: with CQRSKIT_INDEXER_PARTITIONS > 1 the indexer reads, and the relay writes, the
    partitions' queues (indexer, indexer.p1, ...) and their delay queues, and no other queue."""
    from cqrskit.app.privileges import rabbitmq_permissions
    from cqrskit.infra.settings import Settings

    permissions = rabbitmq_permissions(Settings(indexer_queue="idx", commands_queue="cmds"))
    indexer, relay = permissions["indexer"], permissions["relay"]
    for queue in ("idx", "idx.p1", "idx.p12", "idx.p3.DQ"):
        assert re.match(indexer.read, queue) and re.match(relay.write, queue), queue
    for queue in ("idx.XQ", "idx.p", "idx.px", "idxx", "cmds", "cmds.DQ"):
        assert not re.match(indexer.read, queue), queue
    assert not re.match(relay.write, "cmds")
