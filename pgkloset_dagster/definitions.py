"""Build Definitions from a loaded pgkloset.yaml (or the embedded demo).

Every problem found while loading is logged once (logger ``pgkloset``) and
kept in the Definitions' metadata under ``pgkloset/problems``; the servers
that are fine load regardless.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from pgkloset_dagster import naming
from pgkloset_dagster.assets import ServerPlan, build_server_assets
from pgkloset_dagster.checks import build_drill_checks
from pgkloset_dagster.config import PgKlosetConfig, Problem, find_config_path, load_config
from pgkloset_dagster.discovery import list_databases
from pgkloset_dagster.jobs import backup_jobs, drill_job, prune_job, restore_job
from pgkloset_dagster.resources import (
    KlosetResource,
    PostgresServerResource,
    kloset_resource_key,
    server_resource_key,
)
from pgkloset_dagster.schedules import backup_schedules
from pgkloset_dagster.sensors import build_drill_sensor, build_prune_sensor

log = logging.getLogger("pgkloset")


def plan_servers(cfg: PgKlosetConfig, *, discover: bool = True) -> list[ServerPlan]:
    """Resolve ``databases: all`` (listing at load time, falling back to ``_all``)."""
    plans = []
    for s in cfg.servers.values():
        k = cfg.klosets[s.kloset]
        if s.databases is not None:
            clash = [d for d in s.databases if d in naming.RESERVED]
            if clash:
                cfg.problems.append(Problem(
                    f"server {s.name!r}: database name {clash[0]!r} is reserved for pgkloset's "
                    "own assets; that database is skipped", subject=f"server {s.name}"))
            plans.append(ServerPlan(s, k, tuple(d for d in s.databases if d not in clash)))
            continue
        dbs, why = list_databases(s) if discover else (None, "listing is turned off")
        if dbs is None:
            cfg.problems.append(Problem(
                f"server {s.name!r}: databases: all, but its databases cannot be listed now "
                f"({why}); it gets one asset pgkloset/{s.name}/_all that backs up every "
                "database when it runs", severity="warning", subject=f"server {s.name}"))
        plans.append(ServerPlan(s, k, tuple(dbs) if dbs is not None else None))
    return plans


def build_definitions(cfg: PgKlosetConfig, *, discover: bool = True) -> dg.Definitions:
    plans = plan_servers(cfg, discover=discover)
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list[object] = []
    drill_jobs: list[UnresolvedAssetJobDefinition] = []
    schedules: list[dg.ScheduleDefinition] = []
    resources: dict[str, object] = {}
    infos: list[naming.AssetInfo] = []
    for plan in plans:
        assets += build_server_assets(plan)
        infos += plan.infos()
        jobs += backup_jobs(plan)
        schedules += backup_schedules(plan)
        check = build_drill_checks(plan)
        if check is not None:
            checks.append(check)
            drill_jobs.append(drill_job(plan))
        s = plan.server
        resources[server_resource_key(s.name)] = PostgresServerResource(
            name=s.name, dsn=dg.EnvVar(s.dsn_env), bin_dir=s.bin_dir)
    used = sorted({p.kloset.name for p in plans})
    prune_jobs = []
    for name in used:
        k = cfg.klosets[name]
        resources[kloset_resource_key(name)] = KlosetResource(
            name=name, url=k.url, passphrase=dg.EnvVar(k.passphrase_env), lock_wait=k.lock_wait,
            create_if_missing=k.create_if_missing)
        prune_jobs.append(prune_job(k, [p.server for p in plans if p.kloset.name == name]))
    sensors: list[dg.SensorDefinition] = []
    if drill_jobs:
        sensors.append(build_drill_sensor(infos, {p.server.name for p in plans
                                                  if p.server.drill_enabled}, drill_jobs))
    if prune_jobs:
        sensors.append(build_prune_sensor(infos, prune_jobs))
    if plans:
        jobs.append(restore_job(used, [p.server.name for p in plans]))
    for problem in cfg.problems:
        (log.error if problem.severity == "error" else log.warning)("pgkloset: %s", problem)
    return dg.Definitions(
        assets=assets, asset_checks=checks, jobs=[*jobs, *drill_jobs, *prune_jobs],
        schedules=schedules, sensors=sensors, resources=resources,
        metadata={"pgkloset/config": dg.MetadataValue.text(cfg.source),
                  "pgkloset/problems": dg.MetadataValue.json([str(p) for p in cfg.problems])})


def load_pgkloset_config(path: str | os.PathLike[str] | None = None) -> PgKlosetConfig:
    """The config at ``path``, PGKLOSET_CONFIG, ./pgkloset.yaml, or the embedded demo."""
    found = Path(path) if path else find_config_path()
    if found is None:
        from pgkloset_dagster.demo import demo_config

        return demo_config()
    return load_config(found)


def load_definitions(path: str | os.PathLike[str] | None = None) -> dg.Definitions:
    return build_definitions(load_pgkloset_config(path))
