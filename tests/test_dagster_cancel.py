"""Terminating a backup run stops pg_dump and commits no snapshot of the database."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_dagster import naming
from pgkloset_dagster.config import config_from_mapping
from pgkloset_dagster.definitions import build_definitions
from tests.test_dagster_support import (
    QUIET,
    dagster_home,
    kloset_entry,
    new_kloset,
    open_kloset,
    server_entry,
)

BIG = "dgcancel_big"


def _pg_dump_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"pg_dump .*dbname={BIG}"], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


def test_interrupted_run_kills_pg_dump_and_commits_nothing(
        pg15: LocalInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pg15.scalar(f"SELECT count(*) FROM pg_database WHERE datname = '{BIG}'"):
        pg15.execute(f"CREATE DATABASE {BIG}")
        pg15.execute("CREATE TABLE t AS SELECT g, md5(g::text) || md5((g + 1)::text) AS x "
                     "FROM generate_series(1, 2000000) g", BIG)
    new_kloset(tmp_path / "k")
    monkeypatch.setenv("PGKLOSET_T_PASS", "dagster-test-passphrase")
    monkeypatch.setenv("PGKLOSET_T_ALPHA", pg15.dsn("postgres"))
    defs = build_definitions(config_from_mapping({
        "klosets": {"main": kloset_entry(tmp_path / "k", "PGKLOSET_T_PASS")},
        "servers": {"alpha": server_entry("PGKLOSET_T_ALPHA", "main", [BIG])}}))
    job = defs.resolve_job_def(naming.backup_job_name("alpha"))
    seen: list[int] = []

    def interrupt_when_dumping() -> None:
        # Interrupt only once pg_dump runs, i.e. inside the op, as a run termination would.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not seen:
            seen.extend(_pg_dump_pids())
            time.sleep(0.05)
        if seen:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)

    with dg.DagsterInstance.from_config(str(dagster_home(tmp_path / "home"))) as instance:
        watcher = threading.Thread(target=interrupt_when_dumping, daemon=True)
        watcher.start()
        result = job.execute_in_process(instance=instance, raise_on_error=False,
                                        run_config=QUIET)
        watcher.join()
        assert seen, "pg_dump never started"
        assert not result.success
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
        assert any("run interrupted; stopping the tool, nothing is committed" in m
                   for m in messages)
    deadline = time.monotonic() + 10
    while _pg_dump_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pg_dump_pids() == []
    kinds = [(s.kind, s.meta.get("database")) for s in open_kloset(tmp_path / "k").snapshots()]
    assert ("logical", BIG) not in kinds
