"""Drills of logical snapshots: pass on a good one, fail by name on genuinely broken ones."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.postgres.drill import SqlCheck, globals_of, run_drill
from pgkloset_core.postgres.instance import LocalInstance, can_isolate_network
from pgkloset_core.postgres.logical import backup_logical
from tests.test_drill_support import assert_clean, new_kloset, rewrite_snapshot

SOURCE_DB = "drill_logical_src"

SCHEMA = """
CREATE SCHEMA sales;
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE sales.orders (id bigserial PRIMARY KEY, customer int REFERENCES customers,
                           amount numeric(10, 2), note text);
CREATE INDEX orders_customer ON sales.orders (customer);
CREATE TABLE audit_empty (at timestamptz DEFAULT now());
CREATE VIEW big_orders AS SELECT * FROM sales.orders WHERE amount > 900;
CREATE FUNCTION order_total(c int) RETURNS numeric LANGUAGE sql
    AS 'SELECT coalesce(sum(amount), 0) FROM sales.orders WHERE customer = c';
INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 40) g;
INSERT INTO sales.orders (customer, amount, note)
    SELECT 1 + g % 40, (g * 7919 % 100000) / 100.0, repeat('x', g % 200)
    FROM generate_series(1, 6000) g;
"""


@dataclass
class LogicalSetup:
    kloset: Kloset
    source: LocalInstance
    good: Snapshot


def make_logical_snapshot(kloset: Kloset, source: LocalInstance, dbname: str) -> Snapshot:
    """A logical snapshot of `dbname` (plus its run's globals) by the product's backup code."""
    results = backup_logical(kloset, source.dsn(dbname), [dbname])
    (logical,) = [r for r in results if r.kind == "logical"]
    return kloset.resolve(logical.snapshot_id)


@pytest.fixture(scope="module")
def logical(pg15: LocalInstance, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LogicalSetup]:
    pg15.execute(f"DROP DATABASE IF EXISTS {SOURCE_DB}")
    pg15.execute(f"CREATE DATABASE {SOURCE_DB}")
    pg15.execute(SCHEMA, SOURCE_DB)
    kloset = new_kloset(tmp_path_factory.mktemp("drill-logical") / "k")
    yield LogicalSetup(kloset, pg15, make_logical_snapshot(kloset, pg15, SOURCE_DB))
    pg15.execute(f"DROP DATABASE IF EXISTS {SOURCE_DB}")


def dump_entry(snap: Snapshot) -> Entry:
    dumps = [e for e in snap.entries if e.type in ("stream", "file")
             and "globals" not in e.name]
    assert len(dumps) == 1, [e.name for e in dumps]
    return dumps[0]


def test_good_snapshot_passes(logical: LogicalSetup, pg_shared_dir: Path) -> None:
    report = run_drill(logical.kloset, logical.good, work_dir=pg_shared_dir, sql_checks=[
        SqlCheck("forty customers", "SELECT count(*) = 40 FROM customers"),
        SqlCheck("totals", "SELECT order_total(1) > 0 AND (SELECT count(*) FROM big_orders) > 0"),
    ])
    assert report.passed, report.first_failure()
    names = {c.name: c for c in report.checks}
    assert names["rows sales.orders"].expected == names["rows sales.orders"].actual == 6000
    assert names["rows public.customers"].actual == 40
    assert names["rows public.audit_empty"].actual == 0
    assert any(n.startswith("objects ") for n in names), "object counts were not compared"
    assert names["sql forty customers"].passed and names["sql totals"].passed
    assert report.restore_seconds > 0
    globals_snap = globals_of(logical.kloset, logical.good)
    assert globals_snap is not None and names["restore globals"].passed
    assert report.bytes_read == dump_entry(logical.good).size + globals_snap.logical_bytes
    assert report.scratch_version is not None and report.scratch_version.startswith("15.")
    assert report.isolated == can_isolate_network()
    assert report.to_json()["passed"] is True
    assert_clean(pg_shared_dir)


def test_truncated_dump_fails(logical: LogicalSetup, pg_shared_dir: Path) -> None:
    """Valid encryption, valid manifest, broken dump: only a restore can tell."""
    target = dump_entry(logical.good)

    def truncate(entry: Entry, data: bytes) -> bytes:
        return data[: len(data) * 2 // 3] if entry.name == target.name else data

    broken = rewrite_snapshot(logical.kloset, logical.good, truncate)
    report = run_drill(logical.kloset, broken, work_dir=pg_shared_dir)
    assert not report.passed
    restore = next(c for c in report.checks if c.name == f"restore {SOURCE_DB}")
    assert not restore.passed
    assert "pg_restore" in restore.message and "error" in restore.message
    assert report.first_failure() == restore.message
    print(restore.message)
    assert_clean(pg_shared_dir)


def test_table_data_left_out_fails(logical: LogicalSetup, pg_shared_dir: Path) -> None:
    """A dump without one table's rows, under facts that counted them, is caught by name."""
    source = logical.source
    dump = subprocess.run(
        [str(source.binaries.path("pg_dump")), "-Fc", "-Z0", "--exclude-table-data=sales.orders",
         SOURCE_DB], capture_output=True, env=source.env(SOURCE_DB), check=True).stdout
    entry = dump_entry(logical.good)
    lying = rewrite_snapshot(logical.kloset, logical.good,
                             lambda e, data: dump if e.name == entry.name else data)
    report = run_drill(logical.kloset, lying, work_dir=pg_shared_dir)
    assert not report.passed
    failing = [c for c in report.checks if not c.passed]
    assert [c.name for c in failing] == ["rows sales.orders"]
    assert failing[0].expected == 6000 and failing[0].actual == 0
    assert report.first_failure() == "rows sales.orders: expected 6000 rows, restored 0"
    assert_clean(pg_shared_dir)


def test_false_sql_check_fails(logical: LogicalSetup, tmp_path: Path,
                               pg_shared_dir: Path) -> None:
    check_file = tmp_path / "no_refunds.sql"
    check_file.write_text("SELECT count(*) = 0 FROM sales.orders  -- there are orders\n")
    report = run_drill(logical.kloset, logical.good, work_dir=pg_shared_dir,
                       sql_checks=[check_file])
    assert not report.passed
    assert report.first_failure() == "sql no_refunds.sql: returned False, expected a single true"
    assert all(c.passed for c in report.checks if not c.name.startswith("sql "))
    assert_clean(pg_shared_dir)


def test_failing_sql_error_is_reported(logical: LogicalSetup, pg_shared_dir: Path) -> None:
    report = run_drill(logical.kloset, logical.good, work_dir=pg_shared_dir,
                       sql_checks=[SqlCheck("typo", "SELECT count(*) FROM no_such_table")])
    assert not report.passed
    assert 'relation "no_such_table" does not exist' in (report.first_failure() or "")
    assert_clean(pg_shared_dir)


def test_scratch_can_be_newer_for_logical(logical: LogicalSetup, pg_shared_dir: Path) -> None:
    """A logical snapshot of 15 may be drilled on 16 when 15 is not asked for."""
    from pgkloset_core.postgres.binaries import pgserver_bin_dir

    bin16 = pgserver_bin_dir()
    if bin16 is None:
        pytest.skip("no PostgreSQL 16 binaries")
    report = run_drill(logical.kloset, logical.good, work_dir=pg_shared_dir, bin_dir=bin16)
    assert report.scratch_version is not None and report.scratch_version.startswith("16.")
    assert report.passed, report.first_failure()
    assert_clean(pg_shared_dir)
