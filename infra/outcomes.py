"""The outcome of a command (G3): what became of it, queryable by its command id.

Statuses are terminal: ``succeeded`` (aggregate version and event positions), ``rejected`` (a
business rule, with the reason), ``invalid`` (bad envelope or payload, with the validation
errors) and ``dead`` (an infrastructure failure that outlived the retries).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field

from cqrskit.infra.utc import as_utc


class Status(str, Enum):
    succeeded = "succeeded"
    rejected = "rejected"
    invalid = "invalid"
    dead = "dead"


class Outcome(BaseModel):
    command_id: str
    status: Status
    type: str | None = None
    aggregate_id: str | None = None
    reason: str | None = None
    errors: list[dict[str, Any]] | None = None
    aggregate_version: int | None = None
    positions: list[int] = Field(default_factory=list)
    correlation_id: str | None = None
    causation_id: str | None = None
    recorded_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    duplicate: bool = Field(default=False, description="True when this delivery found the outcome already recorded.")

    def row(self, positions: list[int] | None = None) -> dict[str, Any]:
        row = self.model_dump(exclude={"duplicate"})
        row["status"] = self.status.value
        if positions is not None:
            row["positions"] = positions
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Outcome:
        data = dict(row)
        data["positions"] = data.get("positions") or []
        data["recorded_at"] = as_utc(data["recorded_at"])
        return cls.model_validate(data)

    def as_duplicate(self) -> Outcome:
        return self.model_copy(update={"duplicate": True})
