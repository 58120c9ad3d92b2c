"""Alembic migrations of the node's database (see :func:`node.db.migrate` and docs/architecture.md)."""
