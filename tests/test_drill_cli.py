"""`pgkloset drill` as a real subprocess: reports, exit codes, and cleanup on signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkloset_core.postgres.instance import LocalInstance, can_isolate_network
from pgkloset_core.postgres.logical import backup_logical
from tests.test_drill_support import (
    CLI,
    REPO_ROOT,
    StderrLines,
    assert_clean,
    cli_env,
    new_kloset,
    port_free,
    run_cli,
)

DB = "drill_cli_src"


@pytest.fixture(scope="module")
def repo(pg15: LocalInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A kloset with a logical snapshot of DB (and its globals), then a stream snapshot."""
    pg15.execute(f"DROP DATABASE IF EXISTS {DB}")
    pg15.execute(f"CREATE DATABASE {DB}")
    pg15.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint);"
                 "INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, 1500) g", DB)
    path = tmp_path_factory.mktemp("drill-cli") / "k"
    kloset = new_kloset(path)
    backup_logical(kloset, pg15.dsn(DB), [DB])
    with kloset.writer(kind="stream") as writer:  # newer, but nothing a drill can restore
        writer.add_bytes("notes.txt", b"not a database")
        writer.commit()
    yield path
    pg15.execute(f"DROP DATABASE IF EXISTS {DB}")


def sql_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_cli_drill_passes(repo: Path, pg_shared_dir: Path) -> None:
    done = run_cli(repo, "drill", "latest", "--work-dir", str(pg_shared_dir))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ok   rows public.accounts: expected 1500, got 1500" in out
    assert "restore drill_cli_src" in out and "result: PASSED" in out
    isolation = "network isolated" if can_isolate_network() else "NOT network isolated"
    assert f"{isolation}" in out and "restore: " in out and "read;" in out
    assert_clean(pg_shared_dir)


def test_cli_drill_json(repo: Path, pg_shared_dir: Path, tmp_path: Path) -> None:
    check = sql_file(tmp_path, "rich.sql", "SELECT sum(balance) > 1000 FROM accounts")
    done = run_cli(repo, "drill", "latest", "--json", "--sql-check", str(check),
                   "--work-dir", str(pg_shared_dir))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["passed"] is True and doc["kind"] == "logical" and doc["database"] == DB
    assert doc["isolated"] == can_isolate_network()
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["rows public.accounts"]["actual"] == 1500
    assert checks["sql rich.sql"]["passed"] is True
    assert doc["restore_seconds"] > 0 and doc["bytes_read"] > 0
    assert_clean(pg_shared_dir)


def test_cli_drill_fails_with_exit_4(repo: Path, pg_shared_dir: Path, tmp_path: Path) -> None:
    check = sql_file(tmp_path, "no_accounts.sql", "SELECT NOT EXISTS (SELECT FROM accounts)")
    done = run_cli(repo, "drill", "latest", "--sql-check", str(check),
                   "--work-dir", str(pg_shared_dir))
    assert done.returncode == 4, done.stderr
    assert "FAIL sql no_accounts.sql: returned False" in done.stdout
    assert "result: FAILED" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "pgkloset: error: drill failed: sql no_accounts.sql: returned False, "
        "expected a single true")
    assert "Traceback" not in done.stderr
    assert_clean(pg_shared_dir)


def test_cli_drill_of_unknown_snapshot(repo: Path, pg_shared_dir: Path) -> None:
    done = run_cli(repo, "drill", "ffffffff", "--work-dir", str(pg_shared_dir))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "pgkloset: error: no snapshot matches 'ffffffff'"
    done = run_cli(repo, "drill", "latest", "--database", "nope", "--work-dir", str(pg_shared_dir))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "pgkloset: error: no logical or physical snapshot of database 'nope' to drill")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("signum, isolate", [(signal.SIGINT, True), (signal.SIGTERM, False),
                                             (signal.SIGTERM, True)])
def test_cli_drill_interrupted_cleans_up(repo: Path, pg_shared_dir: Path, tmp_path: Path,
                                         signum: int, isolate: bool) -> None:
    """A signal in the middle of a drill leaves no process, directory, socket or port."""
    slow = sql_file(tmp_path, "slow.sql", "SELECT true FROM pg_sleep(120)")
    args = ["drill", "latest", "--sql-check", str(slow), "--work-dir", str(pg_shared_dir)]
    if not isolate:
        args.append("--no-isolate")
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(repo), cwd=REPO_ROOT)
    try:
        lines = StderrLines(proc)
        started = lines.wait_for("scratch PostgreSQL")
        lines.wait_for("running SQL check slow.sql")
        base = [p for p in pg_shared_dir.iterdir() if p.name.startswith("pgkloset-drill-")]
        assert len(base) == 1
        socket_dirs = list(base[0].glob("pgkloset-pg-*/sock"))
        assert socket_dirs, "the scratch instance's socket directory was not where expected"
        time.sleep(0.5)  # let the query reach pg_sleep
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = lines.text()
    assert code == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert f"pgkloset: error: drill interrupted by {name}" in stderr
    assert "Traceback" not in stderr
    assert not base[0].exists(), "the drill's base directory was left behind"
    assert not socket_dirs[0].exists()
    assert_clean(pg_shared_dir)
    if not isolate:
        port = int(started.rsplit("port ", 1)[1].rstrip(")"))
        assert port_free(port), f"port {port} is still in use"
