"""The public API is one module, ``cqrskit.app.api``, and its surface is listed here: a name
enters or leaves it only with this list (a house rule, like the layering; no guarantee G1..G13
rests on it). The example apps (tests/test_layering.py), docs/extending.md's tutorial and
``cqrskit new``'s skeleton import only from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cqrskit.app.api as api
from cqrskit.app import scaffold

ROOT = Path(__file__).resolve().parents[1]
SURFACE = {
    "App", "DemoLoad",
    "Aggregate", "ClaimRead", "Command", "ConcurrencyConflict", "Event", "FromTarget", "HandlerContext", "Read",
    "Registry", "RuleViolation", "StreamRead", "merged",
    "UnregisteredEvent", "UpcastError", "check_golden_events",
    "FRESH", "HELD", "STREAMS", "Awaited", "Cents", "Document", "Facet", "Flag", "Metric", "Queries", "QueryError",
    "QueryFunction", "QueryModel", "Range", "ReadModel", "Searchable", "Term", "View", "When", "WriteStoreSource",
    "alias", "bool_query", "bounded_int", "iso", "positions_by_stream", "searchable", "streams_of", "text_keyword",
    "CommandEnvelope", "CommandProducer", "ConsistencyToken", "new_command",
    "ProcessManager", "Reaction",
    "Harness", "InMemoryStore", "ProcessScenario", "Scenario", "Sent",
}


def test_the_surface_is_the_listed_one() -> None:
    assert set(api.__all__) == SURFACE, (
        f"added: {sorted(set(api.__all__) - SURFACE)}, removed: {sorted(SURFACE - set(api.__all__))}")
    assert len(api.__all__) == len(SURFACE), "a name listed twice in __all__"
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing, f"__all__ names what the module does not define: {missing}"


def test_every_name_is_in_the_guide() -> None:
    guide = (ROOT / "docs" / "extending.md").read_text()
    section = guide[guide.index("## The public API"):]
    absent = sorted(name for name in SURFACE if f"`{name}`" not in section)
    assert not absent, f"docs/extending.md's public API table misses {absent}"


def _cqrskit_imports(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cqrskit"):
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.startswith("cqrskit"))
    return modules


def test_the_tutorial_imports_only_the_public_api() -> None:
    guide = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert len(blocks) >= 4, "the tutorial's code blocks were not found"
    imported = set().union(*(_cqrskit_imports(block) for block in blocks))
    assert imported == {"cqrskit.app.api"}, f"the tutorial imports {sorted(imported)}"


def test_the_skeleton_imports_only_the_public_api() -> None:
    templates = [value for value in vars(scaffold).values() if isinstance(value, str) and "import" in value]
    imported = set()
    for template in templates:
        code = template.replace("{{package}}", "myapp")
        try:
            imported |= _cqrskit_imports(code)
        except SyntaxError:  # not a Python template
            continue
    assert imported == {"cqrskit.app.api"}, f"the skeleton of cqrskit new imports {sorted(imported)}"
