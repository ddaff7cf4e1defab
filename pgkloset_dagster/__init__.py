"""Dagster orchestration of pgkloset: resources, assets, checks, jobs, schedules, sensors.

Only orchestration lives here; the work is done by pgkloset_core.
"""

import dagster as dg

defs = dg.Definitions()
