"""Physical backups and restores against real PostgreSQL 15 clusters.

One source cluster (pgbench data) is shared by the module; restored clusters
run on a free port and are stopped by the test that started them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgkloset_core.kloset.keys import KdfCost
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.binaries import PgBinaries, pgserver_bin_dir
from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider
from pgkloset_core.postgres.pgenv import BackupCancelled
from pgkloset_core.postgres.physical import (
    CLUSTER_DATABASE,
    PhysicalRestoreError,
    backup_physical,
    restore_physical,
)
from pgkloset_core.storage import open_backend

PASSPHRASE = "physical-test-pw"
REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pgkloset_core.cli"]


def new_kloset(path: Path) -> Kloset:
    return Kloset.init(open_backend(str(path)), PASSPHRASE, kdf=KdfCost(1, 1024, 1))


def cli_env(repo: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGKLOSET_REPO=str(repo), PGKLOSET_PASSPHRASE=PASSPHRASE,
               PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_ctl_stop(bins: PgBinaries, data_dir: Path) -> None:
    subprocess.run([str(bins.path("pg_ctl")), "-D", str(data_dir), "-m", "immediate", "stop"],
                   capture_output=True, user="postgres", timeout=60, cwd="/")


def pgbench_invariant(conn_args: list[str], bins: PgBinaries) -> list[str]:
    """Every pgbench transaction adds the same delta to all four tables."""
    sql = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
           "(SELECT sum(bbalance) FROM pgbench_branches), "
           "(SELECT sum(tbalance) FROM pgbench_tellers), "
           "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
    out = subprocess.run([str(bins.path("psql")), *conn_args, "-X", "-A", "-t", "-c", sql],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("|")


@dataclass
class Source:
    instance: LocalInstance
    kloset: Kloset
    repo: Path
    snapshot_id: str  # a backup of the idle cluster (pgbench data, marker row)


@pytest.fixture(scope="module")
def source(pg_provider: LocalInstanceProvider,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    with pg_provider.start(15, wal_level="replica", max_wal_senders=4,
                           hba_lines=["local replication all trust"]) as inst:
        subprocess.run([str(inst.binaries.path("pgbench")), "-i", "-s", "3", "-q"],
                       env=inst.env("postgres"), check=True, capture_output=True)
        inst.execute("CREATE TABLE marker (note text); INSERT INTO marker VALUES ('before')")
        repo = tmp_path_factory.mktemp("physical") / "k"
        kloset = new_kloset(repo)
        snap = backup_physical(kloset, inst.dsn(), fast_checkpoint=True, tags=["base"])
        yield Source(inst, kloset, repo, snap.snapshot_id)


def test_backup_under_pgbench_restores_consistent_cluster(source: Source,
                                                          pg_shared_dir: Path) -> None:
    inst = source.instance
    inst.execute("INSERT INTO marker VALUES ('committed before backup')")
    bench = subprocess.Popen([str(inst.binaries.path("pgbench")), "-c", "2", "-T", "60", "-n"],
                             env=inst.env("postgres"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        assert bench.poll() is None, "pgbench should be writing during the backup"
        before = inst.scalar("SELECT count(*) FROM pgbench_history")
        lines: list[str] = []
        result = backup_physical(source.kloset, inst.dsn(), fast_checkpoint=True,
                                 server="bench", log=lines.append)
        assert inst.scalar("SELECT count(*) FROM pgbench_history") > before  # it did write
    finally:
        bench.terminate()
        bench.wait(timeout=30)
    assert result.file_count > 900 and result.pg_version.startswith("15.")
    assert any("write-ahead log end point" in ln for ln in lines)
    snap = source.kloset.resolve(result.snapshot_id)
    assert snap.kind == "physical" and snap.meta["server"] == "bench"
    assert snap.entry("backup_manifest") is not None
    assert any(e.name.startswith("pg_wal/0000") for e in snap.entries)  # WAL is inside

    target = pg_shared_dir / "restored"
    port = free_port()
    restored = restore_physical(source.kloset, snap, to_dir=str(target), start=True, port=port)
    bins = PgBinaries.from_dir(restored.binaries, tool="postgres")
    try:
        assert restored.verified and restored.started and restored.port == port
        assert (target.stat().st_mode & 0o777) == 0o700
        assert target.stat().st_uid == inst.user.uid  # owned by the postgres OS user
        assert ((target / "global" / "pg_control").stat().st_mode & 0o777) == 0o600
        conn = ["-h", str(restored.socket_dir), "-p", str(port), "-U", "postgres",
                "-d", "postgres"]
        notes = subprocess.run([str(bins.path("psql")), *conn, "-X", "-A", "-t", "-c",
                                "SELECT pg_is_in_recovery(), string_agg(note, ',' ORDER BY note)"
                                " FROM marker"], capture_output=True, text=True, check=True)
        assert notes.stdout.strip() == "f|before,committed before backup"
        sums = pgbench_invariant(conn, bins)
        assert len(set(sums)) == 1, f"pgbench balances disagree after restore: {sums}"
        amcheck = subprocess.run([str(bins.path("pg_amcheck")), *conn[:6], "--all",
                                  "--install-missing", "--heapallindexed"],
                                 capture_output=True, text=True, timeout=300)
        assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
    finally:
        pg_ctl_stop(bins, target)


def test_snapshot_records_cluster_facts(source: Source) -> None:
    snap = source.kloset.resolve(source.snapshot_id)
    meta = snap.meta
    inst = source.instance
    assert meta["database"] == CLUSTER_DATABASE
    assert meta["pg_major"] == 15 and meta["pg_version_file"] == "15"
    assert meta["system_identifier"] == str(
        inst.scalar("SELECT system_identifier FROM pg_control_system()"))
    assert meta["timeline"] == 1
    assert meta["start_lsn"] and meta["stop_lsn"]
    assert inst.scalar(f"SELECT '{meta['stop_lsn']}'::pg_lsn >= '{meta['start_lsn']}'::pg_lsn")
    assert "START WAL LOCATION: " + meta["start_lsn"] in meta["backup_label"]
    assert meta["total_bytes"] == snap.logical_bytes > 0
    assert meta["file_count"] == sum(1 for e in snap.entries if e.type == "file")
    assert meta["pg_basebackup_version"].startswith("15.")
    assert meta["data_checksums"] is False
    assert "base" in snap.tags
    dirs = {e.name for e in snap.entries if e.type == "dir"}
    assert {"base", "global", "pg_wal"} <= dirs
    assert all(not e.name.startswith(("/", "./")) for e in snap.entries)


def test_second_backup_of_unchanged_cluster_stores_little(source: Source,
                                                          tmp_path: Path) -> None:
    kloset = new_kloset(tmp_path / "k")
    source.instance.execute("CHECKPOINT")
    first = backup_physical(kloset, source.instance.dsn(), fast_checkpoint=True)
    source.instance.execute("CHECKPOINT")
    second = backup_physical(kloset, source.instance.dsn(), fast_checkpoint=True)
    assert first.stored_bytes > 1_000_000
    assert second.logical_bytes >= first.logical_bytes * 0.9
    assert second.stored_bytes < first.stored_bytes * 0.05, (first, second)


def test_cli_backup_physical_json(source: Source) -> None:
    done = subprocess.run([*CLI, "backup", "physical", "--tag", "cli", "--fast-checkpoint",
                           "--server", "clisrv", "--json"], capture_output=True, text=True,
                          env=cli_env(source.repo, PGKLOSET_DSN=source.instance.dsn()),
                          cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["file_count"] > 900 and out["pg_version"].startswith("15.")
    snap = source.kloset.resolve(out["snapshot_id"])
    assert snap.tags == ["cli"] and snap.meta["server"] == "clisrv"
    assert snap.meta["system_identifier"] == out["system_identifier"]


def test_restore_with_other_major_is_refused_before_writing(source: Source,
                                                            tmp_path: Path) -> None:
    bin16 = pgserver_bin_dir()
    if bin16 is None:
        pytest.skip("the pgserver wheel (PostgreSQL 16) is not installed")
    target = tmp_path / "data"
    with pytest.raises(PhysicalRestoreError) as err:
        restore_physical(source.kloset, source.snapshot_id, to_dir=str(target),
                         pg_bin=str(bin16))
    message = str(err.value)
    assert "PostgreSQL 15 cluster" in message and "PostgreSQL 16." in message
    assert "\n" not in message
    assert not target.exists() and not (tmp_path / "data.partial").exists()


def test_restore_refuses_non_empty_directory_unless_forced(source: Source,
                                                           tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious").write_text("keep me")
    with pytest.raises(PhysicalRestoreError, match="not empty.*--force"):
        restore_physical(source.kloset, source.snapshot_id, to_dir=str(target))
    assert (target / "precious").read_text() == "keep me"
    result = restore_physical(source.kloset, source.snapshot_id, to_dir=str(target), force=True)
    assert result.verified and not (target / "precious").exists()
    assert (target / "PG_VERSION").read_text().strip() == "15"
    assert not (tmp_path / "data.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the old copy is gone


def test_restore_failing_midway_leaves_nothing(source: Source, tmp_path: Path) -> None:
    written = 0

    def failing(n: int) -> None:
        nonlocal written
        written += n
        if written > 3_000_000:
            raise OSError(28, "No space left on device (injected)")

    target = tmp_path / "data"
    with pytest.raises(OSError, match="injected"):
        restore_physical(source.kloset, source.snapshot_id, to_dir=str(target),
                         progress=failing)
    assert written > 3_000_000
    assert not target.exists() and not (tmp_path / "data.partial").exists()


KILL_SCRIPT = """
import pathlib, sys, time
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend
from pgkloset_core.postgres.physical import restore_physical
repo, snap, to_dir, flag = sys.argv[1:5]
seen = 0
def progress(n):
    global seen
    seen += n
    if seen > 3_000_000 and not pathlib.Path(flag).exists():
        pathlib.Path(flag).write_text(str(seen))
        time.sleep(300)
restore_physical(Kloset.open(open_backend(repo), sys.argv[5]), snap, to_dir=to_dir,
                 progress=progress)
"""


def test_restore_killed_midway_leaves_no_valid_cluster(source: Source, tmp_path: Path) -> None:
    target = tmp_path / "data"
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(source.repo),
                             source.snapshot_id, str(target), str(flag), PASSPHRASE],
                            cwd=REPO_ROOT, env=cli_env(source.repo))
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, "the restore ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    partial = tmp_path / "data.partial"
    assert not target.exists()
    written = [p for p in partial.rglob("*") if p.is_file()]
    assert len(written) > 10  # it was really midway
    assert not (partial / "PG_VERSION").exists()
    # A later restore clears the leftover only when asked to.
    with pytest.raises(PhysicalRestoreError, match="interrupted restore"):
        restore_physical(source.kloset, source.snapshot_id, to_dir=str(target))
    restore_physical(source.kloset, source.snapshot_id, to_dir=str(target), force=True)
    assert (target / "PG_VERSION").exists() and not partial.exists()


def test_cancel_stops_backup_without_snapshot(source: Source, tmp_path: Path) -> None:
    kloset = new_kloset(tmp_path / "k")
    cancel = threading.Event()
    moved = 0

    def progress(n: int) -> None:
        nonlocal moved
        moved += n
        if moved > 1_000_000:
            cancel.set()

    with pytest.raises(BackupCancelled):
        backup_physical(kloset, source.instance.dsn(), fast_checkpoint=True, cancel=cancel,
                        progress=progress)
    assert kloset.snapshots() == []
    deadline = time.monotonic() + 30  # the server's walsender goes away with pg_basebackup
    while source.instance.scalar("SELECT count(*) FROM pg_stat_replication"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_bin_dir_of_other_major_is_refused(source: Source) -> None:
    bin16 = pgserver_bin_dir()
    if bin16 is None:
        pytest.skip("the pgserver wheel (PostgreSQL 16) is not installed")
    done = subprocess.run([*CLI, "backup", "physical", "--bin-dir", str(bin16)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env=cli_env(source.repo, PGKLOSET_DSN=source.instance.dsn()))
    assert done.returncode == 1
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("pgkloset: error: the server runs PostgreSQL 15")
    assert "16." in line and "must match" in line


def run_cli(source: Source, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, env=cli_env(source.repo))


def test_cli_restore_starts_cluster(source: Source, pg_shared_dir: Path) -> None:
    target = pg_shared_dir / "cli-restored"
    port = free_port()
    done = run_cli(source, "restore", source.snapshot_id[:12], "--to-dir", str(target),
                   "--start", "--port", str(port), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    bins = PgBinaries.from_dir(out["binaries"], tool="postgres")
    try:
        assert out["verified"] and out["started"] and out["port"] == port
        rows = subprocess.run([str(bins.path("psql")), "-h", out["socket_dir"], "-p", str(port),
                               "-U", "postgres", "-X", "-A", "-t", "-c",
                               "SELECT pg_is_in_recovery(), count(*) FROM pgbench_accounts"],
                              capture_output=True, text=True, check=True)
        assert rows.stdout.strip() == "f|300000"
    finally:
        pg_ctl_stop(bins, target)


def test_cli_restore_refusals_are_one_line(source: Source, tmp_path: Path) -> None:
    bin16 = pgserver_bin_dir()
    target = tmp_path / "data"
    if bin16 is not None:
        done = run_cli(source, "restore", source.snapshot_id, "--to-dir", str(target),
                       "--pg-bin", str(bin16))
        assert done.returncode == 1
        line = done.stderr.strip()
        assert "\n" not in line and line.startswith("pgkloset: error: ")
        assert "PostgreSQL 15 cluster" in line and "PostgreSQL 16." in line
        assert list(tmp_path.iterdir()) == []  # nothing written
    target.mkdir()
    (target / "x").write_text("x")
    done = run_cli(source, "restore", source.snapshot_id, "--to-dir", str(target))
    assert done.returncode == 1
    assert done.stderr.strip().startswith("pgkloset: error: ") and "--force" in done.stderr
    assert "\n" not in done.stderr.strip()
    assert sorted(p.name for p in target.iterdir()) == ["x"]
