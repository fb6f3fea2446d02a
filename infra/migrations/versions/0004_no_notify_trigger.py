"""Drop the NOTIFY trigger on events: NOTIFY takes a database-wide lock until commit is flushed,
which serialised every command's commit; the relay polls instead (25 ms).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS cqrskit_events_notify ON events")
        op.execute("DROP FUNCTION IF EXISTS cqrskit_notify_events()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION cqrskit_notify_events() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_notify('cqrskit_events', ''); RETURN NULL; END $$"
        )
        op.execute(
            "CREATE TRIGGER cqrskit_events_notify AFTER INSERT ON events "
            "FOR EACH STATEMENT EXECUTE FUNCTION cqrskit_notify_events()"
        )
