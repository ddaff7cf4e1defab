"""Backups through Dagster against real clusters; sensors request drills and prunes; checks land."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_dagster import naming
from pgkloset_dagster.config import config_from_mapping
from pgkloset_dagster.definitions import build_definitions
from pgkloset_dagster.flow import evaluate_sensor, execute_request
from tests.test_dagster_support import (
    QUIET,
    check_results,
    dagster_home,
    kloset_entry,
    materializations,
    new_kloset,
    open_kloset,
    server_entry,
)

SHOP, CRM, METRICS = "dgflow_shop", "dgflow_crm", "dgflow_metrics"


def _create(instance: LocalInstance, db: str, sql: str) -> None:
    if not instance.scalar(f"SELECT count(*) FROM pg_database WHERE datname = '{db}'"):
        instance.execute(f"CREATE DATABASE {db}")
        instance.execute(sql, db)


def _value(md: dict[str, Any], key: str) -> Any:
    return getattr(md[key], "value", md[key])


@pytest.fixture
def world(pg15: LocalInstance, pg_factory: Any, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    _create(pg15, SHOP, "CREATE TABLE customers (id int PRIMARY KEY, name text);"
            "INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 30) g;"
            "CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers(id));"
            "INSERT INTO orders SELECT g, 1 + g % 30 FROM generate_series(1, 300) g;")
    _create(pg15, CRM, "CREATE TABLE contacts (id int, email text);"
            "INSERT INTO contacts SELECT g, g || '@x' FROM generate_series(1, 50) g;")
    beta = pg_factory(15)
    _create(beta, METRICS, "CREATE TABLE m (ts int, v float);"
            "INSERT INTO m SELECT g, g * 0.5 FROM generate_series(1, 150000) g;")
    k1, k2 = tmp_path / "k-main", tmp_path / "k-archive"
    new_kloset(k1)
    new_kloset(k2)
    monkeypatch.setenv("PGKLOSET_T_PASS", "dagster-test-passphrase")
    monkeypatch.setenv("PGKLOSET_T_ALPHA", pg15.dsn("postgres"))
    monkeypatch.setenv("PGKLOSET_T_BETA", beta.dsn("postgres"))
    cfg = config_from_mapping({
        "klosets": {"main": kloset_entry(k1, "PGKLOSET_T_PASS"),
                    "archive": kloset_entry(k2, "PGKLOSET_T_PASS")},
        "servers": {
            "alpha": server_entry("PGKLOSET_T_ALPHA", "main", [SHOP, CRM],
                                  physical={"enabled": True, "fast_checkpoint": True},
                                  drill={"sql_checks": [{"name": "orders", "database": SHOP,
                                                         "sql": "SELECT count(*) = 300 FROM orders"}]}),
            "beta": server_entry("PGKLOSET_T_BETA", "archive", [METRICS]),
        }})
    assert not [p for p in cfg.problems if p.severity == "error"], cfg.problems
    home = dagster_home(tmp_path / "home")
    return {"defs": build_definitions(cfg), "home": home, "k1": k1, "k2": k2, "beta": beta}


def test_backup_sensors_drills_and_prune(world: dict[str, Any]) -> None:
    defs: dg.Definitions = world["defs"]
    with dg.DagsterInstance.from_config(str(world["home"])) as instance:
        run_backup_sensor_drill_flow(defs, instance, world)


def run_backup_sensor_drill_flow(defs: dg.Definitions, instance: dg.DagsterInstance,
                                 world: dict[str, Any]) -> None:
    """Shared with the dagster-postgres test: the same flow against another instance storage."""
    shop, crm = naming.database_key("alpha", SHOP), naming.database_key("alpha", CRM)
    glob, cluster = naming.globals_key("alpha"), naming.cluster_key("alpha")
    metrics = naming.database_key("beta", METRICS)
    logical = defs.resolve_assets_def(shop)
    result = dg.materialize([logical], instance=instance,
                            selection=[shop, crm, glob], run_config=QUIET)
    assert result.success
    physical = dg.materialize([defs.resolve_assets_def(cluster)], instance=instance,
                              run_config=QUIET)
    assert physical.success
    beta_job = defs.resolve_job_def(naming.backup_job_name("beta"))
    for _ in range(3):  # a burst into the archive kloset
        assert beta_job.execute_in_process(instance=instance, run_config=QUIET).success

    # Real snapshots with the metadata the UI plots.
    kloset = open_kloset(world["k1"])
    for key, rows, tables in ((shop, 330, 2), (crm, 50, 1)):
        [md] = materializations(instance, key)
        snap = kloset.resolve(_value(md, "snapshot_id"))
        assert snap.kind == "logical" and snap.meta["database"] == key.path[-1]
        assert snap.meta["server"] == "alpha"
        assert isinstance(md["logical_bytes"], dg.IntMetadataValue)
        assert _value(md, "logical_bytes") == snap.summary["logical_bytes"] > 0
        assert _value(md, "new_stored_bytes") == snap.summary["stored_bytes"]
        assert isinstance(md["dedup_ratio"], dg.FloatMetadataValue)
        assert isinstance(md["seconds"], dg.FloatMetadataValue)
        assert _value(md, "server_version").startswith("15.")
        assert _value(md, "table_count") == tables
        assert _value(md, "total_rows") == rows
    [gmd] = materializations(instance, glob)
    assert kloset.resolve(_value(gmd, "snapshot_id")).kind == "globals"
    [cmd] = materializations(instance, cluster)
    assert kloset.resolve(_value(cmd, "snapshot_id")).kind == "physical"
    assert _value(cmd, "file_count") > 100
    # pg_basebackup's stderr (-v) reached the run's log.
    logs = [e.user_message for e in instance.all_logs(physical.run_id)]
    assert any("pg_basebackup:" in m for m in logs), logs[-20:]
    beta_mds = materializations(instance, metrics)
    assert len(beta_mds) == 3
    # Unchanged data deduplicates: the third backup stores a fraction of the first.
    assert _value(beta_mds[2], "new_stored_bytes") * 3 < _value(beta_mds[0], "new_stored_bytes")
    assert _value(beta_mds[2], "dedup_ratio") > 10

    # The drill sensor: exactly one drill per new snapshot.
    new_ids = {_value(md, "snapshot_id"): key
               for key in (shop, crm, cluster, metrics) for md in materializations(instance, key)}
    drills, cursor = evaluate_sensor(defs, "pgkloset_drill_sensor", instance)
    assert sorted(r.run_key for r in drills) == sorted(f"drill:{s}" for s in new_ids)
    for r in drills:
        sid = r.tags[naming.TAG_SNAPSHOT]
        assert r.asset_check_keys == [naming.drill_check_key(new_ids[sid])]
        assert r.job_name == naming.drill_job_name(new_ids[sid].path[1])
    again, _ = evaluate_sensor(defs, "pgkloset_drill_sensor", instance, cursor)
    assert again == []

    # The prune sensor: one prune per kloset, however many backups landed.
    prunes, _ = evaluate_sensor(defs, "pgkloset_prune_sensor", instance)
    assert sorted(r.job_name for r in prunes) == ["pgkloset_prune_archive", "pgkloset_prune_main"]
    assert len({r.run_key for r in prunes}) == 2

    for r in drills:
        assert execute_request(defs, r, instance).success
    for key in (shop, crm, cluster):
        [(passed, md)] = check_results(instance, key)
        assert passed, md
        assert _value_plain(md, "checks_failed") == 0 and _value_plain(md, "checks_passed") > 0
    assert [p for p, _ in check_results(instance, metrics)] == [True, True, True]
    shop_md = check_results(instance, shop)[0][1]
    assert "sql orders" in str(shop_md["report"])

    for r in prunes:
        res = execute_request(defs, r, instance)
        assert res.success
    archive = open_kloset(world["k2"])
    assert len([s for s in archive.snapshots() if s.kind == "logical"]) == 2  # keep_last: 2
    assert len([s for s in archive.snapshots() if s.kind == "globals"]) == 2

    # Nothing runs twice, even for a sensor that lost its cursor.
    assert evaluate_sensor(defs, "pgkloset_drill_sensor", instance)[0] == []
    assert evaluate_sensor(defs, "pgkloset_prune_sensor", instance)[0] == []


def _value_plain(md: dict[str, Any], key: str) -> Any:
    return getattr(md[key], "value", md[key])


def test_broken_snapshot_fails_its_drill(pg15: LocalInstance, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _create(pg15, CRM, "")
    new_kloset(tmp_path / "k")
    monkeypatch.setenv("PGKLOSET_T_PASS", "dagster-test-passphrase")
    monkeypatch.setenv("PGKLOSET_T_ALPHA", pg15.dsn("postgres"))
    defs = build_definitions(config_from_mapping({
        "klosets": {"main": kloset_entry(tmp_path / "k", "PGKLOSET_T_PASS")},
        "servers": {"alpha": server_entry("PGKLOSET_T_ALPHA", "main", [CRM])}}))
    key = naming.database_key("alpha", CRM)
    with dg.DagsterInstance.from_config(str(dagster_home(tmp_path / "home"))) as instance:
        assert dg.materialize([defs.resolve_assets_def(key)], instance=instance,
                              selection=[key],
                              run_config=QUIET).success
        good = _value(materializations(instance, key)[0], "snapshot_id")
        # A snapshot whose dump was cut in half, recorded as a new materialization.
        kloset = open_kloset(tmp_path / "k")
        snap = kloset.resolve(good)
        entry = snap.entry(snap.meta["entry"])
        data = b"".join(kloset.read_entry(snap, entry))
        with kloset.writer(kind="logical", tags=list(snap.tags), meta=dict(snap.meta)) as w:
            w.add_stream(entry.name, io.BytesIO(data[: len(data) // 2]))
            broken = w.commit().id
        instance.report_runless_asset_event(dg.AssetMaterialization(
            key, metadata={"snapshot_id": broken, "snapshot_ids": dg.MetadataValue.json([broken])}))
        drills, _ = evaluate_sensor(defs, "pgkloset_drill_sensor", instance)
        assert sorted(r.run_key for r in drills) == sorted([f"drill:{good}", f"drill:{broken}"])
        for r in drills:
            execute_request(defs, r, instance)
        results = {md["snapshot_id"]: (passed, md) for passed, md in check_results(instance, key)}
        assert results[good][0] is True
        passed, md = results[broken]
        assert passed is False
        assert broken[:12] in md["first_failure"]
        assert md["checks_failed"] >= 1 or "error" in str(md["report"])
