"""The house rules, checked from the source: every ``cqrskit.*`` import points down the layers
and no modules import each other in a circle (lazy imports inside functions count too).

    cqrskit.app                        the composition root: CLI verbs, process entry points
      └─ cqrskit.workers               Dramatiq actors, relay, worker wiring
           ├─ cqrskit.read_models      projections, indexer, queries, query API
           └─ cqrskit.producers        command producers, HTTP gateway (independent of read_models)
                └─ cqrskit.infra       settings, store, schema, envelope, broker, logs
                     └─ cqrskit.domain the domain core: imports no infrastructure

The example apps (``cqrskit.examples``) stand outside the layers, as a user's app does: the core
imports nothing from them (the default app is only an import string), they import only the
public API (``PUBLIC``, listed in docs/extending.md), and no core module names a shop model or
field.

Run it alone with ``python -m pytest tests/test_layering.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"app": 4, "workers": 3, "read_models": 2, "producers": 2, "infra": 1, "domain": 0}
# What an app may import: the public API of docs/extending.md, one module (its names: tests/test_public_api.py).
PUBLIC = {"cqrskit.app.api"}
# Words of the shop's model that no core module may hold (the default app's import string aside).
SHOP_WORDS = re.compile(r"\b(shop|shops|orders?_?id|orders|customers?|products?|sku|skus|placed_at|total_cents|"
                        r"lifetime_value\w*|units_sold|ShopLoad|OrdersModel)\b", re.IGNORECASE)
DEFAULT_APP = "cqrskit.examples.shop:app"


def _modules(folders: object = PACKAGES) -> dict[str, Path]:
    found = {}
    for folder in folders:  # type: ignore[attr-defined]
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found["cqrskit." + ".".join(parts)] = path
    return found


MODULES = _modules()
EXAMPLES = _modules(["examples"])


def _imports(name: str, path: Path) -> set[str]:
    """The cqrskit modules ``name`` imports, resolved to modules of this tree."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.update(f"{node.module}.{a.name}" for a in node.names)
            targets.add(node.module)
    return {_resolve(t) for t in targets if t.startswith("cqrskit.")} - {None, name}  # type: ignore[misc]


def _resolve(target: str) -> str | None:
    while target and target not in MODULES and target not in EXAMPLES:
        target = target.rpartition(".")[0]
    return target or None


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
GRAPH.update({name: _imports(name, path) for name, path in EXAMPLES.items()})


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_the_tree_is_found() -> None:
    assert {_layer(m) for m in MODULES} == set(PACKAGES)
    assert len(MODULES) > 40


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    own = _layer(module)
    upward = sorted(t for t in GRAPH[module]
                    if _layer(t) != own and PACKAGES[_layer(t)] >= PACKAGES[own])
    assert not upward, f"{module} imports {upward}: only lower layers may be imported ({PACKAGES})"


def test_the_domain_core_imports_no_infrastructure() -> None:
    banned = ("sqlalchemy", "dramatiq", "pika", "elasticsearch", "fastapi", "psycopg", "structlog")
    for name, path in MODULES.items():
        if _layer(name) != "domain":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [n for n in names if n.split(".")[0] in banned], f"{name} imports {names}"


# The write store's PostgreSQL adapter: what the workers never see (they decide through the port,
# ``cqrskit.infra.write_store.port``).
POSTGRES_ADAPTER = {"cqrskit.infra.pg_store", "cqrskit.infra.pg_rows", "cqrskit.infra.pg_sql",
                    "cqrskit.infra.write_store.pg_batch", "cqrskit.infra.write_store.postgres"}
POSTGRES_NAMES = re.compile(r"\b(Pg[A-Z]\w*|LockBusy|lock_key)\b")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "workers"))
def test_workers_import_no_psycopg_and_no_postgresql_class(module: str) -> None:
    """The executor and every worker decide through the write-store port: no psycopg, no module
    or class of the PostgreSQL adapter, no branch on the dialect of the store."""
    source = MODULES[module].read_text()
    drivers = sorted({n for n in _imported_names(source) if n.split(".")[0] == "psycopg"})
    assert not drivers, f"{module} imports {drivers}"
    adapter = sorted(GRAPH[module] & POSTGRES_ADAPTER)
    assert not adapter, f"{module} imports the PostgreSQL adapter {adapter}: use cqrskit.infra.write_store.port"
    named = sorted(set(POSTGRES_NAMES.findall(source)))
    assert not named, f"{module} names PostgreSQL classes of the write store: {named}"
    assert "store.postgres" not in source, f"{module} branches on the store's dialect"


def _imported_names(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_no_example_app() -> None:
    importing = {name: sorted(t for t in GRAPH[name] if t.startswith("cqrskit.examples"))
                 for name in MODULES}
    assert not {n: t for n, t in importing.items() if t}, "the core imports an example app"
    lazy = [name for name, path in MODULES.items() if "cqrskit.examples" in path.read_text().replace(DEFAULT_APP, "")]
    assert not lazy, f"core modules that name an example module: {lazy}"


def test_no_core_module_names_a_shop_model_or_field() -> None:
    named = {}
    for name, path in MODULES.items():
        found = sorted({m.group(0) for m in SHOP_WORDS.finditer(path.read_text().replace(DEFAULT_APP, ""))})
        if found:
            named[name] = found
    assert not named, f"core modules that name the shop's models or fields: {named}"


@pytest.mark.parametrize("module", sorted(EXAMPLES))
def test_example_apps_use_only_the_public_api(module: str) -> None:
    imported = _imports(module, EXAMPLES[module])
    private = sorted(t for t in imported if not t.startswith("cqrskit.examples") and t not in PUBLIC)
    assert not private, f"{module} imports {private}: examples use only the public API ({sorted(PUBLIC)})"
    own_app = (module.split(".") + [""])[2]
    foreign = sorted(t for t in imported if t.startswith("cqrskit.examples.") and t.split(".")[2] != own_app)
    assert not foreign, f"{module} imports another example app: {foreign}"


def test_no_module_cycles() -> None:
    cycles = [c for c in _strongly_connected(GRAPH) if len(c) > 1]
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_modules_stay_small() -> None:
    long = {name: n for name, path in {**MODULES, **EXAMPLES}.items() if (n := len(path.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines (split them along their concerns): {long}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    result.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return result
