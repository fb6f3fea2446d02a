"""The write store behind one port (``cqrskit.infra.write_store.port``).

- ``port``: what the command side asks of a write store (``WriteStore``: decide a batch of
  commands, record an outcome alone, read outcomes and events) and whether it batches;
- ``pg_batch``: deciding many commands in one PostgreSQL transaction (group commit: advisory
  locks, declared reads, put-off commands), behind ``WriteStore.decide``;
- ``memory``: the in-memory store (the domain's ``InMemoryStore`` grown to the whole port), for
  executor tests without a database;
- ``opening``: ``open_store(url, ...)``, the one function that opens a store from a URL.

The SQLAlchemy adapter (PostgreSQL and SQLite) is ``cqrskit.infra.store.EventStore``; its
PostgreSQL hot path is ``cqrskit.infra.pg_store`` (psycopg, pipeline mode).
"""
