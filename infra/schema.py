"""The write store's tables (SQLAlchemy Core). Alembic migrations create them; this module is
the one description the code and the migrations share.

- ``events``: the append-only log. ``position`` is global and increasing (not gap-free: a rolled
  back transaction burns positions), ``(stream_id, version)`` is unique, so two writers can never
  both append version N of a stream (G4).
- ``streams``: one row per aggregate stream: its version and a snapshot of its state at that
  version, written in the same transaction as the events (loading is one primary-key read).
- ``command_outcomes``: the dedup record and the outcome of each command id (G2, G3).
- ``unique_claims``: cross-aggregate uniqueness (an email, a room number) (G4).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", Position, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(36), nullable=False, unique=True),
    sa.Column("stream_id", sa.String(300), nullable=False),
    sa.Column("stream_type", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", Json, nullable=False),
    sa.Column("metadata", Json, nullable=False),
    sa.Column("recorded_at", Timestamp, nullable=False),
    sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
)

streams = sa.Table(
    "streams",
    metadata,
    sa.Column("stream_id", sa.String(300), primary_key=True),
    sa.Column("stream_type", sa.String(64), nullable=False),
    sa.Column("aggregate_id", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", Json, nullable=True),
    sa.Column("state_version", sa.Integer, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

command_outcomes = sa.Table(
    "command_outcomes",
    metadata,
    sa.Column("command_id", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("type", sa.String(200), nullable=True),
    sa.Column("aggregate_id", sa.String(200), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("errors", Json, nullable=True),
    sa.Column("aggregate_version", sa.Integer, nullable=True),
    sa.Column("positions", Json, nullable=True),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    sa.Column("causation_id", sa.String(128), nullable=True),
    sa.Column("recorded_at", Timestamp, nullable=False),
    sa.Index("ix_command_outcomes_status", "status"),
)

unique_claims = sa.Table(
    "unique_claims",
    metadata,
    sa.Column("scope", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
)

# -- the read side's bookkeeping (revision 0002) --------------------------------------------
# events.tx_id: the writing transaction's id (PostgreSQL: pg_current_xact_id()), so that the relay
# can read in an order in which no committed event is ever skipped (G5). NULL on SQLite, whose
# single writer commits in position order.
events.append_column(sa.Column("tx_id", sa.BigInteger, nullable=True))

relay_checkpoints = sa.Table(
    "relay_checkpoints",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("tx_id", sa.BigInteger, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
)

parked_documents = sa.Table(
    "parked_documents",
    metadata,
    sa.Column("id", Position, primary_key=True, autoincrement=True),
    sa.Column("read_model", sa.String(64), nullable=False),
    sa.Column("doc_id", sa.String(300), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("positions", Json, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("parked_at", Timestamp, nullable=False),
    sa.UniqueConstraint("read_model", "doc_id", name="uq_parked_read_model_doc"),
)

read_model_indices = sa.Table(
    "read_model_indices",
    metadata,
    sa.Column("read_model", sa.String(64), primary_key=True),
    sa.Column("index_name", sa.String(200), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),  # live | building
    sa.Column("created_at", Timestamp, nullable=False),
)

# -- who may do what (revision 0005, G11) ------------------------------------------------------
# producers: a RabbitMQ user (AMQP ``user_id``) allowed to publish commands; ``on_behalf``: it may
# vouch for another issuer (the gateway, for its API keys). producer_grants: the command types each
# may send ('*': every type). api_keys: the HTTP clients of the gateway and the query API; only a
# SHA-256 of each secret is stored; scopes are lists of command types and read models ('*': all).
producers = sa.Table(
    "producers",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("on_behalf", sa.Boolean, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

producer_grants = sa.Table(
    "producer_grants",
    metadata,
    sa.Column("producer", sa.String(200), sa.ForeignKey("producers.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("command_type", sa.String(200), primary_key=True),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("commands", Json, nullable=False),
    sa.Column("read_models", Json, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp, nullable=True),
)

# -- process managers (revision 0006, G13) -----------------------------------------------------
# process_instances: each instance's state, versioned (a reaction moves it from the version it
# read). process_handled: the events each manager has reacted to (the guard: a redelivered event
# changes nothing). process_outbox: the commands reactions sent, with their derived ids, until the
# publisher has them confirmed by the broker. process_timers: one row per pending timer (a timer
# set again replaces its row; fired or cancelled, it is deleted). All written in the reaction's
# one transaction. The event consumers' checkpoints are rows of relay_checkpoints.
process_instances = sa.Table(
    "process_instances",
    metadata,
    sa.Column("manager", sa.String(100), primary_key=True),
    sa.Column("instance_key", sa.String(300), primary_key=True),
    sa.Column("state", Json, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

process_handled = sa.Table(
    "process_handled",
    metadata,
    sa.Column("manager", sa.String(100), primary_key=True),
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("handled_at", Timestamp, nullable=False),
)

process_outbox = sa.Table(
    "process_outbox",
    metadata,
    sa.Column("command_id", sa.String(128), primary_key=True),
    sa.Column("manager", sa.String(100), nullable=False),
    sa.Column("instance_key", sa.String(300), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("aggregate_id", sa.String(200), nullable=False),
    sa.Column("payload", Json, nullable=False),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    sa.Column("causation_id", sa.String(128), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("published_at", Timestamp, nullable=True),
    sa.Index("ix_process_outbox_published_at", "published_at"),
)

process_timers = sa.Table(
    "process_timers",
    metadata,
    sa.Column("manager", sa.String(100), primary_key=True),
    sa.Column("instance_key", sa.String(300), primary_key=True),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("timer_id", sa.String(64), nullable=False),
    sa.Column("due_at", Timestamp, nullable=False),
    sa.Column("set_at", Timestamp, nullable=False),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    sa.Index("ix_process_timers_due_at", "due_at"),
)
