"""The restore-drill asset check: restore a snapshot into a scratch instance and verify it.

One ``multi_asset_check`` per server carries a ``restore_drill`` check for each
drillable asset (databases, ``_all``, the physical cluster). The drill sensor
starts it with run config naming the exact snapshot(s) to drill; started by
hand (no config), it drills the asset's latest materialized snapshot.
"""


import threading
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg

from pgkloset_core.errors import KlosetError
from pgkloset_dagster import naming
from pgkloset_dagster.assets import ServerPlan
from pgkloset_dagster.resources import KlosetResource, kloset_resource_key
from pgkloset_dagster.runner import run_cancellable


def drill_run_config(server: str, snapshots: dict[dg.AssetKey, Sequence[str]]) -> dict[str, Any]:
    """Run config for the drill job: which snapshot ids to drill, per asset."""
    return {"ops": {naming.drill_op_name(server): {"config": {"snapshot_ids": {
        key.to_user_string(): list(ids) for key, ids in snapshots.items()}}}}}


def latest_snapshot_ids(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[str]:
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return []
    return snapshot_ids_of(event.asset_materialization.metadata)


def snapshot_ids_of(metadata: Any) -> list[str]:
    """The snapshot ids a materialization recorded (one, or one per database for ``_all``)."""
    value = metadata.get("snapshot_ids")
    ids = getattr(value, "value", value)
    if isinstance(ids, list):
        return [str(i) for i in ids]
    single = metadata.get("snapshot_id")
    single = getattr(single, "value", single)
    return [str(single)] if single else []


def build_drill_checks(plan: ServerPlan) -> dg.AssetChecksDefinition | None:
    server, kcfg = plan.server, plan.kloset
    infos = [i for i in plan.infos() if i.drillable]
    if not server.drill_enabled or not infos:
        return None
    by_key = {i.key: i for i in infos}
    kkey = kloset_resource_key(kcfg.name)
    specs = [dg.AssetCheckSpec(naming.DRILL_CHECK, asset=i.key, blocking=False,
                               description="Restore drill: the snapshot restores into a scratch "
                               "PostgreSQL and matches the facts recorded at backup time.")
             for i in infos]

    @dg.multi_asset_check(name=naming.drill_op_name(server.name), specs=specs, can_subset=True,
                          pool=naming.DRILL_POOL, required_resource_keys={kkey},
                          config_schema={"snapshot_ids": dg.Field(
                              dg.Permissive(), is_required=False, default_value={},
                              description="asset key (a/b/c) -> snapshot ids to drill")})
    def _drill(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        wanted: dict[str, list[str]] = dict(context.op_execution_context.op_config
                                            .get("snapshot_ids") or {})
        kres: KlosetResource = getattr(context.resources, kkey)
        for check_key in sorted(context.selected_asset_check_keys,
                                key=lambda c: c.asset_key.to_user_string()):
            info = by_key[check_key.asset_key]
            ids = wanted.get(info.key.to_user_string()) or \
                latest_snapshot_ids(context.instance, info.key)
            yield _drill_one(context, plan, info, kres, ids)

    return _drill


def _drill_one(context: Any, plan: ServerPlan, info: naming.AssetInfo, kres: KlosetResource,
               ids: Sequence[str]) -> dg.AssetCheckResult:
    if not ids:
        return dg.AssetCheckResult(asset_key=info.key, check_name=naming.DRILL_CHECK,
                                   passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"reason": "no snapshot of this asset to drill yet"})
    from pgkloset_core.postgres.drill import SqlCheck, run_drill

    reports: list[dict[str, Any]] = []
    failures: list[str] = []
    restore_seconds = seconds = 0.0
    passed_checks = failed_checks = 0
    for sid in ids:
        def work(log: Any, _cancel: threading.Event, sid: str = sid) -> Any:
            kloset = kres.open()
            snap = kloset.resolve(sid)
            database = snap.meta.get("database") if snap.kind == "logical" else None
            # A check naming no database runs in the drilled one (it used to never run).
            checks = [SqlCheck(c.name, c.sql, c.database) for c in plan.server.sql_checks
                      if snap.kind == "physical" or c.database in (None, database)]
            return run_drill(kloset, snap, sql_checks=checks, isolate=plan.server.drill_isolate,
                             log=log, lock_wait=kres.lock_wait)

        try:
            report = run_cancellable(context, f"drill {sid[:12]}", work)
        except dg.Failure as exc:  # the drill could not run at all: the check fails, loudly
            failures.append(f"{sid[:12]}: {exc.description}")
            reports.append({"snapshot_id": sid, "passed": False, "error": exc.description})
            continue
        except KlosetError as exc:
            failures.append(f"{sid[:12]}: {exc}")
            continue
        doc = report.to_json()
        reports.append(doc)
        restore_seconds += report.restore_seconds
        seconds += report.seconds
        passed_checks += sum(1 for c in report.checks if c.passed)
        failed_checks += len(report.failures)
        if not report.passed:
            failures.append(f"{sid[:12]}: {report.first_failure() or 'drill failed'}")
    md: dict[str, Any] = {
        "snapshot_id": dg.MetadataValue.text(",".join(ids)),
        "restore_seconds": dg.MetadataValue.float(round(restore_seconds, 3)),
        "drill_seconds": dg.MetadataValue.float(round(seconds, 3)),
        "checks_passed": dg.MetadataValue.int(passed_checks),
        "checks_failed": dg.MetadataValue.int(failed_checks),
        "report": dg.MetadataValue.json(reports),
    }
    if failures:
        md["first_failure"] = dg.MetadataValue.text("; ".join(failures)[:2000])
    passed = not failures
    text = "passed" if passed else f"FAILED: {'; '.join(failures)}"
    (context.log.info if passed else context.log.error)(
        f"restore drill of {info.key.to_user_string()} {text}")
    return dg.AssetCheckResult(asset_key=info.key, check_name=naming.DRILL_CHECK, passed=passed,
                               severity=dg.AssetCheckSeverity.ERROR, metadata=md)
