"""G8 end to end, as a client lives it: send a command through the HTTP gateway, take the
consistency token from its outcome, query the read models with it through the HTTP query API:
the write is visible in the answer. Real PostgreSQL, RabbitMQ, osmem and worker processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cqrskit.examples.shop import app as shop
from cqrskit.infra.settings import Settings
from cqrskit.producers.gateway import create_app as gateway_app
from cqrskit.read_models.api import create_app as query_app
from tests.stack import Stack
from tests.test_gateway import serving


@pytest.fixture
def stack(amqp_settings: Settings, search_url: str, tmp_path: Path) -> Iterator[Stack]:
    built = Stack.create(amqp_settings, search_url, tmp_path)
    built.start_worker(), built.start_relay(), built.start_indexer()
    yield built
    built.close()


def post(gateway: httpx.Client, type: str, aggregate_id: str, payload: dict) -> str:
    command_id = str(uuid.uuid4())
    body = {"command_id": command_id, "type": type, "aggregate_id": aggregate_id, "payload": payload}
    response = gateway.post("/commands", json=body)
    assert response.status_code == 202, response.text
    return command_id


def token_of(gateway: httpx.Client, command_id: str) -> str:
    outcome = gateway.get(f"/commands/{command_id}", params={"wait": 30}).json()
    assert outcome["status"] == "succeeded", outcome
    return outcome["consistency_token"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_query_with_the_token_of_a_command_sees_that_command(stack: Stack) -> None:
    settings = stack.settings
    tag = uuid.uuid4().hex[:8]
    with serving(gateway_app(settings, registry=shop.registry)) as gateway_url, serving(query_app(settings, shop.read_models, shop.queries)) as query_url, \
            httpx.Client(base_url=gateway_url, timeout=60) as gateway, httpx.Client(base_url=query_url, timeout=60) as query:
        token_of(gateway, post(gateway, "RegisterCustomer", f"c-{tag}", {"name": "Ada", "email": f"{tag}@example.com"}))
        token_of(gateway, post(gateway, "AddProduct", f"p-{tag}",
                               {"sku": f"S-{tag}", "name": "Mug", "price_cents": 900, "stock": 5}))
        placed = post(gateway, "PlaceOrder", f"o-{tag}",
                      {"customer_id": f"c-{tag}", "lines": [{"sku": f"S-{tag}", "quantity": 2}]})
        token = token_of(gateway, placed)
        order = query.get(f"/orders/o-{tag}", params={"consistent_with": token, "wait": 10})
        assert order.status_code == 200, order.text
        assert (order.json()["status"], order.json()["total_cents"]) == ("placed", 1800)
        product = query.get(f"/products/p-{tag}", params={"consistent_with": token, "wait": 10}).json()
        assert (product["stock"], product["units_sold"]) == (3, 2)
        renamed = token_of(gateway, post(gateway, "RenameCustomer", f"c-{tag}", {"name": "Countess Ada"}))
        orders = query.get("/orders", params={"customer_id": f"c-{tag}", "consistent_with": renamed, "wait": 10})
        assert [o["customer"]["name"] for o in orders.json()["items"]] == ["Countess Ada"]
        customer = query.get(f"/customers/c-{tag}", params={"consistent_with": token, "wait": 10}).json()
        assert customer["order_count"] == 1
