"""Operators see only inert text (G11, issue 19 finding 3), through the real CLI on PostgreSQL and
RabbitMQ: a command's type, aggregate id, error locations, a dead letter's forged reason, a
parked document's error and a granted type carrying ESC, C0, C1 and DEL are shown as visible
escapes by ``outcome``, ``dlq list``/``show``, ``parked list``/``show`` and ``producers list``;
an invalid command's outcome keeps a type or aggregate id only as it passed validation."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pika
import pytest

from cqrskit.examples.shop.domain import registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.grants import ProducerGrants
from cqrskit.infra.outcomes import Status
from cqrskit.infra.schema import parked_documents
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from cqrskit.workers.execution import CommandExecutor
from tests.processes import commands_topology, envelope  # noqa: F401
from tests.test_ops import cli

LIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")  # what a terminal would obey (newline and tab aside)
EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\r\x7f\u202e"


def assert_inert(output: str) -> None:
    assert not LIVE.search(output), repr(output)
    assert "\\x1b" in output, output


def test_an_outcome_shows_and_stores_only_inert_text(commands_topology: Settings) -> None:  # noqa: F811
    """G10/G11: a body whose type and aggregate id carry terminal controls is invalid; its outcome
    records neither (they did not pass validation); a valid envelope with an extra payload key of
    controls is invalid with that key in its errors, shown escaped by ``outcome`` and ``--json``."""
    settings = commands_topology
    engine = make_engine(settings.database_url)
    executor = CommandExecutor(EventStore(engine, registry), registry)
    bad = envelope("Register" + EVIL, "c-1" + EVIL, {"name": "Ann"})
    extra = envelope("RegisterCustomer", "c-2", {"name": "Ann", "email": "a@example.com", EVIL: 1})
    try:
        stored = executor.execute(json.dumps(bad).encode())
        assert stored.status is Status.invalid and (stored.type, stored.aggregate_id) == (None, None)
        assert executor.execute(json.dumps(extra).encode()).status is Status.invalid
    finally:
        engine.dispose()
    table = cli(settings, "outcome", extra["command_id"])
    assert table.returncode == 0, table.stderr
    assert_inert(table.stdout)
    shown = cli(settings, "outcome", extra["command_id"], "--json")
    assert not LIVE.search(shown.stdout) and "\\u001b" in shown.stdout
    assert json.loads(shown.stdout)["errors"][0]["loc"].endswith(EVIL)  # the JSON still says what was sent


@pytest.mark.timeout(60)
def test_dead_letters_parked_documents_and_grants_show_only_inert_text(commands_topology: Settings,  # noqa: F811
                                                                     search_url: str) -> None:
    """G11, issue 19 finding 3: a raw body in the dead-letter queue whose x-death reason is forged
    ("write store down (fixed now, safe to retry)" after a screen erase), a parked document's
    error and a granted type with controls: every view prints escapes, never the controls."""
    settings = commands_topology
    xq = f"{settings.commands_queue}.XQ"
    body = envelope("RegisterCustomer", "c-3", {"name": "Ann", "email": "a@example.com"})
    body["command_id"] = "id-3"
    forged = [{"reason": f"{EVIL}write store down (fixed now, safe to retry)", "queue": EVIL, "count": 1}]
    with pika.BlockingConnection(pika.URLParameters(settings.broker_url)) as connection:
        connection.channel().basic_publish("", xq, json.dumps(body).encode(),
                                           pika.BasicProperties(headers={"x-death": forged}))
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(parked_documents.insert().values(read_model="customers", doc_id="c" + EVIL, error=EVIL + "\nboom",
                                                          positions=[1], attempts=1, parked_at=datetime.now(UTC)))
        ProducerGrants(engine).grant("crm", ["Pay" + EVIL])
    finally:
        engine.dispose()
    search = {"CQRSKIT_ELASTICSEARCH_URL": search_url, "CQRSKIT_INDEX_PREFIX": settings.index_prefix,
              "CQRSKIT_INDEXER_QUEUE": settings.indexer_queue, "CQRSKIT_EVENTS_EXCHANGE": settings.events_exchange}
    made = cli(settings, "setup", CQRSKIT_PREFLIGHT_WAIT="30", **search)
    assert made.returncode == 0, made.stdout + made.stderr
    for args in (["dlq", "list"], ["dlq", "show", "1"], ["dlq", "list", "--json"], ["parked", "list"],
                 ["parked", "show", "1"], ["producers", "list"]):
        done = cli(settings, *args, **search)
        assert done.returncode == 0, (args, done.stderr)
        output = done.stdout
        assert not LIVE.search(output), (args, output)
        assert "\\x1b" in output or "\\u001b" in output, (args, output)
