"""The gateway's batch endpoint and outcome reads under a limited key (G10, G11: issue 19 findings 5
and 6), on real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from cqrskit.examples.shop.domain import registry
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.outcomes import Outcome, Status
from cqrskit.infra.settings import Settings
from cqrskit.infra.store import EventStore
from tests.processes import commands_topology, envelope  # noqa: F401
from tests.test_http_auth import SECRET, bearer, gateway_app
from tests.test_gateway import serving


@pytest.fixture
def keys(pg_url: str) -> Iterator[ApiKeys]:
    engine = make_engine(pg_url)
    yield ApiKeys(engine, ttl=0)
    engine.dispose()


def bloated(kind: str, n: int) -> dict:
    """A command of ``kind`` with 60 unknown payload keys (60 errors each)."""
    command = envelope(kind, f"x-{n}", {f"k{i:02d}": i for i in range(60)})
    return command


def test_a_batch_is_checked_for_scope_first_and_its_errors_are_capped(commands_topology: Settings,  # noqa: F811
                                                                       keys: ApiKeys) -> None:
    """G10/G11, issue 19 finding 5: 1,000 commands outside a limited key's scope are refused 403
    before any is validated, in an answer of a few hundred bytes; 1,000 in scope with 60 unknown
    keys each get a 400 listing the first 20 by index, 10 errors each and how many more (it was
    a 10.8 MB answer to a 3.7 MB body); nothing is published either way."""
    settings = commands_topology.model_copy(update={"token_secret": SECRET})
    _key, token = keys.create("limited", ["RegisterCustomer"], [])
    outside = [bloated("AddProduct", n) for n in range(1000)]
    inside = [bloated("RegisterCustomer", n) for n in range(1000)]
    with serving(gateway_app(settings, authenticate=keys.authenticate)) as url, \
            httpx.Client(base_url=url, timeout=60, headers=bearer(token)) as http:
        refused = http.post("/commands/batch", content=json.dumps(outside), headers={"content-type": "application/json"})
        assert refused.status_code == 403, refused.text[:300]
        assert len(refused.content) < 2048 and "1000 of 1000 commands" in refused.json()["detail"]
        body = json.dumps(inside).encode()
        invalid = http.post("/commands/batch", content=body, headers={"content-type": "application/json"})
    assert invalid.status_code == 400, invalid.text[:300]
    problem = invalid.json()
    assert [item["index"] for item in problem["items"]] == list(range(20))
    assert all(len(item["errors"]) == 10 and item["more_errors"] >= 40 for item in problem["items"]), \
        problem["items"][0]
    assert problem["detail"].startswith("at least 20 of 1000 commands are invalid")
    assert len(invalid.content) < len(body) / 20


@pytest.mark.timeout(60)
def test_an_outcome_a_key_may_not_see_is_answered_as_an_unknown_id(commands_topology: Settings,  # noqa: F811
                                                                  keys: ApiKeys, pg_url: str) -> None:
    """G11, issue 19 finding 6: a key limited to RegisterCustomer asks, with ?wait=2, for the
    outcome of an AddProduct another producer sent and for an id nobody sent: both are the same
    404 after the whole wait (it answered the first at once: an oracle of which ids exist and
    when they finished); its own type's outcome it reads at once."""
    settings = commands_topology.model_copy(update={"token_secret": SECRET})
    _key, token = keys.create("limited", ["RegisterCustomer"], [])
    engine = make_engine(pg_url)
    store = EventStore(engine, registry)
    store.record_outcome(Outcome(command_id="theirs", status=Status.rejected, type="AddProduct", reason="sku taken"))
    store.record_outcome(Outcome(command_id="mine", status=Status.rejected, type="RegisterCustomer", reason="email"))
    answers = {}
    try:
        with serving(gateway_app(settings, authenticate=keys.authenticate)) as url, \
                httpx.Client(base_url=url, timeout=30, headers=bearer(token)) as http:
            for command_id in ("theirs", "nobodys", "mine"):
                started = time.monotonic()
                answer = http.get(f"/commands/{command_id}", params={"wait": 2})
                answers[command_id] = (answer.status_code, answer.json().get("detail"), time.monotonic() - started)
    finally:
        engine.dispose()
    assert answers["theirs"][0] == answers["nobodys"][0] == 404
    assert answers["theirs"][1] == answers["nobodys"][1].replace("nobodys", "theirs")
    assert answers["theirs"][2] >= 2 and answers["nobodys"][2] >= 2  # both waited the whole ?wait
    assert answers["mine"][0] == 200


def test_a_repeated_wait_is_refused_not_silently_the_last(commands_topology: Settings,  # noqa: F811
                                                          keys: ApiKeys) -> None:
    """G10, issue 19 finding 7: ``?wait=0&wait=30`` kept the last value silently; it is a 422."""
    settings = commands_topology.model_copy(update={"token_secret": SECRET})
    _key, token = keys.create("limited", ["RegisterCustomer"], [])
    with serving(gateway_app(settings, authenticate=keys.authenticate)) as url, \
            httpx.Client(base_url=url, timeout=30, headers=bearer(token)) as http:
        repeated = http.get("/commands/some-id", params=[("wait", "0"), ("wait", "30")])
        single = http.get("/commands/some-id", params={"wait": "0"})
    assert repeated.status_code == 422 and repeated.json()["detail"] == "wait is given more than once"
    assert single.status_code == 404
