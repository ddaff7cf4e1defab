"""Helpers for the Dagster tests: a quiet Dagster home, klosets, configs, subprocess env."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from pgkloset_core.kloset.keys import KdfCost
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PASSPHRASE = "dagster-test-passphrase"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def dagster_home(path: Path, extra: str = "") -> Path:
    """A DAGSTER_HOME with telemetry off (plus any extra dagster.yaml text)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + extra)
    return path


def new_kloset(path: Path) -> Kloset:
    return Kloset.init(open_backend(str(path)), PASSPHRASE, kdf=KdfCost(1, 1024, 1))


def open_kloset(path: Path) -> Kloset:
    return Kloset.open(open_backend(str(path)), PASSPHRASE)


def server_entry(dsn_env: str, kloset: str, databases: Any, **extra: Any) -> dict[str, Any]:
    return {"dsn_env": dsn_env, "kloset": kloset, "databases": databases,
            "schedule": {"logical": "0 2 * * *"}, "retention": {"keep_last": 2},
            "physical": {"enabled": False}, **extra}


def kloset_entry(url: Path, env: str) -> dict[str, Any]:
    return {"url": str(url), "passphrase_env": env, "lock_wait": 30, "prune": {"grace": 0}}


def subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGKLOSET", "DAGSTER_HOME"))}
    env.update(DAGSTER_HOME=str(home), PYTHONPATH=str(REPO_ROOT),
               PATH=f"{VENV_BIN}:{env.get('PATH', '')}", **extra)
    return env


def check_results(instance: dg.DagsterInstance, key: dg.AssetKey,
                  name: str = "restore_drill") -> list[tuple[bool, dict[str, Any]]]:
    """(passed, metadata) of every evaluation of the check, newest first."""
    out = []
    records = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(key, name), limit=100)
    for rec in records:
        ev = rec.event.dagster_event if rec.event else None
        data = ev.event_specific_data if ev is not None else None
        if data is not None and hasattr(data, "passed"):
            out.append((data.passed, {k: getattr(v, "value", v)
                                      for k, v in data.metadata.items()}))
    return out


def materializations(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[dict[str, Any]]:
    """Metadata of every materialization of ``key``, oldest first."""
    records = instance.fetch_materializations(key, limit=100, ascending=True).records
    return [dict(r.asset_materialization.metadata) for r in records
            if r.asset_materialization is not None]
