"""Deduplication of repeated dumps, and what happens when pg_dump dies or is cancelled.

The database is a few tens of MB (generate_series + md5 text), so the stored
ratios mean something; it lives on the shared 15 server under its own name.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pgkloset_core.errors import KlosetError
from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_core.postgres.logical import BackupCancelled, backup_logical
from pgkloset_core.postgres.pgenv import ToolFailed
from tests.fixtures.logical_db import make_kloset
from tests.fixtures.pg import PG_TEST_PASSWORD

DB = "lg_bulk"
ROWS = 250_000


@pytest.fixture(scope="module")
def bulk(pg15: LocalInstance) -> LocalInstance:
    pg15.execute(f"CREATE DATABASE {DB}")
    pg15.execute(f"""
        CREATE TABLE readings (id bigint PRIMARY KEY, sensor int, note text, val float8);
        INSERT INTO readings SELECT i, i % 97, md5(i::text) || md5((i * 7)::text),
            (i % 1000) / 3.0 FROM generate_series(1, {ROWS}) i;
        CREATE TABLE tags (id int PRIMARY KEY, label text);
        INSERT INTO tags SELECT i, md5(i::text) FROM generate_series(1, 5000) i;
    """, DB)
    return pg15


def _logical(results: list[Any]) -> Any:
    return next(r for r in results if r.kind == "logical")


def test_repeated_backups_deduplicate(bulk: LocalInstance, tmp_path: Path) -> None:
    kloset = make_kloset(tmp_path / "k")
    first = _logical(backup_logical(kloset, bulk.dsn("postgres"), [DB]))
    assert first.logical_bytes > 20 * 2**20
    assert first.row_counts == {"public.readings": ROWS, "public.tags": 5000}
    second = _logical(backup_logical(kloset, bulk.dsn("postgres"), [DB]))
    assert second.stored_bytes < 0.02 * first.stored_bytes, (second, first)
    bulk.execute(f"""INSERT INTO readings SELECT i, i % 97, md5(i::text) || md5((i * 7)::text),
        0 FROM generate_series({ROWS + 1}, {ROWS + ROWS // 100}) i""", DB)
    try:
        third = _logical(backup_logical(kloset, bulk.dsn("postgres"), [DB]))
    finally:
        bulk.execute(f"DELETE FROM readings WHERE id > {ROWS}", DB)
    assert third.row_counts["public.readings"] == ROWS + ROWS // 100
    assert third.stored_bytes < 0.10 * first.stored_bytes, (third, first)


def _pg_dump_children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == me and cmd.split(b"\0")[0].endswith(b"/pg_dump"):
            found.append(int(entry.name))
    return found


def test_password_never_in_child_argv_or_meta(bulk: LocalInstance, tmp_path: Path) -> None:
    kloset = make_kloset(tmp_path / "k")
    seen: list[bytes] = []

    def watch(_n: int) -> None:
        for pid in _pg_dump_children():
            try:
                seen.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                pass

    dsn = bulk.dsn("postgres", tcp=True)
    assert PG_TEST_PASSWORD in dsn
    results = backup_logical(kloset, dsn, [DB], progress=watch)
    assert any(b"--snapshot=" in c for c in seen)  # we really looked at the running pg_dump
    assert not any(PG_TEST_PASSWORD.encode() in c for c in seen)
    for r in results:
        assert PG_TEST_PASSWORD not in json.dumps(kloset.resolve(r.snapshot_id).to_json())


def test_cancel_kills_pg_dump_and_commits_nothing(bulk: LocalInstance, tmp_path: Path) -> None:
    kloset = make_kloset(tmp_path / "k")
    cancel = threading.Event()
    running: list[int] = []

    def stop_during_dump(_n: int) -> None:
        if not running:
            running.extend(_pg_dump_children())
        if running:
            cancel.set()

    with pytest.raises(BackupCancelled):
        backup_logical(kloset, bulk.dsn("postgres"), [DB], cancel=cancel,
                       progress=stop_during_dump)
    assert running  # pg_dump was running when we cancelled
    assert [s for s in kloset.snapshots() if s.kind == "logical"] == []
    assert _pg_dump_children() == []


def test_killed_connection_fails_with_stderr(bulk: LocalInstance, tmp_path: Path) -> None:
    kloset = make_kloset(tmp_path / "k")
    killed: list[bool] = []

    def kill_backend(_n: int) -> None:
        if not killed and _pg_dump_children():
            killed.append(bool(bulk.scalar(
                "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'pg_dump'")))

    with pytest.raises(ToolFailed) as info:
        backup_logical(kloset, bulk.dsn("postgres"), [DB], progress=kill_backend)
    assert killed == [True]
    message = str(info.value)
    assert "pg_dump exited with code 1" in message and "pg_dump:" in message
    assert "\n" not in message and isinstance(info.value, KlosetError)
    assert [s for s in kloset.snapshots() if s.kind == "logical"] == []
