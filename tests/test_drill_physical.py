"""Drills of physical snapshots: a good cluster passes, a cluster missing a file or with a
changed one fails."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.postgres.drill import DrillError, SqlCheck, postgres_pids_under, run_drill
from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider
from pgkloset_core.postgres.physical import (
    PhysicalRestoreError,
    backup_physical,
    restore_physical,
)
from tests.test_drill_support import (
    CLI,
    DROP,
    REPO_ROOT,
    StderrLines,
    assert_clean,
    cli_env,
    new_kloset,
    rewrite_snapshot,
    run_cli,
)

DB = "drill_phys"


@dataclass
class PhysicalSetup:
    kloset: Kloset
    repo: Path
    source: LocalInstance
    good: Snapshot
    relation_file: str  # base/<dboid>/<relfilenode> of a table with rows


@pytest.fixture(scope="module")
def physical(pg_provider: LocalInstanceProvider, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[PhysicalSetup]:
    with pg_provider.start(15, wal_level="replica", max_wal_senders=4) as source:
        source.execute(f"CREATE DATABASE {DB}")
        source.execute("CREATE TABLE items (id int PRIMARY KEY, label text);"
                       "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 20000) g;"
                       "CREATE TABLE empty_one (x int);", DB)
        source.execute("CHECKPOINT")
        dboid = source.scalar(f"SELECT oid FROM pg_database WHERE datname = '{DB}'")
        filenode = source.scalar("SELECT pg_relation_filenode('items')", DB)
        repo = tmp_path_factory.mktemp("drill-physical") / "k"
        kloset = new_kloset(repo)
        result = backup_physical(kloset, source.dsn("postgres"), fast_checkpoint=True)
        yield PhysicalSetup(kloset, repo, source, kloset.resolve(result.snapshot_id),
                            f"base/{dboid}/{filenode}")


def test_good_physical_snapshot_passes(physical: PhysicalSetup, pg_shared_dir: Path) -> None:
    report = run_drill(physical.kloset, physical.good, work_dir=pg_shared_dir, sql_checks=[
        SqlCheck("items", "SELECT count(*) = 20000 FROM items", database=DB)])
    assert report.passed, report.first_failure()
    names = {c.name: c for c in report.checks}
    assert names["pg_verifybackup"].passed
    assert names["pg_amcheck"].passed and not names["pg_amcheck"].skipped
    assert "rows" in str(names[f"read tables {DB}"].actual)
    assert names["sql items"].passed
    assert report.kind == "physical"
    assert report.scratch_version is not None and report.scratch_version.startswith("15.")
    assert report.bytes_read > 0 and report.restore_seconds > 0
    assert_clean(pg_shared_dir)


def test_missing_relation_file_fails(physical: PhysicalSetup, pg_shared_dir: Path) -> None:
    """The snapshot is validly sealed but lacks the heap file of a table with rows."""
    assert physical.good.entry(physical.relation_file) is not None

    def skip(entry: Entry, data: bytes) -> bytes | object:
        return DROP if entry.name == physical.relation_file else data

    broken = rewrite_snapshot(physical.kloset, physical.good, skip)
    report = run_drill(physical.kloset, broken, work_dir=pg_shared_dir)
    assert not report.passed
    first = report.first_failure() or ""
    assert physical.relation_file in first, first
    assert "pg_verifybackup" in first
    assert_clean(pg_shared_dir)

    done = run_cli(physical.repo, "drill", broken.id[:12], "--work-dir", str(pg_shared_dir))
    assert done.returncode == 4, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pgkloset: error: drill failed: restore: ")
    assert physical.relation_file in last
    assert "FAIL restore" in done.stdout
    assert_clean(pg_shared_dir)


def test_changed_relation_file_fails_on_its_checksum(physical: PhysicalSetup,
                                                     pg_shared_dir: Path, tmp_path: Path) -> None:
    """Validly sealed, every file present and of its size, one byte of a heap file changed:
    the checksum the restore computes while writing catches it, and nothing is left."""
    def flip(entry: Entry, data: bytes) -> bytes | object:
        if entry.name != physical.relation_file:
            return data
        at = len(data) // 2
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]

    broken = rewrite_snapshot(physical.kloset, physical.good, flip)
    target = tmp_path / "restored"
    with pytest.raises(PhysicalRestoreError) as caught:
        restore_physical(physical.kloset, broken, to_dir=str(target))
    message = str(caught.value)
    assert physical.relation_file in message and "backup manifest" in message, message
    assert "CRC32C" in message
    assert not target.exists() and not target.with_name("restored.partial").exists()

    done = run_cli(physical.repo, "restore", broken.id[:12], "--to-dir", str(target))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgkloset: error: "), done.stderr
    assert physical.relation_file in lines[0] and "backup manifest" in lines[0]
    assert not target.exists() and not target.with_name("restored.partial").exists()

    report = run_drill(physical.kloset, broken, work_dir=pg_shared_dir)
    assert not report.passed
    assert physical.relation_file in (report.first_failure() or "")
    assert_clean(pg_shared_dir)


def test_physical_drill_interrupted_by_sigterm(physical: PhysicalSetup, pg_shared_dir: Path,
                                               tmp_path: Path) -> None:
    """The restored data directory and the server on it go, even on SIGTERM."""
    slow = tmp_path / "slow.sql"
    slow.write_text("SELECT true FROM pg_sleep(120)")
    proc = subprocess.Popen(
        [*CLI, "drill", physical.good.id, "--sql-check", str(slow), "--database", DB,
         "--work-dir", str(pg_shared_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(physical.repo),
        cwd=REPO_ROOT)
    try:
        lines = StderrLines(proc)
        lines.wait_for("running SQL check slow.sql")
        (base,) = [p for p in pg_shared_dir.iterdir() if p.name.startswith("pgkloset-drill-")]
        assert (base / "data" / "PG_VERSION").exists()
        assert postgres_pids_under(base), "no scratch server runs on the restored data"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = lines.text()
    assert code == 128 + signal.SIGTERM, stderr
    assert "pgkloset: error: drill interrupted by SIGTERM" in stderr
    assert not base.exists()
    assert_clean(pg_shared_dir)


def test_physical_needs_the_same_major(physical: PhysicalSetup, pg_shared_dir: Path) -> None:
    from pgkloset_core.postgres.binaries import pgserver_bin_dir

    bin16 = pgserver_bin_dir()
    if bin16 is None:
        pytest.skip("no PostgreSQL 16 binaries")
    with pytest.raises(DrillError, match="major version 15"):
        run_drill(physical.kloset, physical.good, work_dir=pg_shared_dir, bin_dir=bin16)
    assert_clean(pg_shared_dir)


def test_unknown_database_fails(physical: PhysicalSetup, pg_shared_dir: Path) -> None:
    report = run_drill(physical.kloset, physical.good, work_dir=pg_shared_dir, database="nope")
    assert not report.passed
    assert "database nope is not in the restored cluster" in (report.first_failure() or "")
    assert_clean(pg_shared_dir)
