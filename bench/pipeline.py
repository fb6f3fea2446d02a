"""End-to-end sustained throughput: the shop's order mix published at increasing rates through the
Procfile's processes (command workers, the relay, indexers) on PostgreSQL, RabbitMQ and osmem,
each command timed from publish to the first search that shows its effect.

    .venv/bin/python -m bench.pipeline [--rates 100,200,...] [--step-seconds 15] [--smoke]

Rows (docs/benchmarks.md, section "The whole pipeline", says why each limit is the fair one):
- sustained: the highest offered rate whose publish-to-searchable p99 stays <= 1 s (every command
  of the step searchable), beside two raw limits measured in the same run: osmem's raw bulk rate
  of the very documents the run's commands produced, turned into the command rate it allows
  (documents/s over the documents the indexers wrote per command), and PostgreSQL's one-row
  transaction rate at the command workers' concurrency (every command commits at least one);
- lag p50 / p99 at half the sustained rate.
It also draws the lag percentiles against the offered rate (``--plot``, a PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.command_side import raw_pg_rate
from bench.read_side import (Orders, Row, Sent, Watcher, bench_settings, delete_topology, json_lines, log_time,
                             machine_facts, osmem, osmem_stalls, percentile, preload, quiet_gc, raw_bulk, send, stages, steady,
                             table, wait_for_consumer, wait_visible)

PROJECT = Path(__file__).resolve().parents[1]
SUSTAINED = "pipeline: sustained commands/s with publish-to-searchable p99 <= 1 s"
HALF_P50 = "pipeline: lag p50 at half the sustained rate"
HALF_P99 = "pipeline: lag p99 at half the sustained rate"
ROWS = (SUSTAINED, HALF_P50, HALF_P99)
PLOT = PROJECT / "docs" / "pipeline-lag.png"
STALL = 0.5  # seconds: a bulk request the indexer waited this long for is an osmem stall (a merge)


@dataclass
class Step:
    offered: float
    sent: int
    achieved: float  # commands published per second of the step
    p50: float
    p99: float
    unseen: int  # commands not searchable within the step's drain allowance
    load: float
    stalls: list[float] = field(default_factory=list)  # the indexer's bulk waits >= STALL s in the step
    cpu: dict[str, float] = field(default_factory=dict)  # CPU ms per command sent, per kind of process

    def cpu_text(self) -> str:
        return ", ".join(f"{kind} {ms:.1f}" for kind, ms in self.cpu.items())

    def stalled(self) -> str:
        """How many of the indexer's bulk requests waited >= STALL s in the step ("" when none did)."""
        if not self.stalls:
            return ""
        return f", {len(self.stalls)} bulk request(s) waited >= {STALL} s on osmem (max {max(self.stalls):.1f} s)"

    @property
    def kept_up(self) -> bool:
        return self.unseen == 0 and self.p99 <= 1.0


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)
    half: Step | None = None
    sent: list[Sent] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    where: str = ""  # where the half-rate step's lag went, stage by stage


def cpu_seconds(roots: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each kind's processes and their children (a
    Dramatiq process forks its workers), from /proc; "bench" counts this process less the others."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            parent[int(entry.name)], ticks[int(entry.name)] = int(fields[1]), int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)

    def tree(pid: int) -> int:
        return ticks.get(pid, 0) + sum(tree(child) for child in children.get(pid, []))

    hz = os.sysconf("SC_CLK_TCK")
    used = {kind: sum(tree(pid) for pid in pids) / hz for kind, pids in roots.items()}
    if "bench" in used:  # the bench's own threads (publisher, watcher): its children are the other kinds
        used["bench"] -= sum(seconds for kind, seconds in used.items() if kind != "bench")
    return used


def measure_step(stack: Any, watcher: Watcher, orders: Orders, rate: float, seconds: float,
                 roots: dict[str, list[int]] | None = None) -> tuple[Step, list[Sent]]:
    """``rate`` commands/s for ``seconds``, then up to 5 s for the last of them to become visible.
    ``roots``: the processes whose CPU per command the step reports, by kind."""
    load = os.getloadavg()[0]
    started, wall = time.monotonic(), time.time()
    before = cpu_seconds(roots or {})
    sent = steady(stack, watcher, orders, rate, seconds)
    took = time.monotonic() - started
    used = {kind: (now - before[kind]) * 1000 / max(1, len(sent)) for kind, now in cpu_seconds(roots or {}).items()}
    wait_visible(watcher, 5.0, fail=False)
    lags = [s.visible - s.published if s.visible is not None else float("inf") for s in sent]
    unseen = sum(1 for s in sent if s.visible is None)
    stalls = [end - start for start, end in osmem_stalls(stack, STALL) if wall <= end <= time.time()]
    return Step(rate, len(sent), len(sent) / took, percentile(lags, 0.5), percentile(lags, 0.99), unseen, load,
                stalls, used), sent


def ladder(stack: Any, watcher: Watcher, orders: Orders, rates: Sequence[float], seconds: float,
           console: Console, run: Run, roots: dict[str, list[int]]) -> None:
    """Steps up the ladder until two steps in a row do not keep up (one may be a neighbour's busy
    moment on a shared machine); the pipeline drains between steps."""
    misses = 0
    for rate in rates:
        step, sent = measure_step(stack, watcher, orders, rate, seconds, roots)
        run.steps.append(step)
        run.sent += sent
        console.log(f"pipeline: {rate:,.0f}/s offered ({step.achieved:,.0f}/s published): p50 "
                    f"{step.p50 * 1000:,.0f} ms, p99 {step.p99 * 1000:,.0f} ms, {step.unseen} not visible"
                    f"{step.stalled()}; load {step.load:.1f}; CPU ms per command: {step.cpu_text()}")
        wait_visible(watcher, 300)
        misses = 0 if step.kept_up else misses + 1
        if misses == 2:
            return
        time.sleep(1.0)


def where_the_time_goes(stack: Any, sent: list[Sent]) -> str:
    """Per stage (publish->committed->relayed->indexed->visible), p50 / p99 in ms."""
    breakdown = stages(stack, sent) if sent else {}
    return "; ".join(f"{name} {percentile(v, 0.5) * 1000:,.0f} / {percentile(v, 0.99) * 1000:,.0f}"
                     for name, v in breakdown.items() if "->" in name and v)


def indexer_counts(stack: Any, start: float, end: float) -> dict[str, int]:
    """Documents the indexers computed, wrote and had refused as stale between ``start`` and
    ``end`` (their ``indexer.indexed`` logs), summed over every indexer process."""
    lines = [line for p in stack.started if p.log_path.name.startswith("indexer") for line in json_lines(p.log_path)
             if line.get("event") == "indexer.indexed" and start <= log_time(line) <= end]
    return {key: sum(line.get(key, 0) for line in lines) for key in ("documents", "written", "stale", "skipped")}


def run_documents(url: str, order_ids: list[str]) -> dict[str, list[Any]]:
    """The final documents of the run's orders, their customers and their products."""
    from cqrskit.examples.shop.domain import Order, registry
    from cqrskit.infra.db import make_engine
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
    from cqrskit.read_models.source import WriteStoreSource, snapshot

    engine = make_engine(url, pool_size=2)
    try:
        with snapshot(engine) as conn:
            source = WriteStoreSource(conn, registry)
            orders = source.aggregates(Order, order_ids)
            ids = {"orders": list(orders), "customers": sorted({o.state.customer_id for o in orders.values()}),
                   "products": sorted({line.product_id for o in orders.values() for line in o.state.lines})}
            return {m.name: list(m.build(source, ids[m.name]).values()) for m in SHOP_READ_MODELS}
    finally:
        engine.dispose()


def raw_bulk_rate(documents: dict[str, list[Any]], chunk: int) -> float:
    """Documents/s of ``helpers.bulk`` of ``documents`` into a fresh osmem."""
    from cqrskit.read_models.search import make_client
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    tag = uuid.uuid4().hex[:8]
    with osmem() as server:
        es = make_client(server.url, timeout=600)
        try:
            with quiet_gc():
                seconds = sum(raw_bulk(es, f"raw{tag}-{m.name}", m, documents[m.name], chunk) for m in SHOP_READ_MODELS)
        finally:
            es.close()
    return sum(len(d) for d in documents.values()) / seconds


def merge_stall(documents: int = 15_000, runs: Sequence[int] = (1000, 5000)) -> list[str]:
    """osmem's merge stall, reproduced: ``documents`` orders indexed in bulk requests of ``size``
    (each request leaves osmem one run of that many documents), then eleven one-document updates,
    each to a document of another run, timed. osmem merges ten runs of 100-999 live documents
    into one inside the write that makes the tenth, under its cluster-wide lock: a run of 1,000
    documents that loses one to an update joins that class. One line per run size."""
    from cqrskit.examples.shop.read_models import OrdersModel
    from cqrskit.read_models.indices import create_index
    from cqrskit.read_models.search import make_client

    def order(i: int, version: int) -> dict[str, Any]:
        line = {"sku": f"SKU-{i % 200}", "product_id": f"p{i % 200}", "name": "Blue widget", "quantity": 2,
                "unit_price_cents": 1234, "total_cents": 2468}
        return {"order_id": f"o{i}", "status": "placed", "customer": {"id": f"c{i % 2000}", "name": "Ada Lovelace",
                "email": f"ada{i}@example.com"}, "lines": [line], "line_count": 1, "units": 2, "total_cents": 2468,
                "placed_at": "2026-12-03T10:00:00Z", "streams": [{"id": f"order-o{i}", "version": version}]}

    def bulk(es: Any, index: str, ids: Sequence[int], version: int) -> float:
        operations: list[dict[str, Any]] = []
        for i in ids:
            operations += [{"index": {"_index": index, "_id": f"o{i}", "version": version, "version_type": "external"}},
                           order(i, version)]
        started = time.perf_counter()
        es.bulk(operations=operations)
        return time.perf_counter() - started

    lines = []
    for size in runs:
        with osmem() as server:
            es = make_client(server.url, timeout=600)
            create_index(es, "merges", OrdersModel, {})
            for start in range(0, documents, size):
                bulk(es, "merges", range(start, min(documents, start + size)), 1)
            waits = [bulk(es, "merges", [(k * 1009 + 7) % documents], 2) * 1000 for k in range(11)]
            es.close()
        lines.append(f"osmem merges: {documents:,} orders in bulk requests of {size:,}, then one-document updates "
                     f"to 11 of those runs: the first nine {statistics.median(waits[:9]):,.0f} ms (median), the "
                     f"tenth {waits[9]:,.0f} ms, the eleventh {waits[10]:,.0f} ms; load {os.getloadavg()[0]:.1f}")
    return lines


def plot(run: Run, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    offered = [s.offered for s in run.steps]
    ax.plot(offered, [s.p50 * 1000 for s in run.steps], "o-", label="p50")
    ax.plot(offered, [s.p99 * 1000 if s.p99 != float("inf") else None for s in run.steps], "s-", label="p99")
    if run.half is not None:
        ax.plot([run.half.offered] * 2, [run.half.p50 * 1000, run.half.p99 * 1000], "D", color="green",
                label=f"half the sustained rate ({run.half.offered:,.0f}/s)")
    ax.axhline(1000, color="grey", linestyle="--", linewidth=1, label="1 s")
    ax.set_yscale("log")
    ax.set_xlabel("offered commands/s (order mix)")
    ax.set_ylabel("publish-to-searchable lag (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class Shape:
    workers: int  # command worker processes
    worker_threads: int
    indexers: int  # indexer processes
    indexer_threads: int
    partitions: int  # indexer partitions, dealt round-robin to the indexer processes

    def describe(self) -> str:
        return (f"{self.workers} worker process(es) x {self.worker_threads} threads, 1 relay, {self.indexers} "
                f"indexer process(es) x {self.indexer_threads} threads on {self.partitions} partition(s), osmem")

    def partitions_of(self, indexer: int) -> list[int]:
        return [p for p in range(self.partitions) if p % self.indexers == indexer]


def processes(stack: Any, osmem_pid: int) -> dict[str, list[int]]:
    """The pipeline's processes by kind (PostgreSQL and RabbitMQ serve other sessions too: left out)."""
    kinds: dict[str, list[int]] = defaultdict(list)
    for process in stack.started:
        kinds[process.log_path.name.split("-")[0] + "s"].append(process.popen.pid)
    return {**kinds, "osmem": [osmem_pid], "bench": [os.getpid()]}


def start(stack: Any, shape: Shape) -> None:
    from cqrskit.infra.topology import indexer_partitions

    settings = stack.settings
    queues = [p.queue for p in indexer_partitions(settings)]
    for i in range(shape.indexers):
        indexer = stack.start_indexer(threads=shape.indexer_threads, partitions=shape.partitions_of(i))
        wait_for_consumer(queues[shape.partitions_of(i)[0]], indexer.popen, 60)
    stack.start_relay()
    for _ in range(shape.workers):
        worker = stack.start_worker(threads=shape.worker_threads)
        wait_for_consumer(settings.commands_queue, worker.popen, 60)


def measure(args: argparse.Namespace, console: Console) -> tuple[list[Row], Run]:
    from bench.command_side import bench_database
    from cqrskit.read_models.indices import alias
    from tests.stack import Stack

    shape = Shape(args.workers, args.worker_threads, args.indexers, args.indexer_threads,
                  args.partitions or args.indexers)
    tag = uuid.uuid4().hex[:8]
    run = Run()
    with bench_database(f"pipe_{tag}") as url, osmem() as server, \
            tempfile.TemporaryDirectory(prefix="cqrskit-bench-") as tmp:
        load, stored = preload(url, args.sizes, console)
        lingers = {} if args.linger_ms is None else {"relay_linger_ms": args.linger_ms}
        settings = bench_settings(url, server.url, tag, indexer_partitions=shape.partitions, **lingers)
        stack = Stack.create(settings, server.url, Path(tmp))
        # one search every 20 ms at most: the watcher is a client, not a load on the search server
        watcher = Watcher(stack.es, alias(settings.index_prefix, "orders"), pause=args.watch_pause)
        try:
            start(stack, shape)
            if not stored:
                stack.send_and_wait(load.catalogue(), timeout=120)
            watcher.start()
            orders = Orders(load)
            send(stack, watcher, [orders.place() for _ in range(50)])  # warm-up
            wait_visible(watcher, 60)
            run.started = time.time()
            roots = processes(stack, server.pid)
            ladder(stack, watcher, orders, args.rates, args.step_seconds, console, run, roots)
            kept = [s for s in run.steps if s.kept_up]
            sustained = max((s.achieved for s in kept), default=0.0)
            if sustained:
                time.sleep(1.0)
                run.half, half_sent = measure_step(stack, watcher, orders, sustained / 2, args.half_seconds, roots)
                run.sent += half_sent
                wait_visible(watcher, 120)
            run.ended = time.time() + 1.0
            counts = indexer_counts(stack, run.started, run.ended)
            written = counts["written"]
            watcher.stop.set()
            watcher.join(timeout=10)
            failed = sum(1 for p in stack.started for line in json_lines(p.log_path)
                         if line.get("event") in ("indexer.batch_failed", "relay.error"))
            run.where = where_the_time_goes(stack, half_sent if run.half else [])
            if args.keep_logs:
                shutil.copytree(tmp, args.keep_logs, dirs_exist_ok=True)
                Path(args.keep_logs, "lags.json").write_text(json.dumps(
                    [[s.command_id, s.wants, s.published, s.visible] for s in run.sent]))
        finally:
            watcher.stop.set()
            stack.close()
            delete_topology(settings)
        documents = run_documents(url, sorted({s.order_id for s in run.sent}))
        docs_per_command = written / max(1, len(run.sent))
        raw_docs = raw_bulk_rate(documents, args.raw_chunk)
        raw_pg = raw_pg_rate(url, shape.workers * shape.worker_threads, 3.0)
    rows = rows_of(run, shape, sustained, raw_docs, docs_per_command, raw_pg, stored, failed, documents, counts)
    return rows, run


def rows_of(run: Run, shape: Shape, sustained: float, raw_docs: float, docs_per_command: float, raw_pg: float,
            stored: int, failed: int, documents: dict[str, list[Any]], counts: dict[str, int]) -> list[Row]:
    allowed = raw_docs / docs_per_command if docs_per_command else float("nan")
    ladder_text = "; ".join(f"{s.offered:,.0f}/s: p50 {s.p50 * 1000:,.0f} / p99 {s.p99 * 1000:,.0f} ms"
                            + (f", {s.unseen} unseen" if s.unseen else "") + s.stalled() for s in run.steps)
    loads = [s.load for s in run.steps] + ([run.half.load] if run.half else [])
    common = (f"{shape.describe()}; write store of {stored:,} events before the run; load "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}; {failed} indexer/relay failures logged")
    ratio = sustained / allowed if allowed == allowed and allowed else float("nan")
    rows = [Row(SUSTAINED, f"{sustained:,.0f}", "osmem raw bulk of the run's documents, as commands/s",
                f"{allowed:,.0f}", f"{ratio:.2f}x", ">= 1,000/s or >= 0.8x", sustained >= 1000 or ratio >= 0.8,
                f"ladder {ladder_text}. Raw: osmem bulk {raw_docs:,.0f} docs/s of the "
                f"{sum(len(d) for d in documents.values()):,} final documents of the run's orders, customers and "
                f"products, over {docs_per_command:.2f} documents written per command = {allowed:,.0f} commands/s; "
                f"PostgreSQL one-row tx {raw_pg:,.0f}/s at {shape.workers * shape.worker_threads} connections "
                f"({sustained / raw_pg:.2f}x of it). Indexers: {counts['documents']:,} documents computed, "
                f"{counts['written']:,} written, {counts['stale']:,} refused as stale, {counts['skipped']:,} "
                f"skipped as covered, for {sum(len(d) for d in documents.values()):,} distinct documents. {common}")]
    half = run.half
    if half is None:
        return rows + [Row(HALF_P50, "n/a"), Row(HALF_P99, "n/a")]
    note = (f"{half.sent:,} commands at {half.offered:,.0f}/s ({half.achieved:,.0f}/s published){half.stalled()}; "
            f"stages p50 / p99 ms: {run.where}; CPU ms per command: {half.cpu_text()}; {common}")
    rows.append(Row(HALF_P50, f"{half.p50 * 1000:,.0f} ms", "", "", "", "<= 100 ms", half.p50 <= 0.1, note))
    rows.append(Row(HALF_P99, f"{half.p99 * 1000:,.0f} ms", "", "", "", "<= 500 ms", half.p99 <= 0.5,
                    f"{half.unseen} not visible within 5 s"))
    return rows


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,100,200,300,400,500,700,1000,1400",
                        help="offered commands/s, in increasing order (comma-separated)")
    parser.add_argument("--step-seconds", type=float, default=15.0, help="seconds per rate")
    parser.add_argument("--half-seconds", type=float, default=30.0, help="seconds at half the sustained rate")
    parser.add_argument("--lag-store-events", type=int, default=50_000, help="events in the write store before the run")
    parser.add_argument("--workers", type=int, default=2, help="command worker processes")
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument("--indexers", type=int, default=1, help="indexer processes")
    parser.add_argument("--indexer-threads", type=int, default=8)
    parser.add_argument("--partitions", type=int, default=0, help="indexer partitions (default: one per indexer)")
    parser.add_argument("--linger-ms", type=float, default=None, help="the relay's linger bound (default: the setting's)")
    parser.add_argument("--raw-chunk", type=int, default=500, help="documents per raw bulk request")
    parser.add_argument("--plot", type=Path, default=PLOT, help="PNG of lag against offered rate ('' for none)")
    parser.add_argument("--watch-pause", type=float, default=0.02, help="seconds between the watcher's searches")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the processes' logs and the lags here")
    parser.add_argument("--osmem-merges", action="store_true",
                        help="only reproduce osmem's merge stall (a one-document write that waits seconds)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (CI): two short steps, no plot")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.plot = args.plot if args.plot and str(args.plot) not in ("", ".") else None
    if args.smoke:
        args.rates, args.step_seconds, args.half_seconds, args.lag_store_events = [10.0, 20.0], 2.0, 2.0, 0
        args.workers, args.worker_threads, args.indexer_threads, args.plot = 1, 2, 2, None
    args.sizes = argparse.Namespace(lag_store_events=args.lag_store_events, smoke=args.smoke)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import Settings

    args = parse(argv)
    configure_logging(Settings(log_level="WARNING"))
    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(" | ".join(f"[bold]{key}[/bold] {value}" for key, value in machine_facts().items()))
    started = time.perf_counter()
    if args.osmem_merges:
        for line in merge_stall():
            console.print(line)
        return 0
    rows, run = measure(args, console)
    console.print(table(rows))
    if args.plot and run.steps:
        plot(run, args.plot, f"cqrskit pipeline on 2 cores: lag vs offered rate (load {statistics.mean(s.load for s in run.steps):.1f})")
        console.print(f"plot: {args.plot}")
    console.print(f"measured in {time.perf_counter() - started:.0f} s; load average now "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
