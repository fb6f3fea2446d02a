"""The HTTP services are observable like the workers: one access-log line per request and
Prometheus metrics on ``GET /metrics`` (the query API here, served by uvicorn on osmem; the
gateway is wired the same way, ``cqrskit.infra.http_observe.observe``)."""

from __future__ import annotations

import io
import json

import httpx

from cqrskit.app import bootstrap
from cqrskit.infra.logs import configure_logging
from cqrskit.infra.settings import LogFormat, Settings
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.search import make_client
from test_query_api import LiveServer
from prometheus_client.parser import text_string_to_metric_families


def test_the_query_api_logs_each_request_and_serves_metrics(search_url: str, index_prefix: str, sqlite_url: str) -> None:
    settings = Settings(database_url=sqlite_url, elasticsearch_url=search_url, index_prefix=index_prefix,
                        log_format=LogFormat.json)
    from cqrskit.infra.db import make_engine

    engine, es = make_engine(sqlite_url), make_client(search_url)
    for model in bootstrap.app_of(settings).read_models:
        ensure(es, engine, index_prefix, model)
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/customers", params={"text": "ada"}).status_code == 200
        assert client.get("/customers/nobody").status_code == 404
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    counted = {(s.labels["route"], s.labels["status"]): s.value
               for family in text_string_to_metric_families(metrics.text) for s in family.samples
               if s.name == "cqrskit_http_requests_total" and s.labels["service"] == "query"}
    assert counted == {("/customers", "200"): 1.0, ("/customers/{doc_id}", "404"): 1.0}, metrics.text
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if '"http.request"' in line]
    assert [(l["path"], l["status"], l["level"]) for l in lines if l["path"] != "/metrics"] == [
        ("/customers", 200, "info"), ("/customers/nobody", 404, "info")]
    assert all(l["duration_ms"] >= 0 and l["route"] for l in lines)
    es.close()
    engine.dispose()
