"""Timestamps read back from the write store, in UTC.

The store writes UTC; PostgreSQL hands ``timestamptz`` back aware, SQLite hands it back naive.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|infinity|nan)", re.IGNORECASE)


def as_utc(moment: datetime) -> datetime:
    """``moment`` marked UTC when it is naive; an aware ``moment`` is returned as it is."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def written_as_a_date(value: Any) -> Any:
    """A pydantic ``BeforeValidator``: a date or time must be written as one (ISO 8601 / RFC 3339),
    as the JSON Schema says; a number (or a numeric string) is not read as seconds since 1970."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("expected an ISO 8601 date or date-time, not a number")
    return value
