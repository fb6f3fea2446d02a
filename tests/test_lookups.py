"""Indexes for read models' fan-out lookups (``ids_where``), on real PostgreSQL (and SQLite, which
gets none): the lookup finds the same aggregates with the index as without, so a fan-out still
reaches every document it must (G6), and the query is served by the index."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from cqrskit.examples.hotel.read_models import HOTEL_READ_MODELS
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from cqrskit.infra.schema import streams
from cqrskit.infra.store import EventStore
from cqrskit.read_models.lookups import checked, ensure_lookup_indexes, lookups_of
from cqrskit.read_models.source import WriteStoreSource, snapshot
from cqrskit.workers.execution import CommandExecutor
from cqrskit.producers.commands import new_command


def place_orders(store: EventStore, customers: int, orders: int) -> None:
    executor = CommandExecutor(store, store.registry)
    commands = [new_command("AddProduct", "p1", {"sku": "MUG", "name": "Mug", "price_cents": 100, "stock": 10_000})]
    commands += [new_command("RegisterCustomer", f"c{i}", {"name": f"C {i}", "email": f"c{i}@example.com"})
                 for i in range(customers)]
    commands += [new_command("PlaceOrder", f"o{i}", {"customer_id": f"c{i % customers}",
                                                     "lines": [{"sku": "MUG", "quantity": 1}]}) for i in range(orders)]
    for command in commands:
        assert executor.execute(command.to_json()).status.value == "succeeded"


def orders_of(store: EventStore, customers: list[str]) -> dict[str, list[str]]:
    with snapshot(store.engine) as conn:
        found = WriteStoreSource(conn, store.registry).ids_where("order", "customer_id", customers)
    return {c: sorted(ids) for c, ids in found.items()}


def test_declared_lookups_are_indexed_once_and_find_what_a_scan_finds(store: EventStore) -> None:
    place_orders(store, customers=5, orders=40)
    expected = {f"c{i}": sorted(f"o{j}" for j in range(40) if j % 5 == i) for i in range(5)}
    assert orders_of(store, [*expected, "nobody"]) == expected
    assert lookups_of([*SHOP_READ_MODELS, *HOTEL_READ_MODELS]) == [("booking", "room_id"), ("order", "customer_id")]
    made = ensure_lookup_indexes(store.engine, SHOP_READ_MODELS)
    postgres = store.engine.dialect.name == "postgresql"
    assert made == (["ix_streams_order_customer_id"] if postgres else [])
    assert ensure_lookup_indexes(store.engine, SHOP_READ_MODELS) == []
    assert orders_of(store, [*expected, "nobody"]) == expected


def test_the_lookup_query_is_served_by_its_index(pg_store: EventStore) -> None:
    place_orders(pg_store, customers=3, orders=10)
    ensure_lookup_indexes(pg_store.engine, SHOP_READ_MODELS)
    field = streams.c.state.op("->>")(sa.literal_column("'customer_id'"))
    query = sa.select(streams.c.aggregate_id).where(streams.c.stream_type == sa.literal_column("'order'"),
                                                    field.in_(["c1", "c2"]))
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    with pg_store.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # a table this small would be scanned anyway
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))
    assert "ix_streams_order_customer_id" in plan, plan


@pytest.mark.parametrize("stream_type, field", [("order", "customer_id'); DROP TABLE streams; --"),
                                                ("or der", "customer_id"), ("order", "")])
def test_a_lookup_must_name_plain_identifiers(stream_type: str, field: str) -> None:
    with pytest.raises(ValueError, match="plain identifier"):
        checked(stream_type, field)
