"""``cqrskit setup --privileges`` provisions the roles of docs/operations.md, and each process works
under its own role and is refused what it must not do (G11), on real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pika
import psycopg
import pytest
from sqlalchemy import make_url

from cqrskit.app.privileges import provision
from cqrskit.examples.shop.domain import registry
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.outcomes import Status
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.producers.gateway import create_app, read_only_engine
from cqrskit.workers.execution import CommandExecutor
from tests.access import rabbitmqctl
from tests.conftest import _admin_dsn
from tests.processes import Workers, WriteStore, commands_topology, envelope, workers, write_store  # noqa: F401
from tests.test_gateway import serving

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
