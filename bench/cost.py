"""The cost curve: the CPU a command costs the whole stack at steady rates and in a drain, the
batch sizes each stage reached, and what an idle stack costs.

    .venv/bin/python -m bench.cost [--rates 10,50,200] [--step-seconds 20] [--drain 3000] [--smoke]

The Procfile's processes (2 command workers, the relay, 2 indexers) run on PostgreSQL, RabbitMQ and
osmem over a write store of ``--store-events`` events. For each steady rate and for a drain (a
backlog published at once), one row: commands/s, the CPU milliseconds per command of every kind of
process (from /proc: the processes and their children, this database's PostgreSQL backends, and
RabbitMQ's ``beam.smp``, which other sessions share), the mean batch of each stage (group commit,
relay, indexer window), the bulk requests per command, publish -> searchable p50 / p99, and the
bulk requests that waited >= 0.5 s on osmem (its merge stalls). Then the idle cost (% of one core)
before the steps and after them, and the raw limit measured in the same run: PostgreSQL's one-row
commit rate at the command workers' concurrency. The load average stands beside every figure;
compare ratios of one run (CPU per command at 50/s against the drain's), not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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
from rich.table import Table

from bench.command_side import bench_database, raw_pg_rate
from bench.pipeline import STALL, Shape, processes, where_the_time_goes
from bench.read_side import (Orders, Sent, Watcher, bench_settings, delete_topology, json_lines, log_time,
                             machine_facts, osmem, osmem_stalls, percentile, preload, send, steady, wait_for_consumer,
                             wait_visible)

PROJECT = Path(__file__).resolve().parents[1]
PLOT = PROJECT / "docs" / "cost-per-command.png"
HZ = os.sysconf("SC_CLK_TCK")
KINDS = ("workers", "relays", "indexers", "osmem", "postgres", "autovacuum", "rabbitmq")
AT_REST = ("workers", "relays", "indexers", "osmem", "postgres")  # what the idle target counts
ROWS = ("cost: CPU ms per command", "cost: idle % of a core", "cost: 50/s against the drain")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks) of ``pid`` from /proc, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def snapshot(roots: dict[str, list[int]], database: str) -> dict[str, dict[int, int]]:
    """CPU ticks so far per kind and pid: ``roots`` and their children, this database's PostgreSQL
    backends, RabbitMQ's ``beam.smp``."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p))) is not None}
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    out: dict[str, dict[int, int]] = defaultdict(dict)

    def tree(kind: str, pid: int) -> None:
        if pid in stats:
            out[kind][pid] = stats[pid][1]
        for child in children.get(pid, []):
            tree(kind, child)

    for kind, pids in roots.items():
        for pid in pids:
            tree(kind, pid)
    for pid in stats:
        title = _title(pid)
        if title.startswith("postgres: ") and f" {database} " in title:  # autovacuum: what the writes left
            out["autovacuum" if "autovacuum" in title else "postgres"][pid] = stats[pid][1]
        elif "beam.smp" in title and "rabbit" in title:
            out["rabbitmq"][pid] = stats[pid][1]
    return out


def used_seconds(before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]) -> dict[str, float]:
    """CPU seconds per kind between two snapshots (a process born meanwhile: all of its ticks)."""
    return {kind: sum(t - before.get(kind, {}).get(pid, 0) for pid, t in after.get(kind, {}).items()) / HZ
            for kind in KINDS}


@dataclass
class Point:
    """One steady rate (or the drain: ``offered`` 0)."""

    offered: float
    sent: int
    achieved: float
    p50: float
    p99: float
    unseen: int
    stalls: int
    load: float
    cpu: dict[str, float] = field(default_factory=dict)  # ms per command, by kind
    batches: dict[str, float] = field(default_factory=dict)  # mean batch per stage
    bulks_per_command: float = 0.0
    searches: float = 0.0  # osmem CPU ms per command of the bench's own searches (estimated), in osmem's figure
    where: str = ""  # p50 / p99 of each stage of publish -> searchable

    @property
    def name(self) -> str:
        return f"{self.offered:,.0f}/s" if self.offered else "drain"

    @property
    def total(self) -> float:
        return sum(self.cpu.values())

    @property
    def ours(self) -> float:
        """Without RabbitMQ (other sessions share it) and without the bench's own searches."""
        return self.total - self.cpu.get("rabbitmq", 0.0) - self.searches


def stage_batches(stack: Any, start: float, end: float) -> tuple[dict[str, float], int]:
    """Mean batch per stage between ``start`` and ``end`` (wall clock) from the processes' logs:
    group commit (commands), relay (events), indexer window (events); and the indexers' windows
    written (each one bulk request per read model it touched)."""
    sizes: dict[str, list[int]] = defaultdict(list)
    bulks = 0
    for process in stack.started:
        for line in json_lines(process.log_path):
            event = line.get("event")
            if event not in ("command.batch", "command.succeeded", "relay.published", "indexer.indexed") \
                    or not start <= log_time(line) <= end:
                continue
            if event == "command.batch":
                sizes["group commit"].append(line.get("size", 0))
            elif event == "command.succeeded":  # a command committed alone (a batch's are DEBUG)
                sizes["group commit"].append(1)
            elif event == "relay.published":
                sizes["relay"].append(line.get("count", 0))
            else:
                sizes["indexer window"].append(line.get("events", 0))
                bulks += int(bool(line.get("written", 0) + line.get("stale", 0)))
    return {stage: statistics.mean(v) for stage, v in sizes.items() if v}, bulks


def profilers(roots: dict[str, list[int]], seconds: float, directory: Path | None, label: str) -> list[Any]:
    """``py-spy record`` (collapsed stacks, ``DIR/<kind>-<pid>-<label>.txt``) of every cqrskit process
    for ``seconds``; none without ``directory``."""
    if directory is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking", "--subprocesses", "-f", "raw", "-r", "50",
                              "-d", str(max(1, int(seconds))), "-o", str(directory / f"{kind}-{pid}-{label}.txt"),
                              "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for kind in ("workers", "relays", "indexers") for pid in roots.get(kind, [])]


def measure(stack: Any, watcher: Watcher, sent_of: Any, offered: float, roots: dict[str, list[int]],
            database: str, profile: Path | None = None, seconds: float = 0.0, per_search: float = 0.0) -> Point:
    """``sent_of()`` publishes the step's commands; the point covers it until all are visible.
    ``per_search``: osmem CPU ms of one of the watcher's searches."""
    load, wall, started, rounds = os.getloadavg()[0], time.time(), time.monotonic(), watcher.rounds
    before = snapshot(roots, database)
    spies = profilers(roots, seconds, profile, f"{offered:.0f}" if offered else "drain")
    sent: list[Sent] = sent_of()
    published = time.monotonic() - started
    wait_visible(watcher, 120.0, fail=False)
    for spy in spies:
        spy.wait(timeout=60)
    used = used_seconds(before, snapshot(roots, database))
    took = time.monotonic() - started
    lags = [s.visible - s.published if s.visible is not None else float("inf") for s in sent]
    end = time.time()
    batches, bulks = stage_batches(stack, wall, end)
    stalls = sum(1 for s, e in osmem_stalls(stack, STALL) if wall <= e <= end)
    achieved = len(sent) / (published if offered else took)
    return Point(offered, len(sent), achieved, percentile(lags, 0.5), percentile(lags, 0.99),
                 sum(1 for s in sent if s.visible is None), stalls, load,
                 {k: s * 1000 / max(1, len(sent)) for k, s in used.items()}, batches, bulks / max(1, len(sent)),
                 (watcher.rounds - rounds) * per_search / max(1, len(sent)), where_the_time_goes(stack, sent))


def idle(roots: dict[str, list[int]], database: str, seconds: float) -> tuple[dict[str, float], float]:
    """% of one core per kind over ``seconds`` with nothing sent, and the load average."""
    load = os.getloadavg()[0]
    before, started = snapshot(roots, database), time.monotonic()
    time.sleep(seconds)
    used = used_seconds(before, snapshot(roots, database))
    took = time.monotonic() - started
    return {k: 100 * s / took for k, s in used.items()}, load


def search_cost(stack: Any, index: str, order_ids: list[str], osmem_pid: int, count: int) -> float:
    """osmem CPU ms of one search like the watcher's (``terms`` of up to 200 order ids), the
    mean of ``count`` run back to back at rest."""
    ids = order_ids[:200]
    before = snapshot({"osmem": [osmem_pid]}, "")
    for _ in range(count):
        stack.es.search(index=index, query={"terms": {"order_id": ids}}, source_includes=["order_id", "status"],
                        size=len(ids))
    return used_seconds(before, snapshot({"osmem": [osmem_pid]}, ""))["osmem"] * 1000 / count


def drain(stack: Any, watcher: Watcher, orders: Orders, count: int, out: dict[str, Any]) -> list[Sent]:
    """``count`` orders published at once; ``out["committed"]``: commands/s from the first publish
    until every outcome was recorded (the command drain, beside the one-row commit rate)."""
    commands = [orders.place() for _ in range(count)]
    started = time.monotonic()
    for start_at in range(0, count, 1000):
        send(stack, watcher, commands[start_at:start_at + 1000])
    stack.write_store.wait_for_outcomes([s.command_id for _, s in commands], timeout=600)
    out["committed"] = count / (time.monotonic() - started)
    return [s for _, s in commands]


def start(stack: Any, shape: Shape) -> None:
    """The Procfile's processes: ``shape.indexers`` indexers (every one on every partition, as
    ``honcho start -c indexer=N`` runs them), the relay, ``shape.workers`` command workers."""
    from cqrskit.infra.topology import indexer_partitions

    settings = stack.settings
    first = indexer_partitions(settings)[0].queue
    for _ in range(shape.indexers):
        wait_for_consumer(first, stack.start_indexer(threads=shape.indexer_threads).popen, 60)
    stack.start_relay()
    for _ in range(shape.workers):
        wait_for_consumer(settings.commands_queue, stack.start_worker(threads=shape.worker_threads).popen, 60)


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from tests.stack import Stack

    from cqrskit.read_models.indices import alias

    shape = Shape(args.workers, args.worker_threads, args.indexers, args.indexer_threads, args.partitions)
    tag = uuid.uuid4().hex[:8]
    out: dict[str, Any] = {"points": [], "shape": shape.describe()}
    with bench_database(f"cost_{tag}") as url, osmem() as server, \
            tempfile.TemporaryDirectory(prefix="cqrskit-bench-") as tmp:
        database = url.rsplit("/", 1)[1].split("?")[0]
        load, stored = preload(url, args.sizes, console)
        settings = bench_settings(url, server.url, tag, indexer_partitions=shape.partitions)
        stack = Stack.create(settings, server.url, Path(tmp))
        watcher = Watcher(stack.es, alias(settings.index_prefix, "orders"), pause=args.watch_pause)
        try:
            start(stack, shape)
            if not stored:
                stack.send_and_wait(load.catalogue(), timeout=120)
            watcher.start()
            orders = Orders(load)
            send(stack, watcher, [orders.place() for _ in range(50)])  # warm-up
            wait_visible(watcher, 60)
            roots = {k: v for k, v in processes(stack, server.pid).items() if k != "bench"}
            time.sleep(args.settle)
            out["idle_before"] = idle(roots, database, args.idle_seconds)
            console.log(f"cost: idle over {stored:,} stored events: {_idle_text(*out['idle_before'])}")
            per_search = search_cost(stack, watcher.index, [f"{load.tag}-lag{n}" for n in range(1, 51)], server.pid,
                                     args.searches)
            out["per_search"] = per_search
            console.log(f"cost: one of the bench's searches costs osmem {per_search:.2f} ms of CPU")
            for rate in args.rates:
                point = measure(stack, watcher, lambda r=rate: steady(stack, watcher, orders, r, args.step_seconds),
                                rate, roots, database, args.py_spy, args.step_seconds, per_search)
                out["points"].append(point)
                console.log(f"cost: {_point_text(point)}")
                time.sleep(1.0)
            point = measure(stack, watcher, lambda: drain(stack, watcher, orders, args.drain, out), 0.0, roots, database,
                            per_search=per_search)
            out["points"].append(point)
            console.log(f"cost: {_point_text(point)}")
            events = stack.write_store.engine.connect().exec_driver_sql("SELECT count(*) FROM events").scalar()
            out["events"] = events
            time.sleep(args.settle)
            out["idle_after"] = idle(roots, database, args.idle_seconds)
            console.log(f"cost: idle over {events:,} stored events: {_idle_text(*out['idle_after'])}")
        finally:
            watcher.stop.set()
            stack.close()
            delete_topology(settings)
        out["raw_pg"] = raw_pg_rate(url, shape.workers * shape.worker_threads, 3.0)
        out["raw_load"] = os.getloadavg()[0]
    out["stored"] = stored
    return out


def at_rest(percent: dict[str, float]) -> float:
    """The idle figure of the target: the stack's processes, osmem and the database's backends."""
    return sum(percent.get(k, 0.0) for k in AT_REST)


def _idle_text(percent: dict[str, float], load: float) -> str:
    return (f"{at_rest(percent):.2f} % of a core ("
            + ", ".join(f"{k} {v:.2f}" for k, v in percent.items()) + f"); load {load:.1f}")


def _point_text(p: Point) -> str:
    return (f"{p.name}: {p.achieved:,.0f}/s, CPU {p.total:.2f} ms/command, {p.ours:.2f} without RabbitMQ and the "
            f"bench's searches (" + ", ".join(f"{k} {v:.2f}" for k, v in p.cpu.items())
            + "); batches " + ", ".join(f"{k} {v:.1f}" for k, v in p.batches.items())
            + f"; {p.bulks_per_command:.2f} bulk/command; p50 {p.p50 * 1000:,.0f} ms, p99 {p.p99 * 1000:,.0f} ms, "
            f"{p.unseen} unseen, {p.stalls} stalls >= {STALL} s; load {p.load:.1f}; stages p50 / p99 ms: {p.where}")


def tables(out: dict[str, Any]) -> list[Table]:
    points: list[Point] = out["points"]
    cpu = Table(title=ROWS[0], show_lines=False)
    for column in ("rate", "achieved/s", *KINDS, "total", "bench searches", "ours", "group commit", "relay", "indexer window",
                   "bulk/command", "p50 ms", "p99 ms", "stalls", "load"):
        cpu.add_column(column, justify="right")
    for p in points:
        cpu.add_row(p.name, f"{p.achieved:,.0f}", *(f"{p.cpu.get(k, 0):.2f}" for k in KINDS), f"{p.total:.2f}",
                    f"{p.searches:.2f}", f"{p.ours:.2f}",
                    *(f"{p.batches.get(s, 0):.1f}" for s in ("group commit", "relay", "indexer window")),
                    f"{p.bulks_per_command:.2f}", f"{p.p50 * 1000:,.0f}", f"{p.p99 * 1000:,.0f}"
                    + (f" ({p.unseen} unseen)" if p.unseen else ""), str(p.stalls), f"{p.load:.1f}")
    idle_table = Table(title=ROWS[1])
    for column in ("when", "stored events", *KINDS, "total at rest", "load"):
        idle_table.add_column(column, justify="right")
    for when, events in (("before", out["stored"]), ("after", out.get("events", 0))):
        percent, load = out[f"idle_{when}"]
        idle_table.add_row(when, f"{events:,}", *(f"{percent.get(k, 0):.2f}" for k in KINDS),
                           f"{at_rest(percent):.2f}", f"{load:.1f}")
    return [cpu, idle_table, verdict(out)]


def verdict(out: dict[str, Any]) -> Table:
    points: list[Point] = out["points"]
    drained = next(p for p in points if not p.offered)
    at50 = next((p for p in points if p.offered == 50), None)
    table = Table(title=ROWS[2])
    for column in ("figure", "ours", "limit", "ratio", "target"):
        table.add_column(column)
    if at50 is not None:
        table.add_row("CPU ms per command at 50/s, everything measured", f"{at50.total:.2f}",
                      f"drain {drained.total:.2f}", f"{at50.total / drained.total:.2f}x", "<= 2x")
        table.add_row("the same without RabbitMQ (shared) and the bench's searches", f"{at50.ours:.2f}",
                      f"drain {drained.ours:.2f}", f"{at50.ours / drained.ours:.2f}x", "<= 2x")
        table.add_row("publish -> searchable p50 at 50/s", f"{at50.p50 * 1000:,.0f} ms", "", "", "<= 100 ms")
    limit = f"one-row PostgreSQL commits {out['raw_pg']:,.0f}/s (load {out['raw_load']:.1f})"
    table.add_row("drain: commands/s committed", f"{out['committed']:,.0f}", limit,
                  f"{out['committed'] / out['raw_pg']:.3f}x", ">= 0.09x")
    table.add_row("drain: commands/s searchable", f"{drained.achieved:,.0f}", limit,
                  f"{drained.achieved / out['raw_pg']:.3f}x", "")
    worst = max(at_rest(out[w][0]) for w in ("idle_before", "idle_after"))
    table.add_row("idle stack, % of a core (processes, osmem, the database's backends)", f"{worst:.2f}", "", "",
                  "< 1 %")
    return table


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: list[Point] = out["points"]
    steady_points = [p for p in points if p.offered]
    drained = next(p for p in points if not p.offered)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    x = [p.achieved for p in steady_points] + [drained.achieved]
    bottom = [0.0] * len(x)
    for kind in KINDS:
        values = [p.cpu.get(kind, 0) for p in steady_points] + [drained.cpu.get(kind, 0)]
        ax.bar(range(len(x)), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(x)), [f"{p.name}" for p in steady_points] + [f"drain\n({drained.achieved:,.0f}/s)"])
    loads = [p.load for p in points]
    ax.set_ylabel("CPU ms per command (stack)")
    ax.set_title(f"cqrskit on 2 cores: CPU per command against the rate (load {min(loads):.1f}-{max(loads):.1f})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,50,200", help="steady commands/s (comma-separated)")
    parser.add_argument("--step-seconds", type=float, default=20.0, help="seconds per steady rate")
    parser.add_argument("--drain", type=int, default=3000, help="commands published at once for the drain")
    parser.add_argument("--store-events", type=int, default=10_000, help="events in the write store before the run")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="seconds of each idle measurement")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of rest before an idle measurement")
    parser.add_argument("--workers", type=int, default=2, help="command worker processes")
    parser.add_argument("--worker-threads", type=int, default=8)
    parser.add_argument("--indexers", type=int, default=2, help="indexer processes (each on every partition)")
    parser.add_argument("--partitions", type=int, default=1, help="indexer partitions (CQRSKIT_INDEXER_PARTITIONS)")
    parser.add_argument("--indexer-threads", type=int, default=4)
    parser.add_argument("--watch-pause", type=float, default=0.02, help="seconds between the watcher's searches")
    parser.add_argument("--plot", type=Path, default=PLOT, help="PNG of CPU per command against the rate ('' for none)")
    parser.add_argument("--searches", type=int, default=300, help="searches timed to price the bench's own")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="profile the cqrskit processes of every steady step with py-spy (collapsed stacks here)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (CI): short steps, no plot")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.plot = args.plot if args.plot and str(args.plot) not in ("", ".") else None
    if args.smoke:
        args.rates, args.step_seconds, args.drain, args.store_events = [10.0], 2.0, 100, 0
        args.idle_seconds, args.settle, args.workers, args.worker_threads, args.plot = 1.0, 0.5, 1, 2, None
        args.searches = 20
        args.indexers, args.indexer_threads = 1, 2
    args.sizes = argparse.Namespace(lag_store_events=args.store_events, smoke=args.smoke)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import Settings

    args = parse(argv)
    configure_logging(Settings(log_level="WARNING"))
    console = Console(width=None if sys.stdout.isatty() else 250)
    console.print(" | ".join(f"[bold]{key}[/bold] {value}" for key, value in machine_facts().items()))
    started = time.perf_counter()
    out = run(args, console)
    for table in tables(out):
        console.print(table)
    for point in out["points"]:
        console.print(f"{point.name}: stages p50 / p99 ms: {point.where}")
    if args.plot:
        plot(out, args.plot)
        console.print(f"plot: {args.plot}")
    console.print(f"{out['shape']}; measured in {time.perf_counter() - started:.0f} s; load average now "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
