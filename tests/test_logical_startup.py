"""A logical backup starts its tools early, and stops them when anything before the dump fails.

pg_dump (and pg_dumpall) start as soon as the kloset is locked: their catalog
reads overlap reading the previous dump's chunk list and writing the globals
snapshot, instead of waiting for them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import pgkloset_core.postgres.logical as logical
from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_core.postgres.pgenv import ToolFailed, ToolProcess
from tests.fixtures.logical_db import error_lines, make_kloset, run_cli

DB = "lg_startup"
ROWS = 100_000  # a few MB of dump: more than a pipe holds, so pg_dump waits for us


@pytest.fixture(scope="module")
def startup_db(pg15: LocalInstance) -> str:
    pg15.execute(f"DROP DATABASE IF EXISTS {DB}")
    pg15.execute(f"CREATE DATABASE {DB}")
    pg15.execute("CREATE TABLE rows AS SELECT i, md5(i::text) AS t "
                 f"FROM generate_series(1, {ROWS}) i", DB)
    return DB


def _spy_tools(monkeypatch: pytest.MonkeyPatch) -> list[ToolProcess]:
    """Every tool backup_logical starts, in order (the real ToolProcess runs)."""
    started: list[ToolProcess] = []

    class Recorded(ToolProcess):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(logical, "ToolProcess", Recorded)
    return started


def test_pg_dump_runs_while_the_chunk_list_is_read(
        pg15: LocalInstance, startup_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    kloset = make_kloset(tmp_path / "k")
    logical.backup_logical(kloset, pg15.dsn("postgres"), [startup_db])  # a previous dump
    started = _spy_tools(monkeypatch)
    seen: list[tuple[str, bool]] = []
    real_previous = logical.previous_dumps

    def previous(*args: Any) -> Any:
        seen.extend((t.what, t.proc.poll() is None) for t in started)
        return real_previous(*args)

    monkeypatch.setattr(logical, "previous_dumps", previous)
    results = logical.backup_logical(kloset, pg15.dsn("postgres"), [startup_db])
    assert [what for what, _ in seen] == ["pg_dump", "pg_dumpall"]
    assert seen[0] == ("pg_dump", True)  # running, blocked on the pipe until we read
    assert [r.kind for r in results] == ["globals", "logical"]
    assert results[1].total_rows == ROWS
    assert all(t.proc.poll() is not None for t in started)


def _failing_pg_dumpall(pg15: LocalInstance, tmp_path: Path) -> Path:
    """A bin dir of the real client tools, except a pg_dumpall that fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = pg15.binaries.bin_dir
    for name in ("pg_dump", "pg_restore", "psql"):
        os.symlink(real / name, bin_dir / name)
    fake = bin_dir / "pg_dumpall"
    fake.write_text("#!/bin/sh\necho 'pg_dumpall: error: role lookup failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    return bin_dir


def test_failing_globals_stop_the_early_pg_dump_and_commit_nothing(
        pg15: LocalInstance, startup_db: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = _failing_pg_dumpall(pg15, tmp_path)
    kloset = make_kloset(tmp_path / "k")
    started = _spy_tools(monkeypatch)
    with pytest.raises(ToolFailed, match="pg_dumpall exited with code 1: .*role lookup failed"):
        logical.backup_logical(kloset, pg15.dsn("postgres"), [startup_db], bin_dir=str(bin_dir))
    dump = next(t for t in started if t.what == "pg_dump")
    assert dump.proc.poll() is not None  # killed, not left blocked on its pipe
    assert kloset.snapshots() == []
    assert _sessions_on(pg15, startup_db) == 0  # the exported snapshot's session is closed too


def _sessions_on(pg15: LocalInstance, db: str, settle: float = 10.0) -> int:
    """Backends on ``db``, waiting a little: a backend leaves once it notices its client went."""
    deadline = time.monotonic() + settle
    while True:
        count = int(pg15.scalar(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"))
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def test_failing_globals_are_one_line_on_the_cli(pg15: LocalInstance, startup_db: str,
                                                 tmp_path: Path) -> None:
    bin_dir = _failing_pg_dumpall(pg15, tmp_path)
    make_kloset(tmp_path / "k")
    done = run_cli(tmp_path / "k", "backup", "logical", "--database", startup_db,
                   "--bin-dir", str(bin_dir), env={"PGKLOSET_DSN": pg15.dsn("postgres")})
    assert done.returncode != 0
    assert error_lines(done) == [
        "pgkloset: error: pg_dumpall exited with code 1: pg_dumpall: error: role lookup failed"]
    assert "Traceback" not in done.stderr
