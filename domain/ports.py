"""What a command handler may ask of the write store, as a small abstract port.

The infrastructure implements it inside ONE write-store transaction; an app's handlers and
their unit tests (``cqrskit.domain.testing.InMemoryContext``) use nothing else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, TypeVar

from cqrskit.domain.model import Aggregate

A = TypeVar("A", bound=Aggregate)  # type: ignore[type-arg]


class ConcurrencyConflict(Exception):
    """Another transaction got there first (a stream moved since it was loaded, a claim was taken,
    the same command id was recorded): the command should be decided again. Raised by every
    implementation of the write side, the real store and the in-memory one alike."""


class HandlerContext(Protocol):
    def load(self, cls: type[A], aggregate_id: str) -> A:
        """The aggregate at its latest version (version 0, default state, when it has no stream).
        Loading the same id twice in one context returns the same object."""
        ...

    def owner_of(self, scope: str, key: str) -> str | None:
        """Who holds a unique claim (e.g. scope 'guest.email'), or None."""
        ...

    def claim(self, scope: str, key: str, owner: str) -> None:
        """Take a unique claim for ``owner``, committed with the events. Raises RuleViolation when
        another owner holds it already. If another transaction takes it concurrently, the commit
        fails as a conflict and the command is retried, so the handler then sees it taken (G4)."""
        ...

    def release(self, scope: str, key: str, owner: str) -> None:
        """Give a claim up (committed with the events)."""
        ...

    def now(self) -> datetime:
        """The clock of this command (UTC)."""
        ...
