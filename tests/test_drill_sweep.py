"""A SIGKILLed drill leaves its work directory behind; the next drill sweeps it away."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkloset_core.postgres.drill import postgres_pids_under
from pgkloset_core.postgres.instance import LocalInstance, sweep_stale
from pgkloset_core.postgres.logical import backup_logical
from tests.test_drill_support import (
    CLI,
    REPO_ROOT,
    StderrLines,
    assert_clean,
    cli_env,
    new_kloset,
    run_cli,
)

DB = "drill_sweep_src"


@pytest.fixture(scope="module")
def repo(pg15: LocalInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    pg15.execute(f"DROP DATABASE IF EXISTS {DB}")
    pg15.execute(f"CREATE DATABASE {DB}")
    pg15.execute("CREATE TABLE items (id int PRIMARY KEY, label text);"
                 "INSERT INTO items SELECT g, 'i' || g FROM generate_series(1, 500) g", DB)
    path = tmp_path_factory.mktemp("drill-sweep") / "k"
    backup_logical(new_kloset(path), pg15.dsn(DB), [DB])
    yield path
    pg15.execute(f"DROP DATABASE IF EXISTS {DB}")


def _wait_no_postgres(path: Path, seconds: float = 30.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (pids := postgres_pids_under(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def _killed_drill(repo: Path, work: Path, tmp_path: Path) -> Path:
    """Start a drill, check a sweep spares it while it runs, SIGKILL it; its work dir."""
    slow = tmp_path / "slow.sql"
    slow.write_text("SELECT true FROM pg_sleep(120)")
    proc = subprocess.Popen([*CLI, "drill", "latest", "--sql-check", str(slow),
                             "--work-dir", str(work)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(repo), cwd=REPO_ROOT)
    try:
        lines = StderrLines(proc)
        lines.wait_for("running SQL check slow.sql")
        [drill_dir] = [p for p in work.iterdir() if p.name.startswith("pgkloset-drill-")]
        assert postgres_pids_under(drill_dir), "the scratch server should be running"
        assert sweep_stale(work) == []  # a live drill's directory is not touched
        assert drill_dir.exists()
        proc.kill()
        assert proc.wait(timeout=30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The postmaster gets its parent-death signal; nothing runs on, but files stay.
    assert _wait_no_postgres(drill_dir) == [], "postgres outlived the killed drill"
    assert drill_dir.exists() and list(drill_dir.glob("pgkloset-pg-*/data"))
    return drill_dir


def test_next_drill_sweeps_a_killed_drills_directory(repo: Path, pg_shared_dir: Path,
                                                     tmp_path: Path) -> None:
    stale = _killed_drill(repo, pg_shared_dir, tmp_path)
    done = run_cli(repo, "drill", "latest", "--work-dir", str(pg_shared_dir))
    assert done.returncode == 0, done.stderr
    assert f"drill: removed {stale}, left by a process that died" in done.stderr
    assert "result: PASSED" in done.stdout
    assert not stale.exists()
    assert_clean(pg_shared_dir)


def test_sweep_stale_removes_a_killed_drills_directory(repo: Path, pg_shared_dir: Path,
                                                       tmp_path: Path) -> None:
    stale = _killed_drill(repo, pg_shared_dir, tmp_path)
    assert sweep_stale(pg_shared_dir) == [stale]
    assert not stale.exists()
    assert sweep_stale(pg_shared_dir) == []
    assert_clean(pg_shared_dir)
