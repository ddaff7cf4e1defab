"""The backup, sensor and drill flow with Dagster's own storage in PostgreSQL (dagster-postgres)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from tests.test_dagster_flow import run_backup_sensor_drill_flow, world  # noqa: F401
from tests.test_dagster_support import dagster_home

STORAGE_PASSWORD = "dagster-storage-pw"


def test_flow_with_postgres_instance_storage(world: dict[str, Any],  # noqa: F811
                                             pg_factory: Any, tmp_path: Path) -> None:
    storage = pg_factory(15, password=STORAGE_PASSWORD, tcp=True)
    storage.execute("CREATE DATABASE dagster")
    home = dagster_home(tmp_path / "pg-home", f"""\
storage:
  postgres:
    postgres_db:
      username: {storage.superuser}
      password:
        env: PGKLOSET_T_DAGSTER_PW
      hostname: {storage.tcp_host}
      port: {storage.port}
      db_name: dagster
      scheme: postgresql+psycopg2
""")
    import os

    os.environ["PGKLOSET_T_DAGSTER_PW"] = STORAGE_PASSWORD
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            run_backup_sensor_drill_flow(world["defs"], instance, world)
    finally:
        os.environ.pop("PGKLOSET_T_DAGSTER_PW", None)
    # The evidence is in PostgreSQL: runs, materializations and check evaluations.
    assert storage.scalar("SELECT count(*) FROM runs", "dagster") >= 10
    assert storage.scalar("SELECT count(*) FROM event_logs WHERE dagster_event_type = "
                          "'ASSET_MATERIALIZATION'", "dagster") >= 6
    assert storage.scalar("SELECT count(*) FROM asset_check_executions", "dagster") >= 6
