"""Alembic environment: runs migrations on the connection `shared.db.upgrade_database` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from shared.db import Base


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations in one transaction (batch mode so SQLite can alter tables)."""
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations(context.config.attributes["connection"])
