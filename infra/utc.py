"""Timestamps read back from the write store, in UTC.

The store writes UTC; PostgreSQL hands ``timestamptz`` back aware, SQLite hands it back naive.
"""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(moment: datetime) -> datetime:
    """``moment`` marked UTC when it is naive; an aware ``moment`` is returned as it is."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
