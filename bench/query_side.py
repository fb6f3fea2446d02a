"""Query-side benchmark: the query API over HTTP beside the raw Elasticsearch client running the
very same queries, at the same concurrency, on one orders index.

    .venv/bin/python -m bench.query_side [--orders 100000] [--concurrency 8] [--seconds 10] [--runs 3]
                                         [--search-url URL] [--smoke]

- The index: ``--orders`` documents synthesised in the shape of ``OrdersModel`` documents
  (customers, lines with product names, statuses, timestamps over 180 days, streams), bulk-indexed
  into an index created with ``OrdersModel.mappings``, on an osmem server started here (it holds
  everything in memory: ~1.8 GB for 100k orders).
- The mix: what a back office does (recent orders, filters, full text, a customer's orders, next
  pages, one order, facets, revenue per day). The raw side sends exactly the requests the query
  layer builds (captured from ``cqrskit.examples.shop.queries``), through the same plain-JSON client.
- The API runs in its own process (``run_query_api``: uvicorn, one worker), like the Procfile's
  ``query``; the load comes from ``--concurrency`` threads with keep-alive connections.
Each figure is the median of ``--runs`` interleaved runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any
from urllib.parse import urlencode

import urllib3
from elasticsearch import Elasticsearch, helpers
from rich.console import Console
from rich.table import Table

from cqrskit.examples.shop.load import FIRST, GOODS, LAST
from cqrskit.examples.shop import queries as q
from cqrskit.read_models.indices import alias, create_index, physical
from cqrskit.read_models.search import make_client
from cqrskit.examples.shop.read_models import OrdersModel

PREFIX = "bench"
START = datetime(2026, 1, 1, tzinfo=UTC)
MIX_ROW, API, RAW, ERRORS = "whole mix", "query API (HTTP)", "raw client", "errors"


# ---------------------------------------------------------------- the index

def synthesise(orders: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Order documents as OrdersModel builds them, without a write store."""
    rng = random.Random(seed)
    customers = [(f"c{i}", f"{FIRST[i % len(FIRST)]} {LAST[(i * 7) % len(LAST)]}")
                 for i in range(max(10, orders // 10))]
    products = [(f"p{i}", f"SKU-P{i}", f"{GOODS[i % len(GOODS)][0]} {i}", rng.randint(300, 9000))
                for i in range(200)]
    for i in range(orders):
        customer_id, name = rng.choice(customers)
        lines = [{"sku": sku, "product_id": pid, "name": pname, "quantity": (n := rng.randint(1, 3)),
                  "unit_price_cents": price, "total_cents": n * price}
                 for pid, sku, pname, price in rng.sample(products, rng.randint(1, 3))]
        placed = START + timedelta(seconds=rng.uniform(0, 180 * 86400))
        status = rng.choices(["placed", "paid", "shipped", "cancelled"], [10, 30, 45, 15])[0]
        paid = placed + timedelta(minutes=rng.uniform(1, 600)) if status in ("paid", "shipped") else None
        shipped = paid + timedelta(hours=rng.uniform(1, 72)) if status == "shipped" and paid else None
        cancelled = placed + timedelta(hours=rng.uniform(1, 48)) if status == "cancelled" else None
        times = [t for t in (placed, paid, shipped, cancelled) if t]
        version = len(times)
        yield {
            "order_id": f"o{i}", "status": status,
            "customer": {"id": customer_id, "name": name, "email": f"{customer_id}@example.com"},
            "lines": lines, "line_count": len(lines), "units": sum(line["quantity"] for line in lines),
            "total_cents": sum(line["total_cents"] for line in lines),
            "placed_at": _iso(placed), "paid_at": _iso(paid), "shipped_at": _iso(shipped),
            "cancelled_at": _iso(cancelled), "updated_at": _iso(max(times)),
            "streams": [{"id": f"order:o{i}", "version": version},
                        {"id": f"customer:{customer_id}", "version": 1}],
        }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def load_index(es: Elasticsearch, orders: int, console: Console) -> None:
    """Index ``orders`` synthesised orders, unless the index holds exactly that many already."""
    index = physical(PREFIX, "orders", 1)
    if es.indices.exists(index=index) and es.count(index=index)["count"] == orders:
        console.print(f"reusing {index} ({orders} orders)")
        return
    es.options(ignore_status=404).indices.delete(index=index)
    create_index(es, index, OrdersModel(), {alias(PREFIX, "orders"): {}})
    started = time.perf_counter()
    actions = ({"_index": index, "_id": d["order_id"], "_source": d} for d in synthesise(orders))
    done, errors = helpers.bulk(es.options(request_timeout=600), actions, chunk_size=2000,
                                raise_on_error=False)
    es.indices.refresh(index=index)
    seconds = time.perf_counter() - started
    assert not errors and done == orders, errors[:3]
    console.print(f"indexed {done} synthesised orders in {seconds:.1f} s")


# ---------------------------------------------------------------- the mix

class _Captured(Exception):
    def __init__(self, method: str, kwargs: dict[str, Any]) -> None:
        super().__init__(method)
        self.method, self.kwargs = method, kwargs


class _Recorder:
    """Stands in for the client to capture the request a query function makes."""

    def options(self, **_: Any) -> _Recorder:
        return self

    def search(self, **kwargs: Any) -> Any:
        raise _Captured("search", kwargs)

    def get(self, **kwargs: Any) -> Any:
        raise _Captured("get", kwargs)


def _raw_request(run: Callable[..., Any], *args: Any) -> tuple[str, dict[str, Any]]:
    try:
        run(_Recorder(), PREFIX, *args)
    except _Captured as captured:
        return captured.method, captured.kwargs
    raise AssertionError("the query made no request")


@dataclass(frozen=True)
class Request:
    kind: str
    path: str  # HTTP path and query string
    raw: tuple[str, dict[str, Any]]  # client method and its arguments


def build_mixes(es: Elasticsearch, orders: int) -> dict[str, list[Request]]:
    """Two mixes, weighted by repetition, every request valid for this index: what a back office
    does (the search server's work dominates), and point lookups (where our overhead shows)."""
    rng = random.Random(11)
    customers = max(10, orders // 10)

    def page(kind: str, **params: Any) -> Request:
        query = q.OrderQuery(**params)
        return Request(kind, "/orders?" + urlencode(params, doseq=True), _raw_request(q.search_orders, query))

    def one_order() -> Request:
        order_id = f"o{rng.randrange(orders)}"
        return Request("one order", f"/orders/{order_id}", _raw_request(q.get_document, "orders", order_id))

    second = q.search_orders(es, PREFIX, q.OrderQuery(status=["shipped"])).next_cursor
    stats = q.OrderStatsQuery(placed_since=datetime(2026, 6, 1, tzinfo=UTC))
    back_office = [
        *(page("recent orders") for _ in range(3)),
        *(page("status, by total", status=["paid"], sort="total") for _ in range(2)),
        *(page("text: customer name", text=rng.choice(LAST)) for _ in range(2)),
        page("text: product name", text="burr grinder", sort="placed_at"),
        *(page("a customer's orders", customer_id=f"c{rng.randrange(customers)}") for _ in range(2)),
        page("orders with a sku", sku=f"SKU-P{rng.randrange(200)}"),
        page("dates and totals", placed_since="2026-03-01", placed_until="2026-03-15", total_min=5000),
        *(page("next page", status=["shipped"], cursor=second) for _ in range(2)),
        page("facets", placed_since="2026-06-01", facets=True),
        *(one_order() for _ in range(3)),
        Request("revenue per day", "/orders/revenue?placed_since=2026-06-01", _raw_request(q.revenue, stats)),
    ]
    lookups = [*(one_order() for _ in range(4)),
               *(page("a customer's orders", customer_id=f"c{rng.randrange(customers)}") for _ in range(4))]
    return {"back office": back_office, "point lookups": lookups, "point lookups, 1 client": lookups}


# ---------------------------------------------------------------- load

def run_load(call: Callable[[Request], None], mix: list[Request], concurrency: int,
             seconds: float) -> dict[str, list[float]]:
    """``concurrency`` threads cycling through the mix for ``seconds``; latencies by kind."""
    latencies: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        mine: list[tuple[str, float]] = []
        i = offset
        while (now := time.perf_counter()) < deadline:
            request = mix[i % len(mix)]
            try:
                call(request)
                mine.append((request.kind, time.perf_counter() - now))
            except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                mine.append((ERRORS, 0.0))
                print(f"{request.kind}: {exc!r}"[:300], file=sys.stderr)
            i += 7
        with lock:
            for kind, latency in mine:
                latencies[kind].append(latency)

    threads = [threading.Thread(target=worker, args=(n * len(mix) // concurrency,))
               for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies[MIX_ROW] = [x for kind, xs in list(latencies.items()) if kind != ERRORS for x in xs]
    return latencies


def raw_caller(es: Elasticsearch) -> Callable[[Request], None]:
    def call(request: Request) -> None:
        method, kwargs = request.raw
        getattr(es, method)(**kwargs)
    return call


def http_caller(url: str, concurrency: int) -> Callable[[Request], None]:
    host, port = url.removeprefix("http://").split(":")
    connections = urllib3.HTTPConnectionPool(host, int(port), maxsize=concurrency, block=True, retries=False)

    def call(request: Request) -> None:
        response = connections.request("GET", request.path)
        if response.status != 200:
            raise RuntimeError(f"{request.path}: {response.status} {response.data[:300]!r}")
        json.loads(response.data)
    return call


@contextmanager
def query_api(search_url: str) -> Iterator[str]:
    """The query API in its own process, as the Procfile runs it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CQRSKIT_ELASTICSEARCH_URL": search_url, "CQRSKIT_INDEX_PREFIX": PREFIX}
    code = f"from cqrskit.infra.settings import Settings; from cqrskit.read_models.api import run_query_api; " \
           f"from cqrskit.examples.shop import app; " \
           f"run_query_api(Settings(), app.read_models, app.queries, '127.0.0.1', {port})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        http = urllib3.PoolManager(retries=False)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http.request("GET", f"{url}/orders?size=1").status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the query API did not start")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


# ---------------------------------------------------------------- report

def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


@dataclass
class Figures:
    throughput: float
    p50: float
    p99: float
    errors: int


def summarise(runs: list[dict[str, list[float]]], seconds: float) -> dict[str, Figures]:
    out = {}
    for kind in {k for r in runs for k in r} - {ERRORS}:
        out[kind] = Figures(
            statistics.median(len(r[kind]) / seconds for r in runs),
            statistics.median(percentile(r[kind], 0.5) for r in runs),
            statistics.median(percentile(r[kind], 0.99) for r in runs),
            sum(len(r.get(ERRORS, [])) for r in runs) if kind == MIX_ROW else 0)
    return out


def report(console: Console, title: str,
           results: dict[str, tuple[dict[str, Figures], dict[str, Figures]]]) -> bool:
    table = Table(title=title, title_justify="left")
    for column in ("mix: requests", "raw req/s", "API req/s", "API/raw", "raw p50 ms", "API p50 ms",
                   "added p50 ms", "raw p99 ms", "API p99 ms", "errors raw/API"):
        table.add_column(column, justify="left" if column.startswith("mix") else "right")
    verdicts = []
    for mix, (raw, api) in results.items():
        for kind in [MIX_ROW] + sorted(k for k in raw if k != MIX_ROW):
            r, a = raw[kind], api[kind]
            ratio = f"{a.throughput / r.throughput:.2f}x" if r.throughput else "n/a"
            errors = f"{r.errors}/{a.errors}" if kind == MIX_ROW else ""
            table.add_row(f"{mix}: {kind}", f"{r.throughput:,.1f}", f"{a.throughput:,.1f}", ratio,
                          f"{r.p50:.2f}", f"{a.p50:.2f}", f"{a.p50 - r.p50:+.2f}", f"{r.p99:.1f}",
                          f"{a.p99:.1f}", errors, style="bold" if kind == MIX_ROW else None)
        table.add_section()
        ratio = api[MIX_ROW].throughput / raw[MIX_ROW].throughput if raw[MIX_ROW].throughput else 0.0
        added = api[MIX_ROW].p50 - raw[MIX_ROW].p50
        verdicts.append(f"{mix}: {ratio:.2f}x {'met' if ratio >= 0.8 else 'NOT met'}, {added:+.2f} ms "
                        f"{'met' if added <= 2.0 else 'NOT met'}"
                        + (", errors" if raw[MIX_ROW].errors + api[MIX_ROW].errors else ""))
    console.print(table)
    console.print("targets (API >= 0.8x raw throughput; <= 2 ms added at p50):\n  " + "\n  ".join(verdicts))
    return not any("NOT" in v or "errors" in v for v in verdicts)


def measure(callers: dict[str, Callable[[Request], None]], mix: list[Request], args: argparse.Namespace,
            concurrency: int) -> tuple[dict[str, Figures], dict[str, Figures]]:
    """Warm-up, then ``args.runs`` interleaved runs of each caller; (raw, API) figures."""
    for call in callers.values():
        run_load(call, mix, concurrency, min(2.0, args.seconds))
    runs: dict[str, list[dict[str, list[float]]]] = {RAW: [], API: []}
    for _ in range(args.runs):
        for name, call in callers.items():
            runs[name].append(run_load(call, mix, concurrency, args.seconds))
    return summarise(runs[RAW], args.seconds), summarise(runs[API], args.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="Tiny: 2,000 orders, one short run.")
    parser.add_argument("--search-url", help="Use this search server (and its bench index when it holds "
                                             "--orders documents) instead of starting osmem.")
    args = parser.parse_args(argv)
    if args.smoke:
        args.orders, args.seconds, args.runs, args.concurrency = 2000, 1.0, 1, 4
    console = Console()
    from osmem_server import OsmemServer

    server = None if args.search_url else OsmemServer.start(japanese=False)
    search_url = args.search_url or server.url  # type: ignore[union-attr]
    try:
        es = make_client(search_url, timeout=120)
        load_index(es, args.orders, console)
        mixes = build_mixes(es, args.orders)
        with query_api(search_url) as url:
            callers = {RAW: raw_caller(es), API: http_caller(url, args.concurrency)}
            results = {name: measure(callers, mix, args, 1 if name.endswith("1 client") else args.concurrency)
                       for name, mix in mixes.items()}
        title = (f"Query side: {args.orders:,} orders synthesised in the OrdersModel shape, bulk-indexed "
                 f"with OrdersModel.mappings into osmem {version('osmem-server')}; query API: uvicorn, "
                 f"1 process; "
                 f"{args.concurrency} concurrent clients (unless said); median of {args.runs} x "
                 f"{args.seconds:g} s; "
                 f"{os.cpu_count()} CPUs shared with osmem and the load generator (load average "
                 f"{os.getloadavg()[0]:.1f} at the end)")
        report(console, title, results)
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
