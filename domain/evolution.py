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
