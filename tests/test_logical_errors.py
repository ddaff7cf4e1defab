"""Expected failures of logical backups: one clear line, non-zero exit, nothing committed.

Also: --all/--exclude selection, the DSN from the environment, and the
non-superuser globals fallback (--no-role-passwords), on a password-protected
TCP server.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider
from tests.fixtures.logical_db import error_lines, make_kloset, run_cli, snapshots

PASSWORD = "s3cret:with\\odd chars"
HBA = ["host all all 127.0.0.1/32 scram-sha-256", "local all all trust"]


@pytest.fixture(scope="module")
def locked(pg_provider: LocalInstanceProvider) -> Iterator[LocalInstance]:
    """A server that wants a SCRAM password on TCP (tests use names of their own)."""
    with pg_provider.start(15, password=PASSWORD, hba_lines=HBA) as instance:
        instance.execute("CREATE DATABASE lg_a")
        instance.execute("CREATE DATABASE lg_b")
        instance.execute("CREATE TABLE t AS SELECT generate_series(1, 10) AS i", "lg_a")
        yield instance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_error(done: object) -> str:
    lines = error_lines(done)  # type: ignore[arg-type]
    assert done.returncode != 0  # type: ignore[attr-defined]
    assert len(lines) == 1, done.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in done.stderr  # type: ignore[attr-defined]
    return lines[0]


def test_unreachable_server(tmp_path: Path) -> None:
    make_kloset(tmp_path / "k")
    dsn = f"host=127.0.0.1 port={_free_port()} user=postgres dbname=postgres connect_timeout=5"
    line = _one_error(run_cli(tmp_path / "k", "backup", "logical", "--dsn", dsn,
                              "--database", "x"))
    assert "cannot connect" in line
    assert snapshots(tmp_path / "k") == []


def test_wrong_password_is_clear_and_not_echoed(locked: LocalInstance, tmp_path: Path) -> None:
    make_kloset(tmp_path / "k")
    done = run_cli(tmp_path / "k", "backup", "logical", "--database", "lg_a",
                   env={"PGKLOSET_DSN": locked.dsn("postgres", tcp=True, password="nope-pw")})
    line = _one_error(done)
    assert "password authentication failed" in line
    assert "nope-pw" not in done.stderr
    assert snapshots(tmp_path / "k") == []


def test_wrong_passphrase_while_the_server_is_fine(locked: LocalInstance,
                                                  tmp_path: Path) -> None:
    """The key unlocks in the background while the server is checked; its failure still
    stops the backup with one line, before any snapshot or pg_dump output is stored."""
    make_kloset(tmp_path / "k")
    before = sorted((tmp_path / "k").rglob("*"))
    done = run_cli(tmp_path / "k", "backup", "logical", "--database", "lg_a",
                   env={"PGKLOSET_DSN": locked.dsn("postgres", tcp=True),
                        "PGKLOSET_PASSPHRASE": "not it"})
    assert "wrong passphrase" in _one_error(done)
    assert sorted((tmp_path / "k").rglob("*")) == before  # no lock, pack or snapshot left


def test_missing_database(locked: LocalInstance, tmp_path: Path) -> None:
    make_kloset(tmp_path / "k")
    done = run_cli(tmp_path / "k", "backup", "logical", "--database", "lg_nope",
                   env={"PGKLOSET_DSN": locked.dsn("postgres", tcp=True)})
    assert "lg_nope does not exist" in _one_error(done)
    assert snapshots(tmp_path / "k") == []


def test_all_with_exclude_over_password_tcp(locked: LocalInstance, tmp_path: Path) -> None:
    make_kloset(tmp_path / "k")
    done = run_cli(tmp_path / "k", "backup", "logical", "--all", "--exclude", "lg_b",
                   "--server", "prod-1", "--json",
                   env={"PGKLOSET_DSN": locked.dsn("postgres", tcp=True)})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert sorted(str(r["database"]) for r in results) == ["None", "lg_a", "postgres"]
    snaps = snapshots(tmp_path / "k")
    assert {s.meta["server"] for s in snaps} == {"prod-1"}
    assert len({s.meta["run_id"] for s in snaps}) == 1
    assert all(PASSWORD not in json.dumps(s.to_json()) for s in snaps)
    a = next(s for s in snaps if s.meta.get("database") == "lg_a")
    assert a.meta["tables"] == {"public.t": 10}


def test_non_superuser_globals_fall_back_to_no_role_passwords(locked: LocalInstance,
                                                              tmp_path: Path) -> None:
    locked.execute("CREATE ROLE lg_app LOGIN PASSWORD 'app-pw'")
    locked.execute("CREATE DATABASE lg_app_db OWNER lg_app")
    locked.execute("CREATE TABLE t (i int); INSERT INTO t VALUES (1)", "lg_app_db")
    locked.execute("ALTER TABLE t OWNER TO lg_app", "lg_app_db")
    make_kloset(tmp_path / "k")
    done = run_cli(tmp_path / "k", "backup", "logical", "--database", "lg_app_db", env={
        "PGKLOSET_DSN": locked.dsn("postgres", tcp=True, user="lg_app", password="app-pw")})
    assert done.returncode == 0, done.stderr
    assert "--no-role-passwords" in done.stderr
    snaps = snapshots(tmp_path / "k")
    glob = next(s for s in snaps if s.kind == "globals")
    assert glob.meta["no_role_passwords"] is True
    db = next(s for s in snaps if s.kind == "logical")
    assert db.meta["tables"] == {"public.t": 1}


def test_restore_into_missing_database_without_create(locked: LocalInstance,
                                                      tmp_path: Path) -> None:
    repo = tmp_path / "k"
    make_kloset(repo)
    assert run_cli(repo, "backup", "logical", "--dsn", locked.dsn("postgres"), "--database",
                   "lg_a").returncode == 0
    line = _one_error(run_cli(repo, "restore", "latest", "--database", "lg_a", "--to",
                              locked.dsn("lg_new")))
    assert "does not exist" in line and "--create" in line


def test_failed_restore_drops_the_database_it_created(locked: LocalInstance,
                                                      pg16: LocalInstance,
                                                      tmp_path: Path) -> None:
    repo = tmp_path / "k"
    make_kloset(repo)
    locked.execute("CREATE EXTENSION hstore", "lg_a")
    assert run_cli(repo, "backup", "logical", "--dsn", locked.dsn("postgres"), "--database",
                   "lg_a").returncode == 0
    # Past pre-flight by force: CREATE EXTENSION hstore then fails inside pg_restore.
    done = run_cli(repo, "restore", "latest", "--database", "lg_a", "--create",
                   "--force-preflight", "--to", pg16.dsn("lg_forced"))
    line = _one_error(done)
    assert "pg_restore" in line and "hstore" in line and "dropped again" in line
    assert pg16.scalar("SELECT count(*) FROM pg_database WHERE datname = 'lg_forced'") == 0
