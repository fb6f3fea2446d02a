"""API keys of the HTTP gateway and query API (G11), kept in the write store's ``api_keys`` table.

A key reads ``ck_<key id>_<secret>``: the id is public (it names the key in lists and logs), the
secret is 256 random bits shown once, at creation; only its SHA-256 is stored, so a copy of the
table authenticates nobody. Each key has scopes: the command types it may send through the
gateway and the read models it may read through the query API (``*``: all).

``ApiKeys.authenticate`` is what the HTTP processes call: it needs only ``SELECT`` on ``api_keys``
(the query API's ``cqrskit_query`` role has nothing else), and caches each key for ``ttl``
seconds, so a revocation takes effect within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Engine

from cqrskit.infra.delivery import is_name
from cqrskit.infra.schema import api_keys

EVERYTHING = "*"
_TOKEN = re.compile(r"^ck_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    commands: frozenset[str]
    read_models: frozenset[str]
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def issuer(self) -> str:
        """What a command sent with this key records as its issuer."""
        return f"key:{self.name}"

    def may_send(self, command_type: str) -> bool:
        return EVERYTHING in self.commands or command_type in self.commands

    def may_read(self, read_model: str) -> bool:
        return EVERYTHING in self.read_models or read_model in self.read_models


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class ApiKeys:
    engine: Engine
    ttl: float = 5.0
    _cache: dict[str, tuple[float, tuple[str, ApiKey] | None]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def authenticate(self, token: str) -> ApiKey | None:
        """The live key ``token`` is, or None (malformed, unknown, wrong secret, revoked)."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        found = self._cached(key_id)
        if found is None:
            return None
        digest, key = found
        return key if hmac.compare_digest(digest, _digest(secret)) else None

    def _cached(self, key_id: str) -> tuple[str, ApiKey] | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key_id)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id,
                                                         api_keys.c.revoked_at.is_(None))).first()
        found = None if row is None else (row.secret_sha256, _key(row))
        with self._lock:
            if len(self._cache) > 10_000:  # unknown ids must not grow it without bound
                self._cache.clear()
            self._cache[key_id] = (now, found)
        return found

    # -- the operator's side ----------------------------------------------------------------
    def create(self, name: str, commands: Iterable[str], read_models: Iterable[str]) -> tuple[ApiKey, str]:
        """A new key and its token (shown once: it is not stored)."""
        if not is_name(name):
            raise ValueError(f"not a valid key name: {name!r} (letters, digits, ._:@/+- ; at most 200)")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, frozenset(commands), frozenset(read_models), datetime.now(UTC))
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(
                key_id=key_id, name=name, secret_sha256=_digest(secret), commands=sorted(key.commands),
                read_models=sorted(key.read_models), created_at=key.created_at))
        return key, f"ck_{key_id}_{secret}"

    def revoke(self, key_id_or_name: str) -> int:
        """Revoke the key with this id, or every live key with this name; how many were revoked."""
        where = sa.or_(api_keys.c.key_id == key_id_or_name, api_keys.c.name == key_id_or_name)
        with self.engine.begin() as conn:
            return conn.execute(api_keys.update().where(where, api_keys.c.revoked_at.is_(None))
                                .values(revoked_at=datetime.now(UTC))).rowcount

    def all(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_key(row) for row in rows]


def live_command_scopes(engine: Engine) -> dict[str, frozenset[str]]:
    """Each live key's name and the command types it may send (the union over its live keys):
    what a command worker checks a vouched-for ``key:NAME`` issuer against. Reads only the
    ``name``, ``commands`` and ``revoked_at`` columns, all the workers' role may read."""
    scopes: dict[str, set[str]] = {}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(api_keys.c.name, api_keys.c.commands).where(api_keys.c.revoked_at.is_(None)))
        for name, commands in rows:
            scopes.setdefault(name, set()).update(commands or ())
    return {name: frozenset(types) for name, types in scopes.items()}


def _key(row: sa.Row) -> ApiKey:  # type: ignore[type-arg]
    return ApiKey(row.key_id, row.name, frozenset(row.commands), frozenset(row.read_models),
                  row.created_at, row.revoked_at)
