"""Backup schedules from each server's cron expressions."""

from __future__ import annotations

import dagster as dg

from pgkloset_dagster import naming
from pgkloset_dagster.assets import ServerPlan


def backup_schedules(plan: ServerPlan) -> list[dg.ScheduleDefinition]:
    s = plan.server
    out = []
    if s.logical_cron:
        out.append(dg.ScheduleDefinition(
            name=f"{naming.backup_job_name(s.name)}_schedule", job_name=naming.backup_job_name(s.name),
            cron_schedule=s.logical_cron, execution_timezone=s.timezone,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Logical backup of {s.name} ({s.logical_cron} {s.timezone})."))
    if s.physical_cron and s.physical:
        out.append(dg.ScheduleDefinition(
            name=f"{naming.physical_job_name(s.name)}_schedule",
            job_name=naming.physical_job_name(s.name), cron_schedule=s.physical_cron,
            execution_timezone=s.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Physical backup of {s.name} ({s.physical_cron} {s.timezone})."))
    return out
