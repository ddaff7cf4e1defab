"""Client/server versions: 15 snapshots restore into 16; a 16 server is dumped by a 16 client."""

from __future__ import annotations

from pathlib import Path

from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_core.postgres.logical import backup_logical
from pgkloset_core.postgres.restore_logical import restore_logical
from tests.fixtures.logical_db import (
    build_plain,
    error_lines,
    make_kloset,
    run_cli,
    snapshots,
    table_checksums,
)


def test_snapshot_of_15_restores_into_16(pg15: LocalInstance, pg16: LocalInstance,
                                         tmp_path: Path) -> None:
    build_plain(pg15, "lg_plain15")
    kloset = make_kloset(tmp_path / "k")
    results = backup_logical(kloset, pg15.dsn("postgres"), ["lg_plain15"])
    snap = kloset.resolve(next(r.snapshot_id for r in results if r.kind == "logical"))
    assert snap.meta["pg_dump_version"].startswith("15.")
    restore_logical(kloset, snap, pg16.dsn("lg_plain_from15"), create=True)
    assert table_checksums(pg16, "lg_plain_from15") == table_checksums(pg15, "lg_plain15")
    assert pg16.scalar("SELECT shop.total()", "lg_plain_from15") == \
        pg15.scalar("SELECT shop.total()", "lg_plain15")


def test_16_server_is_dumped_with_16_client(pg16: LocalInstance, tmp_path: Path) -> None:
    build_plain(pg16, "lg_plain16", rows=100)
    kloset = make_kloset(tmp_path / "k")
    results = backup_logical(kloset, pg16.dsn("postgres"), ["lg_plain16"])
    snap = kloset.resolve(next(r.snapshot_id for r in results if r.kind == "logical"))
    assert snap.meta["pg_dump_version"].startswith("16")
    assert snap.meta["pg_version_num"] // 10000 == 16
    assert snap.meta["tables"] == {"shop.item": 100, "shop.line": 100}


def test_bin_dir_older_than_server_is_one_clear_error(pg16: LocalInstance,
                                                      tmp_path: Path) -> None:
    repo = tmp_path / "k"
    make_kloset(repo)
    done = run_cli(repo, "backup", "logical", "--dsn", pg16.dsn("postgres"), "--database",
                   "postgres", "--bin-dir", "/usr/lib/postgresql/15/bin")
    assert done.returncode != 0
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert "15.18" in lines[0] and "16" in lines[0] and "Traceback" not in done.stderr
    assert snapshots(repo) == []
