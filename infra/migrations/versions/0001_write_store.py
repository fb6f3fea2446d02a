"""The write store: events, streams, command outcomes, unique claims.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "events",
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
    op.create_table(
        "streams",
        sa.Column("stream_id", sa.String(300), primary_key=True),
        sa.Column("stream_type", sa.String(64), nullable=False),
        sa.Column("aggregate_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", Json, nullable=True),
        sa.Column("state_version", sa.Integer, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "command_outcomes",
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
    )
    op.create_index("ix_command_outcomes_status", "command_outcomes", ["status"])
    op.create_table(
        "unique_claims",
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    for table in ("unique_claims", "command_outcomes", "streams", "events"):
        op.drop_table(table)
