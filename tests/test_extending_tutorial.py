"""docs/extending.md, run: its files are exactly what ``cqrskit new todo`` writes; the project they
make passes its own tests (given/when/then and the in-process harness); and, on real PostgreSQL,
RabbitMQ and osmem, the tutorial's Procfile run from the project's directory (the app named
only by its ``.env``) executes the commands the page sends and answers its queries, through
``cqrskit`` and the query API. No file of cqrskit is edited for it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cqrskit.app.scaffold import files
from cqrskit.infra.settings import Settings
from tests.processes import PROJECT
from tests.stack import Stack, wait_until
from tests.test_procfile_stack import BIN, Honcho, _answers, free_base_port

DOC = PROJECT / "docs" / "extending.md"
BLOCK = re.compile(r"^`([^`]+)`:\n\n```[a-z]*\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def tutorial_files() -> dict[str, str]:
    found = {path: text + "\n" for path, text in BLOCK.findall(DOC.read_text())}
    if "touch todo/__init__.py" in DOC.read_text():
        found["todo/__init__.py"] = ""
    return found


def commands(prefix: str) -> list[list[str]]:
    """The shell lines of the page that start with ``prefix`` (continuations joined)."""
    lines = re.findall(rf"^{re.escape(prefix)}(?: .*)?$", DOC.read_text(), re.MULTILINE)
    return [shlex.split(line.split("  #")[0]) for line in lines]


def write_project(where: Path) -> Path:
    for path, text in tutorial_files().items():
        (where / path).parent.mkdir(parents=True, exist_ok=True)
        (where / path).write_text(text)
    return where


def test_the_tutorial_is_what_cqrskit_new_writes() -> None:
    assert tutorial_files() == files("todo")


def test_cqrskit_new_writes_a_project_whose_tests_pass(tmp_path: Path, search_url: str) -> None:
    done = subprocess.run([str(BIN / "cqrskit"), "new", "todo"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    again = subprocess.run([str(BIN / "cqrskit"), "new", "todo"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2 and "would overwrite" in again.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=240)
    assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout[-3000:] + tests.stderr[-2000:]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = write_project(tmp_path / "todo-project")
    monkeypatch.syspath_prepend(str(root))  # the test reads the write store with the app's registry
    return root


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_tutorial_runs_on_the_procfile_stack(project: Path, amqp_settings: Settings, search_url: str,
                                                  tmp_path: Path) -> None:
    stack = Stack(amqp_settings.model_copy(update={"app": "todo.app:app", "elasticsearch_url": search_url}),
                  tmp_path)
    base = free_base_port()
    env = stack.env(PATH=f"{BIN}:{os.environ['PATH']}")  # the page exports CQRSKIT_APP for the CLI
    run = lambda args: subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    setup = run([str(BIN / "cqrskit"), "setup"])
    assert setup.returncode == 0 and f"{stack.settings.index_prefix}-tasks: created" in setup.stdout, \
        setup.stdout + setup.stderr
    honcho = Honcho(stack, base, project, {"commands": 1}, CQRSKIT_APP="")  # the Procfile's: from .env
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{base + 300}", timeout=30) as query:
            wait_until(lambda: _answers(query), 90, f"the query API; honcho says:\n{honcho.tail()}")
            for args in commands("cqrskit send"):
                sent = run([str(BIN / args[0]), *args[1:]])
                assert sent.returncode == 0 and "succeeded" in sent.stdout, sent.stdout + sent.stderr
            stack.wait_drained(timeout=60)
            (search,) = commands("cqrskit search")
            found = run([str(BIN / search[0]), *search[1:]])
            assert found.returncode == 0 and "Write the docs" in found.stdout and "docs" in found.stdout, \
                found.stdout + found.stderr
            (curl,) = commands("curl")
            answer = query.get(curl[1].replace("http://127.0.0.1:8300", ""))
            assert [t["task_id"] for t in answer.json()["items"]] == ["t1"], answer.text
            for verb in ("cqrskit verify", "cqrskit status"):
                (args,) = commands(verb)
                checked = run([str(BIN / args[0]), *args[1:]])
                assert checked.returncode == 0 and "tasks" in checked.stdout, checked.stdout + checked.stderr
        assert honcho.popen.poll() is None, honcho.tail()
    finally:
        honcho.stop()
        stack.close()
