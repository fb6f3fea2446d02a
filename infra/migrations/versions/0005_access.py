"""Who may do what (G11): producers and the command types each may send; API keys (hashed) with
their scopes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "producers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("on_behalf", sa.Boolean, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_table(
        "producer_grants",
        sa.Column("producer", sa.String(200), sa.ForeignKey("producers.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("command_type", sa.String(200), primary_key=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("commands", Json, nullable=False),
        sa.Column("read_models", Json, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("producer_grants")
    op.drop_table("producers")
