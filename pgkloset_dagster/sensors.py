"""Sensors: a restore drill for every new snapshot, a coalesced prune for every kloset.

Both read new materializations of the snapshot assets from the instance's
event log, with a cursor of the last storage id seen per asset. Nothing runs
twice: run keys name the work (``drill:<snapshot id>``, ``prune:<kloset>:<storage
id>``), and before asking, each sensor also looks for a run already tagged with
that work (one started by hand, by the demo, or by a sensor whose cursor was
reset), so a redeployed sensor does not redo old drills.
"""


import json
from collections.abc import Iterator, Sequence

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from pgkloset_dagster import naming
from pgkloset_dagster.checks import drill_run_config, snapshot_ids_of

PAGE = 200
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
               dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def _new_materializations(instance: dg.DagsterInstance, key: dg.AssetKey,
                          after: int | None) -> list[dg.EventLogRecord]:
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, after_storage_id=after), limit=PAGE, ascending=True)
    return list(result.records)


def _run_exists(instance: dg.DagsterInstance, tags: dict[str, str]) -> bool:
    return bool(instance.get_run_records(dg.RunsFilter(tags=tags), limit=1))


def build_drill_sensor(infos: Sequence[naming.AssetInfo], drill_servers: set[str],
                       jobs: Sequence[UnresolvedAssetJobDefinition],
                       minimum_interval_seconds: int = 30) -> dg.SensorDefinition:
    watched = [i for i in infos if i.drillable and i.server in drill_servers]

    @dg.sensor(name="pgkloset_drill_sensor", jobs=list(jobs),
               minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Starts one restore drill per new snapshot; the result is the "
               "asset's restore_drill check.")
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest]:
        cursor: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
        for info in watched:
            name = info.key.to_user_string()
            for rec in _new_materializations(context.instance, info.key, cursor.get(name)):
                mat = rec.asset_materialization
                for sid in snapshot_ids_of(mat.metadata if mat is not None else {}):
                    tags = {naming.TAG_SNAPSHOT: sid, naming.TAG_OPERATION: "drill"}
                    if _run_exists(context.instance, tags):
                        continue
                    yield dg.RunRequest(
                        run_key=f"drill:{sid}", job_name=naming.drill_job_name(info.server),
                        asset_check_keys=[naming.drill_check_key(info.key)],
                        run_config=drill_run_config(info.server, {info.key: [sid]}),
                        tags={**tags, naming.TAG_SERVER: info.server,
                              naming.TAG_KLOSET: info.kloset})
                cursor[name] = rec.storage_id
        context.update_cursor(json.dumps(cursor, sort_keys=True))

    return _sensor


def build_prune_sensor(infos: Sequence[naming.AssetInfo], jobs: Sequence[dg.JobDefinition],
                       minimum_interval_seconds: int = 60) -> dg.SensorDefinition:
    """One prune per kloset per burst: waits while a backup into that kloset is still running."""
    klosets = sorted({i.kloset for i in infos})

    @dg.sensor(name="pgkloset_prune_sensor", jobs=list(jobs),
               minimum_interval_seconds=minimum_interval_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="After new snapshots land, starts one retention prune per kloset "
               "(coalesced: a burst of backups causes one prune).")
    def _sensor(context: dg.SensorEvaluationContext) -> Iterator[dg.RunRequest]:
        cursor: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
        for kloset in klosets:
            latest: dict[str, int] = {}
            for info in (i for i in infos if i.kloset == kloset):
                name = info.key.to_user_string()
                records = _new_materializations(context.instance, info.key, cursor.get(name))
                if records:
                    latest[name] = max(r.storage_id for r in records)
            if not latest:
                continue
            busy = context.instance.get_run_records(dg.RunsFilter(
                tags={naming.TAG_KLOSET: kloset, naming.TAG_OPERATION: "backup"},
                statuses=IN_PROGRESS), limit=1)
            if busy:
                context.log.info(f"kloset {kloset}: backups still running; prune waits for them")
                continue
            through = str(max(latest.values()))
            cursor.update(latest)
            tags = {naming.TAG_KLOSET: kloset, naming.TAG_PRUNE_THROUGH: through,
                    naming.TAG_OPERATION: "prune"}
            if _run_exists(context.instance, tags):
                continue
            yield dg.RunRequest(run_key=f"prune:{kloset}:{through}",
                                job_name=naming.prune_job_name(kloset), tags=tags)
        context.update_cursor(json.dumps(cursor, sort_keys=True))

    return _sensor
