"""Read-side benchmark: the indexer, the rebuild and the whole pipeline's lag, each beside the raw
limit it should approach, all measured in one run.

    .venv/bin/python -m bench.read_side [--events 1000000] [--indexer-events 50000] [--lag-seconds 60] [--smoke]

Rows (docs/benchmarks.md, section "Read side", says why each limit is the fair one):
- indexer: ``Indexer.index_events`` over every event of a shop write store, in relay-sized batches
  (500 events, relay order), into a fresh osmem, documents/s; beside ``elasticsearch.helpers.bulk``
  of the very same final documents (computed once with the read models' ``build()``) into the
  same server, at the indexer's mean bulk-request size. Then the same backlog drained by the real
  processes (``cqrskit relay`` + ``dramatiq cqrskit.app.processes:indexer_worker``).
- rebuild: ``python -m cqrskit.app rebuild orders|products|customers`` as subprocesses on a write
  store of ``--events`` events, documents/s, events/s and peak RSS (``wait4`` rusage, plus
  /proc polling for the curve); beside raw bulk of the same documents at the rebuild's chunk size.
- lag: the full pipeline as processes (command workers, relay, indexer, osmem): its sustainable
  rate (a burst drained end to end), then commands published at half that rate, each timed from
  publish to the first search that shows its effect; p50/p99 and where the time goes (from the
  processes' JSON logs).

Write stores are generated fast (``ShopWriter``): the ``cqrskit.examples.shop.load`` mix decided by the
shop's real handlers on live in-memory aggregates, the resulting events and stream snapshots
COPYed into PostgreSQL. It makes its own databases, queues, exchanges and osmem servers and
removes them afterwards.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from bench.command_side import ADMIN_URL, AMQP_URL, amqp_channel, bench_database, dsn
from cqrskit.examples.shop.load import ShopLoad

PROJECT = Path(__file__).resolve().parents[1]

INDEXER = "indexer, in process (500-event batches)"
INDEXER_PROCS = "indexer, processes (relay + indexer draining a backlog)"
REBUILD_DOCS = "rebuild: documents/s (3 read models)"
REBUILD_EVENTS = "rebuild: events/s"
REBUILD_RSS = "rebuild: peak RSS of the process"
SUSTAINABLE = "pipeline: sustainable rate (commands/s)"
LAG_P50 = "publish-to-searchable lag p50"
LAG_P99 = "publish-to-searchable lag p99"
ROWS = (INDEXER, INDEXER_PROCS, REBUILD_DOCS, REBUILD_EVENTS, REBUILD_RSS, SUSTAINABLE, LAG_P50, LAG_P99)
RELAY_BATCH = 500
REBUILD_CHUNK = 1000  # cqrskit.read_models.rebuild's chunk: ids per snapshot and documents per bulk request


@dataclass(frozen=True)
class Sizes:
    events: int  # the rebuild's write store
    indexer_events: int  # the indexer's write store
    lag_seconds: float
    burst: int  # commands of the sustainable-rate burst
    step_seconds: float  # each steady step looking for the sustainable rate
    lag_store_events: int  # events in the lag's write store before the run
    smoke: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> Sizes:
        if args.smoke:
            return cls(events=4000, indexer_events=3000, lag_seconds=5.0, burst=150, step_seconds=3.0,
                       lag_store_events=2000, smoke=True)
        return cls(args.events, args.indexer_events, args.lag_seconds, args.burst, args.step_seconds,
                   args.lag_store_events, False)


@dataclass
class Row:
    name: str
    ours: str
    limit_name: str = ""
    limit: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


def rate_row(name: str, ours: float, limit_name: str, limit: float, target: float | None, note: str) -> Row:
    ratio = ours / limit if limit else math.nan
    return Row(name, f"{ours:,.0f}", limit_name, f"{limit:,.0f}", f"{ratio:.2f}x",
               "" if target is None else f">= {target}x", None if target is None else ratio >= target, note)


# -- a shop write store, generated fast ------------------------------------------------------
class LinearShopLoad(ShopLoad):
    """``ShopLoad`` with the same commands from the same seed, but a ``fulfilment`` linear in the
    number of orders: ShopLoad's builds the set of paid orders once per order (quadratic: it does
    not finish at 200k orders)."""

    def fulfilment(self) -> Any:
        pay, ship, cancel = [], [], []
        for oid in self.orders:
            roll = self.rng.random()
            if roll < 0.75:
                pay.append(self._cmd("PayOrder", oid, {}))
                if roll < 0.45:
                    ship.append(oid)
            elif roll < 0.9:
                cancel.append(self._cmd("CancelOrder", oid, {"reason": "changed my mind"}))
        paid = {c.aggregate_id for c in pay}
        unpaid = [o for o in self.orders if o not in paid][:2]
        self.expected["rejected"] += len(unpaid)
        wrong = [self._cmd("ShipOrder", oid, {}) for oid in unpaid]
        return pay + cancel + wrong, [self._cmd("ShipOrder", oid, {}) for oid in ship]


class _Context:
    """The shop handlers' port (``cqrskit.domain.ports.HandlerContext``) over live aggregates held in memory:
    loading copies the live state (a rejected command leaves nothing behind), ``ShopWriter`` commits."""

    def __init__(self, writer: ShopWriter) -> None:
        self.writer = writer
        self.loaded: dict[str, Any] = {}
        self.claims: dict[tuple[str, str], str | None] = {}

    def load(self, cls: Any, aggregate_id: str) -> Any:
        from cqrskit.domain.model import stream_id

        sid = stream_id(cls.stream_type, aggregate_id)
        if sid not in self.loaded:
            live = self.writer.aggregates.get(sid)
            self.loaded[sid] = cls(aggregate_id) if live is None else cls(
                aggregate_id, live.version, live.state.model_copy(deep=True))
        return self.loaded[sid]

    def owner_of(self, scope: str, key: str) -> str | None:
        if (scope, key) in self.claims:
            return self.claims[(scope, key)]
        return self.writer.claims.get((scope, key))

    def claim(self, scope: str, key: str, owner: str) -> None:
        from cqrskit.domain.model import RuleViolation

        if self.owner_of(scope, key) not in (None, owner):
            raise RuleViolation(f"{scope} {key!r} is already taken")
        self.claims[(scope, key)] = owner

    def release(self, scope: str, key: str, owner: str) -> None:
        if self.owner_of(scope, key) == owner:
            self.claims[(scope, key)] = None

    def now(self) -> datetime:
        return self.writer.clock


EVENT_COLUMNS = ("event_id", "stream_id", "stream_type", "version", "type", "schema_version", "data", "metadata",
                 "recorded_at")
STREAM_COLUMNS = ("stream_id", "stream_type", "aggregate_id", "version", "state", "state_version", "updated_at")


class ShopWriter:
    """Decides shop commands with the shop's own handlers on live in-memory aggregates and COPYs
    the events (and, at the end, every stream's version and snapshot) into a migrated PostgreSQL
    write store, in transactions of ``flush_rows`` events (short: the relays of other databases
    on this server wait for our transactions, xmin being server-wide).

    A ``PlaceOrder`` whose product is short of stock for a normal line (1-3 units) is preceded by
    a ``RestockProduct`` of 1,000: the ShopLoad mix is sized for ~20k commands, and at a million
    events its 200 products would otherwise run dry and most orders be rejected."""

    def __init__(self, url: str | None, flush_rows: int = 20_000) -> None:
        from cqrskit.examples.shop.domain import registry

        self.registry = registry
        self.db = dsn(url) if url else None
        self.flush_rows = flush_rows
        self.aggregates: dict[str, Any] = {}
        self.claims: dict[tuple[str, str], str] = {}
        self.clock = datetime(2026, 10, 1, tzinfo=UTC)
        self.rows: list[tuple[Any, ...]] = []
        self.events = 0
        self.outcomes: Counter[str] = Counter()
        self.load: LinearShopLoad | None = None

    def run(self, load: Any, until_events: int | None = None) -> None:
        for _name, envelopes in load.phases():
            for envelope in envelopes:
                if envelope.type == "PlaceOrder":
                    self._restock_for(envelope.payload)
                self.execute(envelope.type, envelope.aggregate_id, envelope.payload, envelope.command_id,
                             envelope.metadata.correlation_id)
                if until_events is not None and self.events >= until_events:
                    return

    def _restock_for(self, payload: dict[str, Any]) -> None:
        for line in payload.get("lines", []):
            owner = self.claims.get(("product.sku", line.get("sku")))
            product = self.aggregates.get(f"product:{owner}")
            quantity = line.get("quantity")
            if product is not None and isinstance(quantity, int) and 0 < quantity <= 3 and product.state.stock < quantity:
                self.execute("RestockProduct", owner, {"quantity": 1000}, str(uuid.uuid4()), None)

    def execute(self, type_: str, aggregate_id: str, payload: dict[str, Any], command_id: str,
                correlation_id: str | None) -> str:
        from pydantic import ValidationError

        from cqrskit.domain.model import RuleViolation
        from cqrskit.domain.registry import UnknownType

        self.clock += timedelta(milliseconds=40)
        try:
            command = self.registry.command_type(type_).model_validate(payload)
        except (UnknownType, ValidationError):
            self.outcomes["invalid"] += 1
            return "invalid"
        ctx = _Context(self)
        try:
            self.registry.handler(type_)(command, aggregate_id, ctx)
        except RuleViolation:
            self.outcomes["rejected"] += 1
            return "rejected"
        meta = json.dumps({"command_id": command_id, "command_type": type_,
                           "correlation_id": correlation_id or command_id, "causation_id": command_id,
                           "issuer": "bench.read_side"})
        for sid, aggregate in sorted(ctx.loaded.items()):
            if not aggregate.pending:
                continue
            self.events += len(aggregate.pending)
            for offset, event in enumerate(aggregate.pending, start=1):
                self.rows.append((str(uuid.uuid4()), sid, aggregate.stream_type, aggregate.version + offset, event.type,
                                  event.schema_version, json.dumps(event.model_dump(mode="json")), meta, self.clock))
            aggregate.version += len(aggregate.pending)
            aggregate.pending.clear()
            aggregate.updated_at = self.clock
            self.aggregates[sid] = aggregate
        for key, owner in ctx.claims.items():
            if owner is None:
                self.claims.pop(key, None)
            else:
                self.claims[key] = owner
        self.outcomes["succeeded"] += 1
        if len(self.rows) >= self.flush_rows:
            self.flush()
        return "succeeded"

    def flush(self) -> None:
        if self.db is not None and self.rows:
            with psycopg.connect(self.db) as conn, conn.cursor() as cur:
                with cur.copy(f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                    for row in self.rows:
                        copy.write_row(row)
        self.rows = []

    def finish(self) -> None:
        """Flush the events, write every stream row, analyse the tables."""
        self.flush()
        if self.db is None:
            return
        with psycopg.connect(self.db) as conn, conn.cursor() as cur:
            with cur.copy(f"COPY streams ({', '.join(STREAM_COLUMNS)}) FROM STDIN") as copy:
                for sid, a in self.aggregates.items():
                    copy.write_row((sid, a.stream_type, a.id, a.version, json.dumps(a.snapshot()), a.snapshot_version(),
                                    getattr(a, "updated_at", self.clock)))
            with cur.copy("COPY unique_claims (scope, key, owner) FROM STDIN") as copy:
                for (scope, key), owner in self.claims.items():
                    copy.write_row((scope, key, owner))
        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            conn.execute("VACUUM ANALYZE streams")

    def streams_by_type(self) -> Counter[str]:
        return Counter(a.stream_type for a in self.aggregates.values())


def calibrate(size: int = 8000) -> float:
    """Events per unit of ShopLoad size (the mix is linear in its size once it has 200 products)."""
    writer = ShopWriter(None)
    writer.run(LinearShopLoad(size=size, seed=11))
    return writer.events / size


def generate_store(url: str, events: int, console: Console, seed: int = 7, restock: int = 0) -> ShopWriter:
    """Fill the (migrated, empty) write store at ``url`` with about ``events`` events of the shop mix
    (its ``LinearShopLoad`` is ``writer.load``); ``restock``: then add that much stock to every product."""
    size = max(200, math.ceil(events / calibrate() * 1.02))
    started = time.perf_counter()
    writer = ShopWriter(url)
    writer.load = LinearShopLoad(size=size, seed=seed)
    writer.run(writer.load, until_events=events)
    for product_id in writer.load.products if restock else []:
        writer.execute("RestockProduct", product_id, {"quantity": restock}, str(uuid.uuid4()), None)
    writer.finish()
    console.log(f"write store: {writer.events:,} events, streams {dict(writer.streams_by_type())}, "
                f"commands {dict(writer.outcomes)} (ShopLoad size {size:,}) in {time.perf_counter() - started:.0f} s")
    return writer


# -- services ----------------------------------------------------------------------------------
@contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic garbage collection over what the bench holds (a million events, 200k documents)
    while something is timed in this process: a full collection walks every live object, and that
    would be charged to whatever is measured (the raw bulk of 200k documents ran at 500/s with it,
    against 866/s for the rebuild process, which holds one chunk)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
@contextmanager
def osmem() -> Iterator[Any]:
    """A fresh osmem server (its own process, everything in memory), closed afterwards."""
    from osmem_server import OsmemServer

    server = OsmemServer.start(japanese=False)
    try:
        yield server
    finally:
        server.close()


def proc_status_kb(pid: int, key: str) -> int:
    """``VmRSS``/``VmHWM``... of a process from /proc, in kB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def bench_settings(url: str, search_url: str, tag: str, **extra: Any) -> Any:
    from cqrskit.infra.settings import QueueType, Settings

    return Settings(database_url=url, broker_url=AMQP_URL, elasticsearch_url=search_url,
                    commands_exchange=f"bench.{tag}.commands", commands_queue=f"bench.{tag}.commands",
                    events_exchange=f"bench.{tag}.events", indexer_queue=f"bench.{tag}.indexer",
                    index_prefix=f"bench{tag}", queue_type=QueueType.quorum, log_level="WARNING", **extra)


def delete_topology(settings: Any) -> None:
    from cqrskit.infra.topology import indexer_partitions

    with amqp_channel() as channel:
        for base in (settings.commands_queue, *(p.queue for p in indexer_partitions(settings))):
            for queue in (base, f"{base}.DQ", f"{base}.XQ"):
                channel.queue_delete(queue)
        channel.exchange_delete(settings.commands_exchange)
        channel.exchange_delete(settings.events_exchange)


def delete_indices(es: Any, pattern: str) -> None:
    names = list(es.indices.get(index=pattern, ignore_unavailable=True, allow_no_indices=True))
    if names:
        es.indices.delete(index=",".join(names), ignore_unavailable=True)


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON log lines of a process's log file (other lines skipped)."""
    with path.open("rb") as f:
        for line in f:
            if line.startswith(b"{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def log_time(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


# -- documents -----------------------------------------------------------------------------
def relay_batches(engine: Any, size: int = RELAY_BATCH) -> list[list[dict[str, Any]]]:
    """Every event in relay order, in relay-sized batches of wire-format dicts, as the relay
    hands them to the indexer (read with the relay's own query). Waits (up to 120 s) while a
    transaction elsewhere on the server holds the relay's horizon (xmin) back, as the relay would."""
    import sqlalchemy as sa

    from cqrskit.infra.event_wire import EventMessage
    from cqrskit.workers.relay import read_batch

    batches: list[list[dict[str, Any]]] = []
    checkpoint, read, deadline = (0, 0), 0, time.monotonic() + 120
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        while read < stored:
            batch = read_batch(conn, checkpoint, size)
            conn.commit()  # a fresh snapshot (and xmin) for the next read
            if not batch:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {read} of {stored} events readable after 120 s (xmin held back)")
                time.sleep(0.2)
                continue
            batches.append([EventMessage.from_stored(e).model_dump(mode="json") for e in batch])
            checkpoint, read = (batch[-1].tx_id or 0, batch[-1].position), read + len(batch)
    return batches


def final_documents(engine: Any, model: Any) -> list[Any]:
    """Every document of ``model`` as the write store holds it now, computed with ``build()``."""
    from cqrskit.examples.shop.domain import registry
    from cqrskit.read_models.source import WriteStoreSource, snapshot

    documents = []
    with snapshot(engine) as conn:
        source = WriteStoreSource(conn, registry)
        for ids in source.all_ids(model.stream_type, REBUILD_CHUNK):
            documents += model.build(source, ids).values()
    return documents


def raw_bulk(es: Any, index: str, model: Any, documents: Sequence[Any], chunk: int) -> float:
    """``helpers.bulk`` of ``documents`` (the same index operations the indexer sends: id, external
    version, source) into a fresh index with the model's mappings; seconds taken."""
    from elasticsearch import helpers

    from cqrskit.read_models.indices import create_index

    create_index(es, index, model, {})
    actions = ({"_index": index, "_id": d.id, "version": d.version, "version_type": "external", "_source": d.source}
               for d in documents)
    with quiet_gc():
        started = time.perf_counter()
        ok, errors = helpers.bulk(es, actions, chunk_size=chunk, max_chunk_bytes=1 << 30, raise_on_error=True)
        seconds = time.perf_counter() - started
    if ok != len(documents):
        raise RuntimeError(f"raw bulk wrote {ok} of {len(documents)}: {errors[:3]}")
    return seconds


def raw_bulk_all(es: Any, tag: str, documents: dict[str, list[Any]], chunk: int) -> float:
    """Raw bulk of every model's documents into fresh indices (deleted afterwards); seconds."""
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    seconds = 0.0
    for model in SHOP_READ_MODELS:
        seconds += raw_bulk(es, f"raw{tag}-{model.name}", model, documents[model.name], chunk)
    delete_indices(es, f"raw{tag}-*")
    return seconds


class TimedBulk:
    """The search client, with the time spent in ``bulk`` (what the indexer writes with) counted."""

    def __init__(self, es: Any) -> None:
        self.es = es
        self.seconds = 0.0
        self.requests = self.items = 0

    def bulk(self, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.es.bulk(**kwargs)
        finally:
            self.seconds += time.perf_counter() - started
            self.requests += 1
            self.items += len(kwargs["operations"]) // 2

    def __getattr__(self, name: str) -> Any:
        return getattr(self.es, name)


# -- 1. the indexer --------------------------------------------------------------------------
@dataclass
class IndexerRun:
    seconds: float
    written: int  # 200/201: the document is new or newer
    stale: int  # 409: the index already holds this version (a document recomputed by a later batch)
    bulk: TimedBulk
    osmem_mb: int


def run_indexer(url: str, batches: list[list[dict[str, Any]]], tag: str) -> IndexerRun:
    """``Indexer.index_events`` over ``batches``, one after the other, into a fresh osmem."""
    from cqrskit.examples.shop.domain import registry
    from cqrskit.infra.db import make_engine
    from cqrskit.read_models.indexer import Indexer
    from cqrskit.read_models.indices import ensure
    from cqrskit.read_models.search import make_client
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    engine = make_engine(url, pool_size=4)
    with osmem() as server:
        es = make_client(server.url, timeout=300)
        try:
            for model in SHOP_READ_MODELS:
                ensure(es, engine, f"warm{tag}", model)
            Indexer(engine, registry, es, f"warm{tag}", SHOP_READ_MODELS).index_events(batches[0])  # connections
            delete_indices(es, f"warm{tag}-*")
            for model in SHOP_READ_MODELS:
                ensure(es, engine, f"ix{tag}", model)
            timed = TimedBulk(es)
            indexer = Indexer(engine, registry, timed, f"ix{tag}", SHOP_READ_MODELS)  # type: ignore[arg-type]
            written = stale = 0
            with quiet_gc():
                started = time.perf_counter()
                for batch in batches:
                    report = indexer.index_events(batch)
                    written, stale = written + report.written, stale + report.stale
                seconds = time.perf_counter() - started
            return IndexerRun(seconds, written, stale, timed, proc_status_kb(server.pid, "VmRSS") // 1024)
        finally:
            es.close()
            engine.dispose()


def raw_bulk_fresh(tag: str, documents: dict[str, list[Any]], chunk: int) -> float:
    """Raw bulk of every model's documents into a fresh osmem; seconds spent in bulk."""
    from cqrskit.read_models.search import make_client
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    with osmem() as server:
        es = make_client(server.url, timeout=600)
        try:
            return sum(raw_bulk(es, f"raw{tag}-{m.name}", m, documents[m.name], chunk) for m in SHOP_READ_MODELS)
        finally:
            es.close()


def measure_indexer(sizes: Sizes, args: argparse.Namespace, console: Console) -> list[Row]:
    """Raw, indexer, raw (each on a fresh osmem: deleting an index does not give osmem's memory
    back); the raw figure is the mean of the two, at the indexer's mean bulk-request size."""
    from cqrskit.infra.db import make_engine
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    tag = uuid.uuid4().hex[:8]
    with bench_database(f"idx_{tag}") as url:
        writer = generate_store(url, sizes.indexer_events, console)
        engine = make_engine(url, pool_size=2)
        batches = relay_batches(engine)
        final = {m.name: final_documents(engine, m) for m in SHOP_READ_MODELS}
        engine.dispose()
        finals = sum(len(d) for d in final.values())
        load_before = os.getloadavg()[0]
        guess = 450
        raw_first = raw_bulk_fresh(tag, final, guess)
        run = run_indexer(url, batches, tag)
        chunk = max(1, round(run.bulk.items / run.bulk.requests))
        raw_second = raw_bulk_fresh(tag, final, chunk)
        if abs(chunk - guess) > 50:  # the first raw run guessed the chunk size wrong: again at the right one
            raw_first = raw_bulk_fresh(tag, final, chunk)
        raw_rate = finals / statistics.mean([raw_first, raw_second])
        load_after = os.getloadavg()[0]
        ours = run.written / run.seconds
        console.log(f"indexer: {len(batches)} batches, {run.written:,} documents written (+{run.stale:,} stale) in "
                    f"{run.seconds:.1f} s ({ours:,.0f}/s; bulk {run.bulk.seconds:.1f} s); raw {raw_rate:,.0f}/s "
                    f"at chunk {chunk} ({finals / raw_first:,.0f} and {finals / raw_second:,.0f})")
        if args.profile:
            profile_indexer(url, batches[: max(4, len(batches) // 5)], tag, console)
        note = (f"{writer.events:,} events in {len(batches)} batches of {RELAY_BATCH}: {run.written:,} documents "
                f"written (every final document once) and {run.stale:,} more sent and refused as stale (409: a later "
                f"batch recomputed a document already at its final version) in {run.seconds:.1f} s; "
                f"{run.bulk.seconds / run.seconds:.0%} of the time in bulk requests ({run.bulk.requests} requests, "
                f"{chunk} documents each on average, {run.bulk.items / run.bulk.seconds:,.0f} items/s), the rest "
                f"reading the write store and projecting; raw runs {finals / raw_first:,.0f} and "
                f"{finals / raw_second:,.0f}/s; osmem RSS {run.osmem_mb:,} MB; load {load_before:.1f}->{load_after:.1f}")
        rows = [rate_row(INDEXER, ours, f"helpers.bulk, same final documents, chunk {chunk}", raw_rate, 0.8, note)]
        rows.append(measure_indexer_processes(url, writer.events, finals, raw_rate, chunk, args, console))
    return rows


def profile_indexer(url: str, batches: list[list[dict[str, Any]]], tag: str, console: Console) -> None:
    from cqrskit.examples.shop.domain import registry
    from cqrskit.infra.db import make_engine
    from cqrskit.read_models.indexer import Indexer
    from cqrskit.read_models.indices import ensure
    from cqrskit.read_models.search import make_client
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    engine = make_engine(url, pool_size=2)
    with osmem() as server:
        es = make_client(server.url, timeout=300)
        for model in SHOP_READ_MODELS:
            ensure(es, engine, f"prof{tag}", model)
        indexer = Indexer(engine, registry, es, f"prof{tag}", SHOP_READ_MODELS)
        profiler = cProfile.Profile()
        profiler.enable()
        for batch in batches:
            indexer.index_events(batch)
        profiler.disable()
        es.close()
    engine.dispose()
    for key in ("tottime", "cumulative"):
        console.rule(f"cProfile: Indexer.index_events, {len(batches)} batches (top 30 by {key})")
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(30)
        console.print(out.getvalue(), markup=False, highlight=False)


def measure_indexer_processes(url: str, events: int, finals: int, raw_rate: float, chunk: int,
                              args: argparse.Namespace, console: Console) -> Row:
    """The same backlog drained by the Procfile's processes: ``cqrskit relay`` publishing every
    event (confirmed) and enqueueing 500-event batches, ``dramatiq cqrskit.app.processes:indexer_worker`` (one
    process, ``--indexer-threads``) writing them. Timed from the relay's start (after its
    interpreter started) to the last batch written, from the processes' JSON logs."""
    from tests.stack import Stack

    tag = uuid.uuid4().hex[:8]
    with osmem() as server, tempfile.TemporaryDirectory(prefix="cqrskit-bench-") as tmp:
        settings = bench_settings(url, server.url, tag)
        stack = Stack.create(settings, server.url, Path(tmp))
        try:
            indexer = stack.start_indexer(threads=args.indexer_threads)
            wait_for_consumer(settings.indexer_queue, indexer.popen, timeout=60)
            relay = stack.start_relay()
            deadline = time.monotonic() + max(120.0, events / 100)
            indexed = written = stale = 0
            while indexed < events:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"indexer processes: {indexed} of {events} events indexed")
                if not (indexer.alive and relay.alive):
                    raise RuntimeError(f"a process died; see {indexer.log_path} / {relay.log_path}")
                time.sleep(0.2)
                lines = [line for line in json_lines(indexer.log_path) if line.get("event") == "indexer.indexed"]
                indexed = sum(line["events"] for line in lines)
                written, stale = sum(line["written"] for line in lines), sum(line["stale"] for line in lines)
            started = min(log_time(line) for line in json_lines(relay.log_path) if line.get("event") == "relay.started")
            seconds = max(log_time(line) for line in lines) - started
            failures = sum(1 for line in json_lines(indexer.log_path) if line.get("event") == "indexer.batch_failed")
            for process in (relay, indexer):
                stack.stop(process)
        finally:
            stack.close()
            delete_topology(settings)
    ours = written / seconds
    console.log(f"indexer processes: {written:,} documents written (+{stale:,} stale) in {seconds:.1f} s ({ours:,.0f}/s)")
    note = (f"{events:,} events relayed (each published to the events exchange, confirmed) and indexed by 1 indexer "
            f"process x {args.indexer_threads} threads: {written:,} documents written, {stale:,} stale, in "
            f"{seconds:.1f} s from the relay's start to the last batch; {failures} batches retried")
    return rate_row(INDEXER_PROCS, ours, f"helpers.bulk, same final documents, chunk {chunk}", raw_rate, 0.8, note)


def wait_for_consumer(queue: str, process: subprocess.Popen, timeout: float) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    with amqp_channel() as channel:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"process exited with status {process.returncode} before consuming {queue}")
            if channel.queue_declare(queue, passive=True).method.consumer_count > 0:
                return
            time.sleep(0.05)
    raise TimeoutError(f"no consumer on {queue} after {timeout} s")


# -- 2. rebuild ------------------------------------------------------------------------------
@dataclass
class RebuildRun:
    model: str
    documents: int
    seconds: float  # as the command reports it (its work, not the interpreter's start)
    wall: float
    peak_rss_mb: float  # the process's VmHWM
    curve: list[float]  # RSS (MB) at 25/50/75/100 % of the run
    bulk_seconds: float  # in bulk requests (the search client logs each one with its duration)


def run_rebuild(env: dict[str, str], model: str, cwd: Path = PROJECT) -> RebuildRun:
    """``python -m cqrskit.app rebuild MODEL`` as an operator runs it. Its peak RSS is the last
    ``VmHWM`` read from /proc (every 50 ms; the high-water mark of the process's own memory since
    exec). Not ``wait4``'s ``ru_maxrss``: Linux carries the high-water mark of the image the child
    was forked from (this bench, with the whole write store in memory) across the exec."""
    import re

    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "cqrskit.app", "rebuild", model], cwd=cwd, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        samples: list[tuple[float, int]] = []
        peak = 0
        while process.poll() is None:
            hwm, rss = proc_status_kb(process.pid, "VmHWM"), proc_status_kb(process.pid, "VmRSS")
            if process.poll() is None and rss:
                peak = max(peak, hwm)
                samples.append((time.perf_counter() - started, rss))
            time.sleep(0.05)
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"rebuild {model} exited {process.returncode}:\n{text[-3000:]}")
    found = re.search(rf"{model}: (\d+) documents into \S+ in ([\d.]+) s", text)
    if found is None:
        raise RuntimeError(f"rebuild {model}: unexpected output:\n{text[-3000:]}")
    curve = []
    for share in (0.25, 0.5, 0.75, 1.0):
        before = [kb for at, kb in samples if at <= wall * share]
        curve.append((before[-1] if before else 0) / 1024)
    bulk = sum(float(d) for d in re.findall(r"_bulk\S* \[status:\d+ duration:([\d.]+)s\]", text))
    return RebuildRun(model, int(found[1]), float(found[2]), wall, peak / 1024, curve, bulk)


def measure_rebuild(sizes: Sizes, console: Console) -> list[Row]:
    """Per read model: ``cqrskit rebuild`` into a fresh osmem (after ``setup``'s empty live index),
    then raw bulk of the same documents into another fresh osmem (osmem keeps everything in memory
    and does not give a deleted index's memory back: one index at a time)."""
    from cqrskit.infra.db import make_engine
    from cqrskit.read_models.indices import ensure
    from cqrskit.read_models.search import make_client
    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS

    tag = uuid.uuid4().hex[:8]
    runs: list[RebuildRun] = []
    raw_seconds: dict[str, float] = {}
    osmem_peak = 0
    with bench_database(f"rb_{tag}") as url:
        writer = generate_store(url, sizes.events, console)
        events, streams = writer.events, dict(writer.streams_by_type())
        del writer  # the bench's own memory back before the rebuilds run beside it
        engine = make_engine(url, pool_size=2)
        prefix = f"bench{tag}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
        # INFO: the search client logs every request with its duration (the bulk share below)
        env.update(CQRSKIT_DATABASE_URL=url, CQRSKIT_INDEX_PREFIX=prefix, CQRSKIT_LOG_LEVEL="INFO",
                   CQRSKIT_LOG_FORMAT="json", COLUMNS="200")
        load_before = os.getloadavg()[0]
        try:
            for model in SHOP_READ_MODELS:
                with osmem() as server:
                    es = make_client(server.url, timeout=600)
                    ensure(es, engine, prefix, model)  # the live index `cqrskit setup` made, empty
                    run = run_rebuild({**env, "CQRSKIT_ELASTICSEARCH_URL": server.url}, model.name)
                    count = es.count(index=f"{prefix}-{model.name}")["count"]
                    osmem_peak = max(osmem_peak, proc_status_kb(server.pid, "VmHWM"))
                    es.close()
                if count != run.documents:
                    raise RuntimeError(f"{model.name}: rebuild reported {run.documents} documents, the index has {count}")
                runs.append(run)
                documents = final_documents(engine, model)
                if len(documents) != run.documents:
                    raise RuntimeError(f"{model.name}: rebuild wrote {run.documents}, build() gives {len(documents)}")
                with osmem() as server:
                    es = make_client(server.url, timeout=600)
                    raw_seconds[model.name] = raw_bulk(es, f"raw{tag}-{model.name}", model, documents, REBUILD_CHUNK)
                    osmem_peak = max(osmem_peak, proc_status_kb(server.pid, "VmHWM"))
                    es.close()
                del documents
                console.log(f"rebuild {model.name}: {run.documents:,} documents in {run.seconds:.1f} s "
                            f"({run.documents / run.seconds:,.0f}/s), peak RSS {run.peak_rss_mb:.0f} MB; "
                            f"raw bulk {run.documents / raw_seconds[model.name]:,.0f}/s")
        finally:
            engine.dispose()
    documents = sum(r.documents for r in runs)
    seconds = sum(r.seconds for r in runs)
    raw = sum(raw_seconds.values())
    per_model = "; ".join(f"{r.model} {r.documents:,} in {r.seconds:.1f} s = {r.documents / r.seconds:,.0f}/s "
                          f"(raw {r.documents / raw_seconds[r.model]:,.0f}/s), {r.bulk_seconds / r.seconds:.0%} in bulk"
                          for r in runs)
    bulk_share = sum(r.bulk_seconds for r in runs) / seconds
    load = f"load {load_before:.1f}->{os.getloadavg()[0]:.1f}"
    peak = max(runs, key=lambda r: r.peak_rss_mb)
    return [
        rate_row(REBUILD_DOCS, documents / seconds, f"helpers.bulk, same documents, chunk {REBUILD_CHUNK}",
                 documents / raw, 0.8, f"{per_model}; the rebuild spent {bulk_share:.0%} of its time waiting for bulk "
                                       f"requests, so at equal server speed it runs at about {bulk_share:.2f}x raw "
                                       f"(the one-shot ratio moves with the machine's load); osmem peak RSS "
                                       f"{osmem_peak // 1024:,} MB; {load}"),
        rate_row(REBUILD_EVENTS, events / seconds, "the same events over the raw bulk time", events / raw,
                 0.8, f"{events:,} events, streams {streams}; the 3 rebuilds took {seconds:.1f} s "
                      f"({sum(r.wall for r in runs):.1f} s wall, with interpreter start)"),
        Row(REBUILD_RSS, f"{peak.peak_rss_mb:,.0f} MB", "", "", "", "< 300 MB", peak.peak_rss_mb < 300,
            "VmHWM; " + "; ".join(f"{r.model} {r.peak_rss_mb:.0f} MB (RSS at 25/50/75/100% of the run: "
                                  + "/".join(f"{mb:.0f}" for mb in r.curve) + ")" for r in runs)),
    ]


# -- 3. publish-to-searchable lag ------------------------------------------------------------
@dataclass
class Sent:
    command_id: str
    order_id: str
    wants: str  # "placed": the order's document exists; "paid": it says paid (or later)
    published: float  # wall clock, just before publishing
    visible: float | None = None


WATCHED = 200  # pending commands per search


class Watcher(threading.Thread):
    """Searches the orders alias (what a client's query sees, no refresh, no get-by-id) over and
    over for the orders of commands still pending; a command is visible at the start of the first
    search whose hits show its effect (so the resolution is one search round trip + ``pause``)."""

    def __init__(self, es: Any, index: str, pause: float = 0.003) -> None:
        super().__init__(name="watcher", daemon=True)
        self.es, self.index, self.pause = es, index, pause
        self.pending: dict[str, Sent] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.statuses: dict[str, tuple[str, float]] = {}  # order id -> (status, first seen at)
        self.rounds = 0
        self.error: BaseException | None = None

    def add(self, sent: list[Sent]) -> None:
        with self.lock:
            self.pending.update((s.command_id, s) for s in sent)

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.lock:
                    # the oldest (documents become visible about in order): a search costs the search
                    # server about the same however far behind the pipeline is (2,000 ids: ~10 ms)
                    waiting = list(self.pending.values())[:WATCHED]
                if not waiting:
                    time.sleep(0.002)
                    continue
                ids = sorted({s.order_id for s in waiting})
                at = time.time()
                hits = self.es.search(index=self.index, query={"terms": {"order_id": ids}},
                                      source_includes=["order_id", "status"], size=len(ids))["hits"]["hits"]
                self.rounds += 1
                status = {h["_source"]["order_id"]: h["_source"]["status"] for h in hits}
                with self.lock:
                    for sent in waiting:
                        now = status.get(sent.order_id)
                        if now is not None and (sent.wants == "placed" or now in ("paid", "shipped")):
                            sent.visible = at
                            self.pending.pop(sent.command_id, None)
                            if now == "placed":
                                self.statuses.setdefault(sent.order_id, ("placed", at))
                time.sleep(self.pause)
        except BaseException as exc:  # handed to the bench by the caller
            self.error = exc


class Orders:
    """PlaceOrder commands for new orders of the catalogue's customers and products (1-2 lines of
    one unit), and PayOrder for orders seen placed a while ago."""

    def __init__(self, load: Any, seed: int = 3) -> None:
        self.load, self.rng = load, random.Random(seed)
        self.count = 0
        self.payable: list[str] = []

    def place(self) -> tuple[Any, Sent]:
        from cqrskit.producers.commands import new_command

        self.count += 1
        order_id = f"{self.load.tag}-lag{self.count}"
        lines = [{"sku": self.load.sku(p), "quantity": 1} for p in self.rng.sample(self.load.products, self.rng.randint(1, 2))]
        envelope = new_command("PlaceOrder", order_id, {"customer_id": self.rng.choice(self.load.customers),
                                                        "lines": lines}, issuer="bench.read_side")
        return envelope, Sent(envelope.command_id, order_id, "placed", 0.0)

    def pay(self, order_id: str) -> tuple[Any, Sent]:
        from cqrskit.producers.commands import new_command

        envelope = new_command("PayOrder", order_id, {}, issuer="bench.read_side")
        return envelope, Sent(envelope.command_id, order_id, "paid", 0.0)


def send(stack: Any, watcher: Watcher, commands: list[tuple[Any, Sent]]) -> None:
    at = time.time()
    for _, sent in commands:
        sent.published = at
    report = stack.producer.send_many([envelope for envelope, _ in commands])
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} commands not confirmed: {report.failed[:3]}")
    watcher.add([sent for _, sent in commands])


def wait_visible(watcher: Watcher, timeout: float, fail: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while watcher.outstanding():
        if watcher.error is not None:
            raise watcher.error
        if time.monotonic() > deadline:
            if fail:
                raise TimeoutError(f"{watcher.outstanding()} commands not searchable after {timeout} s")
            return False
        time.sleep(0.01)
    return True


def kept_up(sent: list[Sent], watcher: Watcher) -> tuple[bool, str]:
    """Whether the pipeline kept up with a steady step: every command searchable within 1 s of the
    last publish, and the lags of the step's last third not growing over its first third's."""
    in_time = wait_visible(watcher, 1.0 + max(0.0, max(s.published for s in sent) - time.time()), fail=False)
    lags = [s.visible - s.published for s in sent if s.visible is not None]  # type: ignore[operator]
    third = max(1, len(sent) // 3)
    first = [s.visible - s.published for s in sent[:third] if s.visible is not None]  # type: ignore[operator]
    last = [s.visible - s.published for s in sent[-third:] if s.visible is not None]  # type: ignore[operator]
    growing = not first or not last or statistics.median(last) > 2 * statistics.median(first) + 0.05
    summary = (f"p50 {percentile(lags, 0.5) * 1000:.0f} ms" if lags else "nothing visible") + (
        f", first third {statistics.median(first) * 1000:.0f} ms, last third {statistics.median(last) * 1000:.0f} ms"
        if first and last else "")
    return in_time and not growing, summary


def sustainable_rate(stack: Any, watcher: Watcher, orders: Orders, start: float, seconds: float,
                     console: Console) -> tuple[float, list[str]]:
    """The highest rate of a ladder (from ``start`` down by 0.7x) that the pipeline keeps up with
    for ``seconds`` of steady publishing (``kept_up``); the pipeline drains between steps."""
    rate, steps = start, []
    while True:
        sent = steady(stack, watcher, orders, rate, seconds)
        ok, summary = kept_up(sent, watcher)
        wait_visible(watcher, 300)
        steps.append(f"{rate:,.0f}/s {'kept up' if ok else 'fell behind'} ({summary})")
        console.log(f"pipeline: {steps[-1]}")
        if ok or rate < 2:
            return rate, steps
        rate *= 0.7
        time.sleep(1.0)


def steady(stack: Any, watcher: Watcher, orders: Orders, rate: float, seconds: float,
           pay_share: float = 0.25) -> list[Sent]:
    """Publish at ``rate`` commands/s for ``seconds`` (a command as it falls due; a late sender
    catches up in one ``send_many``): PlaceOrder, and a share of PayOrder for orders seen placed
    at least a second ago."""
    sent: list[Sent] = []
    started = time.monotonic()
    total = int(rate * seconds)
    while len(sent) < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1) - len(sent)
        if due <= 0:
            time.sleep(max(0.0, started + len(sent) / rate - time.monotonic()))
            continue
        now = time.time()
        ready = [o for o, (status, at) in list(watcher.statuses.items()) if status == "placed" and now - at > 1.0]
        batch = []
        for _ in range(due):
            if ready and orders.rng.random() < pay_share:
                order_id = ready.pop()
                watcher.statuses[order_id] = ("pay sent", now)
                batch.append(orders.pay(order_id))
            else:
                batch.append(orders.place())
        send(stack, watcher, batch)
        sent += [s for _, s in batch]
    return sent


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def stages(stack: Any, measured: list[Sent]) -> dict[str, list[float]]:
    """Where each command's lag went, from the JSON logs of the worker, relay and indexer:
    publish -> committed (the worker's ``command.succeeded``), -> relayed (the relay's batch that
    carried its events), -> indexed (the indexer's batch written: logged after its bookkeeping,
    hence "indexed->visible" below zero), -> visible (our search). Also ``caught``: 1.0 when the
    command's relayed->indexed window overlaps a bulk request the search server took >= 1 s over."""
    committed: dict[str, float] = {}
    relayed: dict[str, float] = {}
    indexed: dict[str, float] = {}
    stalls = osmem_stalls(stack)
    for process in stack.started:
        for line in json_lines(process.log_path):
            event = line.get("event")
            if event == "command.succeeded" and line.get("command_id"):
                committed.setdefault(line["command_id"], log_time(line))
            elif event in ("relay.published", "indexer.indexed"):
                target = relayed if event == "relay.published" else indexed
                at = log_time(line)
                for command_id in line.get("command_ids", []):
                    target.setdefault(command_id, at)
    out: dict[str, list[float]] = defaultdict(list)
    for s in measured:
        c, r, i = committed.get(s.command_id), relayed.get(s.command_id), indexed.get(s.command_id)
        if c is None or r is None or i is None or s.visible is None:
            continue
        out["publish->committed"].append(c - s.published)
        out["committed->relayed"].append(r - c)
        out["relayed->indexed"].append(i - r)
        out["indexed->visible"].append(s.visible - i)
        out["total"].append(s.visible - s.published)
        out["caught"].append(float(any(start < i and r < end for start, end in stalls)))
    out["stalls"] = [end - start for start, end in stalls]
    return out


def osmem_stalls(stack: Any, over: float = 1.0) -> list[tuple[float, float]]:
    """(start, end) of the windows whose writes the indexer waited ``over`` seconds or more for,
    from its own ``indexer.indexed`` lines (``write_ms``: the bulk requests and their results; the
    search client's request lines are at WARNING)."""
    stalls = []
    for process in stack.started:
        for line in json_lines(process.log_path):
            seconds = float(line.get("write_ms") or 0) / 1000 if line.get("event") == "indexer.indexed" else 0.0
            if seconds >= over:
                end = log_time(line)
                stalls.append((end - seconds, end))
    return stalls


def batch_sizes(stack: Any, start: float, end: float) -> str:
    """Relay batches and indexer batches written between ``start`` and ``end`` (wall clock)."""
    relay: list[int] = []
    indexer: list[int] = []
    for process in stack.started:
        for line in json_lines(process.log_path):
            if line.get("event") in ("relay.published", "indexer.indexed") and start <= log_time(line) <= end:
                (relay if line["event"] == "relay.published" else indexer).append(line.get("count", line.get("events", 0)))
    seconds = max(end - start, 1e-9)
    return (f"{len(relay) / seconds:.0f} relay batches/s of {statistics.mean(relay or [0]):.1f} events, "
            f"{len(indexer) / seconds:.0f} indexer batches/s")


def slowest(breakdown: dict[str, list[float]], share: float = 0.01) -> str:
    """Where the slowest ``share`` of the commands lost their time (mean of each stage)."""
    if not breakdown.get("total"):
        return "no breakdown"
    cut = percentile(breakdown["total"], 1 - share)
    picked = [k for k, total in enumerate(breakdown["total"]) if total >= cut]
    return ", ".join(f"{name} {statistics.mean(values[k] for k in picked) * 1000:,.0f}"
                     for name, values in breakdown.items() if "->" in name) + " ms"


def preload(url: str, sizes: Sizes, console: Console) -> tuple[ShopLoad, int]:
    """The lag's write store: ``--lag-store-events`` events of the shop mix already in it (the
    indexer's work per batch grows with the store, so an empty one flatters it), every product
    restocked so that no order of the run is short of stock, and the relay's checkpoint at its
    end (those events are history: the run measures new commands). Returns the load whose
    customers and products the run orders from, and how many events were stored."""
    if not sizes.lag_store_events:
        return ShopLoad(size=400 if sizes.smoke else 2000, seed=5), 0  # its catalogue is sent first
    writer = generate_store(url, sizes.lag_store_events, console, seed=5, restock=1_000_000)
    with psycopg.connect(dsn(url)) as conn:
        conn.execute("INSERT INTO relay_checkpoints (name, tx_id, position, updated_at) "
                     "SELECT 'relay', tx_id, position, now() FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
    assert writer.load is not None
    return writer.load, writer.events


def measure_lag(sizes: Sizes, args: argparse.Namespace, console: Console) -> list[Row]:
    from cqrskit.read_models.indices import alias
    from tests.stack import Stack

    tag = uuid.uuid4().hex[:8]
    with bench_database(f"lag_{tag}") as url, osmem() as server, \
            tempfile.TemporaryDirectory(prefix="cqrskit-bench-") as tmp:
        load, stored = preload(url, sizes, console)
        settings = bench_settings(url, server.url, tag)
        stack = Stack.create(settings, server.url, Path(tmp))
        watcher = Watcher(stack.es, alias(settings.index_prefix, "orders"))
        try:
            indexer = stack.start_indexer(threads=args.indexer_threads)
            stack.start_relay()
            worker = stack.start_worker(threads=args.worker_threads)
            wait_for_consumer(settings.indexer_queue, indexer.popen, 60)
            wait_for_consumer(settings.commands_queue, worker.popen, 60)
            if not stored:
                stack.send_and_wait(load.catalogue(), timeout=120)
            watcher.start()
            orders = Orders(load)
            send(stack, watcher, [orders.place() for _ in range(50)])  # warm-up
            wait_visible(watcher, 60)
            # sustainable rate: a burst drained end to end (published -> every order searchable) gives
            # an upper bound; then steady steps down from it until the pipeline keeps up
            burst = [orders.place() for _ in range(sizes.burst)]
            send(stack, watcher, burst)
            wait_visible(watcher, max(120, sizes.burst / 5))
            drained = max(s.visible for _, s in burst) - min(s.published for _, s in burst)  # type: ignore[type-var]
            console.log(f"pipeline: burst of {sizes.burst} orders searchable after {drained:.1f} s "
                        f"({sizes.burst / drained:,.0f}/s)")
            sustainable, steps = sustainable_rate(stack, watcher, orders, sizes.burst / drained, sizes.step_seconds,
                                                  console)
            time.sleep(1.0)
            load_before = os.getloadavg()[0]
            console.log(f"pipeline: now {sustainable / 2:,.0f}/s for {sizes.lag_seconds:.0f} s")
            measured = steady(stack, watcher, orders, sustainable / 2, sizes.lag_seconds)
            wait_visible(watcher, 120)
            load_after = os.getloadavg()[0]
            watcher.stop.set()
            watcher.join(timeout=10)
            breakdown = stages(stack, measured)
            batches = batch_sizes(stack, measured[0].published, max(m.visible or 0 for m in measured))
            failed = sum(1 for p in stack.started for line in json_lines(p.log_path)
                         if line.get("event") in ("indexer.batch_failed", "relay.error"))
            if args.keep_logs:
                import shutil

                shutil.copytree(tmp, args.keep_logs, dirs_exist_ok=True)
                Path(args.keep_logs, "lags.json").write_text(json.dumps(
                    [[m.command_id, m.wants, m.published, m.visible] for m in measured]))
        finally:
            watcher.stop.set()
            stack.close()
            delete_topology(settings)
    lags = [s.visible - s.published for s in measured if s.visible is not None]  # type: ignore[operator]
    p50, p99 = percentile(lags, 0.5), percentile(lags, 0.99)
    stalls, caught = breakdown.get("stalls", []), breakdown.get("caught", [])
    clear = [t for t, c in zip(breakdown.get("total", []), caught) if not c]
    stalled = (f"osmem stalled {len(stalls)} bulk requests for >= 1 s (max {max(stalls):.1f} s), catching "
               f"{int(sum(caught))} commands; without those p50 {percentile(clear, 0.5) * 1000:,.0f} / p99 "
               f"{percentile(clear, 0.99) * 1000:,.0f} ms" if stalls and clear else "no osmem stall >= 1 s")
    kinds = Counter(s.wants for s in measured)
    where = "; ".join(f"{name} p50 {percentile(v, 0.5) * 1000:.0f} / p99 {percentile(v, 0.99) * 1000:.0f} ms"
                      for name, v in breakdown.items() if "->" in name)
    rate = sustainable / 2
    common = (f"{len(lags):,} commands at {rate:,.0f}/s for {sizes.lag_seconds:.0f} s on a write store holding "
              f"{stored:,} events before the run "
              f"({kinds['placed']} PlaceOrder, {kinds['paid']} PayOrder), 1 worker process x {args.worker_threads} "
              f"threads, relay, 1 indexer x {args.indexer_threads} threads, osmem; {watcher.rounds:,} searches; "
              f"{batches}; load {load_before:.1f}->{load_after:.1f}")
    return [
        Row(SUSTAINABLE, f"{sustainable:,.0f}", "", "", "", "", None,
            f"a burst of {sizes.burst} PlaceOrder published at once was searchable after {drained:.1f} s "
            f"({sizes.burst / drained:,.0f}/s: big batches); steady steps of {sizes.step_seconds:.0f} s from there: "
            + "; ".join(steps)),
        Row(LAG_P50, f"{p50 * 1000:,.0f} ms", "", "", "", "<= 100 ms", p50 <= 0.1, f"{common}; {where}"),
        Row(LAG_P99, f"{p99 * 1000:,.0f} ms", "", "", "", "<= 500 ms", p99 <= 0.5,
            f"max {max(lags) * 1000:,.0f} ms; the slowest 1% on average: {slowest(breakdown)}; {stalled}; "
            f"{failed} indexer/relay failures logged"),
    ]


# -- the table ------------------------------------------------------------------------------
def machine_facts() -> dict[str, str]:
    import pika

    with psycopg.connect(dsn(ADMIN_URL)) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    rabbit = connection._impl.server_properties["version"]  # noqa: SLF001 - what the broker says it is
    connection.close()
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    gib = lambda key: int(meminfo[key].split()[0]) / 1024**2  # noqa: E731
    libs = ", ".join(f"{p} {version(p)}" for p in ("osmem-server", "elasticsearch", "sqlalchemy", "psycopg", "dramatiq"))
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{gib('MemTotal'):.0f} GiB ({gib('MemAvailable'):.0f} available)",
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "PostgreSQL": str(pg),
        "RabbitMQ": rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit),
        "Python": platform.python_version(),
        "libraries": libs,
    }


def table(rows: list[Row]) -> Table:
    out = Table(title="cqrskit read side vs raw limits (one run)", show_lines=True)
    out.add_column("measurement", no_wrap=True)
    for column in ("cqrskit", "raw limit", "limit", "ratio", "target", "note"):
        out.add_column(column, justify="right" if column in ("cqrskit", "limit", "ratio", "target") else "left",
                       overflow="fold")
    for row in rows:
        verdict = "" if row.met is None else (" [green]met[/green]" if row.met else " [red]below[/red]")
        out.add_row(row.name, row.ours, row.limit_name, row.limit, row.ratio, row.target + verdict, row.note)
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.read_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the rebuild's write store")
    parser.add_argument("--indexer-events", type=int, default=50_000, help="events in the indexer's write store")
    parser.add_argument("--lag-seconds", type=float, default=60.0, help="how long commands flow at half rate")
    parser.add_argument("--lag-store-events", type=int, default=200_000,
                        help="events already in the lag's write store (0: an empty store, the catalogue sent first)")
    parser.add_argument("--burst", type=int, default=2000, help="commands of the sustainable-rate burst")
    parser.add_argument("--step-seconds", type=float, default=10.0, help="each steady step finding the sustainable rate")
    parser.add_argument("--worker-threads", type=int, default=4, help="threads of the command worker process")
    parser.add_argument("--indexer-threads", type=int, default=4, help="threads of the indexer process")
    parser.add_argument("--only", choices=("indexer", "rebuild", "lag"), action="append",
                        help="measure only these sections (repeatable)")
    parser.add_argument("--profile", action="store_true", help="cProfile the in-process indexer (a fifth of the batches)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the lag run's process logs and lags here")
    parser.add_argument("--smoke", action="store_true", help="everything at a tiny size (CI)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from cqrskit.infra.logs import configure_logging
    from cqrskit.infra.settings import Settings

    args = parse(argv)
    sizes = Sizes.of(args)
    configure_logging(Settings(log_level="WARNING"))  # the table tells the story
    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(" | ".join(f"[bold]{key}[/bold] {value}" for key, value in machine_facts().items()))
    if os.getloadavg()[0] > 1.0:
        console.print("[yellow]the machine is busy (load average above 1): other sessions share the 2 cores, "
                      "PostgreSQL (whose oldest open transaction holds every relay back) and the disk with "
                      "this run; the notes give the load during each section[/yellow]")
    sections = args.only or ["indexer", "rebuild", "lag"]
    rows: list[Row] = []
    started = time.perf_counter()
    if "indexer" in sections:
        rows += measure_indexer(sizes, args, console)
    if "rebuild" in sections:
        rows += measure_rebuild(sizes, console)
    if "lag" in sections:
        rows += measure_lag(sizes, args, console)
    console.print(table(rows))
    console.print(f"measured in {time.perf_counter() - started:.0f} s; load average now "
                  + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
