"""A read-your-writes wait on a document that was parked says so (G7, G8): the 504 names the
document, its error and where to see it, instead of a bare "not reflected in time"."""

from __future__ import annotations

from pathlib import Path

import httpx

from cqrskit.examples.shop import app as shop_app
from cqrskit.infra.db import make_engine
from cqrskit.infra.migrate import upgrade
from cqrskit.infra.settings import Settings
from cqrskit.infra.tokens import ConsistencyToken
from cqrskit.read_models.api import create_app
from cqrskit.read_models.consistency import parked_notes
from cqrskit.read_models.indices import ensure
from cqrskit.read_models.parking import park
from cqrskit.read_models.search import make_client
from tests.test_gateway import serving

SECRET = "s" * 40


def test_a_wait_on_a_parked_document_says_it_is_parked(search_url: str, tmp_path: Path, index_prefix: str) -> None:
    """G7, G8: customer c-1's document was parked (a mapping conflict); a query waiting for it
    answers 504 naming the parked document and its error; a document merely lagging still says
    "retry later"."""
    engine = make_engine(f"sqlite:///{tmp_path}/w.db")
    upgrade(engine)
    es = make_client(search_url)
    for model in shop_app.read_models:
        ensure(es, engine, index_prefix, model, replicas=0)
    park(engine, [("customers", "c-1", "400 strict_dynamic_mapping_exception: mapping set to strict, dynamic "
                   "introduction of [nickname] within [_doc] is not allowed", [12])])
    settings = Settings(elasticsearch_url=search_url, index_prefix=index_prefix, token_secret=SECRET)
    api = create_app(settings, shop_app.read_models, shop_app.queries, max_wait=0.3, parked=parked_notes(engine))
    with serving(api) as url, httpx.Client(base_url=url, timeout=30) as client:
        parked = ConsistencyToken((("customer:c-1", 3),)).encode(SECRET)
        answer = client.get("/customers/c-1", params={"consistent_with": parked, "wait": 0.3})
        assert answer.status_code == 504, answer.text
        detail = answer.json()["detail"]
        assert "document c-1 is parked (400 strict_dynamic_mapping_exception: mapping set to strict" in detail
        assert detail.endswith("cqrskit parked list")
        lagging = ConsistencyToken((("customer:c-2", 3),)).encode(SECRET)
        answer = client.get("/customers/c-2", params={"consistent_with": lagging, "wait": 0.3})
        assert answer.status_code == 504 and answer.json()["detail"].endswith("retry later")
    es.close()
    engine.dispose()
