"""`cqrskit rebuild` offers the rebuild of every read model whose live index differs from its
declaration: a mapping change, or a ``projection_version`` bump (``build`` computing documents
anew from the same events). Issue 22: a read-model change, start to finish (G6, G9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cqrskit.app.setup import setup_all
from cqrskit.examples.shop import app as shop_app
from cqrskit.infra.settings import Settings
from cqrskit.read_models.indices import alias, create_index, projection_drift, projection_version
from cqrskit.read_models.search import make_client
from tests.processes import PROJECT


def test_a_projection_version_is_recorded_in_the_index_and_a_bump_is_drift(search_url: str,
                                                                            index_prefix: str) -> None:
    model = next(m for m in shop_app.read_models if m.name == "products")
    es = make_client(search_url)
    index = f"{index_prefix}-products-v1"
    create_index(es, index, model, {alias(index_prefix, "products"): {}}, replicas=0)
    assert es.indices.get_mapping(index=index)[index]["mappings"]["_meta"]["cqrskit"] == {"projection_version": 1}
    assert projection_drift(es, index_prefix, model) == []

    class Bumped(type(model)):  # type: ignore[misc]
        projection_version = 3

    assert projection_drift(es, index_prefix, Bumped()) == ["built by projection_version 1, declared 3"]

    class Bad(type(model)):  # type: ignore[misc]
        projection_version = 0

    with pytest.raises(ValueError, match="projection_version must be an int >= 1, got 0"):
        projection_version(Bad())
    es.close()


def test_rebuild_lists_the_drifted_read_models_and_rebuilds_them(search_url: str, tmp_path: Path,
                                                                 index_prefix: str) -> None:
    """The live `customers` index was built by another projection version: `cqrskit rebuild` (no
    name) names it with its fix, `--drifted` rebuilds it (and only it), then nothing is listed."""
    settings = Settings(database_url=f"sqlite:///{tmp_path}/w.db", elasticsearch_url=search_url,
                        index_prefix=index_prefix, elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    es = make_client(search_url)
    live = alias(index_prefix, "customers")
    old = list(es.indices.get_alias(name=live))
    model = next(m for m in shop_app.read_models if m.name == "customers")
    es.indices.create(index=f"{live}-v7", aliases={live: {}},
                      mappings={**model.mappings, "_meta": {"cqrskit": {"projection_version": 2}}})
    es.indices.delete(index=",".join(old))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}, "COLUMNS": "300",
           **{k: v for k, v in settings.environment().items() if k in (
               "CQRSKIT_DATABASE_URL", "CQRSKIT_ELASTICSEARCH_URL", "CQRSKIT_INDEX_PREFIX",
               "CQRSKIT_ELASTICSEARCH_REPLICAS")}}
    run = lambda *args: subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=180)
    listed = run("rebuild")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.count("│") >= 3}
    assert "built by projection_version 2, declared 1" in rows["customers"] and \
        "cqrskit rebuild customers" in rows["customers"], listed.stdout
    assert "as declared" in rows["orders"] and "as declared" in rows["products"], listed.stdout
    assert "cqrskit rebuild --drifted" in listed.stdout
    untouched = list(es.indices.get_alias(name=alias(index_prefix, "orders")))
    rebuilt = run("rebuild", "--drifted")
    assert rebuilt.returncode == 0 and "customers:" in rebuilt.stdout and "orders:" not in rebuilt.stdout, \
        rebuilt.stdout + rebuilt.stderr
    assert projection_drift(es, index_prefix, model) == []
    assert list(es.indices.get_alias(name=alias(index_prefix, "orders"))) == untouched
    again = run("rebuild")
    assert again.returncode == 0 and "cqrskit rebuild --drifted" not in again.stdout, again.stdout
    both = run("rebuild", "customers", "--drifted")
    assert both.returncode == 2 and "not both" in both.stderr, both.stdout + both.stderr
    es.close()
