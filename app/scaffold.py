"""``cqrskit new NAME``: a working app skeleton in the current directory — a domain (tasks: add,
complete), a read model with declared queries, the ``App``, its tests (given/when/then and the
in-process pipeline), a Procfile and a ``.env`` naming the app. docs/extending.md walks through
exactly these files (a test keeps the two equal)."""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from pathlib import Path

PACKAGE = "{{package}}"

DOMAIN = '''"""The domain: tasks that are added, then completed.

Rules: a task is added once; only an open task can be completed.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from cqrskit.app.api import Aggregate, Command, Event, HandlerContext, Registry

registry = Registry()
Title = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\\x00-\\x1f\\x7f]*$")]
Tag = Annotated[str, Field(min_length=1, max_length=30, pattern=r"^[a-z0-9-]+$")]


class TaskState(BaseModel):
    title: str = ""
    tags: list[str] = []
    added: bool = False
    done: bool = False


@registry.event
class TaskAdded(Event):
    type = "TaskAdded"
    title: str
    tags: list[str]


@registry.event
class TaskCompleted(Event):
    type = "TaskCompleted"


class Task(Aggregate[TaskState]):
    stream_type = "task"
    State = TaskState

    def apply(self, event: Event) -> None:
        match event:
            case TaskAdded(title=title, tags=tags):
                self.state.title, self.state.tags, self.state.added = title, tags, True
            case TaskCompleted():
                self.state.done = True
            case _:
                raise TypeError(f"task cannot apply {type(event).__name__}")


def add_task(command: AddTask, task_id: str, ctx: HandlerContext) -> None:
    task = ctx.load(Task, task_id)
    task.require(not task.state.added, f"task {task_id} exists already")
    task.record(TaskAdded(title=command.title, tags=sorted(set(command.tags))))


def complete_task(command: CompleteTask, task_id: str, ctx: HandlerContext) -> None:
    task = ctx.load(Task, task_id)
    task.require(task.state.added, f"task {task_id} does not exist")
    task.require(not task.state.done, f"task {task_id} is done already")
    task.record(TaskCompleted())


@registry.command(add_task)
class AddTask(Command):
    type = "AddTask"
    aggregate = Task
    title: Title
    tags: list[Tag] = Field(default_factory=list, max_length=5)


@registry.command(complete_task)
class CompleteTask(Command):
    type = "CompleteTask"
    aggregate = Task
'''

READ_MODELS = '''"""The read model: one document per task, searchable by the words of its title, filtered by
tag and by done, faceted by tag."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from {{package}}.domain import Task
from cqrskit.app.api import (
    STREAMS, Document, Facet, Queries, Term, View, WriteStoreSource, iso, streams_of, text_keyword)

KEYWORD = {"type": "keyword"}


class TaskView(View):
    task_id: str
    title: str
    tags: list[str]
    done: bool
    added_at: datetime | None = None
    score: float | None = None


class TasksModel:
    name = "tasks"
    stream_type = "task"
    id_field = "task_id"
    mappings: dict[str, Any] = {
        "dynamic": "strict",
        "properties": {"task_id": KEYWORD, "title": text_keyword(), "tags": KEYWORD,
                       "done": {"type": "boolean"}, "added_at": {"type": "date"}, "streams": STREAMS},
    }
    queries = Queries(
        view=TaskView, description="Tasks, open and done.",
        text={"title": 1},
        filters={"tag": Term("tags", description="Tasks with this tag."), "done": Term("done", bool)},
        sorts={"title": ("title.keyword", "asc"), "added_at": ("added_at", "desc")},
        default_sort="added_at",
        facets={"tags": Facet("tags", 20)},
    )

    def affected(self, source: WriteStoreSource, events: list[dict[str, Any]]) -> dict[str, list[int]]:
        """The tasks the events touch, each with the positions that touched it."""
        touched: dict[str, list[int]] = {}
        for event in events:
            if event["stream_type"] == "task":
                touched.setdefault(event["aggregate_id"], []).append(event["position"])
        return touched

    def build(self, source: WriteStoreSource, ids: list[str]) -> dict[str, Document]:
        """Fresh documents from the write store. ``Document(id, source=...)`` takes the version
        from ``streams`` (the streams a document is computed from, here the task's): their sum."""
        tasks = {i: t for i, t in source.aggregates(Task, ids).items() if t.state.added}
        added = source.event_times("task", tasks, first_only=True)
        return {i: Document(i, source={
            "task_id": i, "title": t.state.title, "tags": t.state.tags, "done": t.state.done,
            "added_at": iso(added[i].get("TaskAdded")),
            "streams": streams_of(t),
        }) for i, t in tasks.items()}
'''

APP = '''"""The app: name it once (CQRSKIT_APP={{package}}.app:app) and every cqrskit process runs it."""

from cqrskit.app.api import App
from {{package}}.domain import registry
from {{package}}.read_models import TasksModel

app = App("{{package}}", registry, read_models=[TasksModel()])
'''

TESTS = '''"""The app's own tests: the rules given/when/then, and the whole pipeline in process."""

from pathlib import Path

from cqrskit.app.api import Harness, Scenario
from {{package}}.app import app
from {{package}}.domain import TaskAdded, TaskCompleted, registry


def test_a_task_is_added_then_completed_once() -> None:
    scenario = Scenario(registry)
    scenario.when("AddTask", "t1", {"title": "Write docs", "tags": ["docs"]}) \\
        .then(TaskAdded(title="Write docs", tags=["docs"]))
    scenario.when("CompleteTask", "t1", {}).then(TaskCompleted())
    scenario.when("CompleteTask", "t1", {}).then_rejected("done already")


def test_a_completed_task_is_found_once_reflected(tmp_path: Path) -> None:
    with Harness(app, f"sqlite:///{tmp_path / 'write.db'}") as pipeline:
        pipeline.send("AddTask", "t1", {"title": "Write the docs", "tags": ["docs"]})
        pipeline.send("AddTask", "t2", {"title": "Fix the docs build", "tags": ["docs", "ci"]})
        done = pipeline.send("CompleteTask", "t1", {})
        page = pipeline.search("tasks", consistent_with=done.token, text="docs", done=True, facets=True)
        assert [(t.task_id, t.done) for t in page.items] == [("t1", True)]
        assert [(b.key, b.count) for b in page.facets.tags] == [("docs", 1)]
        assert all(report.ok for report in pipeline.verify())
'''

PROCFILE = '''commands: cqrskit worker --processes 1 --threads 64
relay: cqrskit relay
indexer: cqrskit indexer --processes 1 --threads 4
query: cqrskit query --insecure --host 127.0.0.1 --port ${PORT:-8001}
gateway: cqrskit gateway --insecure --host 127.0.0.1 --port ${PORT:-8000}
'''

ENV = '''CQRSKIT_APP={{package}}.app:app
'''


def files(package: str) -> dict[str, str]:
    """The skeleton of ``package``: relative path -> text."""
    templates = {f"{PACKAGE}/__init__.py": "", f"{PACKAGE}/domain.py": DOMAIN,
                 f"{PACKAGE}/read_models.py": READ_MODELS, f"{PACKAGE}/app.py": APP,
                 f"tests/test_{PACKAGE}.py": TESTS, "Procfile": PROCFILE, ".env": ENV}
    return {path.replace(PACKAGE, package): text.replace(PACKAGE, package) for path, text in templates.items()}


def check_name(package: str) -> None:
    """Raises ValueError unless ``package`` can be a new top-level Python package name."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", package) or keyword.iskeyword(package):
        raise ValueError(f"{package!r} is not a package name: lower-case letters, digits and _, "
                         f"starting with a letter")
    if package in ("cqrskit", "tests", "test"):
        raise ValueError(f"{package!r} is taken: choose another name")
    if package in sys.stdlib_module_names:
        raise ValueError(f"{package!r} is a module of Python's standard library: a package of that name would "
                         "shadow it (for cqrskit too); choose another name")
    if importlib.util.find_spec(package) is not None:
        raise ValueError(f"{package!r} is already importable here (an installed package or module): a package of "
                         "that name would shadow it or be shadowed; choose another name")


def write(package: str, where: Path) -> list[Path]:
    """Write the skeleton under ``where``; refuses (FileExistsError) to overwrite any file."""
    check_name(package)
    planned = {where / path: text for path, text in files(package).items()}
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        raise FileExistsError(f"would overwrite {', '.join(existing)}")
    for path, text in planned.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(planned)
