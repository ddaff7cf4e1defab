"""Dagster entry point: `dagster dev -f definitions.py` (grows with the Dagster integration)."""

from pgkloset_dagster import defs

__all__ = ["defs"]
