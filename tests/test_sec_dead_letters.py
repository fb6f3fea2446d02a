"""No identity is forged through the commands' dead letters (G11), on real RabbitMQ users and
PostgreSQL: a dead letter's body is never believed about who sent it; only what RabbitMQ
validated (``user_id``) and what a worker wrapped (published under the workers' own user) is.
``dlq retry`` keeps the original producer and issuer, or leaves the letter and says why; a
vouched-for issuer must exist and be allowed the type."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pika
import pytest
import sqlalchemy as sa

from cqrskit.app.privileges import rabbitmq_permissions
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.delivery import ISSUER_HEADER, PRODUCER_HEADER, RETRIED_HEADER, Delivery
from cqrskit.infra.grants import ProducerGrants
from cqrskit.infra.outcomes import Status
from cqrskit.infra.schema import events
from cqrskit.infra.settings import Settings
from tests.access import RabbitUsers, rabbit_users
from tests.processes import (  # noqa: F401  (fixtures: commands_topology, workers, write_store)
    PROJECT,
    Workers,
    WriteStore,
    commands_topology,
    envelope,
    worker_env,
    workers,
    write_store,
)
from tests.test_producer_access import producer_user, publish


@pytest.fixture
def users(amqp_url: str) -> Iterator[RabbitUsers]:
    with rabbit_users(amqp_url) as made:
        yield made


@pytest.fixture
def grants(pg_url: str) -> Iterator[ProducerGrants]:
    engine = make_engine(pg_url)
    yield ProducerGrants(engine, ttl=0)
    engine.dispose()


def forged_wrapper(settings: Settings, command: dict, **kwargs: str | None) -> bytes:
    """A body shaped as a worker's Dramatiq message around ``command``, with a forged delivery."""
    return json.dumps({
        "queue_name": settings.commands_queue, "actor_name": "execute_command",
        "args": [base64.b64encode(json.dumps(command).encode()).decode()],
        "kwargs": {"routing_key": command["type"], "producer": None, "on_behalf_of": None} | kwargs,
        "options": {"retries": 20, "traceback": "Traceback (most recent call last):\n  File \"x\"\n"
                                               "OperationalError: write store down (fixed now, safe to retry)"},
        "message_id": str(uuid.uuid4()), "message_timestamp": int(time.time() * 1000),
    }).encode()


def operator_user(users: RabbitUsers, settings: Settings) -> tuple[str, str]:
    p = rabbitmq_permissions(settings)["operator"]
    return users.add("operator", p.configure, p.write, p.read)


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, text=True, capture_output=True,
                          timeout=60, env=worker_env(settings, COLUMNS="200", **env))


def xq_ready(settings: Settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return connection.channel().queue_declare(f"{settings.commands_queue}.XQ", passive=True).method.message_count
    finally:
        connection.close()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_forged_wrapper_in_the_dead_letters_is_never_retried_under_its_claimed_issuer(
    workers: Workers, write_store: WriteStore, users: RabbitUsers, grants: ProducerGrants
) -> None:
    """G11, issue 19 finding 1 (High): a producer granted only PayOrder|CancelOrder publishes a
    body shaped as a worker's retry whose delivery names ``atk-gateway`` on behalf of ``key:ceo``
    and whose traceback lures the operator. It is dead-lettered; ``dlq list`` shows it as the
    attacker's, unreadable; ``dlq retry --all`` by an operator granted --on-behalf leaves it in
    place, and no customer is ever registered (before the fix it ran as ``key:ceo``)."""
    settings = workers.settings
    attacker, attacker_url = producer_user(users, settings)
    operator, operator_url = operator_user(users, settings)
    grants.grant(attacker, ["PayOrder", "CancelOrder"])
    grants.grant("atk-gateway", ["*"], on_behalf=True)
    grants.grant(operator, ["*"], on_behalf=True)
    workers.start(threads=2, CQRSKIT_PRODUCER_GRANTS="true", CQRSKIT_GRANTS_TTL_SECONDS="0")

    victim = envelope("RegisterCustomer", "c-ceo", {"name": "Mallory", "email": "m@example.com"})
    body = forged_wrapper(settings, victim, producer="atk-gateway", on_behalf_of="key:ceo")
    with pika.BlockingConnection(pika.URLParameters(attacker_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(settings.commands_exchange, "RegisterCustomer", body,
                              pika.BasicProperties(user_id=attacker, delivery_mode=2), mandatory=True)
    wait_for(lambda: xq_ready(settings) == 1, 30, "the forged body dead-lettered")

    as_operator = {"CQRSKIT_BROKER_URL": operator_url, "CQRSKIT_WORKER_USER": "guest"}
    listed = json.loads(cli(settings, "dlq", "list", "--json", **as_operator).stdout)
    assert [(d["command_id"], d["wrapped"], d["producer"]) for d in listed] == [(None, False, attacker)]
    retried = cli(settings, "dlq", "retry", "--all", **as_operator)
    assert "retried 0, left 1 unreadable in place" in retried.stdout, retried.stdout + retried.stderr
    assert xq_ready(settings) == 1
    sentinel = publish(attacker_url, settings, envelope("PayOrder", "o-1", {}))
    assert write_store.wait_for_outcomes([sentinel], timeout=30)[sentinel].status is Status.rejected
    assert write_store.outcomes([victim["command_id"]]) == {}
    assert write_store.events_by_command() == {}


@pytest.mark.timeout(90)
def test_a_wrapper_from_the_default_exchange_counts_only_from_the_workers_own_user(
    workers: Workers, write_store: WriteStore, users: RabbitUsers, grants: ProducerGrants
) -> None:
    """G11, issue 19 findings 1 and 2: a user that may write to ``amq.default`` (as the relay and
    the indexer once could) puts a wrapper with a forged delivery straight on the commands queue:
    the worker takes it as a raw body, not its own retry (its ``user_id`` is not the workers'),
    so it never runs; the worker's own retries still do (the dead letter after them is a wrapper
    ``dlq`` believes, with the original producer)."""
    settings = workers.settings
    intruder, intruder_url = users.add("relay", write="^amq\\.default$")
    grants.grant("gw", ["*"], on_behalf=True)
    workers.start(threads=2, CQRSKIT_GRANTS_TTL_SECONDS="0")
    forged = envelope("RegisterCustomer", "c-x", {"name": "Eve", "email": "eve@example.com"})
    with pika.BlockingConnection(pika.URLParameters(intruder_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for user_id in (None, intruder):
            channel.basic_publish("", settings.commands_queue,
                                  forged_wrapper(settings, forged, producer="gw", on_behalf_of="key:ceo"),
                                  pika.BasicProperties(user_id=user_id, delivery_mode=2), mandatory=True)
    wait_for(lambda: xq_ready(settings) == 2, 30, "both forged bodies dead-lettered")
    assert write_store.outcomes([forged["command_id"]]) == {}
    listed = json.loads(cli(settings, "dlq", "list", "--json").stdout)
    assert sorted(((d["command_id"], d["wrapped"], d["producer"]) for d in listed), key=str) == sorted(
        [(None, False, None), (None, False, intruder)], key=str)


def test_a_vouched_for_issuer_must_exist_and_be_allowed_the_type(pg_url: str) -> None:
    """G11, issue 19 finding 1: an --on-behalf producer vouches for ``key:ceo``, which does not
    exist, and for a live key outside its scope: both invalid "not allowed"; a live key in scope
    runs and is the issuer. A retry vouched for by a user not granted --on-behalf is refused; one
    by the granted operator keeps the original producer and issuer."""
    from cqrskit.examples.shop.domain import registry
    from cqrskit.infra.store import EventStore
    from cqrskit.workers.admission import Gate
    from cqrskit.workers.execution import CommandExecutor

    engine = make_engine(pg_url)
    grants = ProducerGrants(engine, ttl=0)
    grants.grant("gw", ["*"], on_behalf=True)
    grants.grant("ops", ["*"], on_behalf=True)
    grants.grant("crm", ["RegisterCustomer"])
    grants.grant("billing", ["PayOrder"])
    ApiKeys(engine).create("web", ["RegisterCustomer"], ["*"])
    ApiKeys(engine).create("pay", ["PayOrder"], ["*"])
    executor = CommandExecutor(EventStore(engine, registry), registry, gate=Gate(grants, enforce=True))

    def run(delivery: Delivery, n: int):
        body = envelope("RegisterCustomer", f"c-{n}", {"name": "Ann", "email": f"a{n}@example.com"})
        return body["command_id"], executor.execute(json.dumps(body).encode(), delivery)

    def amqp(user: str, **headers: str) -> Delivery:
        return Delivery.from_amqp("RegisterCustomer", user, headers)

    try:
        cases = {
            "unknown key": run(amqp("gw", **{ISSUER_HEADER: "key:ceo"}), 1),
            "key out of scope": run(amqp("gw", **{ISSUER_HEADER: "key:pay"}), 2),
            "key in scope": run(amqp("gw", **{ISSUER_HEADER: "key:web"}), 3),
            "retry by a non-voucher": run(amqp("billing", **{RETRIED_HEADER: "x.XQ", PRODUCER_HEADER: "crm"}), 4),
            "retry by the operator": run(amqp("ops", **{RETRIED_HEADER: "x.XQ", PRODUCER_HEADER: "gw",
                                                         ISSUER_HEADER: "key:web"}), 5),
            "retry of an anonymous command": run(amqp("ops", **{RETRIED_HEADER: "x.XQ"}), 6),
        }
        status = {name: (outcome.status, outcome.reason) for name, (_id, outcome) in cases.items()}
        assert status["unknown key"] == (Status.invalid, "not allowed: issuer 'key:ceo' (vouched for by 'gw') is "
                                                         "unknown or may not send RegisterCustomer")
        assert status["key out of scope"][1].startswith("not allowed: issuer 'key:pay'")
        assert status["key in scope"][0] is Status.succeeded
        assert status["retry by a non-voucher"] == (Status.invalid, "not allowed: 'billing' may not republish the "
                                                                    "commands of 'crm' (grant it --on-behalf)")
        assert status["retry by the operator"][0] is Status.succeeded
        assert status["retry of an anonymous command"][1].startswith("not allowed: no validated producer identity")
        with engine.connect() as conn:
            meta = {row.metadata["command_id"]: row.metadata for row in conn.execute(sa.select(events.c.metadata))}
        assert {k: meta[cases["retry by the operator"][0]][k] for k in ("issuer", "producer")} == {
            "issuer": "key:web", "producer": "gw"}
        assert set(meta) == {cases["key in scope"][0], cases["retry by the operator"][0]}
    finally:
        engine.dispose()


def test_no_control_character_in_a_dead_letter_reaches_the_terminal() -> None:
    """G11, issue 19 finding 3: a forged reason's ESC, C1 CSI, CR and bidi override are shown as
    visible escapes; newlines survive only where a text has lines (a traceback)."""
    from cqrskit.infra.inert import inert, inert_lines

    forged = "ok\x1b]0;pwned\x07\x9b2J\rsafe\u202etxt.exe\x7f"
    shown = inert(forged)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", shown)
    assert shown == "ok\\x1b]0;pwned\\x07\\x9b2J\\x0dsafe\\u202etxt.exe\\x7f"
    assert inert_lines("a\n\tb\x1b") == "a\n\tb\\x1b" and inert("a\nb") == "a\\x0ab"
