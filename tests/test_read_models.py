"""Read models on real PostgreSQL/SQLite and osmem: projections, versions, parking, verify,
rebuild (G6, G7, G9) — driven directly, without broker or relay."""

from __future__ import annotations

import pytest
from elasticsearch import Elasticsearch

from cqrskit.infra.store import EventStore
from cqrskit.producers.commands import new_command
from cqrskit.read_models.indexer import Indexer
from cqrskit.read_models.indices import alias, ensure
from cqrskit.read_models.parking import list_parked
from cqrskit.read_models.rebuild import rebuild
from cqrskit.read_models.search import make_client
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from cqrskit.read_models.verify import verify
from cqrskit.infra.event_wire import EventMessage
from cqrskit.workers.execution import CommandExecutor


@pytest.fixture
def es(search_url: str) -> Elasticsearch:
    return make_client(search_url)


@pytest.fixture
def shop(store: EventStore, es: Elasticsearch, index_prefix: str):  # type: ignore[no-untyped-def]
    for model in SHOP_READ_MODELS:
        ensure(es, store.engine, index_prefix, model)
    return Shop(store, es, index_prefix)


class Shop:
    def __init__(self, store: EventStore, es: Elasticsearch, prefix: str) -> None:
        self.store, self.es, self.prefix = store, es, prefix
        self.executor = CommandExecutor(store, store.registry)
        self.indexer = Indexer(store.engine, store.registry, es, prefix, SHOP_READ_MODELS)
        self.indexed_up_to = 0

    def run(self, type: str, aggregate_id: str, **payload):  # type: ignore[no-untyped-def]
        outcome = self.executor.execute(new_command(type, aggregate_id, payload).to_json())
        assert outcome.status.value == "succeeded", outcome.reason
        return outcome

    def pending_events(self) -> list[dict]:
        events = self.store.read_all(self.indexed_up_to, limit=100_000)
        self.indexed_up_to = events[-1].position if events else self.indexed_up_to
        return [EventMessage.from_stored(e).model_dump(mode="json") for e in events]

    def index(self):  # type: ignore[no-untyped-def]
        return self.indexer.index_events(self.pending_events())

    def doc(self, model: str, doc_id: str) -> dict:
        return self.es.get(index=alias(self.prefix, model), id=doc_id)

    def verify_all(self) -> None:
        for model in SHOP_READ_MODELS:
            report = verify(self.store.engine, self.store.registry, self.es, self.prefix, model)
            assert report.ok, report


def seed(shop: Shop) -> None:
    shop.run("RegisterCustomer", "c1", name="Ada Lovelace", email="ada@example.com")
    shop.run("AddProduct", "p1", sku="MUG", name="Ceramic mug", description="Stoneware", price_cents=1200, stock=10)
    shop.run("AddProduct", "p2", sku="BEANS", name="Espresso beans", price_cents=1800, stock=5)
    shop.run("PlaceOrder", "o1", customer_id="c1", lines=[{"sku": "MUG", "quantity": 2}, {"sku": "BEANS", "quantity": 1}])
    shop.run("PayOrder", "o1")


def test_documents_are_denormalised_and_versioned(shop: Shop) -> None:
    seed(shop)
    report = shop.index()
    assert report.parked == [] and report.written == report.documents == 4  # o1, p1, p2, c1
    order = shop.doc("orders", "o1")
    assert order["_source"]["customer"] == {"id": "c1", "name": "Ada Lovelace", "email": "ada@example.com"}
    assert [line["name"] for line in order["_source"]["lines"]] == ["Ceramic mug", "Espresso beans"]
    assert (order["_source"]["status"], order["_source"]["total_cents"], order["_version"]) == ("paid", 4200, 2 + 1)
    product = shop.doc("products", "p1")["_source"]
    assert (product["stock"], product["units_sold"]) == (8, 2)
    customer = shop.doc("customers", "c1")["_source"]
    assert (customer["order_count"], customer["lifetime_value_cents"]) == (1, 4200)
    shop.verify_all()


def test_customer_rename_reaches_every_order(shop: Shop) -> None:
    seed(shop)
    shop.run("PlaceOrder", "o2", customer_id="c1", lines=[{"sku": "MUG", "quantity": 1}])
    shop.index()
    shop.run("RenameCustomer", "c1", name="Countess of Lovelace")
    shop.index()
    for order_id in ("o1", "o2"):
        assert shop.doc("orders", order_id)["_source"]["customer"]["name"] == "Countess of Lovelace"
    shop.verify_all()


def test_replayed_and_reordered_batches_never_regress_a_document(shop: Shop) -> None:
    """G6: duplicates and out-of-order deliveries leave the newest document in place."""
    seed(shop)
    first = shop.pending_events()
    shop.run("ShipOrder", "o1")
    second = shop.pending_events()
    shop.indexer.index_events(second)
    shop.indexer.index_events(first)  # late, and a replay of what is already covered
    again = shop.indexer.index_events(first + second)
    assert again.written == 0 and again.stale == again.documents
    assert shop.doc("orders", "o1")["_source"]["status"] == "shipped"
    shop.verify_all()


def test_verify_reports_missing_extra_and_different(shop: Shop) -> None:
    seed(shop)
    shop.index()
    index = alias(shop.prefix, "orders")
    shop.es.delete(index=index, id="o1", refresh=True)
    shop.es.index(index=index, id="ghost", document={"order_id": "ghost", "status": "paid"}, refresh=True)
    shop.es.index(index=alias(shop.prefix, "products"), id="p1", refresh=True,
                  document={**shop.doc("products", "p1")["_source"], "stock": 999})
    orders = verify(shop.store.engine, shop.store.registry, shop.es, shop.prefix, SHOP_READ_MODELS[0])
    products = verify(shop.store.engine, shop.store.registry, shop.es, shop.prefix, SHOP_READ_MODELS[1])
    assert (orders.missing, orders.extra, orders.ok) == (["o1"], ["ghost"], False)
    assert products.different == {"p1": ["stock"]}


def test_unindexable_document_is_parked_and_the_rest_lands(shop: Shop, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """G7: a document the mapping refuses is parked with its error; its batch-mates are written."""
    seed(shop)
    products = SHOP_READ_MODELS[1]
    original = products.build

    def breaking(source, ids):  # type: ignore[no-untyped-def]
        docs = original(source, ids)
        if "p2" in docs:
            docs["p2"].source["stock"] = "lots"  # a long field: mapper_parsing_exception
        return docs

    monkeypatch.setattr(products, "build", breaking)
    report = shop.index()
    assert [(m, d) for m, d, _ in report.parked] == [("products", "p2")]
    (row,) = list_parked(shop.store.engine)
    assert "mapper_parsing_exception" in row["error"] and row["positions"]
    assert shop.doc("products", "p1")["_source"]["stock"] == 8
    monkeypatch.setattr(products, "build", original)
    shop.indexer.reindex("products", ["p2"])
    assert list_parked(shop.store.engine) == []
    shop.verify_all()


def test_rebuild_swaps_the_alias_to_an_equal_new_index(shop: Shop) -> None:
    seed(shop)
    shop.index()
    before = set(shop.es.indices.get_alias(name=alias(shop.prefix, "orders")))
    report = rebuild(shop.store.engine, shop.store.registry, shop.es, shop.prefix, SHOP_READ_MODELS[0])
    after = set(shop.es.indices.get_alias(name=alias(shop.prefix, "orders")))
    assert report.documents == 1 and report.replaced == sorted(before) and after == {report.index} != before
    assert not shop.es.indices.exists(index=list(before))
    shop.verify_all()


def test_a_mapping_with_nested_streams_is_refused_when_the_app_loads() -> None:
    """G8: read-your-writes finds documents by ``streams.id``, a plain object array
    (``STREAMS``); a read model whose mapping still declares ``streams`` as ``nested`` (which that
    lookup would not find) is refused with one line naming ``STREAMS``, not left to time out."""
    import copy

    from cqrskit.examples.shop.read_models import OrdersModel
    from cqrskit.read_models.queryable import searchable

    class NestedOrders(OrdersModel):
        mappings = copy.deepcopy(OrdersModel.mappings)

    NestedOrders.mappings["properties"]["streams"]["type"] = "nested"
    with pytest.raises(ValueError, match="STREAMS"):
        searchable(NestedOrders())
    assert searchable(OrdersModel()) is not None
