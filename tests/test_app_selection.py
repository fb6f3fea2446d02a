"""Which app runs: ``CQRSKIT_APP`` / ``--app`` (resolved once, in the composition root), handed to
every child process through the environment; a bad one is one clear line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cqrskit.app import App
from cqrskit.app.bootstrap import AppError, load_app
from cqrskit.domain.registry import Registry
from cqrskit.infra.settings import DEFAULT_APP, Settings
from cqrskit.read_models.queryable import Queries, View

BROKEN = "import nowhere_to_be_found\n"
NOT_AN_APP = "app = 42\n"
BAD_QUERIES = """
from cqrskit.app import App
from cqrskit.domain.registry import Registry
from cqrskit.read_models.queryable import Queries, View

class Model:
    name, stream_type, id_field = "things", "thing", "thing_id"
    mappings = {"properties": {"thing_id": {"type": "keyword"}}}
    queries = Queries(view=View, text={"title": 1}, sorts={"id": ("thing_id", "asc")})

app = App("bad", Registry(), read_models=[Model()])
"""


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    return subprocess.run([sys.executable, "-m", "cqrskit.app", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**clean, "COLUMNS": "300", **env})


@pytest.mark.parametrize("spec, message", [
    ("nowhere:app", "no module named 'nowhere'"),
    ("cqrskit.examples.shop:nope", "cqrskit.examples.shop has no attribute 'nope'"),
    ("cqrskit.examples.shop:registry", "is a Registry, not a cqrskit.app.App"),
    ("no colon", "CQRSKIT_APP must be module:attribute"),
    ("broken:app", "importing broken failed: No module named 'nowhere_to_be_found'"),
    ("notapp:app", "is a int, not a cqrskit.app.App"),
    ("badqueries:app", "'title' is not a field of its mapping"),
])
def test_a_bad_app_is_one_line_for_every_verb(tmp_path: Path, spec: str, message: str) -> None:
    """G10 for the operator: bad configuration gets a clear error and nothing else."""
    (tmp_path / "broken.py").write_text(BROKEN)
    (tmp_path / "notapp.py").write_text(NOT_AN_APP)
    (tmp_path / "badqueries.py").write_text(BAD_QUERIES)
    for args, env in ((("--app", spec, "status"), {}), (("verify",), {"CQRSKIT_APP": spec})):
        done = cli(tmp_path, *args, **env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr, \
            done.stderr


def test_the_app_is_found_in_the_current_directory_and_handed_to_children(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("from cqrskit.app import App\nfrom cqrskit.domain.registry import Registry\n"
                                      "app = App('mine', Registry())\n")
    done = cli(tmp_path, "--app", "mine:app", "search", "anything")
    assert done.returncode == 2 and "unknown read model 'anything' of the app 'mine'; known: none" in done.stderr, \
        done.stderr
    assert Settings(app="mine:app").environment()["CQRSKIT_APP"] == "mine:app"
    assert Settings().app == DEFAULT_APP


def test_load_app_resolves_once_and_checks_the_declarations() -> None:
    assert load_app(DEFAULT_APP) is load_app(DEFAULT_APP)
    assert load_app(DEFAULT_APP).name == "shop"
    with pytest.raises(AppError, match="not a cqrskit.app.App"):
        load_app("cqrskit.examples.shop.domain:registry")


def test_an_app_refuses_two_read_models_of_one_name() -> None:
    class Model:
        name, stream_type, id_field, mappings = "twice", "x", "x_id", {"properties": {}}
        queries = Queries(view=View)

    with pytest.raises(ValueError, match="two read models share a name"):
        App("dup", Registry(), read_models=[Model(), Model()])


def test_search_lists_the_declared_parameters_of_any_app(tmp_path: Path) -> None:
    done = cli(tmp_path, "--app", "cqrskit.examples.hotel:app", "search", "bookings", "--params")
    assert done.returncode == 0, done.stderr
    assert all(f"--{name}" in done.stdout for name in ("text", "status", "room-type", "from", "until", "facets"))
    stray = cli(tmp_path, "--app", "cqrskit.examples.hotel:app", "search", "rooms", "--text", "x")
    assert stray.returncode == 2 and "--text does not apply to rooms" in stray.stderr, stray.stderr


def test_a_file_in_the_current_directory_never_shadows_an_installed_module(tmp_path: Path) -> None:
    """An attacker's ``elasticsearch.py`` in the directory a process starts from is not imported."""
    (tmp_path / "elasticsearch.py").write_text("raise SystemExit('shadowed!')\n")
    (tmp_path / "mine.py").write_text("from cqrskit.app import App\nfrom cqrskit.domain.registry import Registry\n"
                                      "import elasticsearch\napp = App('mine', Registry())\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    script = Path(sys.executable).parent / "cqrskit"  # as installed (``python -m`` itself puts "" first)
    done = subprocess.run([str(script), "--app", "mine:app", "search", "anything"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**clean, "COLUMNS": "300"})
    assert "shadowed!" not in done.stdout + done.stderr and "known: none" in done.stderr, done.stderr
