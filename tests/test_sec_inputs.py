"""Inputs an attacker or a careless user controls, refused with one clear line (G10, G11: issue
19 finding 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_cli import invoke


@pytest.mark.parametrize("name", ["json", "logging", "re", "sqlalchemy", "pika", "dramatiq"])
def test_cqrskit_new_refuses_a_name_that_would_shadow_the_standard_library_or_a_dependency(
    tmp_path: Path, name: str
) -> None:
    """G10, issue 19 finding 7: ``cqrskit new json`` (or logging, re, sqlalchemy, pika) wrote a
    package that shadows the standard library or a dependency for every process run from that
    directory; it is refused with one line and nothing is written."""
    result = invoke("new", name, "--directory", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "choose another name" in result.output and len(result.output.strip().splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []
    made = invoke("new", "myshop_x", "--directory", str(tmp_path))
    assert made.exit_code == 0 and (tmp_path / "myshop_x" / "app.py").exists(), made.output


def test_the_query_apis_health_shows_counts_only_to_a_key_that_may_read_them(search_url: str, index_prefix: str,
                                                                              pg_url: str) -> None:
    """G11, issue 19 finding 7: ``/health`` needs no key and says the search side answers; it showed
    every read model's document count to anyone. Now: none without a key (or with a bad one), and
    a key sees the counts of the read models it may read only."""
    import httpx

    from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
    from cqrskit.infra.api_keys import ApiKeys
    from cqrskit.infra.db import make_engine
    from cqrskit.infra.settings import Settings
    from cqrskit.read_models.indices import ensure
    from cqrskit.read_models.search import make_client
    from tests.test_gateway import serving
    from tests.test_http_auth import SECRET, bearer, query_app

    engine = make_engine(pg_url)
    keys = ApiKeys(engine, ttl=0)
    _key, orders_only = keys.create("orders-reader", [], ["orders"])
    es = make_client(search_url)
    for model in SHOP_READ_MODELS:
        ensure(es, engine, index_prefix, model)
    settings = Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET)
    try:
        with serving(query_app(settings, authenticate=keys.authenticate)) as url, \
                httpx.Client(base_url=url, timeout=30) as http:
            anonymous = http.get("/health")
            forged = http.get("/health", headers=bearer("ck_0000000000000000_" + "x" * 43))
            keyed = http.get("/health", headers=bearer(orders_only))
    finally:
        es.close()
        engine.dispose()
    assert anonymous.status_code == forged.status_code == keyed.status_code == 200
    assert anonymous.json() == forged.json() == {"status": "ok", "documents": {}}
    assert keyed.json() == {"status": "ok", "documents": {"orders": 0}}
