"""Logical backup and restore round trips against real PostgreSQL 15 clusters.

One backup of the many-kinds-of-objects database (tests/fixtures/logical_db.sql)
is made through the CLI and restored into a separate cluster: whole, by
schema, by table, in parallel, and from a directory-format dump.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider
from tests.fixtures.logical_db import (
    CONTRIB,
    build_kitchen,
    error_lines,
    make_kloset,
    run_cli,
    schema_dump,
    snapshots,
    table_checksums,
)
from tests.fixtures.pg import PG_TEST_PASSWORD

DB = "lg_kitchen"


@pytest.fixture(scope="module")
def kitchen(pg15: LocalInstance, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The source database, a kloset, and one CLI backup of it (DSN from the environment)."""
    build_kitchen(pg15, DB)
    repo = tmp_path_factory.mktemp("lgk") / "kloset"
    make_kloset(repo)
    done = run_cli(repo, "backup", "logical", "--database", DB, "--tag", "nightly", "--json",
                   env={"PGKLOSET_DSN": pg15.dsn("postgres", tcp=True)})
    assert done.returncode == 0, done.stderr
    return {"repo": repo, "results": json.loads(done.stdout), "source": pg15}


@pytest.fixture(scope="module")
def target(pg_provider: LocalInstanceProvider, kitchen: dict[str, Any]) -> Iterator[LocalInstance]:
    """A separate PostgreSQL 15 cluster with the source's globals restored into it."""
    with pg_provider.start(15) as instance:
        done = run_cli(kitchen["repo"], "restore", _globals_id(kitchen), "--to",
                       instance.dsn("postgres"))
        assert done.returncode == 0, done.stderr
        yield instance


def _globals_id(kitchen: dict[str, Any]) -> str:
    return next(r["snapshot_id"] for r in kitchen["results"] if r["kind"] == "globals")


def test_snapshot_meta_holds_exact_facts(kitchen: dict[str, Any], pg15: LocalInstance) -> None:
    snaps = snapshots(kitchen["repo"])
    assert sorted(s.kind for s in snaps) == ["globals", "logical"]
    logical = next(s for s in snaps if s.kind == "logical")
    glob = next(s for s in snaps if s.kind == "globals")
    run_tags = {t for s in snaps for t in s.tags if t.startswith("run:")}
    assert len(run_tags) == 1 and all("nightly" in s.tags for s in snaps)
    assert logical.meta["run_id"] == glob.meta["run_id"]
    meta = logical.meta
    assert meta["database"] == DB and meta["format"] == "custom"
    assert meta["server"] == f"127.0.0.1:{pg15.port}"
    assert meta["pg_dump_version"].startswith("15.")
    assert meta["pg_version_num"] // 10000 == 15
    assert meta["system_identifier"] == pg15.scalar(
        "SELECT system_identifier::text FROM pg_control_system()")
    # Row counts equal the source's (nothing changed it since); leaves only, partitions included.
    for name in ("app.customer", "app.orders", "app.events_2023", "app.events_2024",
                 "app.vehicle", "app.truck", "app.cache"):
        assert meta["tables"][name] == pg15.scalar(f"SELECT count(*) FROM ONLY {name}", DB), name
    assert "app.events" not in meta["tables"] and meta["partitioned_tables"] == ["app.events"]
    assert meta["tables"]["app.vehicle"] == 2  # the inheritance parent's own rows only
    counts = meta["object_counts"]
    assert counts["partitioned_tables"] == 1 and counts["materialized_views"] == 1
    assert counts["views"] == 1 and counts["procedures"] == 1 and counts["triggers"] == 2
    assert counts["functions"] == 3 and counts["policies"] == 2 and counts["large_objects"] == 1
    assert set(CONTRIB) <= set(meta["extensions"]) and meta["schemas"] == ["app", "audit",
                                                                            "public"]
    assert {"lg_owner", "lg_reader"} <= set(meta["roles_needed"])
    assert meta["tablespaces_needed"] == []
    result = next(r for r in kitchen["results"] if r["kind"] == "logical")
    assert result["total_rows"] == sum(meta["tables"].values())
    assert result["row_counts"] == meta["tables"]
    assert not glob.meta["no_role_passwords"]
    for snap in snaps:  # the password is nowhere in the metadata
        assert PG_TEST_PASSWORD not in json.dumps(snap.meta)


def test_full_restore_matches_source(kitchen: dict[str, Any], target: LocalInstance) -> None:
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--create",
                   "--to", target.dsn(DB))
    assert done.returncode == 0, done.stderr
    source: LocalInstance = kitchen["source"]
    # No normalization beyond comments, SET lines and psql's random \restrict keys.
    assert schema_dump(target, DB) == schema_dump(source, DB)
    assert table_checksums(target, DB) == table_checksums(source, DB)
    assert target.scalar("SELECT convert_from(lo_get(oid), 'UTF8') FROM "
                         "pg_largeobject_metadata", DB) == "large object payload"

    # Again without --clean: refused before anything is touched.
    again = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--to",
                    target.dsn(DB))
    assert again.returncode != 0 and len(error_lines(again)) == 1
    assert "already has" in error_lines(again)[0] and "--clean" in error_lines(again)[0]
    # With --clean it replaces the objects and the data is still identical.
    target.execute("DELETE FROM app.cache", DB)
    clean = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--clean",
                    "--to", target.dsn(DB))
    assert clean.returncode == 0, clean.stderr
    assert table_checksums(target, DB) == table_checksums(source, DB)


def test_parallel_restore_into_renamed_database(kitchen: dict[str, Any],
                                                target: LocalInstance) -> None:
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--create",
                   "--jobs", "2", "--to", target.dsn("lg_kitchen_par"))
    assert done.returncode == 0, done.stderr
    assert table_checksums(target, "lg_kitchen_par") == table_checksums(kitchen["source"], DB)


def test_schema_restore_into_empty_database(kitchen: dict[str, Any],
                                            target: LocalInstance) -> None:
    target.execute("CREATE DATABASE lg_schema_only")
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--schema", "audit",
                   "--to", target.dsn("lg_schema_only"))
    assert done.returncode == 0, done.stderr
    restored = table_checksums(target, "lg_schema_only")
    assert list(restored) == ["audit.log"]
    assert restored["audit.log"] == table_checksums(kitchen["source"], DB)["audit.log"]
    assert target.scalar("SELECT count(*) FROM pg_proc WHERE proname = 'record'",
                         "lg_schema_only") == 1
    assert target.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'app'",
                         "lg_schema_only") == 0


def test_table_restore_brings_indexes_constraints_triggers(kitchen: dict[str, Any],
                                                           target: LocalInstance) -> None:
    db = "lg_one_table"
    target.execute(f"CREATE DATABASE {db}")
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--table",
                   "app.product", "--to", target.dsn(db))
    assert done.returncode == 0, done.stderr
    assert list(table_checksums(target, db)) == ["app.product"]
    assert table_checksums(target, db)["app.product"] == \
        table_checksums(kitchen["source"], DB)["app.product"]
    indexes = {r[0] for r in target.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'product'", db)}
    assert indexes == {"product_pkey", "product_title_idx", "product_serial_no_key"}
    constraints = {(r[0], r[1]) for r in target.execute(
        "SELECT conname, contype FROM pg_constraint WHERE conrelid = 'app.product'::regclass",
        db)}
    assert constraints == {("product_pkey", "p"), ("product_serial_no_key", "u"),
                           ("product_price_check", "c")}
    assert target.scalar("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal", db) == \
        "product_touch"
    assert target.scalar("SELECT obj_description('app.product'::regclass)", db) == "catalog"
    assert target.scalar("SELECT has_table_privilege('lg_reader', 'app.product', 'SELECT')", db)
    # The owned sequence continues where the source's was.
    assert target.scalar("SELECT last_value FROM app.product_serial_no_seq", db) == 300
    # Nothing else of the schema came along.
    assert target.scalar("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON "
                         "n.oid = c.relnamespace WHERE n.nspname = 'app' AND relkind = 'r'",
                         db) == 1


def test_missing_table_is_one_clear_error(kitchen: dict[str, Any], target: LocalInstance) -> None:
    target.execute("CREATE DATABASE lg_missing_table")
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--table",
                   "app.nope", "--to", target.dsn("lg_missing_table"))
    assert done.returncode != 0
    assert "has no table app.nope" in done.stderr
    assert len(error_lines(done)) == 1 and "Traceback" not in done.stderr


def test_preflight_lists_missing_extensions_on_16(kitchen: dict[str, Any],
                                                  pg16: LocalInstance) -> None:
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--create",
                   "--to", pg16.dsn("lg_kitchen_16"))
    assert done.returncode != 0
    lines = error_lines(done)
    assert len(lines) == 1 and "pre-flight" in lines[0]
    for ext in CONTRIB:
        assert ext in lines[0]
    assert "lg_owner" in lines[0]  # roles are listed too
    assert pg16.scalar("SELECT count(*) FROM pg_database WHERE datname = 'lg_kitchen_16'") == 0


def test_directory_format_parallel_backup_and_restore(kitchen: dict[str, Any],
                                                      target: LocalInstance,
                                                      tmp_path: Path) -> None:
    source: LocalInstance = kitchen["source"]
    repo = tmp_path / "k"
    make_kloset(repo)
    done = run_cli(repo, "backup", "logical", "--dsn", source.dsn("postgres"), "--database", DB,
                   "--format", "directory", "--jobs", "2", "--json")
    assert done.returncode == 0, done.stderr
    snap = next(s for s in snapshots(repo) if s.kind == "logical")
    assert snap.meta["format"] == "directory"
    names = [e.name for e in snap.entries]
    assert "dump/toc.dat" in names and len(names) > 5
    restored = run_cli(repo, "restore", snap.id[:12], "--create", "--jobs", "2", "--to",
                       target.dsn("lg_kitchen_dir"))
    assert restored.returncode == 0, restored.stderr
    assert table_checksums(target, "lg_kitchen_dir") == table_checksums(source, DB)


def test_restore_refuses_physical_options_for_logical(kitchen: dict[str, Any],
                                                      target: LocalInstance) -> None:
    done = run_cli(kitchen["repo"], "restore", "latest", "--database", DB, "--to-dir", "/tmp/x",
                   "--to", target.dsn("postgres"))
    assert done.returncode != 0 and len(error_lines(done)) == 1
    assert "--to-dir" in error_lines(done)[0]


def test_counting_uses_one_backend_and_leaves_the_server_default(pg15: LocalInstance) -> None:
    """The row counts run next to pg_dump: parallel workers would take its cores."""
    from pgkloset_core.postgres.facts import SnapshotSession
    from pgkloset_core.postgres.pgenv import ConnTarget

    setting = "SELECT current_setting('max_parallel_workers_per_gather')"
    default = pg15.scalar(setting)
    assert default != "0"  # else this test shows nothing
    with SnapshotSession(ConnTarget.parse(pg15.dsn("postgres"))) as session:
        assert session.conn.execute(setting).fetchone() == ("0",)
        assert session.facts()["total_rows"] >= 0
    assert pg15.scalar(setting) == default


BLOCKS_DB = "lg_blocks"


def _blocks_db(instance: LocalInstance) -> None:
    """A database of ~15 MB in one table, made once per server."""
    if int(instance.scalar(f"SELECT count(*) FROM pg_database WHERE datname = '{BLOCKS_DB}'")):
        return
    instance.execute(f"CREATE DATABASE {BLOCKS_DB}")
    instance.execute("CREATE TABLE blocks AS SELECT i, md5(i::text) AS t "
                     "FROM generate_series(1, 200000) i", BLOCKS_DB)


def _io_calls(argv: list[Any], env: dict[str, str], counter: str, *,
              stdin_data: bytes | None = None) -> tuple[int, int]:
    """(bytes out, read or write calls) of a tool on pipes, from its /proc/PID/io."""
    import re
    import subprocess
    import threading

    from pgkloset_core.postgres.pgenv import ToolProcess

    stdin = subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL
    with ToolProcess(argv, env, what="tool", stdin=stdin, stdout=subprocess.PIPE) as tool:
        feeder = None
        if stdin_data is not None:
            def feed() -> None:  # in a thread: the tool's output must be read meanwhile
                tool.stdin.write(stdin_data)
                tool.stdin.close()

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
        size = 0
        while chunk := tool.stdout.read(1 << 20):
            size += len(chunk)
        if feeder is not None:
            feeder.join()
        os.waitid(os.P_PID, tool.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        io = Path(f"/proc/{tool.pid}/io").read_text()
        tool.check()
    found = re.search(rf"^{counter}: (\d+)$", io, re.M)
    assert found is not None
    return size, int(found.group(1))


def _watch_buffering(module: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bool]]:
    """Record how ``module`` asks for buffered tools; the real stdio_buffered still runs."""
    from pgkloset_core.postgres.pgenv import stdio_buffered

    asked: list[dict[str, bool]] = []

    def spy(argv: Any, **how: bool) -> list[Any]:
        asked.append(how)
        return stdio_buffered(argv, **how)

    monkeypatch.setattr(module, "stdio_buffered", spy)
    return asked


def test_pg_dump_writes_its_archive_in_large_blocks(
        pg15: LocalInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stdio writes pg_dump's archive to a pipe 4 KiB at a time; backups give it 1 MiB."""
    import pgkloset_core.postgres.logical as logical
    from pgkloset_core.postgres.pgenv import stdio_buffered

    _blocks_db(pg15)
    dump = [str(pg15.binaries.path("pg_dump")), "-Fc", "-Z0", "-d", BLOCKS_DB]
    plain_bytes, plain_calls = _io_calls(dump, pg15.env(BLOCKS_DB), "syscw")
    size, calls = _io_calls(stdio_buffered(dump, stdout=True), pg15.env(BLOCKS_DB), "syscw")
    assert plain_calls > plain_bytes // 8192  # unbuffered: the count tells the two apart
    assert size > 8 * 2**20 and calls <= size // 2**20 + 3

    asked = _watch_buffering(logical, monkeypatch)
    results = logical.backup_logical(make_kloset(tmp_path / "k"), pg15.dsn("postgres"),
                                     [BLOCKS_DB])
    assert asked == [{"stdout": True}]
    assert next(r for r in results if r.kind == "logical").total_rows == 200000


def test_pg_restore_reads_a_piped_archive_in_large_blocks(
        pg15: LocalInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stdio reads a piped archive 4 KiB at a time; restores give pg_restore 1 MiB."""
    import subprocess

    import pgkloset_core.postgres.restore_logical as restore_logical
    from pgkloset_core.postgres.logical import backup_logical
    from pgkloset_core.postgres.pgenv import stdio_buffered

    _blocks_db(pg15)
    archive = subprocess.run([str(pg15.binaries.path("pg_dump")), "-Fc", "-Z0", "-d",
                              BLOCKS_DB], capture_output=True, check=True,
                             env=pg15.env(BLOCKS_DB)).stdout
    to_script = [str(pg15.binaries.path("pg_restore")), "-f", "-"]
    _, plain = _io_calls(to_script, {}, "syscr", stdin_data=archive)
    _, buffered = _io_calls(stdio_buffered(to_script, stdin=True), {}, "syscr",
                            stdin_data=archive)
    assert len(archive) > 8 * 2**20
    assert plain > len(archive) // 8192  # unbuffered: the count tells the two apart
    # A pipe read returns what is there, and start-up reads libraries: a tenth is plenty.
    assert buffered < plain // 10

    kloset = make_kloset(tmp_path / "k")
    results = backup_logical(kloset, pg15.dsn("postgres"), [BLOCKS_DB])
    snap = kloset.load_snapshot(next(r.snapshot_id for r in results if r.kind == "logical"))
    asked = _watch_buffering(restore_logical, monkeypatch)
    pg15.execute("DROP DATABASE IF EXISTS lg_blocks_back")
    restore_logical.restore_logical(kloset, snap, pg15.dsn("lg_blocks_back"), create=True)
    assert {"stdin": True} in asked
    assert int(pg15.scalar("SELECT count(*) FROM blocks", "lg_blocks_back")) == 200000
    pg15.execute("DROP DATABASE lg_blocks_back")
