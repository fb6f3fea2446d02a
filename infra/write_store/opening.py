"""Opening a write store from a URL: the one function that chooses an adapter."""

from __future__ import annotations

from cqrskit.domain.registry import Registry
from cqrskit.infra.db import make_engine
from cqrskit.infra.store import EventStore
from cqrskit.infra.write_store.memory import MemoryStore
from cqrskit.infra.write_store.port import WriteStore
from cqrskit.infra.write_store.postgres import Waits

MEMORY_URL = "memory://"


def open_store(url: str, registry: Registry, *, waits: Waits | None = None, pool_size: int = 8) -> WriteStore:
    """The write store at ``url``: ``postgresql+psycopg://...`` (group commit, bounded lock waits
    when ``waits`` is given), ``sqlite:///path`` (one writer at a time) or ``memory://`` (the
    in-memory store: not durable, for tests). Connects to nothing yet: engines connect on
    first use. Raises ``sqlalchemy.exc.ArgumentError`` for a URL of no known kind."""
    if url == MEMORY_URL:
        return MemoryStore(registry)
    return EventStore(make_engine(url, pool_size=pool_size), registry, waits=waits)
