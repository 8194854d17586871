"""Alembic migrations; the schema's only owner."""
