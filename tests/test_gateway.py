"""The command gateway (producers/gateway.py) served by uvicorn on a free port, against the real
RabbitMQ and PostgreSQL: accepted means confirmed (G1), every command reaches a queryable outcome
with its consistency token (G3, G8), bad input gets a precise problem and publishes nothing (G10),
size limits hold before the body is read, and generated input never gets a 5xx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
import schemathesis
import sqlalchemy as sa
import uvicorn
from hypothesis import HealthCheck, settings as hypothesis_settings

from cqrskit.examples.shop.domain import registry as shop_registry
from cqrskit.infra.api_keys import ApiKeys
from cqrskit.infra.db import make_engine
from cqrskit.infra.settings import Settings
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.producers.gateway import check_command, create_app, read_only_engine
from api_checks import ALL_CHECKS, credentials, no_key  # as the query API tests import it (a check registers once)
from tests.bad_inputs import BAD_INPUTS
from tests.processes import (  # noqa: F401  (fixtures)
    Workers,
    WriteStore,
    commands_topology,
    drain_queue,
    envelope,
    workers,
    write_store,
)

PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}  # a POST without it is refused (415, G11)
ROOT = Path(__file__).resolve().parents[1]


# -- serving the app -----------------------------------------------------------------------------
@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` (its lifespan included) under uvicorn in a thread on a free port; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@contextmanager
def gateway_client(settings: Settings, **options: Any) -> Iterator[httpx.Client]:
    with serving(create_app(settings, registry=shop_registry, **options)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture
def client(commands_topology: Settings) -> Iterator[httpx.Client]:
    with gateway_client(commands_topology) as http:
        yield http


def queue_depth(settings: Settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        return connection.channel().queue_declare(settings.commands_queue, passive=True).method.message_count
    finally:
        connection.close()


def problem_text(response: httpx.Response) -> str:
    body = response.json()
    errors = [f"{'.'.join(map(str, e['loc']))} {e['msg']}" for e in body.get("errors", [])]
    items = [f"{i['index']}: {i['detail']}" for i in body.get("items", [])]
    return " ".join([body["detail"], *errors, *items])


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"], body
    return body


def customer(cid: str, email: str | None = None) -> dict[str, Any]:
    return envelope("RegisterCustomer", cid, {"name": "Ann", "email": email or f"{cid}@example.com"})


def product(pid: str, sku: str) -> dict[str, Any]:
    return envelope("AddProduct", pid, {"sku": sku, "name": sku.title(), "price_cents": 1250, "stock": 10})


# -- accepted, executed, outcome with its token ------------------------------------------------------
@pytest.mark.timeout(120)
def test_commands_are_executed_and_outcomes_carry_consistency_tokens(
    workers: Workers, write_store: WriteStore
) -> None:
    workers.start(threads=2)
    settings = workers.settings
    with gateway_client(settings) as http:
        setup = [customer("c-ann"), product("p-mug", "MUG-1"), product("p-tee", "TEE-1")]
        batch = http.post("/commands/batch", json=setup)
        assert batch.status_code == 202, batch.text
        assert batch.json()["confirmed"] == 3 and all(c["confirmed"] for c in batch.json()["commands"])
        for item in batch.json()["commands"]:
            assert http.get(item["outcome_url"], params={"wait": 20}).json()["status"] == "succeeded"

        lines = [{"sku": "MUG-1", "quantity": 2}, {"sku": "TEE-1", "quantity": 1}]
        order = envelope("PlaceOrder", "o-1", {"customer_id": "c-ann", "lines": lines})
        accepted = http.post("/commands", json=order)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json() == {"command_id": order["command_id"], "status": "accepted",
                                   "outcome_url": f"/commands/{order['command_id']}"}
        assert accepted.headers["location"] == accepted.json()["outcome_url"]
        outcome = http.get(accepted.headers["location"], params={"wait": 20}).json()
        too_many = [{"sku": "MUG-1", "quantity": 99}]
        short = envelope("PlaceOrder", "o-2", {"customer_id": "c-ann", "lines": too_many})
        location = http.post("/commands", json=short).headers["location"]
        rejected = http.get(location, params={"wait": 20}).json()

    assert outcome["status"] == "succeeded", outcome
    assert (outcome["aggregate_id"], outcome["aggregate_version"], len(outcome["positions"])) == ("o-1", 1, 3)
    token = ConsistencyToken.decode(outcome["consistency_token"], settings.token_secret)
    assert sorted(token.streams) == [("order:o-1", 1), ("product:p-mug", 2), ("product:p-tee", 2)]
    assert write_store.outcomes([order["command_id"]])[order["command_id"]].positions == outcome["positions"]
    assert rejected["status"] == "rejected" and "stock" in rejected["reason"], rejected
    assert "consistency_token" not in rejected and rejected["positions"] == []


def test_accepted_means_queued_and_the_outcome_is_not_known_until_executed(
    client: httpx.Client, commands_topology: Settings
) -> None:
    command = customer("c-queued")
    command["metadata"]["correlation_id"] = "flow-7"
    body = json.dumps(command, indent=1, ensure_ascii=False).encode()
    response = client.post("/commands", content=body,
                           headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 202, response.text
    assert queue_depth(commands_topology) == 1

    started = time.monotonic()
    pending = client.get(f"/commands/{command['command_id']}", params={"wait": 0.3})
    assert time.monotonic() - started >= 0.3
    assert "not known yet: pending or never received" in assert_problem(pending, 404)["detail"]

    [(properties, queued)] = drain_queue(commands_topology.broker_url, commands_topology.commands_queue)
    assert properties.message_id == command["command_id"] and properties.delivery_mode == 2
    assert queued == body  # byte for byte what was checked: the workers decide on the same bytes


def test_concurrent_commands_are_each_confirmed(client: httpx.Client, commands_topology: Settings) -> None:
    """Requests arriving together are published together; each still answers for its own command,
    and one command id sent twice at once is accepted twice (it takes effect once)."""
    commands = [customer(f"c-many-{i}") for i in range(60)]
    commands.append(commands[0])
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda command: client.post("/commands", json=command), commands))
    assert [r.status_code for r in responses] == [202] * 61
    assert [r.json()["command_id"] for r in responses] == [c["command_id"] for c in commands]
    assert queue_depth(commands_topology) == 61


def test_command_ids_with_slashes_round_trip_through_the_outcome_url(client: httpx.Client) -> None:
    command = customer("c-slash", email="slash@example.com")
    command["command_id"] = "shop/2026:cmd@7"
    response = client.post("/commands", json=command)
    assert response.status_code == 202, response.text
    assert response.json()["outcome_url"] == "/commands/shop%2F2026%3Acmd%407"
    missing = client.get(response.json()["outcome_url"])
    assert "'shop/2026:cmd@7'" in assert_problem(missing, 404)["detail"]


# -- bad input (G10) -------------------------------------------------------------------------------
GATEWAY_FRAGMENTS = {  # rows the workers dead-letter (they cannot read a command id): what the gateway says
    "garbage bytes": "Invalid JSON",
    "not JSON": "Invalid JSON",
    "empty body": "Invalid JSON",
    "JSON array": "Input should be an object",
    "no command id": "command_id Field required",
    "command id with NUL": "command_id NUL",
}


def test_every_bad_input_gets_a_precise_problem_and_nothing_is_published(
    client: httpx.Client, commands_topology: Settings
) -> None:
    wrong = []
    for name, make_body, (fate, fragment) in BAD_INPUTS:
        expected = GATEWAY_FRAGMENTS[name] if fate == "dead-letter" else fragment
        response = client.post("/commands", content=make_body(f"cmd-{uuid.uuid4()}"),
                               headers={"content-type": "application/json"})
        status = 413 if name == "oversized" else 400
        if response.status_code != status or response.headers["content-type"] != PROBLEM:
            wrong.append(f"{name}: {response.status_code} {response.text[:300]}")
        elif expected not in problem_text(response):
            wrong.append(f"{name}: {expected!r} not in {problem_text(response)!r}")
    assert not wrong, "\n".join(wrong)
    assert queue_depth(commands_topology) == 0


def test_errors_name_their_paths_as_locations_and_json_pointers(client: httpx.Client) -> None:
    command = customer("c-paths")
    command["payload"] = {"name": 42, "email": "a@example.com", "x/y": 1}
    body = assert_problem(client.post("/commands", json=command), 400)
    assert body["type"] == "https://cqrskit.dev/problems/invalid-command"
    assert body["detail"] == "invalid payload for RegisterCustomer"
    assert {(tuple(e["loc"]), e["pointer"], e["type"]) for e in body["errors"]} == {
        (("payload", "name"), "/payload/name", "string_type"),
        (("payload", "x/y"), "/payload/x~1y", "extra_forbidden"),
    }


def test_requests_that_are_not_commands_get_problems(client: httpx.Client) -> None:
    text = client.post("/commands", content=b"{}", headers={"content-type": "text/plain"})
    assert "application/json" in assert_problem(text, 415)["detail"]
    assert assert_problem(client.get("/commands/bad%00id"), 422)["errors"][0]["loc"] == ["path", "command_id"]
    for wait in ("-1", "abc", "nan", "inf"):
        assert_problem(client.get("/commands/c-1", params={"wait": wait}), 422)
    assert_problem(client.get("/nowhere"), 404)
    assert_problem(client.delete("/commands/c-1"), 405)


def test_health_says_whether_the_write_store_answers(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok", "write_store": "ok"}


# -- size limits before the body is read (G10, G11) ------------------------------------------------
def raw_request(url: str, head: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``head`` and ``body`` on a socket (from a thread: the server may stop reading and close)
    and read the response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sender = threading.Thread(target=_send_ignoring_resets, args=(sock, head + body), daemon=True)
        sender.start()
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        sender.join(timeout=5)
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _send_ignoring_resets(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_an_oversized_body_is_refused_from_its_content_length_before_it_is_read(
    commands_topology: Settings,
) -> None:
    with serving(create_app(commands_topology, registry=shop_registry)) as url:
        head = (b"POST /commands HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000000\r\n\r\n")
        started = time.monotonic()
        status, problem = raw_request(url, head, b'{"command_id": "c-big", "payload": {"name": "')
        assert status == 413 and time.monotonic() - started < 3  # 100 MB were never sent
        assert problem["detail"] == "command of 100000000 bytes exceeds CQRSKIT_MAX_COMMAND_BYTES=65536"

        chunked = (b"POST /commands/batch HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        chunks = b"".join(b"%x\r\n" % 8192 + b"[" * 8192 + b"\r\n" for _ in range(1000))  # 8.2 MB, no length
        status, problem = raw_request(url, chunked, chunks)
        assert status == 413 and "more than 5242880 bytes" in problem["detail"]  # 4 MiB + 1 MiB drained

        a_little_over = b"[" + b" " * 70_000 + b"]"
        head = (b"POST /commands HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(a_little_over))
        status, problem = raw_request(url, head, a_little_over)  # read (and dropped), then refused exactly
        assert status == 413 and "command of 70002 bytes exceeds" in problem["detail"]
    assert queue_depth(commands_topology) == 0


def test_the_size_limit_is_the_setting(commands_topology: Settings) -> None:
    small = commands_topology.model_copy(update={"max_command_bytes": 300})
    command = customer("c-small")
    with gateway_client(small) as http:
        assert http.post("/commands", json=command).status_code == 202
        command["payload"]["name"] = "A" * 200
        too_large = assert_problem(http.post("/commands", json=command), 413)
        assert "CQRSKIT_MAX_COMMAND_BYTES=300" in too_large["detail"]
        batch = http.post("/commands/batch", json=[customer("c-b1"), command])
        assert assert_problem(batch, 400)["items"][0]["index"] == 1
    assert queue_depth(commands_topology) == 1


# -- batches -----------------------------------------------------------------------------------------
def test_a_batch_with_bad_commands_names_each_by_index_and_publishes_nothing(
    client: httpx.Client, commands_topology: Settings
) -> None:
    good = customer("c-good")
    batch = [good, {**customer("c-extra"), "priority": "high"}, customer("c-fine"),
             {**customer("c-rocket"), "type": "LaunchRocket"},
             {**customer("c-dup"), "command_id": good["command_id"]}]
    body = assert_problem(client.post("/commands/batch", json=batch), 400)
    assert body["detail"] == "3 of 5 commands are invalid; nothing was published"
    assert [(i["index"], i["errors"][0]["loc"]) for i in body["items"]] == [
        (1, ["priority"]), (3, ["type"]), (4, ["command_id"])]
    assert "unknown command type 'LaunchRocket'" in body["items"][1]["detail"]
    assert "also at index 0" in body["items"][2]["detail"]
    assert queue_depth(commands_topology) == 0


def test_batch_limits_and_shapes(client: httpx.Client, commands_topology: Settings) -> None:
    """G10: a batch that is not JSON, holds a lone surrogate, is empty or not an array, or holds
    more than 1,000 commands (the schema's maxItems: 400) is refused and publishes nothing."""
    assert "not valid JSON" in assert_problem(client.post("/commands/batch", content=b"[{", headers=JSON), 400)["detail"]
    surrogate_body = json.dumps([customer("c-s")]).replace("Ann", "\\ud800").encode()
    surrogate = client.post("/commands/batch", content=surrogate_body, headers=JSON)
    assert "lone surrogate" in problem_text(surrogate) and surrogate.status_code == 400
    for empty in (b"[]", b"{}"):
        refused = assert_problem(client.post("/commands/batch", content=empty, headers=JSON), 400)
        assert "JSON array of 1 or more" in refused["detail"]
    too_many = [customer(f"c-{i}") for i in range(1001)]
    assert "limit of 1000" in assert_problem(client.post("/commands/batch", json=too_many), 400)["detail"]
    assert queue_depth(commands_topology) == 0


def test_a_good_batch_is_published_and_every_command_confirmed(
    client: httpx.Client, commands_topology: Settings
) -> None:
    batch = [customer(f"c-{i}") for i in range(200)]
    body = b"[" + b", ".join(json.dumps(c).encode() for c in batch) + b"]"
    response = client.post("/commands/batch", content=body, headers=JSON)
    assert response.status_code == 202, response.text
    assert response.json()["confirmed"] == 200 and response.json()["failed"] == 0
    assert [c["command_id"] for c in response.json()["commands"]] == [c["command_id"] for c in batch]
    assert all(c["confirmed"] and c.get("reason") is None for c in response.json()["commands"])
    queued = drain_queue(commands_topology.broker_url, commands_topology.commands_queue)
    assert sorted(body for _, body in queued) == sorted(json.dumps(c).encode() for c in batch)


# -- the broker does not confirm -----------------------------------------------------------------------
def test_503_when_the_exchange_does_not_exist(commands_topology: Settings) -> None:
    exchange = f"test.missing.{uuid.uuid4().hex[:8]}"
    missing = commands_topology.model_copy(update={"commands_exchange": exchange})
    with gateway_client(missing) as http:
        one = assert_problem(http.post("/commands", json=customer("c-lost")), 503)
        assert "404" in one["detail"] and "send it again with the same command id" in one["detail"]
        batch = assert_problem(http.post("/commands/batch", json=[customer("c-l1"), customer("c-l2")]), 503)
        assert [c["confirmed"] for c in batch["commands"]] == [False, False]
        after = http.post("/commands", json=customer("c-again"))  # the channel is reopened for the next one
        assert after.status_code == 503 and after.headers["retry-after"] == "1"


def test_503_when_nothing_is_bound_to_the_exchange(amqp_settings: Settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_settings.broker_url))
    connection.channel().exchange_declare(amqp_settings.commands_exchange, "topic", durable=True)
    connection.close()
    with gateway_client(amqp_settings) as http:
        refused = assert_problem(http.post("/commands", json=customer("c-nowhere")), 503)
        assert "unroutable" in refused["detail"]


# -- least privilege (G11), nothing at import -------------------------------------------------------------
def test_the_gateway_cannot_write_the_write_store(pg_url: str) -> None:
    engine = read_only_engine(pg_url)
    try:
        with pytest.raises(sa.exc.InternalError, match="read-only transaction"):
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM command_outcomes"))
    finally:
        engine.dispose()


def test_creating_the_app_connects_to_nothing_and_documents_the_envelope() -> None:
    nowhere = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/%2F",
                       database_url="postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    document = create_app(nowhere, registry=shop_registry).openapi()
    envelope_schema = document["components"]["schemas"]["CommandEnvelope"]
    assert envelope_schema["additionalProperties"] is False
    assert set(envelope_schema["required"]) == {"command_id", "type", "aggregate_id", "payload"}
    with pytest.raises(ValueError, match="amqp://"):
        create_app(Settings(), registry=shop_registry)  # the embedded broker lives in another process


def test_settings_pass_to_worker_processes_through_the_environment() -> None:
    settings = Settings(broker_url="amqp://u:p@rabbit:5672/%2F", max_command_bytes=1234,
                        commands_exchange="x.y")
    env = settings.environment()
    assert Settings(**{k.removeprefix("CQRSKIT_").lower(): v for k, v in env.items()}) == settings


def test_check_command_publishes_the_bytes_it_checked() -> None:
    from cqrskit.examples.shop.domain import registry

    body = json.dumps(customer("c-check")).encode()
    message = check_command(body, registry, 65536)
    assert (message.body, message.message_id, message.routing_key) == (body, json.loads(body)["command_id"],
                                                                      "RegisterCustomer")


# -- generated input (schemathesis) ----------------------------------------------------------------------
SCHEMA = schemathesis.openapi.from_dict(create_app(
    Settings(broker_url="amqp://nobody@127.0.0.1:1/%2F"), registry=shop_registry, authenticate=no_key).openapi())


@pytest.fixture
def keyed_gateway(commands_topology: Settings) -> Iterator[tuple[str, dict[str, str]]]:
    """The gateway as deployed (RabbitMQ, PostgreSQL, API keys looked up read-only); its URL and a key's header."""
    owner = make_engine(commands_topology.database_url)
    _key, token = ApiKeys(owner).create("schemathesis", ["*"], [])
    owner.dispose()
    keys = read_only_engine(commands_topology.database_url)
    app = create_app(commands_topology, registry=shop_registry, max_wait=0.2,
                     authenticate=ApiKeys(keys, ttl=60).authenticate)
    with serving(app) as url:
        yield url, {"Authorization": f"Bearer {token}"}  # the header the schema declares
    keys.dispose()


@pytest.mark.timeout(120)
@SCHEMA.parametrize()
@hypothesis_settings(max_examples=15, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_server_error(case: Any, keyed_gateway: tuple[str, dict[str, str]]) -> None:
    """G10, G11: every operation, with data that fits its schema and data that does not, under every
    check schemathesis ships (``--checks all``), authenticated with a real API key, against real
    RabbitMQ and PostgreSQL: no 5xx, only documented answers, valid commands accepted, invalid
    ones refused, nothing without a key."""
    url, headers = keyed_gateway
    case.call_and_validate(base_url=url, headers=credentials(case, headers), timeout=30, checks=ALL_CHECKS)


# -- the benchmark runs -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_smoke_run_prints_both_rows(pg_admin: str, amqp_url: str) -> None:
    from bench.gateway import ROWS

    env = {**os.environ, "CQRSKIT_BENCH_PG": pg_admin, "CQRSKIT_BENCH_AMQP": amqp_url, "COLUMNS": "250"}
    result = subprocess.run([sys.executable, "-m", "bench.gateway", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=230)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row in ROWS:
        assert row in result.stdout, f"row {row!r} missing from:\n{result.stdout[-3000:]}"
