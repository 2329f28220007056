"""Alembic migrations of the ipab schema; run them with `shared.db.upgrade_database`."""
