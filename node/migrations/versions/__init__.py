"""One module per schema change; ``0001_baseline`` is the schema before Alembic."""
