"""The read side's bookkeeping: transaction ids on events (G5), relay checkpoints, leases,
parked documents (G7), and the physical indices of each read model (G9).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    default = sa.text("(pg_current_xact_id()::text::bigint)") if postgres else None
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("tx_id", sa.BigInteger, nullable=True, server_default=default))
    op.create_index("ix_events_tx_position", "events", ["tx_id", "position"])
    if postgres:  # wake the relay at commit time instead of making it poll
        op.execute(
            "CREATE FUNCTION cqrskit_notify_events() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_notify('cqrskit_events', ''); RETURN NULL; END $$"
        )
        op.execute(
            "CREATE TRIGGER cqrskit_events_notify AFTER INSERT ON events "
            "FOR EACH STATEMENT EXECUTE FUNCTION cqrskit_notify_events()"
        )
    op.create_table(
        "relay_checkpoints",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("tx_id", sa.BigInteger, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
    )
    op.create_table(
        "parked_documents",
        sa.Column("id", Position, primary_key=True, autoincrement=True),
        sa.Column("read_model", sa.String(64), nullable=False),
        sa.Column("doc_id", sa.String(300), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("positions", Json, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("parked_at", Timestamp, nullable=False),
        sa.UniqueConstraint("read_model", "doc_id", name="uq_parked_read_model_doc"),
    )
    op.create_table(
        "read_model_indices",
        sa.Column("read_model", sa.String(64), primary_key=True),
        sa.Column("index_name", sa.String(200), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )


def downgrade() -> None:
    for table in ("read_model_indices", "parked_documents", "leases", "relay_checkpoints"):
        op.drop_table(table)
    op.drop_index("ix_events_tx_position", "events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER cqrskit_events_notify ON events")
        op.execute("DROP FUNCTION cqrskit_notify_events()")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("tx_id")
