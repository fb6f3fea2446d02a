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


# Explicit dependencies below the root: only cqrskit.app imports Settings or reads the environment;
# everything below receives the values it uses. The modules that still do are listed, each a debt
# to pay (a module leaves the list when it is fixed: the test says so).
SETTINGS_BELOW_ROOT = {
    "cqrskit.infra.broker", "cqrskit.infra.deadletters", "cqrskit.infra.http_auth", "cqrskit.infra.logs",
    "cqrskit.infra.topology", "cqrskit.producers.commands", "cqrskit.producers.gateway", "cqrskit.read_models.api",
    "cqrskit.read_models.search", "cqrskit.workers.metrics", "cqrskit.workers.relay", "cqrskit.workers.relay_outlet",
    "cqrskit.workers.runtime",
}
ENVIRON_BELOW_ROOT = {"cqrskit.infra.tracing", "cqrskit.producers.gateway", "cqrskit.workers.metrics"}
ENVIRON = re.compile(r"\bos\.(environ|getenv)\b|\bgetenv\(")


def _below_root() -> dict[str, Path]:
    return {name: path for name, path in MODULES.items()
            if _layer(name) != "app" and name not in ("cqrskit.infra.settings", "cqrskit.infra.defaults")}


def test_below_the_root_nothing_imports_settings() -> None:
    """Components receive values, not the settings object (the composition root reads it)."""
    importing = {name for name in _below_root() if "cqrskit.infra.settings" in GRAPH[name]}
    assert not importing - SETTINGS_BELOW_ROOT, f"new modules below the root import Settings: {sorted(importing - SETTINGS_BELOW_ROOT)}"
    assert not SETTINGS_BELOW_ROOT - importing, f"no longer import Settings (strike them off): {sorted(SETTINGS_BELOW_ROOT - importing)}"


def test_below_the_root_nothing_reads_the_environment() -> None:
    """Only the composition root reads ``os.environ`` (Settings are read there, once)."""
    reading = {name for name, path in _below_root().items() if ENVIRON.search(path.read_text())}
    assert not reading - ENVIRON_BELOW_ROOT, f"new modules below the root read the environment: {sorted(reading - ENVIRON_BELOW_ROOT)}"
    assert not ENVIRON_BELOW_ROOT - reading, f"no longer read the environment (strike them off): {sorted(ENVIRON_BELOW_ROOT - reading)}"


# Only the composition root creates a broker (and with it Dramatiq's global one); the relay's
# outlet still makes its own (without installing it: make_broker(install=False)), a listed debt.
BROKERS_BELOW_ROOT = {"cqrskit.workers.relay_outlet"}


def test_only_the_root_creates_a_broker() -> None:
    making = {name for name, path in _below_root().items()
              if name != "cqrskit.infra.broker" and re.search(r"\bmake_broker\(", path.read_text())}
    assert not making - BROKERS_BELOW_ROOT, f"new modules below the root create a broker: {sorted(making - BROKERS_BELOW_ROOT)}"
    assert not BROKERS_BELOW_ROOT - making, f"no longer create a broker (strike them off): {sorted(BROKERS_BELOW_ROOT - making)}"


# Tables have one owner: the write store's tables are imported only by the write-store package;
# each other table by the module that keeps it. Today's exceptions are listed (debts, as above).
WRITE_STORE = {"cqrskit.infra.store", "cqrskit.infra.pg_store", "cqrskit.infra.migrate", "cqrskit.infra.migrations.env"}
WRITE_STORE_TABLES = {"events", "streams", "unique_claims", "command_outcomes"}
TABLE_OWNERS = {"api_keys": "cqrskit.infra.api_keys", "producers": "cqrskit.infra.grants",
                "producer_grants": "cqrskit.infra.grants", "parked_documents": "cqrskit.read_models.parking",
                "read_model_indices": "cqrskit.read_models.indices", "leases": "cqrskit.workers.relay",
                "relay_checkpoints": "cqrskit.workers.relay"}
TABLES_ELSEWHERE = {
    ("cqrskit.app.demo", "command_outcomes"), ("cqrskit.app.demo", "events"),
    ("cqrskit.app.status", "command_outcomes"), ("cqrskit.app.status", "events"), ("cqrskit.app.status", "leases"),
    ("cqrskit.app.status", "parked_documents"), ("cqrskit.app.status", "read_model_indices"),
    ("cqrskit.app.status", "streams"), ("cqrskit.infra.tracing_hooks", "events"),
    ("cqrskit.read_models.source", "events"), ("cqrskit.read_models.source", "streams"),
    ("cqrskit.workers.metrics", "parked_documents"), ("cqrskit.workers.relay", "events"),
}


def _tables_imported() -> set[tuple[str, str]]:
    found = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "cqrskit.infra.schema":
                found.update((name, a.name) for a in node.names if a.name != "metadata")
    return found


def test_every_table_has_one_owner() -> None:
    def owned(module: str, table: str) -> bool:
        in_write_store = module in WRITE_STORE or module.startswith("cqrskit.infra.write_store.")
        if table in WRITE_STORE_TABLES or table not in TABLE_OWNERS:  # the write store's own (reactions too)
            return in_write_store
        return TABLE_OWNERS[table] == module

    foreign = {pair for pair in _tables_imported() if not owned(*pair)}
    assert not foreign - TABLES_ELSEWHERE, f"tables imported outside their owner: {sorted(foreign - TABLES_ELSEWHERE)}"
    assert not TABLES_ELSEWHERE - foreign, f"no longer imported outside their owner (strike them off): {sorted(TABLES_ELSEWHERE - foreign)}"


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
