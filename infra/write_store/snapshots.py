"""The snapshots' check (``cqrskit verify``): a sample of aggregates restored from their stored
snapshot and folded again from their events; the two states must agree.

A snapshot is trusted only when it was taken under the running code's ``snapshot_version()``
(the state model's shape and ``state_version``), so a changed shape can no longer leave old
aggregates wrong. What the fingerprint cannot see is ``apply`` changing meaning without a
``state_version`` bump: this check finds it, on the aggregates it samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from cqrskit.domain.model import Aggregate, restore
from cqrskit.domain.registry import Registry
from cqrskit.infra.schema import events, streams


@dataclass
class SnapshotReport:
    """Of one stream type: how many trusted snapshots were compared, and the aggregate ids whose
    snapshot differs from their events' fold (with the differing state fields)."""

    stream_type: str
    checked: int = 0
    different: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.different


def aggregate_classes(registry: Registry) -> dict[str, type[Aggregate[Any]]]:
    """The aggregate classes the registry's commands name, by stream type."""
    found: dict[str, type[Aggregate[Any]]] = {}
    for command in registry.commands.values():
        cls = getattr(command, "aggregate", None)
        if isinstance(cls, type) and issubclass(cls, Aggregate):
            found.setdefault(cls.stream_type, cls)
    return found


def check_snapshots(engine: Engine, registry: Registry, sample: int = 200) -> list[SnapshotReport]:
    """Compare up to ``sample`` random trusted snapshots of each stream type with a fold of their
    events (read in one transaction per stream type). Raises what the database raises."""
    reports = []
    for stream_type, cls in sorted(aggregate_classes(registry).items()):
        report = SnapshotReport(stream_type)
        query = (sa.select(streams.c.stream_id, streams.c.aggregate_id, streams.c.version, streams.c.state)
                 .where(streams.c.stream_type == stream_type, streams.c.state.is_not(None),
                        streams.c.state_version == cls.snapshot_version())
                 .order_by(sa.func.random()).limit(sample))
        with engine.connect() as conn:
            for row in conn.execute(query).all():
                report.checked += 1
                stored = cls.restore(row.aggregate_id, row.version, row.state).snapshot()
                folded = _fold(conn, registry, cls, row.stream_id, row.aggregate_id, row.version).snapshot()
                if stored != folded:
                    report.different[row.aggregate_id] = sorted(
                        k for k in set(stored) | set(folded) if stored.get(k) != folded.get(k))
        reports.append(report)
    return reports


def _fold(conn: sa.Connection, registry: Registry, cls: type[Aggregate[Any]], sid: str, aggregate_id: str,
          version: int) -> Aggregate[Any]:
    rows = conn.execute(sa.select(events.c.type, events.c.schema_version, events.c.data)
                        .where(events.c.stream_id == sid, events.c.version <= version)
                        .order_by(events.c.version))
    return restore(cls, aggregate_id, version, None, None,  # no snapshot: folded from the events
                   lambda: [registry.decode_event(r.type, r.schema_version, r.data) for r in rows])
