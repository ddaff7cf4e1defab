"""The embedded demo: a throwaway PostgreSQL with sample databases, a local kloset, Dagster.

``python -m pgkloset_dagster.demo`` (``make demo``) runs everything in-process
against a temporary Dagster instance: backs up every snapshot asset twice
(the second time after a small change, to show deduplication), lets the
sensors start the restore drills and the prune, and prints a summary.

``python -m pgkloset_dagster.demo ui`` (``make ui``) keeps state under
``.pgkloset-demo/`` in the project directory: it starts the demo cluster, runs
one backup + drill so there is something to look at, then runs ``dagster dev``
on ``definitions.py`` (which, with no pgkloset.yaml, builds this same demo)
until interrupted. The cluster lives only as long as this command.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg

from pgkloset_dagster import naming
from pgkloset_dagster.config import PgKlosetConfig, config_from_mapping

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEMO_DIR_ENV = "PGKLOSET_DEMO_DIR"
DSN_ENV = "PGKLOSET_DEMO_DSN"
PASSPHRASE_ENV = "PGKLOSET_DEMO_PASSPHRASE"
KLOSET_ENV = "PGKLOSET_DEMO_KLOSET"
DEMO_PASSPHRASE = "demo passphrase, never use in production"
DATABASES = ("demo_shop", "demo_metrics")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def demo_dir() -> Path:
    return Path(os.environ.get(DEMO_DIR_ENV) or PROJECT_DIR / ".pgkloset-demo")


def demo_config() -> PgKlosetConfig:
    """The embedded default: one server, two databases, one local kloset."""
    kloset = os.environ.get(KLOSET_ENV) or str(demo_dir() / "kloset")
    return config_from_mapping({
        "klosets": {"demo": {"url": kloset, "passphrase_env": PASSPHRASE_ENV,
                             "create_if_missing": True, "prune": {"grace": 0}}},
        "servers": {"demo": {
            "dsn_env": DSN_ENV, "kloset": "demo", "databases": list(DATABASES),
            "schedule": {"logical": "0 * * * *"},
            "retention": {"keep_last": 3, "keep_daily": 7},
            "drill": {"sql_checks": [{"name": "orders_present", "database": "demo_shop",
                                      "sql": "SELECT count(*) >= 500 FROM orders"}]},
            "physical": {"enabled": False},
        }},
    }, source="<embedded demo>")


SHOP_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers(id),
                     amount numeric(10,2), placed timestamptz DEFAULT now());
CREATE INDEX ON orders (customer_id);
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com'
  FROM generate_series(1, 100) g;
INSERT INTO orders SELECT g, 1 + g % 100, (g * 7 % 1000) / 3.0,
  now() - g * interval '1 hour' FROM generate_series(1, 500) g;
"""
METRICS_SQL = """
CREATE TABLE measurements (ts timestamptz, sensor int, value double precision);
INSERT INTO measurements SELECT now() - g * interval '1 second', g % 10, sin(g)
  FROM generate_series(1, 50000) g;
"""


def start_cluster() -> Any:
    """A scratch PostgreSQL 15 with the two demo databases."""
    from pgkloset_core.postgres.instance import LocalInstanceProvider

    instance = LocalInstanceProvider().start(15)
    for db, sql in (("demo_shop", SHOP_SQL), ("demo_metrics", METRICS_SQL)):
        instance.execute(f"CREATE DATABASE {db}")
        instance.execute(sql, db)
    return instance


def write_dagster_home(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    yaml_path = home / "dagster.yaml"
    if not yaml_path.exists():
        yaml_path.write_text("telemetry:\n  enabled: false\n")
    return home


def run_flow(defs: dg.Definitions, instance: dg.DagsterInstance, *,
             before_second: Any = None, rounds: int = 2) -> dict[str, Any]:
    """Backups (``rounds`` times), then one sensor tick each for drills and prune."""
    from pgkloset_dagster.flow import evaluate_sensor, execute_requests

    backup = defs.resolve_job_def(naming.backup_job_name("demo"))
    print(f"backing up {', '.join(DATABASES)} and globals through Dagster "
          f"({rounds} run{'s' if rounds > 1 else ''})...", flush=True)
    for i in range(rounds):
        if i == 1 and before_second is not None:
            before_second()
        result = backup.execute_in_process(instance=instance, raise_on_error=False,
                                           run_config=QUIET)
        if not result.success:
            raise SystemExit(f"demo backup failed: {_failure(result)}")
    drills, _ = evaluate_sensor(defs, "pgkloset_drill_sensor", instance)
    print(f"drill sensor: {len(drills)} restore drill(s) requested; running them...", flush=True)
    drill_results = execute_requests(defs, drills, instance, log_level="WARNING")
    prunes, _ = evaluate_sensor(defs, "pgkloset_prune_sensor", instance)
    prune_results = execute_requests(defs, prunes, instance, log_level="WARNING")
    return {"drills": drills, "drill_results": drill_results, "prunes": prunes,
            "prune_results": prune_results}


def _failure(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            return event.step_failure_data.error.message.strip() if \
                event.step_failure_data.error else "step failed"
    return "run failed"


def summary(instance: dg.DagsterInstance, flow: dict[str, Any]) -> str:
    lines = ["", "snapshot assets (latest materialization):"]
    for db in ("_globals", *DATABASES):
        key = dg.AssetKey(["pgkloset", "demo", db])
        ev = instance.get_latest_materialization_event(key)
        if ev is None or ev.asset_materialization is None:
            lines.append(f"  {key.to_user_string():28} (none)")
            continue
        md = {k: getattr(v, "value", v) for k, v in ev.asset_materialization.metadata.items()}
        rows = f", {md['total_rows']} rows in {md['table_count']} tables" \
            if "total_rows" in md else ""
        lines.append(f"  {key.to_user_string():28} {md['snapshot_id'][:12]}  "
                     f"{md['logical_bytes'] / 1024:8.1f} KiB dumped, "
                     f"{md['new_stored_bytes'] / 1024:7.1f} KiB new, "
                     f"dedup x{md['dedup_ratio']:.1f}, {md['seconds']:.2f} s{rows}")
    lines.append(f"restore drills started by the sensor: {len(flow['drills'])}")
    for db in DATABASES:
        key = dg.AssetKey(["pgkloset", "demo", db])
        rec = instance.event_log_storage.get_asset_check_execution_history(
            naming.drill_check_key(key), limit=len(flow["drills"]) or 1)
        for r in rec:
            ev = r.event.dagster_event if r.event else None
            data = ev.event_specific_data if ev is not None else None
            if data is None or not hasattr(data, "passed"):
                continue
            md = {k: getattr(v, "value", v) for k, v in data.metadata.items()}
            lines.append(f"  {key.to_user_string():28} drill {md.get('snapshot_id', '')[:12]} "
                         f"{'passed' if data.passed else 'FAILED'} "
                         f"(restore {md.get('restore_seconds', 0):.2f} s, "
                         f"{md.get('checks_passed', 0)} checks passed)")
    ok = sum(1 for r in flow["prune_results"] if r.success)
    lines.append(f"prune runs started by the sensor: {len(flow['prunes'])} ({ok} succeeded)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import warnings

    from dagster._utils.warnings import BetaWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    parser = argparse.ArgumentParser(prog="python -m pgkloset_dagster.demo")
    sub = parser.add_subparsers(dest="cmd")
    ui = sub.add_parser("ui", help="run dagster dev on the demo")
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if args.cmd == "ui":
        return run_ui(args.host, args.port)
    return run_demo()


def run_demo() -> int:
    from pgkloset_dagster.definitions import build_definitions

    with tempfile.TemporaryDirectory(prefix="pgkloset-dagster-demo-") as tmp:
        os.environ[DSN_ENV] = ""
        os.environ[PASSPHRASE_ENV] = DEMO_PASSPHRASE
        os.environ[KLOSET_ENV] = str(Path(tmp) / "kloset")
        home = write_dagster_home(Path(tmp) / "dagster_home")
        print(f"demo: scratch PostgreSQL 15, kloset {os.environ[KLOSET_ENV]}", flush=True)
        cluster = start_cluster()
        try:
            os.environ[DSN_ENV] = cluster.dsn("postgres")
            defs = build_definitions(demo_config())
            with dg.DagsterInstance.from_config(str(home)) as instance:
                flow = run_flow(defs, instance, before_second=lambda: cluster.execute(
                    "INSERT INTO orders SELECT 1000 + g, 1, 9.99 FROM generate_series(1, 5) g",
                    "demo_shop"))
                print(summary(instance, flow))
                failed = [r for r in flow["drill_results"] if not r.success] + \
                    [r for r in flow["prune_results"] if not r.success]
        finally:
            cluster.stop()
    print("\nthe demo's kloset, cluster and Dagster instance were temporary and are removed.")
    print("to look at it in the Dagster UI: make ui  (python -m pgkloset_dagster.demo ui), "
          "then open http://127.0.0.1:3000")
    return 1 if failed else 0


def run_ui(host: str, port: int) -> int:
    from pgkloset_dagster.definitions import build_definitions

    base = demo_dir()
    base.mkdir(parents=True, exist_ok=True)
    home = write_dagster_home(Path(os.environ.get("DAGSTER_HOME") or base / "dagster_home"))
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault(PASSPHRASE_ENV, DEMO_PASSPHRASE)
    os.environ.setdefault(KLOSET_ENV, str(base / "kloset"))
    cluster = start_cluster()
    try:
        os.environ[DSN_ENV] = cluster.dsn("postgres")
        defs = build_definitions(demo_config())
        with dg.DagsterInstance.get() as instance:
            flow = run_flow(defs, instance, rounds=1)
            print(summary(instance, flow), flush=True)
        env = {k: v for k, v in os.environ.items() if k != "PGKLOSET_CONFIG"}
        print(f"\nDagster UI: http://{host}:{port}  (Ctrl-C stops it and the demo cluster)",
              flush=True)
        child = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-f", str(PROJECT_DIR / "definitions.py"),
             "-h", host, "-p", str(port)], cwd=str(base), env=env)

        def stop(signum: int, _frame: Any) -> None:
            child.send_signal(signal.SIGINT)

        signal.signal(signal.SIGTERM, stop)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            return child.wait()
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
