"""Mapping drift: a field added to a read model after its index was made. ``setup``, ``status``
and preflight each name the read model and the fix (``cqrskit rebuild NAME``) instead of letting
the indexers park every document they touch (G7) or ``setup`` saying "exists"; after the rebuild
the drift is gone (G9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cqrskit.app.errors import Problem
from cqrskit.app.preflight import preflight
from cqrskit.app.setup import setup_all
from cqrskit.examples.shop import app as shop_app
from cqrskit.infra.settings import Settings
from cqrskit.read_models.indices import alias, mapping_drift
from cqrskit.read_models.search import make_client
from tests.processes import PROJECT


def test_setup_status_and_preflight_name_a_drifted_read_model_and_its_fix(search_url: str, tmp_path: Path,
                                                                         index_prefix: str) -> None:
    """G7, G9: the live ``customers`` index lacks a field the model declares (the index of the
    app's previous release): setup prints the drift line, status exits 1 with it, the query side's
    and the indexer's preflight refuse to start with it; ``cqrskit rebuild customers`` clears it."""
    settings = Settings(database_url=f"sqlite:///{tmp_path}/w.db", elasticsearch_url=search_url,
                        index_prefix=index_prefix, elasticsearch_replicas=0)
    setup_all(settings, say=lambda _line: None)
    model = next(m for m in shop_app.read_models if m.name == "customers")
    properties = dict(model.mappings["properties"])
    dropped = next(name for name in reversed(list(properties)) if name not in ("streams", model.id_field))
    del properties[dropped]
    es = make_client(search_url)
    live = alias(index_prefix, "customers")
    old = list(es.indices.get_alias(name=live))
    es.indices.create(index=f"{live}-v7", mappings={**model.mappings, "properties": properties},
                      aliases={live: {}})  # the previous release's index
    es.indices.delete(index=",".join(old))
    assert mapping_drift(es, index_prefix, model) == [
        f"field {dropped!r} ({model.mappings['properties'][dropped].get('type', 'object')}) missing"]
    line = f"read model customers: the live index {live!r} has an older mapping than the app declares"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}, "COLUMNS": "300",
           **{k: v for k, v in settings.environment().items() if k in (
               "CQRSKIT_DATABASE_URL", "CQRSKIT_ELASTICSEARCH_URL", "CQRSKIT_INDEX_PREFIX")}}
    run = lambda *args: subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=PROJECT, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    done = run("setup")
    assert done.returncode == 0 and f"{line} (field {dropped!r}" in done.stdout and \
        "; run cqrskit rebuild customers" in done.stdout, done.stdout + done.stderr
    status = run("status")
    assert status.returncode == 1 and "run cqrskit rebuild customers" in status.stdout.replace("\n", " "), status.stdout
    for process in ("query", "indexer"):
        with pytest.raises(Problem) as refused:
            preflight(settings, process)
        assert refused.value.line().startswith(f"CQRSKIT_ELASTICSEARCH_URL={search_url}: {line}")
        assert refused.value.line().endswith("; run cqrskit rebuild customers")
    rebuilt = run("rebuild", "customers")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert mapping_drift(es, index_prefix, model) == []
    preflight(settings, "query")
    assert "read model customers: the live index" not in run("setup").stdout
    es.close()
