"""Process managers (G13): instances' state, handled events, the command outbox, timers.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "process_instances",
        sa.Column("manager", sa.String(100), primary_key=True),
        sa.Column("instance_key", sa.String(300), primary_key=True),
        sa.Column("state", Json, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "process_handled",
        sa.Column("manager", sa.String(100), primary_key=True),
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("handled_at", Timestamp, nullable=False),
    )
    op.create_table(
        "process_outbox",
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
    )
    op.create_index("ix_process_outbox_published_at", "process_outbox", ["published_at"])
    op.create_table(
        "process_timers",
        sa.Column("manager", sa.String(100), primary_key=True),
        sa.Column("instance_key", sa.String(300), primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("timer_id", sa.String(64), nullable=False),
        sa.Column("due_at", Timestamp, nullable=False),
        sa.Column("set_at", Timestamp, nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=True),
    )
    op.create_index("ix_process_timers_due_at", "process_timers", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_process_timers_due_at", table_name="process_timers")
    op.drop_table("process_timers")
    op.drop_index("ix_process_outbox_published_at", table_name="process_outbox")
    op.drop_table("process_outbox")
    op.drop_table("process_handled")
    op.drop_table("process_instances")
