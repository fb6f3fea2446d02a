"""``docs/grafana-dashboard.json`` charts only metrics the processes export: the relay's
collector and the HTTP services' /metrics are scraped for real (on a migrated write store and a
query API app); the worker groups' counters are the ones ``cqrskit.workers.metrics`` and Dramatiq's
Prometheus middleware register (their names read from the code that registers them)."""

from __future__ import annotations

import asyncio
import inspect
import json
import re

import httpx
from dramatiq.middleware import prometheus as dramatiq_prometheus

from cqrskit.app.bootstrap import app_of
from cqrskit.infra.db import make_engine
from cqrskit.infra.settings import Settings
from cqrskit.read_models.api import create_app
from cqrskit.workers import metrics
from cqrskit.workers.relay import EventRelay
from tests.processes import PROJECT

DASHBOARD = PROJECT / "docs" / "grafana-dashboard.json"
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def charted() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    return {family(n) for e in exprs for n in re.findall(r"\b((?:cqrskit|dramatiq)_[a-z_]+)", e)}


def relay_families(sqlite_url: str) -> set[str]:
    engine = make_engine(sqlite_url)
    relay = EventRelay(Settings(database_url=sqlite_url), engine, None, None, "dashboard-test")
    try:
        return {f.name for f in metrics.RelayMetrics(relay).collect()}
    finally:
        engine.dispose()


def http_families() -> set[str]:
    async def scrape() -> str:
        settings = Settings(elasticsearch_url="http://127.0.0.1:9")
        app = create_app(settings, app_of(settings).read_models)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://query") as client:
            return (await client.get("/metrics")).text

    text = asyncio.run(scrape())
    return {family(m) for m in re.findall(r"^# TYPE (\w+) ", text, re.M)}


def registered_in(module: object) -> set[str]:
    names = re.findall(r"prom\.(?:Counter|Gauge|Histogram)\(\s*\"(\w+)\"", inspect.getsource(module))  # type: ignore[arg-type]
    return {family(n) for n in names}


def test_the_dashboard_charts_exported_metrics_only(sqlite_url: str) -> None:
    exported = relay_families(sqlite_url) | http_families() | registered_in(metrics) | registered_in(dramatiq_prometheus)
    assert {"cqrskit_relay_lag_events", "cqrskit_parked_documents", "cqrskit_http_requests",
            "cqrskit_commands", "dramatiq_message_errors"} <= exported, exported
    unknown = charted() - exported
    assert not unknown, f"the dashboard charts metrics no process exports: {sorted(unknown)}"


def test_the_dashboard_covers_throughput_outcomes_lag_dead_letters_and_parked() -> None:
    names = charted()
    assert {"cqrskit_commands", "cqrskit_relay_events_published", "cqrskit_indexer_documents",
            "cqrskit_relay_lag_events", "cqrskit_parked_documents"} <= names
