"""Jobs: backup and drill (asset jobs), retention prune per kloset, ad-hoc restore."""


import threading
from collections.abc import Sequence
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from pgkloset_dagster import naming
from pgkloset_dagster.assets import ServerPlan
from pgkloset_dagster.config import KlosetConfig, ServerConfig
from pgkloset_dagster.resources import (
    KlosetResource,
    PostgresServerResource,
    kloset_resource_key,
    server_resource_key,
)
from pgkloset_dagster.runner import run_cancellable


def _tags(plan: ServerPlan, operation: str) -> dict[str, str]:
    return {naming.TAG_SERVER: plan.server.name, naming.TAG_KLOSET: plan.kloset.name,
            naming.TAG_OPERATION: operation}


def backup_jobs(plan: ServerPlan) -> list[UnresolvedAssetJobDefinition]:
    """Logical backup of the server (globals + databases); physical backup separately."""
    name = plan.server.name
    jobs = [dg.define_asset_job(
        naming.backup_job_name(name), description=f"Logical backup of server {name}.",
        selection=dg.AssetSelection.assets(*plan.logical_keys()).without_checks(),
        tags=_tags(plan, "backup"))]
    if plan.server.physical:
        jobs.append(dg.define_asset_job(
            naming.physical_job_name(name), description=f"Physical backup of server {name}.",
            selection=dg.AssetSelection.assets(naming.cluster_key(name)).without_checks(),
            tags=_tags(plan, "backup")))
    return jobs


def drill_job(plan: ServerPlan) -> UnresolvedAssetJobDefinition:
    keys = [naming.drill_check_key(i.key) for i in plan.infos() if i.drillable]
    return dg.define_asset_job(
        naming.drill_job_name(plan.server.name), selection=dg.AssetSelection.checks(*keys),
        description=f"Restore drills of server {plan.server.name}'s snapshots.",
        tags=_tags(plan, "drill"))


def prune_job(kloset: KlosetConfig, servers: Sequence[ServerConfig]) -> dg.JobDefinition:
    """Forget by each server's retention policy, then prune unreferenced data, one lock."""
    kkey = kloset_resource_key(kloset.name)
    policies = [(s.name, s.retention) for s in servers if s.retention is not None]

    @dg.op(name=naming.prune_op_name(kloset.name), pool=naming.prune_pool(kloset.name),
           required_resource_keys={kkey})
    def _prune(context: dg.OpExecutionContext) -> dg.Output[dict[str, Any]]:
        kres: KlosetResource = getattr(context.resources, kkey)

        def work(log: Any, _cancel: threading.Event) -> dict[str, Any]:
            from pgkloset_core.kloset.forget import forget, plan_policy
            from pgkloset_core.kloset.prune import describe, prune

            kl = kres.open()
            removed: list[str] = []
            with kl.lock(exclusive=True, operation="prune", wait=kres.lock_wait) as lock:
                snapshots = kl.snapshots()
                for server, policy in policies:
                    assert policy is not None
                    mine = [s for s in snapshots if s.meta.get("server") == server]
                    p = plan_policy(mine, policy)
                    log(f"server {server}: policy {policy.describe()}: keep {len(p.keep)}, "
                        f"forget {len(p.remove)}")
                    removed += forget(kl, p, lock)
                report = prune(kl, lock, grace=kloset.prune_grace,
                               max_repack_ratio=kloset.max_repack_ratio)
            for line in describe(report):
                log(line)
            return {"forgotten": removed, **report.to_json()}

        doc = run_cancellable(context, "prune", work)
        return dg.Output(doc, metadata={
            "snapshots_forgotten": dg.MetadataValue.int(len(doc["forgotten"])),
            "snapshots_kept": dg.MetadataValue.int(int(doc["snapshots"])),
            "packs_deleted": dg.MetadataValue.int(int(doc["packs_deleted"])),
            "bytes_freed": dg.MetadataValue.int(int(doc["bytes_freed"])),
            "packs_waiting": dg.MetadataValue.int(int(doc["packs_waiting"])),
            "forgotten_ids": dg.MetadataValue.json(doc["forgotten"]),
        })

    @dg.job(name=naming.prune_job_name(kloset.name),
            description=f"Retention (forget) and prune of kloset {kloset.name}.",
            tags={naming.TAG_KLOSET: kloset.name, naming.TAG_OPERATION: "prune"})
    def _job() -> None:
        _prune()

    return _job


class RestoreConfig(dg.Config):
    """Ad-hoc restore: which snapshot, into which server's database, which tables."""

    kloset: str
    snapshot: str = "latest"
    source_database: str | None = None  # picks "latest" of this database
    target_server: str  # a configured server: its DSN (EnvVar) is used
    target_database: str | None = None  # default: the snapshot's database
    tables: list[str] = []
    schemas: list[str] = []
    create: bool = False
    clean: bool = False
    schema_only: bool = False
    data_only: bool = False
    no_owner: bool = False


def restore_job(klosets: Sequence[str], servers: Sequence[str]) -> dg.JobDefinition:
    keys = {kloset_resource_key(k) for k in klosets} | {server_resource_key(s) for s in servers}

    @dg.op(name="restore_logical", required_resource_keys=keys)
    def _restore(context: dg.OpExecutionContext, config: RestoreConfig) -> dg.Output[str]:
        kkey, skey = kloset_resource_key(config.kloset), server_resource_key(config.target_server)
        if kkey not in keys or skey not in keys:
            raise dg.Failure(description=f"unknown kloset {config.kloset!r} or server "
                             f"{config.target_server!r} (klosets: {', '.join(klosets)}; "
                             f"servers: {', '.join(servers)})")
        kres: KlosetResource = getattr(context.resources, kkey)
        sres: PostgresServerResource = getattr(context.resources, skey)

        def work(log: Any, cancel: threading.Event) -> Any:
            from pgkloset_core.postgres.pgenv import ConnTarget
            from pgkloset_core.postgres.restore_logical import resolve_snapshot, restore_logical

            kl = kres.open()
            snap = resolve_snapshot(kl, config.snapshot, config.source_database)
            target = ConnTarget.parse(sres.dsn)
            dbname = config.target_database or snap.meta.get("database")
            dsn = target.with_db(str(dbname)) if dbname else target
            dsn_text = dsn.conninfo()
            if dsn.password is not None:
                from psycopg.conninfo import make_conninfo

                dsn_text = make_conninfo(dsn_text, password=dsn.password)
            kl.prepare_read(snap)  # cold storage: thaw the packs the restore reads
            # Shared lock, as the CLI takes: a prune must not delete packs mid-restore.
            with kl.lock(exclusive=False, operation="restore", wait=kres.lock_wait):
                return restore_logical(kl, snap, dsn_text, create=config.create,
                                       clean=config.clean, schemas=config.schemas,
                                       tables=config.tables, schema_only=config.schema_only,
                                       data_only=config.data_only, no_owner=config.no_owner,
                                       bin_dir=sres.bin_dir, log=log, cancel=cancel)

        result = run_cancellable(context, "restore", work)
        return dg.Output(result.snapshot_id, metadata={
            "snapshot_id": dg.MetadataValue.text(result.snapshot_id),
            "database": dg.MetadataValue.text(str(result.database)),
            "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
            "warnings": dg.MetadataValue.json(list(result.warnings)),
        })

    @dg.job(name="pgkloset_restore", tags={naming.TAG_OPERATION: "restore"},
            description="Ad-hoc restore of a logical snapshot (run config: kloset, snapshot, "
            "target_server, target_database, tables).")
    def _job() -> None:
        _restore()

    return _job
