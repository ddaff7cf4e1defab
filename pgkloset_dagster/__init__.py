"""Dagster orchestration of pgkloset: resources, assets, checks, jobs, schedules, sensors.

Only orchestration lives here; the work is done by pgkloset_core. Building
Definitions happens on request (``load_definitions``), not at import.
"""

from pgkloset_dagster.component import PgKlosetComponent
from pgkloset_dagster.definitions import build_definitions, load_definitions

__all__ = ["PgKlosetComponent", "build_definitions", "load_definitions"]
