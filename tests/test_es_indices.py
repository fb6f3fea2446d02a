"""The read models' indices on a real cluster: replicas, a validated index prefix, two ``setup``
runs racing, the rebuild's alias swap in one step that reads nothing first, a rebuild that outlives
a cluster's refusals (G9), and ``status`` failing when the search server refuses it (G12)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from cqrskit.app.errors import explain
from cqrskit.app.privileges import elasticsearch_roles
from cqrskit.app.setup import setup_all
from cqrskit.app.status import gather_status
from cqrskit.examples.shop import app as shop_app
from cqrskit.infra.db import make_engine
from cqrskit.infra.settings import Settings
from cqrskit.read_models.indices import alias, ensure, finish_build
from cqrskit.read_models.rebuild import rebuild
from cqrskit.read_models.search import make_client, replicas_of
from tests.es_front import EsFront
from tests.test_es_faults import UNAVAILABLE


@pytest.fixture
def front(search_url: str) -> Iterator[EsFront]:
    with EsFront(search_url) as f:
        yield f


def settings_for(url: str, tmp_path: Path, prefix: str, **extra: object) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path}/w.db", elasticsearch_url=url, index_prefix=prefix, **extra)


def test_replicas_default_to_one_on_a_cluster_and_follow_the_setting(front: EsFront, tmp_path: Path,
                                                                      index_prefix: str) -> None:
    """G6 under a node loss: a read model's index gets a replica by default on a search server by
    URL (0 embedded), CQRSKIT_ELASTICSEARCH_REPLICAS otherwise, and the rebuild keeps it."""
    assert replicas_of(Settings()) == 0 and replicas_of(Settings(elasticsearch_url=front.url)) == 1
    settings = settings_for(front.url, tmp_path, index_prefix)
    setup_all(settings, say=lambda _line: None)
    es = make_client(front.url)
    live = alias(index_prefix, "orders")
    assert [s["settings"]["index"]["number_of_replicas"] for s in es.indices.get_settings(index=live).values()] == ["1"]
    engine = make_engine(settings.database_url)
    report = rebuild(engine, shop_app.registry, es, index_prefix, next(m for m in shop_app.read_models
                                                                     if m.name == "orders"), replicas=2)
    assert es.indices.get_settings(index=report.index)[report.index]["settings"]["index"]["number_of_replicas"] == "2"
    engine.dispose()
    es.close()


@pytest.mark.parametrize("prefix", ["Shop", "shop data", "_shop", "-shop", "shop/x", "shop*", "", "a" * 201])
def test_an_index_prefix_elasticsearch_would_refuse_is_one_clear_error(prefix: str) -> None:
    """G10: CQRSKIT_INDEX_PREFIX is checked against Elasticsearch's index-name rules when the
    settings are read: one line naming the setting, not a 400 at setup."""
    with pytest.raises(ValidationError) as refused:
        Settings(index_prefix=prefix)
    line = explain(refused.value).line()
    assert line.startswith("CQRSKIT_INDEX_PREFIX=") and "is not a valid index prefix" in line


def test_two_setups_racing_on_an_index_both_succeed(front: EsFront, tmp_path: Path, index_prefix: str) -> None:
    """G9's indices: when a concurrent setup creates the index between this one's check and its
    creation (replayed: the alias check answers 404 though the index exists), the second sees
    resource_already_exists_exception and carries on: one index, one alias."""
    settings = settings_for(front.url, tmp_path, index_prefix, elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    engine = make_engine(settings.database_url)
    es = make_client(front.url)
    model = next(m for m in shop_app.read_models if m.name == "customers")
    front.fail(404, {}, path=f"/_alias/{alias(index_prefix, 'customers')}", method="HEAD")
    from cqrskit.infra.schema import read_model_indices
    import sqlalchemy as sa

    with engine.begin() as conn:  # the other setup's record is not there yet either
        conn.execute(sa.delete(read_model_indices).where(read_model_indices.c.read_model == "customers"))
    assert ensure(es, engine, index_prefix, model, replicas=0) is None
    assert list(es.indices.get_alias(name=alias(index_prefix, "customers"))) == [f"{alias(index_prefix, 'customers')}-v1"]
    engine.dispose()
    es.close()


def test_the_alias_swap_is_one_update_that_reads_nothing_first(front: EsFront, tmp_path: Path,
                                                               index_prefix: str) -> None:
    """G9: the rebuild's swap is a single update_aliases request, sent without reading the alias
    first; a stale second index behind the live alias (a swap that died half way on an older
    cqrskit) leaves it too; the old generations are deleted after."""
    settings = settings_for(front.url, tmp_path, index_prefix, elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    es = make_client(front.url)
    engine = make_engine(settings.database_url)
    live = alias(index_prefix, "products")
    es.indices.create(index=f"{live}-v9", aliases={live: {}})  # a stale extra index behind the alias
    es.indices.create(index=f"{live}-v10", aliases={f"{live}-next": {}})
    front.records.clear()
    deleted = finish_build(es, engine, index_prefix, "products", f"{live}-v10")
    calls = [(r.method, r.path) for r in front.records]
    assert calls[0] == ("POST", "/_aliases"), calls
    assert sorted(deleted) == [f"{live}-v1", f"{live}-v9"]
    assert list(es.indices.get_alias(name=live)) == [f"{live}-v10"]
    assert not es.indices.exists_alias(name=f"{live}-next")
    engine.dispose()
    es.close()


def test_a_rebuild_outlives_the_clusters_refusals(front: EsFront, tmp_path: Path, index_prefix: str) -> None:
    """G9: a rebuild whose bulk requests are refused whole (503, as a cluster without a master
    answers) backs off and goes on, instead of aborting with the old index still live."""
    settings = settings_for(front.url, tmp_path, index_prefix, elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    from cqrskit.app.testing import Harness

    with Harness(shop_app, settings.database_url, front.url, prefix=index_prefix) as pipeline:
        for i in range(3):
            pipeline.send("RegisterCustomer", f"c{i}", {"name": f"N{i}", "email": f"c{i}@example.com"})
        model = next(m for m in shop_app.read_models if m.name == "customers")
        front.fail(503, UNAVAILABLE, times=3, path="/_bulk")
        report = rebuild(pipeline.engine, shop_app.registry, pipeline.es, index_prefix, model, replicas=0)
        assert report.documents == 3 and report.parked == 0
        assert pipeline.es.count(index=alias(index_prefix, "customers"))["count"] == 3


def test_status_fails_when_the_search_server_refuses_it(search_url: str, tmp_path: Path, index_prefix: str) -> None:
    """G12: ``cqrskit status`` under a key whose role may not read what it reads reports the
    search server unreachable with the 403 reason, and is not healthy (exit 1)."""
    settings = settings_for(search_url, tmp_path, index_prefix, elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    roles = elasticsearch_roles(settings, [m.name for m in shop_app.read_models], prefix="t")
    with EsFront(search_url, roles=roles) as secured:
        refused = settings.model_copy(update={"elasticsearch_url": secured.url,
                                              "elasticsearch_api_key": secured.api_key("t_indexer")})
        status = gather_status(refused)
        assert not status.healthy
        search = status.components["search"]
        assert not search.reachable and "403" in (search.error or "") and "setup --privileges" in (search.error or "")
        allowed = refused.model_copy(update={"elasticsearch_api_key": secured.api_key("t_operator")})
        assert gather_status(allowed).components["search"].reachable
