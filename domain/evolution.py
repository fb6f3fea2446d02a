"""Golden events: stored events of every old schema version, kept as test data, read through the
registry's upcaster chain exactly as the write store reads them.

    problems = check_golden_events(registry, Path(__file__).parent / "golden")
    assert not problems, problems

A golden file is ``<folder>/<event type>.v<N>.json`` holding ``{"data": {...}}`` (the event's data
as version N stored it) and, optionally, ``"expected": {...}`` (what it must read as today). Every
version below an event type's ``schema_version`` must have one: a version without its golden file
is a problem, as is a golden event the chain cannot read or reads differently from ``expected``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cqrskit.domain.registry import Registry

GOLDEN_NAME = re.compile(r"(?P<type>.+)\.v(?P<version>[1-9]\d*)\.json")


def check_golden_events(registry: Registry, folder: Path) -> list[str]:
    """One line per problem with the golden events of ``folder`` (empty when every old version of
    every registered event type has a golden event, and each reads as expected)."""
    found: list[str] = []
    seen: set[tuple[str, int]] = set()
    for path in sorted(folder.glob("*.json")):
        match = GOLDEN_NAME.fullmatch(path.name)
        if match is None:
            found.append(f"{path.name}: a golden event is named <event type>.v<N>.json")
            continue
        key = (match["type"], int(match["version"]))
        seen.add(key)
        problem = _read_one(registry, path, *key)
        if problem:
            found.append(f"{path.name}: {problem}")
    for event_type, cls in sorted(registry.events.items()):
        found += [f"{event_type}.v{v}.json is missing: every old version of {event_type!r} keeps a golden event"
                  for v in range(1, cls.schema_version) if (event_type, v) not in seen]
    return found


def _read_one(registry: Registry, path: Path, event_type: str, version: int) -> str | None:
    try:
        golden: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        event = registry.decode_event(event_type, version, dict(golden["data"]))
    except Exception as exc:  # noqa: BLE001 - every way of failing is the problem to report
        return f"does not read through the upcasters: {type(exc).__name__}: {exc}"
    expected = golden.get("expected")
    if expected is not None and event.model_dump(mode="json") != expected:
        return f"reads as {event.model_dump(mode='json')}, expected {expected}"
    return None


def event_schemas(registry: Registry) -> dict[str, str]:
    """The JSON Schema of the ``data`` of every registered event type at its current version, as
    the text of ``<type>.v<N>.schema.json`` (the name is the key). A published version's schema
    never changes but by added optional fields: ``cqrskit event-schemas --check`` compares them."""
    found = {}
    for event_type, cls in sorted(registry.events.items()):
        schema = cls.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = f"{event_type} v{cls.schema_version}"
        found[f"{event_type}.v{cls.schema_version}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return found


def schema_changes(registry: Registry, folder: Path) -> list[str]:
    """How the published schemas in ``folder`` differ from the registry, one line each: a current
    version not written yet or written differently, and an old version whose schema was never
    kept (consumers reading history meet it). Empty when they agree."""
    found = []
    for name, text in event_schemas(registry).items():
        path = folder / name
        if not path.exists():
            found.append(f"{name} is not written (cqrskit event-schemas writes it)")
        elif path.read_text(encoding="utf-8") != text:
            found.append(f"{name} differs from the code: within a version only optional fields may be added "
                         f"(then write it again); any other change is a new schema_version with an upcaster")
    for event_type, cls in sorted(registry.events.items()):
        found += [f"{event_type}.v{v}.schema.json is missing: the schema of every published version is kept"
                  for v in range(1, cls.schema_version) if not (folder / f"{event_type}.v{v}.schema.json").exists()]
    return found
