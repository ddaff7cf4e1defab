"""The asset factory: one snapshot asset per database, plus globals and the physical cluster.

A server's logical backup is one ``multi_asset`` (subsettable): one connection
to list and check databases, one globals dump, then one snapshot per selected
database. The physical cluster snapshot is its own asset, scheduled on its own.
Materializations carry numeric metadata so the UI plots sizes, dedup and
durations over time.
"""


import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from pgkloset_dagster import naming
from pgkloset_dagster.config import KlosetConfig, ServerConfig
from pgkloset_dagster.resources import (
    KlosetResource,
    PostgresServerResource,
    kloset_resource_key,
    server_resource_key,
)
from pgkloset_dagster.runner import run_cancellable


@dataclass(frozen=True)
class ServerPlan:
    """A server as the definitions see it: config plus the databases known at load time.

    ``databases`` is None when the config says ``all`` and listing failed at
    load time: the server then gets one ``_all`` asset that backs up whatever
    databases exist when it runs.
    """

    server: ServerConfig
    kloset: KlosetConfig
    databases: tuple[str, ...] | None

    def infos(self) -> list[naming.AssetInfo]:
        s, k = self.server.name, self.kloset.name
        out = [naming.AssetInfo(naming.globals_key(s), s, k, "globals")]
        if self.databases is None:
            out.append(naming.AssetInfo(naming.all_key(s), s, k, "all"))
        else:
            out += [naming.AssetInfo(naming.database_key(s, d), s, k, "database", d)
                    for d in self.databases]
        if self.server.physical:
            out.append(naming.AssetInfo(naming.cluster_key(s), s, k, "cluster"))
        return out

    def logical_keys(self) -> list[dg.AssetKey]:
        return [i.key for i in self.infos() if i.role != "cluster"]


# ---------------------------------------------------------------- freshness


def cron_gap(cron: str, timezone: str = "UTC") -> timedelta:
    """The longest interval between consecutive ticks of ``cron`` (over its next 32 ticks)."""
    from dagster._utils.schedules import cron_string_iterator

    ticks = cron_string_iterator(datetime.now(UTC).timestamp(), cron, timezone)
    times = [next(ticks) for _ in range(33)]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


def freshness_for(server: ServerConfig, cron: str | None) -> dg.FreshnessPolicy | None:
    """Explicit ``freshness`` wins; else a window one schedule interval plus slack wide."""
    if server.freshness_fail is not None:
        return dg.FreshnessPolicy.time_window(fail_window=server.freshness_fail,
                                              warn_window=server.freshness_warn)
    if cron is None:
        return None
    gap = cron_gap(cron, server.timezone)
    slack = max(gap / 4, timedelta(hours=1))
    return dg.FreshnessPolicy.time_window(fail_window=gap + slack, warn_window=gap + slack / 2)


# ---------------------------------------------------------------- metadata


def snapshot_metadata(kloset: str, snapshot_id: str, logical: int, stored: int, seconds: float,
                      server_version: str, tables: int | None = None,
                      rows: int | None = None) -> dict[str, Any]:
    """Numeric values stay numeric (int/float) so the UI plots them per materialization."""
    md: dict[str, Any] = {
        "snapshot_id": dg.MetadataValue.text(snapshot_id),
        "kloset": dg.MetadataValue.text(kloset),
        "logical_bytes": dg.MetadataValue.int(int(logical)),
        "new_stored_bytes": dg.MetadataValue.int(int(stored)),
        "dedup_ratio": dg.MetadataValue.float(round(logical / max(stored, 1), 3)),
        "new_data_percent": dg.MetadataValue.float(
            round(100.0 * stored / logical, 3) if logical else 0.0),
        "seconds": dg.MetadataValue.float(round(float(seconds), 3)),
        "server_version": dg.MetadataValue.text(server_version),
    }
    if tables is not None:
        md["table_count"] = dg.MetadataValue.int(int(tables))
    if rows is not None:
        md["total_rows"] = dg.MetadataValue.int(int(rows))
        md["dagster/row_count"] = dg.MetadataValue.int(int(rows))
    return md


def _spec(plan: ServerPlan, info: naming.AssetInfo, description: str,
          freshness: dg.FreshnessPolicy | None) -> dg.AssetSpec:
    meta = {"pgkloset/server": plan.server.name, "pgkloset/kloset": plan.kloset.name,
            "pgkloset/role": info.role}
    if info.database is not None:
        meta["pgkloset/database"] = info.database
    return dg.AssetSpec(key=info.key, group_name=plan.server.name, kinds=set(naming.KINDS),
                        description=description, metadata=meta, freshness_policy=freshness,
                        skippable=True)


# ---------------------------------------------------------------- factory


def build_server_assets(plan: ServerPlan) -> list[dg.AssetsDefinition]:
    out = [_logical_assets(plan)]
    if plan.server.physical:
        out.append(_physical_asset(plan))
    return out


def _logical_assets(plan: ServerPlan) -> dg.AssetsDefinition:
    server, kcfg = plan.server, plan.kloset
    fresh = freshness_for(server, server.logical_cron)
    specs: list[dg.AssetSpec] = []
    by_key: dict[dg.AssetKey, naming.AssetInfo] = {}
    for info in plan.infos():
        if info.role == "cluster":
            continue
        if info.role == "globals":
            text = f"Roles and tablespaces of server {server.name} (pg_dumpall --globals-only)."
        elif info.role == "all":
            text = (f"Every database of server {server.name} (the list could not be read when "
                    "the definitions loaded); one snapshot per database.")
        else:
            text = f"Logical snapshot (pg_dump) of database {info.database} on {server.name}."
        specs.append(_spec(plan, info, text, fresh))
        by_key[info.key] = info
    kkey, skey = kloset_resource_key(kcfg.name), server_resource_key(server.name)

    @dg.multi_asset(name=naming.backup_op_name(server.name), specs=specs, can_subset=True,
                    pool=naming.backup_pool(server.name), required_resource_keys={kkey, skey})
    def _backup(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        selected = [by_key[k] for k in context.selected_asset_keys]
        kres: KlosetResource = getattr(context.resources, kkey)
        sres: PostgresServerResource = getattr(context.resources, skey)
        everything = any(i.role == "all" for i in selected)
        databases: list[str] | None = None if everything else \
            [i.database for i in selected if i.database is not None]

        def work(log: Any, cancel: threading.Event) -> list[Any]:
            from pgkloset_core.postgres.logical import backup_logical

            kloset = kres.open()
            return backup_logical(kloset, sres.dsn, databases, exclude=server.exclude,
                                  tags=[f"server:{server.name}", "dagster"],
                                  server=server.name, bin_dir=sres.bin_dir or server.bin_dir,
                                  lock_wait=kres.lock_wait, log=log, cancel=cancel)

        results = run_cancellable(context, "pg_dump", work)
        yield from _logical_results(context, plan, selected, results)

    return _backup


def _logical_results(context: Any, plan: ServerPlan, selected: Sequence[naming.AssetInfo],
                     results: Sequence[Any]) -> Iterator[dg.MaterializeResult]:
    kname, sname = plan.kloset.name, plan.server.name
    wanted = {i.key for i in selected}
    dbs = [r for r in results if r.kind != "globals"]
    for r in results:
        context.log.info(f"snapshot {r.snapshot_id[:12]} ({r.kind} {r.database or ''}): "
                         f"{r.logical_bytes} bytes, {r.stored_bytes} new, {r.seconds:.2f} s")
        if r.kind == "globals":
            key = naming.globals_key(sname)
        elif any(i.role == "all" for i in selected):
            continue
        else:
            key = naming.database_key(sname, r.database)
        if key not in wanted:
            context.log.info(f"{key.to_user_string()} was not selected; snapshot "
                             f"{r.snapshot_id[:12]} is kept but not recorded as a materialization")
            continue
        yield dg.MaterializeResult(asset_key=key, metadata={
            **snapshot_metadata(kname, r.snapshot_id, r.logical_bytes, r.stored_bytes, r.seconds,
                                r.server_version,
                                tables=r.table_count if r.kind != "globals" else None,
                                rows=r.total_rows if r.kind != "globals" else None),
            "snapshot_ids": dg.MetadataValue.json([r.snapshot_id]),
        })
    if any(i.role == "all" for i in selected):
        version = results[0].server_version if results else ""
        md = snapshot_metadata(kname, ",".join(r.snapshot_id for r in dbs),
                               sum(r.logical_bytes for r in dbs), sum(r.stored_bytes for r in dbs),
                               sum(r.seconds for r in dbs), version,
                               tables=sum(r.table_count for r in dbs),
                               rows=sum(r.total_rows for r in dbs))
        md["snapshot_ids"] = dg.MetadataValue.json([r.snapshot_id for r in dbs])
        md["databases"] = dg.MetadataValue.json({r.database: r.snapshot_id for r in dbs})
        yield dg.MaterializeResult(asset_key=naming.all_key(sname), metadata=md)


def _physical_asset(plan: ServerPlan) -> dg.AssetsDefinition:
    server, kcfg = plan.server, plan.kloset
    info = next(i for i in plan.infos() if i.role == "cluster")
    spec = _spec(plan, info, f"Physical snapshot (pg_basebackup, WAL included) of the whole "
                 f"cluster {server.name}.", freshness_for(server, server.physical_cron))
    kkey, skey = kloset_resource_key(kcfg.name), server_resource_key(server.name)

    @dg.multi_asset(name=naming.physical_op_name(server.name), specs=[spec],
                    pool=naming.physical_pool(server.name), required_resource_keys={kkey, skey})
    def _physical(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        kres: KlosetResource = getattr(context.resources, kkey)
        sres: PostgresServerResource = getattr(context.resources, skey)

        def work(log: Any, cancel: threading.Event) -> Any:
            from pgkloset_core.postgres.physical import backup_physical

            return backup_physical(kres.open(), sres.dsn, tags=[f"server:{server.name}",
                                                                 "dagster"],
                                   fast_checkpoint=server.fast_checkpoint, server=server.name,
                                   bin_dir=sres.bin_dir or server.bin_dir,
                                   lock_wait=kres.lock_wait, log=log, cancel=cancel)

        r = run_cancellable(context, "pg_basebackup", work)
        md = snapshot_metadata(kcfg.name, r.snapshot_id, r.logical_bytes, r.stored_bytes,
                               r.seconds, r.pg_version)
        md["file_count"] = dg.MetadataValue.int(int(r.file_count))
        md["snapshot_ids"] = dg.MetadataValue.json([r.snapshot_id])
        yield dg.MaterializeResult(asset_key=info.key, metadata=md)

    return _physical
