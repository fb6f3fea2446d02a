"""Process managers on PostgreSQL: reactions per second beside the raw one-row commit rate, and
the lateness of timers with ``--timers`` of them pending.

    .venv/bin/python -m bench.process_managers [--timers 10000] [--spread 20]

One run, on a fresh database: ``--timers`` shop orders are placed (their events appended through
the write store), the shop's payment deadline reacts to every ``OrderPlaced`` (one transaction
each: handled record, state, timer; ``ReactionStore.react``, as the process does), then every
timer is moved to come due over ``--spread`` seconds from now and one process's timer loop
(``ProcessManagers.fire_once``) fires them as they come due: lateness p50 / p99 / max. The raw
limit: PostgreSQL's one-row INSERT + COMMIT rate on one connection, measured in the same run.
The load average stands beside the figures.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bench.command_side import bench_database, raw_pg_rate
from cqrskit.examples.shop import app as shop
from cqrskit.examples.shop.orders import Order, OrderLine
from cqrskit.examples.shop.payments import payment_deadline
from cqrskit.infra.db import make_engine
from cqrskit.infra.store import EventStore
from cqrskit.infra.write_store.reactions import ReactionStore
from cqrskit.workers.process_managers import ProcessManagers

LINE = OrderLine(sku="SKU-1", product_id="p1", name="Pen", quantity=1, unit_price_cents=100)


def place_orders(store: EventStore, count: int) -> None:
    for start in range(0, count, 100):
        with store.unit_of_work() as uow:
            for i in range(start, min(count, start + 100)):
                uow.load(Order, f"o{i}").place("c1", [LINE])
            uow.commit({})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=20.0)
    args = parser.parse_args()
    with bench_database(uuid.uuid4().hex[:8]) as url:
        engine = make_engine(url, pool_size=4)
        store = EventStore(engine, shop.registry)
        reactions = ReactionStore(engine, shop.registry, shop.process_managers)
        place_orders(store, args.timers)
        placed = [e for e in store.read_all(0, args.timers * 2) if e.type == "OrderPlaced"]
        started = time.monotonic()
        for event in placed:
            reactions.react(payment_deadline, event)
        react_rate = len(placed) / (time.monotonic() - started)
        raw = raw_pg_rate(url, 1, 5.0)
        with engine.begin() as conn:  # due over the spread, from 1 s from now, in the instances' order
            conn.execute(sa.text("UPDATE process_timers SET due_at = now() + interval '1 second' + "
                                 "(substring(instance_key from 2)::int * :step) * interval '1 millisecond'"),
                         {"step": args.spread * 1000 / args.timers})
        process = ProcessManagers(engine, reactions, publish=lambda _: None)
        while reactions.timers(payment_deadline.name, f"o{args.timers - 1}") or process.lateness.fired < len(placed):
            if not process.fire_once(datetime.now(UTC)):
                time.sleep(0.02)
        engine.dispose()
    late = process.lateness
    table = Table("measure", "ours", "raw limit", "ratio", title="process managers (PostgreSQL)")
    table.add_row("reactions/s (one transaction each)", f"{react_rate:,.0f}", f"{raw:,.0f} one-row tx/s",
                  f"{react_rate / raw:.2f}x")
    table.add_row(f"timer lateness p50 / p99 / max ({args.timers:,} pending, due over {args.spread:g} s)",
                  f"{late.quantile(0.5) * 1000:,.0f} / {late.quantile(0.99) * 1000:,.0f} / "
                  f"{max(late.sample) * 1000:,.0f} ms", f"{args.timers / args.spread:,.0f} due/s", "")
    console = Console()
    console.print(table)
    console.print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
