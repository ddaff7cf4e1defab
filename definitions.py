"""Dagster entry point: `dagster dev -f definitions.py`.

Definitions come from pgkloset.yaml (PGKLOSET_CONFIG, or ./pgkloset.yaml);
without one, the embedded demo (see pgkloset_dagster/demo.py).
"""

from pgkloset_dagster import load_definitions

defs = load_definitions()

__all__ = ["defs"]
