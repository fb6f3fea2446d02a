"""Producers and the command types each may send, kept in the write store (G11).

``ProducerGrants`` is what ``cqrskit producers grant|revoke|list`` manage and what a command
worker asks before it decides a command. A worker caches the table for ``ttl`` seconds: a grant or
a revocation takes effect within that time (``CQRSKIT_GRANTS_TTL_SECONDS``, 5 by default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Engine

from cqrskit.infra.api_keys import live_command_scopes
from cqrskit.infra.db import upsert_insert
from cqrskit.infra.delivery import is_name
from cqrskit.infra.schema import producer_grants, producers

EVERY_TYPE = "*"


@dataclass(frozen=True)
class Producer:
    name: str
    on_behalf: bool
    command_types: frozenset[str]

    def may_send(self, command_type: str) -> bool:
        return EVERY_TYPE in self.command_types or command_type in self.command_types


@dataclass
class ProducerGrants:
    engine: Engine
    ttl: float = 5.0
    _cache: dict[str, Producer] = field(default_factory=dict, repr=False)
    _loaded_at: float = field(default=float("-inf"), repr=False)
    _keys: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- the worker's side ------------------------------------------------------------------
    def producer(self, name: str) -> Producer | None:
        """The producer called ``name`` as of at most ``ttl`` seconds ago, or None."""
        with self._lock:
            self._refresh()
            return self._cache.get(name)

    def issuer_may_send(self, issuer: str, command_type: str) -> bool:
        """Whether ``issuer`` exists and may send ``command_type``: ``key:NAME`` is a live API key
        of that name whose scope covers the type; any other name, a producer granted the type."""
        with self._lock:
            self._refresh()
            if issuer.startswith("key:"):
                scope = self._keys.get(issuer.removeprefix("key:"))
                return scope is not None and (EVERY_TYPE in scope or command_type in scope)
            found = self._cache.get(issuer)
            return found is not None and found.may_send(command_type)

    def _refresh(self) -> None:
        if time.monotonic() - self._loaded_at > self.ttl:
            self._cache = {p.name: p for p in self.all()}
            self._keys = live_command_scopes(self.engine)
            self._loaded_at = time.monotonic()

    # -- the operator's side ----------------------------------------------------------------
    def all(self) -> list[Producer]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(producers.c.name, producers.c.on_behalf).order_by(producers.c.name)).all()
            grants = conn.execute(sa.select(producer_grants.c.producer, producer_grants.c.command_type)).all()
        types: dict[str, set[str]] = {}
        for producer, command_type in grants:
            types.setdefault(producer, set()).add(command_type)
        return [Producer(name, bool(on_behalf), frozenset(types.get(name, ()))) for name, on_behalf in rows]

    def grant(self, name: str, command_types: Iterable[str], *, on_behalf: bool | None = None) -> Producer:
        """Allow ``name`` the ``command_types`` (idempotent); ``on_behalf`` set only when given."""
        if not is_name(name):
            raise ValueError(f"not a valid producer name: {name!r} (letters, digits, ._:@/+- ; at most 200)")
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            insert = upsert_insert(conn, producers).values(name=name, on_behalf=bool(on_behalf), created_at=now)
            if on_behalf is None:
                conn.execute(insert.on_conflict_do_nothing(index_elements=["name"]))
            else:
                conn.execute(insert.on_conflict_do_update(index_elements=["name"], set_={"on_behalf": on_behalf}))
            for command_type in command_types:
                conn.execute(upsert_insert(conn, producer_grants).values(producer=name, command_type=command_type)
                             .on_conflict_do_nothing(index_elements=["producer", "command_type"]))
        return next(p for p in self.all() if p.name == name)

    def revoke(self, name: str, command_types: Iterable[str] = ()) -> bool:
        """Take ``command_types`` from ``name``; with none, remove the producer altogether.
        False when there was no such producer."""
        types = list(command_types)
        with self.engine.begin() as conn:
            if types:
                conn.execute(producer_grants.delete().where(producer_grants.c.producer == name,
                                                            producer_grants.c.command_type.in_(types)))
                return conn.execute(sa.select(producers.c.name).where(producers.c.name == name)).first() is not None
            conn.execute(producer_grants.delete().where(producer_grants.c.producer == name))
            return conn.execute(producers.delete().where(producers.c.name == name)).rowcount > 0
