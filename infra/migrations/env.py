"""Alembic environment: runs on the connection handed over by ``cqrskit.infra.migrate``, or on the URL
in ``sqlalchemy.url`` when alembic's own CLI is used."""

from alembic import context
from sqlalchemy import create_engine

from cqrskit.infra.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    with create_engine(config.get_main_option("sqlalchemy.url")).connect() as conn:
        _migrate(conn)


def _migrate(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
