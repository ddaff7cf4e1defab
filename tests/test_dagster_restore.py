"""The ad-hoc restore job against real clusters: a whole database, one table, bad run config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_dagster import naming
from pgkloset_dagster.config import config_from_mapping
from pgkloset_dagster.definitions import build_definitions
from tests.fixtures.pg import PG_TEST_PASSWORD
from tests.test_dagster_support import (
    QUIET,
    dagster_home,
    kloset_entry,
    materializations,
    new_kloset,
    open_kloset,
    server_entry,
)

SHOP = "dgrestore_shop"
SHOP_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
CREATE INDEX customers_name_idx ON customers (name);
INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 40) g;
CREATE TABLE orders (id serial PRIMARY KEY, customer int NOT NULL REFERENCES customers(id),
                     total numeric(10, 2));
CREATE INDEX orders_customer_idx ON orders (customer);
INSERT INTO orders (customer, total) SELECT 1 + g % 40, g * 1.5 FROM generate_series(1, 400) g;
"""


def _restore_config(**config: Any) -> dict[str, Any]:
    return {**QUIET, "ops": {"restore_logical": {"config": {"kloset": "main", **config}}}}


def _indexes(instance: LocalInstance, db: str, table: str) -> set[str]:
    with instance.connect(db) as conn:
        return {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s",
            (table,))}


def _tables(instance: LocalInstance, db: str) -> set[str]:
    with instance.connect(db) as conn:
        return {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def _failure(result: dg.ExecuteInProcessResult) -> str:
    [event] = result.get_step_failure_events()
    data = event.step_failure_data
    assert data.user_failure_data is not None, data.error
    return str(data.user_failure_data.description)


@pytest.fixture
def world(pg15: LocalInstance, pg_factory: Any, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """alpha (pg15) backed up into kloset main; beta, a second cluster, the restore target."""
    pg15.execute(f"DROP DATABASE IF EXISTS {SHOP}")
    pg15.execute(f"CREATE DATABASE {SHOP}")
    pg15.execute(SHOP_SQL, SHOP)
    beta = pg_factory(15, password=PG_TEST_PASSWORD)
    new_kloset(tmp_path / "k")
    monkeypatch.setenv("PGKLOSET_T_PASS", "dagster-test-passphrase")
    monkeypatch.setenv("PGKLOSET_T_ALPHA", pg15.dsn("postgres"))
    # Over TCP: the password in the DSN must reach pg_restore (through a passfile).
    monkeypatch.setenv("PGKLOSET_T_BETA", beta.dsn("postgres", tcp=True))
    cfg = config_from_mapping({
        "klosets": {"main": {**kloset_entry(tmp_path / "k", "PGKLOSET_T_PASS"),
                             "lock_wait": 1}},
        "servers": {"alpha": server_entry("PGKLOSET_T_ALPHA", "main", [SHOP]),
                    "beta": server_entry("PGKLOSET_T_BETA", "main", ["postgres"])}})
    assert not [p for p in cfg.problems if p.severity == "error"], cfg.problems
    defs = build_definitions(cfg)
    home = dagster_home(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        key = naming.database_key("alpha", SHOP)
        assert dg.materialize([defs.resolve_assets_def(key)], instance=instance,
                              selection=[key, naming.globals_key("alpha")],
                              run_config=QUIET).success
        [md] = materializations(instance, key)
    yield {"defs": defs, "home": home, "beta": beta, "kloset": tmp_path / "k",
           "snapshot_id": getattr(md["snapshot_id"], "value", md["snapshot_id"])}
    pg15.execute(f"DROP DATABASE IF EXISTS {SHOP}")


def _run(world: dict[str, Any], **config: Any) -> dg.ExecuteInProcessResult:
    job = world["defs"].resolve_job_def("pgkloset_restore")
    with dg.DagsterInstance.from_config(str(world["home"])) as instance:
        return job.execute_in_process(instance=instance, run_config=_restore_config(**config),
                                      raise_on_error=False)


def test_restore_whole_database_to_a_second_cluster(world: dict[str, Any]) -> None:
    beta: LocalInstance = world["beta"]
    result = _run(world, source_database=SHOP, target_server="beta", create=True)
    assert result.success, _failure(result)
    assert result.output_for_node("restore_logical") == world["snapshot_id"]
    # No target_database: the snapshot's own database name, created on beta.
    assert beta.scalar(f"SELECT count(*) FROM pg_database WHERE datname = '{SHOP}'") == 1
    assert _tables(beta, SHOP) == {"customers", "orders"}
    assert beta.scalar("SELECT count(*) FROM customers", SHOP) == 40
    assert beta.scalar("SELECT count(*) FROM orders", SHOP) == 400
    assert beta.scalar("SELECT sum(total) FROM orders", SHOP) == sum(g * 1.5 for g in
                                                                      range(1, 401))
    assert _indexes(beta, SHOP, "customers") == {"customers_pkey", "customers_name_idx"}
    assert _indexes(beta, SHOP, "orders") == {"orders_pkey", "orders_customer_idx"}
    assert beta.scalar("SELECT count(*) FROM pg_constraint WHERE contype = 'f'", SHOP) == 1
    assert beta.scalar("SELECT nextval('orders_id_seq')", SHOP) == 401

    # create=True into a database that now exists is refused before anything is touched.
    again = _run(world, source_database=SHOP, target_server="beta", create=True)
    assert not again.success
    assert f"database '{SHOP}' already exists on the target" in _failure(again)
    assert beta.scalar("SELECT count(*) FROM orders", SHOP) == 400


def test_restore_one_table_into_an_empty_database(world: dict[str, Any]) -> None:
    beta: LocalInstance = world["beta"]
    beta.execute("CREATE DATABASE only_customers")
    result = _run(world, snapshot=world["snapshot_id"][:12], target_server="beta",
                  target_database="only_customers", tables=["public.customers"])
    assert result.success, _failure(result)
    assert _tables(beta, "only_customers") == {"customers"}
    assert beta.scalar("SELECT count(*) FROM customers", "only_customers") == 40
    assert beta.scalar("SELECT name FROM customers WHERE id = 7", "only_customers") == "c7"
    assert _indexes(beta, "only_customers", "customers") == {"customers_pkey",
                                                             "customers_name_idx"}


def test_unknown_snapshot_fails_the_run_clearly(world: dict[str, Any]) -> None:
    result = _run(world, snapshot="ffffffff", target_server="beta", create=True)
    assert not result.success
    assert _failure(result) == "restore: no snapshot matches 'ffffffff'"
    result = _run(world, snapshot="latest", source_database="no_such_db", target_server="beta")
    assert not result.success
    assert _failure(result) == "restore: no logical snapshot of database 'no_such_db'"
    result = _run(world, target_server="gamma")
    assert not result.success
    assert "unknown kloset 'main' or server 'gamma'" in _failure(result)
    assert world["beta"].scalar(
        f"SELECT count(*) FROM pg_database WHERE datname = '{SHOP}'") == 0


def test_restore_waits_for_the_kloset_lock(world: dict[str, Any]) -> None:
    """A restore reads packs: it must not run while a prune holds the kloset exclusively."""
    kloset = open_kloset(world["kloset"])
    with kloset.lock(exclusive=True, operation="prune"):
        result = _run(world, source_database=SHOP, target_server="beta", create=True)
    assert not result.success
    assert _failure(result).startswith("restore: kloset is locked: exclusive lock by prune")
    assert world["beta"].scalar(
        f"SELECT count(*) FROM pg_database WHERE datname = '{SHOP}'") == 0
