"""cqrskit lives inside its users' projects: it installs one package, ``cqrskit``, and never
shadows a user's own ``domain``, ``workers`` or ``infra`` package (issue: a user's ``domain/``
broke ``cqrskit worker`` with ``cannot import name 'RuleViolation' from 'domain.model'``)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_PACKAGES = ("domain", "workers", "infra", "producers", "read_models")


def _user_project(tmp_path: Path) -> Path:
    """A user's project whose own top-level packages have the names of our folders."""
    for name in USER_PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'the user'\nNAME = {name!r}\n")
        (tmp_path / name / "model.py").write_text("raise ImportError('this is the user\\'s module')\n")
    return tmp_path


def _clean_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env["PYTHONPATH"] = str(project)  # the user's packages come first, as in their own project
    env["COLUMNS"] = "160"
    return env


def test_every_cqrskit_module_imports_beside_a_users_own_packages(tmp_path: Path) -> None:
    project = _user_project(tmp_path)
    code = """
import importlib, pkgutil
names = []
for sub in ("app", "domain", "examples", "infra", "producers", "read_models", "workers"):
    package = importlib.import_module("cqrskit." + sub)
    names += [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                                   if ".migrations" not in m.name and not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
import domain, workers, infra
assert domain.OWNER == workers.OWNER == infra.OWNER == "the user", "cqrskit shadowed the user's package"
print(len(names))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=_clean_env(project),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) > 40


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_demo_runs_from_a_users_project(tmp_path: Path) -> None:
    project = _user_project(tmp_path)
    done = subprocess.run([sys.executable, "-m", "cqrskit.app", "demo", "--size", "300"], cwd=project,
                          env=_clean_env(project), capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every read model equals a fresh projection of the write store" in done.stdout


@pytest.mark.timeout(300)
def test_the_wheel_holds_only_the_cqrskit_package(tmp_path: Path) -> None:
    """What a fresh venv's site-packages receives: ``cqrskit/`` (migrations included) and the
    distribution's metadata, no top-level ``domain``, ``infra``, ``workers``..."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=280,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("cqrskit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cqrskit", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "cqrskit/infra/migrations/env.py" in names
    assert any(n.startswith("cqrskit/infra/migrations/versions/0001_") for n in names)
    assert "cqrskit/app/bootstrap.py" in names and "cqrskit/domain/model.py" in names
    assert "cqrskit/examples/shop/__init__.py" in names and "cqrskit/examples/hotel/domain.py" in names
    assert not [n for n in names if n.startswith("cqrskit/") and n.count("/") == 1 and n.endswith(".py")]
