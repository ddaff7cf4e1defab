"""pgkloset.yaml: messages that name the key and line; broken servers do not stop the others."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest

from pgkloset_dagster.config import ConfigError, find_config_path, load_config, parse_config
from pgkloset_dagster.definitions import build_definitions
from tests.test_dagster_support import REPO_ROOT, VENV_BIN, dagster_home, subprocess_env

MIXED = """\
klosets:
  main:
    url: {kloset}
    passphrase_env: PGKLOSET_TEST_MAIN_PASS
  locked:
    url: {kloset}
    passphrase_env: PGKLOSET_TEST_UNSET_PASS
servers:
  good:
    dsn_env: PGKLOSET_TEST_GOOD_DSN
    kloset: main
    databases: [app, billing]
    schedule:
      logical: "0 2 * * *"
  typo:
    dsn_env: PGKLOSET_TEST_GOOD_DSN
    kloset: main
    databses: [app]
  nopass:
    dsn_env: PGKLOSET_TEST_GOOD_DSN
    kloset: locked
    databases: [app]
  down:
    dsn_env: PGKLOSET_TEST_DOWN_DSN
    kloset: main
    databases: all
"""


@pytest.fixture
def mixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PGKLOSET_TEST_MAIN_PASS", "x")
    monkeypatch.delenv("PGKLOSET_TEST_UNSET_PASS", raising=False)
    monkeypatch.setenv("PGKLOSET_TEST_GOOD_DSN", "host=127.0.0.1 port=1 dbname=postgres")
    # Nothing listens on port 1: the load must not fail, only warn.
    monkeypatch.setenv("PGKLOSET_TEST_DOWN_DSN", "host=127.0.0.1 port=1 user=postgres")
    path = tmp_path / "pgkloset.yaml"
    path.write_text(MIXED.format(kloset=tmp_path / "k"))
    return path


def test_typo_missing_passphrase_and_unreachable_server(mixed: Path) -> None:
    cfg = load_config(mixed)
    text = [str(p) for p in cfg.problems]
    typo = next(t for t in text if "databses" in t)
    assert f"{mixed}:18: servers.typo.databses: unknown key (did you mean 'databases'?)" in typo
    assert "server 'typo' skipped" in typo
    assert any("PGKLOSET_TEST_UNSET_PASS" in t and "kloset 'locked'" in t for t in text)
    defs = build_definitions(cfg)
    text = [str(p) for p in cfg.problems]
    down = next(t for t in text if "server 'down'" in t)
    assert "cannot be listed" in down and "pgkloset/down/_all" in down
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"pgkloset/good/app", "pgkloset/good/billing", "pgkloset/good/_globals",
            "pgkloset/nopass/app", "pgkloset/down/_all"} <= keys
    assert not any(k.startswith("pgkloset/typo/") for k in keys)
    assert "pgkloset/down/_cluster" in keys  # physical stays on by default
    app = dg.AssetKey(["pgkloset", "good", "app"])
    spec = defs.resolve_assets_def(app).specs_by_key[app]
    assert spec.group_name == "good"
    assert set(spec.kinds) == {"postgres", "pgkloset"}
    assert spec.freshness_policy is not None
    problems = defs.metadata["pgkloset/problems"].value
    assert any("databses" in p for p in problems)


def test_validate_reports_problems_and_loads(mixed: Path, tmp_path: Path) -> None:
    home = dagster_home(tmp_path / "home")
    env = subprocess_env(home, PGKLOSET_CONFIG=str(mixed), PGKLOSET_TEST_MAIN_PASS="x",
                         PGKLOSET_TEST_GOOD_DSN="host=127.0.0.1 port=1",
                         PGKLOSET_TEST_DOWN_DSN="host=127.0.0.1 port=1")
    proc = subprocess.run([str(VENV_BIN / "dagster"), "definitions", "validate", "-f",
                           str(REPO_ROOT / "definitions.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "servers.typo.databses: unknown key (did you mean 'databases'?)" in out
    assert "PGKLOSET_TEST_UNSET_PASS" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(("text", "expected"), [
    ("klosets:\n  main:\n    url: /x\n    passphrase_env: P\n  bad: [1\n", ":6: not valid YAML: expected ',' or ']'"),
    ("klosets:\n  a: {url: /x, passphrase_env: P}\n  a: {url: /y, passphrase_env: P}\n",
     ":3: key 'a' given twice (first on line 2)"),
    ("- just\n- a list\n", ":1: the file must be a mapping"),
])
def test_unusable_files_raise_one_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="p.yaml")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("server", "expected"), [
    ("dsn_env: D\nkloset: nope\ndatabases: [a]", "servers.s.kloset: no usable kloset named 'nope'"),
    ("dsn_env: 'not a name'\nkloset: k\ndatabases: [a]", "servers.s.dsn_env: 'not a name' is not"),
    ("dsn_env: D\nkloset: k\ndatabases: [a]\nschedule: {logical: '0 2 * *'}",
     "servers.s.schedule.logical: '0 2 * *' is not a valid cron expression"),
    ("dsn_env: D\nkloset: k\ndatabases: [a]\nretention: {keep_dayly: 3}",
     "unknown retention key 'keep_dayly'"),
    ("dsn_env: D\nkloset: k", "servers.s.databases: is required"),
    ("dsn_env: D\nkloset: k\ndatabases: [a]\ndrill: {sql_checks: [{name: x}]}",
     "servers.s.drill.sql_checks[0].sql: is required"),
])
def test_server_errors_name_key_and_line(server: str, expected: str) -> None:
    body = textwrap.indent(server, "    ")
    text = f"klosets:\n  k: {{url: /x, passphrase_env: P}}\nservers:\n  s:\n{body}\n"
    cfg = parse_config(text, source="p.yaml")
    assert "s" not in cfg.servers
    errors = [str(p) for p in cfg.problems if p.severity == "error"]
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith("p.yaml:")


def test_config_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGKLOSET_CONFIG", raising=False)
    assert find_config_path(tmp_path) is None
    (tmp_path / "pgkloset.yaml").write_text("klosets: {}\n")
    assert find_config_path(tmp_path) == tmp_path / "pgkloset.yaml"
    monkeypatch.setenv("PGKLOSET_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="PGKLOSET_CONFIG names .*missing.yaml"):
        find_config_path(tmp_path)


TWO_SERVERS = """\
klosets:
  main: {{url: {k1}, passphrase_env: PGKLOSET_T_PASS}}
  archive: {{url: {k2}, passphrase_env: PGKLOSET_T_PASS}}
servers:
  alpha:
    dsn_env: PGKLOSET_T_ALPHA
    kloset: main
    databases: [shop, crm]
    schedule: {{logical: "0 2 * * *", physical: "0 4 * * 0"}}
    retention: {{keep_daily: 7, keep_weekly: 4}}
    drill:
      sql_checks: [{{name: orders, database: shop, sql: "SELECT true"}}]
  beta:
    dsn_env: PGKLOSET_T_BETA
    kloset: archive
    databases: [metrics]
    freshness: {{fail: 2d, warn: 1d}}
"""


@pytest.mark.parametrize("variant", ["demo", "two-servers"])
def test_dagster_validate_and_dg_check(variant: str, tmp_path: Path) -> None:
    home = dagster_home(tmp_path / "home")
    extra = {}
    if variant == "two-servers":
        cfg = tmp_path / "two.yaml"
        cfg.write_text(TWO_SERVERS.format(k1=tmp_path / "k1", k2=tmp_path / "k2"))
        extra = {"PGKLOSET_CONFIG": str(cfg), "PGKLOSET_T_PASS": "x",
                 "PGKLOSET_T_ALPHA": "host=127.0.0.1 port=1",
                 "PGKLOSET_T_BETA": "host=127.0.0.1 port=1"}
    env = subprocess_env(home, **extra)
    validate = subprocess.run([str(VENV_BIN / "dagster"), "definitions", "validate", "-f",
                               str(REPO_ROOT / "definitions.py")], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "All code locations passed validation" in validate.stdout + validate.stderr
    project = REPO_ROOT / "deploy" / "dg"
    env["PYTHONPATH"] = f"{project}:{REPO_ROOT}"
    check = subprocess.run([str(VENV_BIN / "dg"), "check", "defs", "--use-active-venv"],
                           env=env, cwd=project, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    # What was loaded is what the config says.
    listing = subprocess.run([sys.executable, "-c", (
        "import definitions as d;"
        "print(sorted(k.to_user_string() for k in d.defs.resolve_all_asset_keys()));"
        "print(sorted(j.name for j in d.defs.jobs))")],
        env={**env, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    if variant == "demo":
        assert "pgkloset/demo/demo_shop" in listing.stdout
    else:
        for key in ("pgkloset/alpha/shop", "pgkloset/alpha/crm", "pgkloset/alpha/_cluster",
                    "pgkloset/beta/metrics", "pgkloset/beta/_globals"):
            assert key in listing.stdout
        for job in ("pgkloset_backup_alpha", "pgkloset_backup_alpha_physical",
                    "pgkloset_prune_main", "pgkloset_prune_archive", "pgkloset_drill_beta",
                    "pgkloset_restore"):
            assert job in listing.stdout


def test_pools_freshness_schedules_and_examples(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from dagster._core.instance.config import dagster_instance_config

    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(TWO_SERVERS.format(k1=tmp_path / "k1", k2=tmp_path / "k2"))
    monkeypatch.setenv("PGKLOSET_T_PASS", "x")
    defs = build_definitions(load_config(cfg_path))
    shop = dg.AssetKey(["pgkloset", "alpha", "shop"])
    assert defs.resolve_assets_def(shop).node_def.pool == "pgkloset_backup_alpha"
    cluster = dg.AssetKey(["pgkloset", "alpha", "_cluster"])
    assert defs.resolve_assets_def(cluster).node_def.pool == "pgkloset_physical_alpha"
    prune = defs.resolve_job_def("pgkloset_prune_main")
    assert [n.definition.pool for n in prune.graph.nodes] == ["pgkloset_prune_main"]
    # Daily backups: fresh for a day plus slack; beta's explicit windows win.
    alpha_policy = defs.resolve_assets_def(shop).specs_by_key[shop].freshness_policy
    assert alpha_policy.fail_window.to_timedelta() == timedelta(hours=30)
    metrics = dg.AssetKey(["pgkloset", "beta", "metrics"])
    beta_policy = defs.resolve_assets_def(metrics).specs_by_key[metrics].freshness_policy
    assert beta_policy.fail_window.to_timedelta() == timedelta(days=2)
    schedules = {s.name: s.cron_schedule for s in defs.schedules}
    assert schedules == {"pgkloset_backup_alpha_schedule": "0 2 * * *",
                         "pgkloset_backup_alpha_physical_schedule": "0 4 * * 0"}
    assert {s.name for s in defs.sensors} == {"pgkloset_drill_sensor", "pgkloset_prune_sensor"}
    # The shipped examples are valid.
    example = load_config(REPO_ROOT / "pgkloset.example.yaml")
    assert set(example.servers) == {"prod", "analytics"}
    assert not [p for p in example.problems if p.severity == "error"]
    deploy = tmp_path / "deploy-home"
    deploy.mkdir()
    (deploy / "dagster.yaml").write_text((REPO_ROOT / "deploy" / "dagster.yaml").read_text())
    instance_cfg, _ = dagster_instance_config(str(deploy))
    assert instance_cfg["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert instance_cfg["concurrency"]["pools"]["default_limit"] == 1
