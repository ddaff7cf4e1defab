"""Scratch instances: real servers start, answer SQL and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

from pgkloset_core.postgres.binaries import find_binaries, pgserver_bin_dir
from pgkloset_core.postgres.instance import (
    InstanceError,
    LocalInstance,
    LocalInstanceProvider,
    can_isolate_network,
    net_namespace,
    sweep_stale,
)
from tests.fixtures.pg import PG_TEST_PASSWORD, PgFactory


def _alive(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here may never reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_dead(pid: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_pg15_answers_sql(pg15: LocalInstance) -> None:
    assert pg15.major == 15
    assert str(pg15.scalar("SHOW server_version")).startswith("15.")
    pg15.execute("CREATE TABLE IF NOT EXISTS t_instance_smoke (n int);"
                 "INSERT INTO t_instance_smoke SELECT generate_series(1, 10)")
    assert pg15.scalar("SELECT count(*) >= 10 FROM t_instance_smoke") is True
    assert pg15.psql("SELECT 6 * 7").strip() == "42"
    assert pg15.scalar("SHOW fsync") == "off"
    assert pg15.scalar("SHOW wal_level") == "replica"


def test_pg16_answers_sql(pg16: LocalInstance) -> None:
    assert pg16.major == 16
    assert str(pg16.scalar("SHOW server_version")).startswith("16.")
    assert pg16.psql("SELECT current_user").strip() == "postgres"


def test_private_socket_dir(pg15: LocalInstance) -> None:
    st = pg15.socket_dir.stat()
    assert st.st_mode & 0o077 == 0
    assert st.st_uid == pg15.user.uid
    if os.geteuid() == 0:
        assert pg15.user.name == "postgres"
        assert (pg15.data_dir / "PG_VERSION").stat().st_uid == pg15.user.uid


def test_tcp_needs_the_password(pg15: LocalInstance) -> None:
    assert pg15.tcp_host == "127.0.0.1"
    with psycopg.connect(pg15.dsn(tcp=True)) as conn:
        assert conn.execute("SELECT inet_server_addr()::text").fetchone() == ("127.0.0.1/32",)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg15.dsn(tcp=True, password="wrong"))
    assert pg15.password == PG_TEST_PASSWORD
    assert pg15.env()["PGPASSWORD"] == PG_TEST_PASSWORD


def test_options_role_and_hba(pg_factory: PgFactory) -> None:
    inst = pg_factory(15, tcp=True, wal_level="logical", max_wal_senders=4,
                      settings={"work_mem": "8MB", "log_min_messages": "warning"},
                      hba_lines=["host all app 127.0.0.1/32 md5"])
    assert inst.scalar("SHOW wal_level") == "logical"
    assert inst.scalar("SHOW max_wal_senders") == "4"
    assert inst.scalar("SHOW work_mem") == "8MB"
    inst.execute("SET password_encryption = 'md5'; CREATE ROLE app LOGIN PASSWORD 's3cret'")
    with psycopg.connect(inst.dsn(tcp=True, user="app", password="s3cret")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    # No superuser password was set: the superuser cannot log in over TCP.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(inst.dsn(tcp=True), connect_timeout=5)


def test_socket_only_instance(pg_factory: PgFactory) -> None:
    inst = pg_factory(15, tcp=False)
    assert inst.tcp_host is None
    assert inst.scalar("SHOW listen_addresses") == ""
    with pytest.raises(InstanceError, match="no TCP"):
        inst.dsn(tcp=True)


@pytest.mark.parametrize("major", [15, 16])
def test_stop_leaves_nothing(pg_provider: LocalInstanceProvider, major: int) -> None:
    if major == 16 and pgserver_bin_dir() is None:
        pytest.skip("pgserver wheel not installed")
    inst = pg_provider.start(major)
    pid = inst.pid
    assert pid is not None
    pidfile_pid = int((inst.data_dir / "postmaster.pid").read_text().split()[0])
    assert pidfile_pid == pid and _alive(pid)
    dirs = [inst.base, inst.data_dir, inst.socket_dir]
    with inst.connect() as conn:  # an open backend must not keep anything alive
        conn.execute("SELECT 1")
        inst.stop()
    assert not _alive(pid)
    assert not any(d.exists() for d in dirs)
    inst.stop()  # idempotent


def test_context_manager_stops_on_error(pg_provider: LocalInstanceProvider) -> None:
    with pytest.raises(ZeroDivisionError), pg_provider.start(15) as inst:
        pid, base = inst.pid, inst.base
        _ = 1 / 0
    assert pid is not None and not _alive(pid)
    assert not base.exists()


def test_network_isolation(pg_factory: PgFactory) -> None:
    inst = pg_factory(15, isolate_network=True)
    assert inst.tcp_host is None
    assert inst.scalar("SELECT 1") == 1  # the unix socket crosses namespaces
    assert inst.isolated is can_isolate_network()
    if not can_isolate_network():
        pytest.skip("unshare --net is not permitted here; fell back to isolated=False")
    assert net_namespace(inst.pid) != net_namespace()
    with pytest.raises(InstanceError, match="unix socket"):
        pg_factory(15, isolate_network=True, tcp=True)


def test_not_isolated_by_default(pg15: LocalInstance) -> None:
    assert pg15.isolated is False
    assert net_namespace(pg15.pid) == net_namespace()


CHILD = textwrap.dedent("""
    import json, sys, time
    from pgkloset_core.postgres.instance import start_instance
    inst = start_instance(15, base_dir=sys.argv[1])
    print(json.dumps({"pid": inst.pid, "base": str(inst.base)}), flush=True)
    time.sleep(300)
""")


def _spawn_child(base_dir: Path) -> tuple[subprocess.Popen[str], int, Path]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(base_dir)],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    assert child.stdout is not None
    facts = json.loads(child.stdout.readline())
    assert _alive(facts["pid"])
    return child, facts["pid"], Path(facts["base"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_cleans_up(pg_shared_dir: Path, signum: int) -> None:
    child, pid, base = _spawn_child(pg_shared_dir)
    child.send_signal(signum)
    assert child.wait(timeout=60) == -signum  # the previous handler still runs
    assert _wait_dead(pid)
    assert not base.exists()


def test_sigkilled_parent_takes_the_server_along(pg_shared_dir: Path) -> None:
    child, pid, base = _spawn_child(pg_shared_dir)
    child.kill()
    child.wait(timeout=30)
    assert _wait_dead(pid), "the postmaster should get its parent-death signal"
    assert base.exists()  # nobody was left to delete it...
    assert sweep_stale(pg_shared_dir) == [base]  # ...until the next run sweeps it
    assert not base.exists()


def test_restored_data_dir_starts_and_is_kept(pg15: LocalInstance,
                                              pg_provider: LocalInstanceProvider,
                                              pg_shared_dir: Path) -> None:
    pg15.execute("CREATE TABLE IF NOT EXISTS t_basebackup (v text);"
                 "TRUNCATE t_basebackup; INSERT INTO t_basebackup VALUES ('kept')")
    target = pg_shared_dir / "restored"
    subprocess.run([str(pg15.binaries.path("pg_basebackup")), "-D", str(target), "-X", "stream",
                    "-c", "fast"], env=pg15.env(), check=True, capture_output=True)
    inst = pg_provider.start_existing_data_dir(target, tcp=False)
    try:
        assert inst.scalar("SELECT v FROM t_basebackup") == "kept"
        assert inst.data_dir == target.resolve()
    finally:
        inst.stop()
    assert target.joinpath("PG_VERSION").exists()  # a restored data dir is not ours to delete
    assert not inst.base.exists()
    if pgserver_bin_dir() is not None:
        with pytest.raises(InstanceError, match="PostgreSQL 15 cluster"):
            pg_provider.start_existing_data_dir(target, 16)


@pytest.mark.skipif(os.geteuid() != 0 or pgserver_bin_dir() is None,
                    reason="needs root and the pgserver wheel")
def test_binaries_the_postgres_user_cannot_reach_are_copied(pg_shared_dir: Path) -> None:
    hidden = pg_shared_dir / "hidden"
    hidden.mkdir(mode=0o700)
    wheel = find_binaries(exact_major=16, tool="postgres")
    package = wheel.install_root.parent  # site-packages/pgserver, next to pgserver.libs
    shutil.copytree(package, hidden / package.name, symlinks=True)
    shutil.copytree(package.parent / f"{package.name}.libs", hidden / f"{package.name}.libs")
    copy = find_binaries(exact_major=16, tool="psql",
                         bin_dir=hidden / package.name / "pginstall" / "bin")
    cache = pg_shared_dir / "cache"
    provider = LocalInstanceProvider(binaries_cache=cache)
    with provider.start(copy, tcp=False) as inst:
        assert inst.binaries.bin_dir.is_relative_to(cache)
        assert str(inst.scalar("SHOW server_version")).startswith("16.")
