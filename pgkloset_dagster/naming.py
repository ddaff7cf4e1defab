"""Asset keys, check names, job/op/pool names: one place, so sensors and assets agree."""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

PREFIX = "pgkloset"
GLOBALS = "_globals"
CLUSTER = "_cluster"
ALL = "_all"
RESERVED = (GLOBALS, CLUSTER, ALL)
DRILL_CHECK = "restore_drill"
KINDS = {"postgres", "pgkloset"}

TAG_SERVER = "pgkloset/server"
TAG_KLOSET = "pgkloset/kloset"
TAG_SNAPSHOT = "pgkloset/snapshot"
TAG_PRUNE_THROUGH = "pgkloset/prune_through"
TAG_OPERATION = "pgkloset/operation"


def database_key(server: str, database: str) -> dg.AssetKey:
    return dg.AssetKey([PREFIX, server, database])


def globals_key(server: str) -> dg.AssetKey:
    return dg.AssetKey([PREFIX, server, GLOBALS])


def cluster_key(server: str) -> dg.AssetKey:
    return dg.AssetKey([PREFIX, server, CLUSTER])


def all_key(server: str) -> dg.AssetKey:
    return dg.AssetKey([PREFIX, server, ALL])


def drill_check_key(key: dg.AssetKey) -> dg.AssetCheckKey:
    return dg.AssetCheckKey(key, DRILL_CHECK)


def backup_job_name(server: str) -> str:
    return f"pgkloset_backup_{server}"


def physical_job_name(server: str) -> str:
    return f"pgkloset_backup_{server}_physical"


def drill_job_name(server: str) -> str:
    return f"pgkloset_drill_{server}"


def drill_op_name(server: str) -> str:
    return f"drill_checks_{server}"


def backup_op_name(server: str) -> str:
    """Op names must differ from job names (both are graphs in one repository)."""
    return f"logical_backup_{server}"


def physical_op_name(server: str) -> str:
    return f"physical_backup_{server}"


def prune_op_name(kloset: str) -> str:
    return f"prune_{kloset}"


def prune_job_name(kloset: str) -> str:
    return f"pgkloset_prune_{kloset}"


def backup_pool(server: str) -> str:
    """One logical backup of a server at a time: covers 'two backups of one database'."""
    return f"pgkloset_backup_{server}"


def physical_pool(server: str) -> str:
    return f"pgkloset_physical_{server}"


def prune_pool(kloset: str) -> str:
    return f"pgkloset_prune_{kloset}"


DRILL_POOL = "pgkloset_drill"


@dataclass(frozen=True)
class AssetInfo:
    """What the sensors need to know about a snapshot asset."""

    key: dg.AssetKey
    server: str
    kloset: str
    role: str  # "database", "globals", "cluster" or "all"
    database: str | None = None

    @property
    def drillable(self) -> bool:
        return self.role in ("database", "cluster", "all")
