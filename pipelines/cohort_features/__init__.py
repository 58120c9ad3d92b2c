"""``prognode cohort features``: one row per study with every feature family and its provenance."""
