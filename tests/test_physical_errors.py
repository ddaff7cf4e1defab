"""Privilege and setting problems: one clear line saying what to change.

Each case is shown twice against a real cluster: the SQL pre-check of
`backup_physical`, and pg_basebackup's own error output mapped by
`explain_basebackup_failure` (for when a setting changes between the two).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_core.postgres.physical import (
    PhysicalBackupError,
    backup_physical,
    explain_basebackup_failure,
)
from tests.test_physical_backup import CLI, REPO_ROOT, cli_env, new_kloset


def raw_basebackup_stderr(inst: LocalInstance, user: str | None = None) -> str:
    env = inst.env("postgres")
    if user:
        env["PGUSER"] = user
    done = subprocess.run([str(inst.binaries.path("pg_basebackup")), "-D", "-", "-Ft",
                           "-X", "fetch", "-w", "-c", "fast"], capture_output=True, env=env,
                          timeout=120)
    assert done.returncode != 0
    return done.stderr.decode("utf-8", "replace")


def refused(kloset: Kloset, dsn: str) -> str:
    with pytest.raises(PhysicalBackupError) as err:
        backup_physical(kloset, dsn)
    message = str(err.value)
    assert "\n" not in message
    assert kloset.snapshots() == []
    return message


def test_role_without_replication_privilege(pg15: LocalInstance, tmp_path: Path) -> None:
    role = f"norepl_{uuid.uuid4().hex[:8]}"
    pg15.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOREPLICATION")
    try:
        message = refused(new_kloset(tmp_path / "k"), pg15.dsn(user=role))
        assert f"role {role} lacks the REPLICATION privilege" in message
        assert f"ALTER ROLE {role} REPLICATION" in message
        explained = explain_basebackup_failure(raw_basebackup_stderr(pg15, role))
        assert explained is not None and "REPLICATION privilege" in explained
    finally:
        pg15.execute(f"DROP ROLE {role}")


def test_max_wal_senders_zero(pg_factory: Callable[..., LocalInstance], tmp_path: Path) -> None:
    inst = pg_factory(15, wal_level="replica", max_wal_senders=0)
    message = refused(new_kloset(tmp_path / "k"), inst.dsn())
    assert message.startswith("max_wal_senders is 0") and "restart" in message
    explained = explain_basebackup_failure(raw_basebackup_stderr(inst))
    assert explained is not None and explained.startswith("max_wal_senders is 0")
    # The CLI says the same in one line, without a traceback.
    done = subprocess.run([*CLI, "backup", "physical", "--dsn", inst.dsn()],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env=cli_env(tmp_path / "k"))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"pgkloset: error: {message}"]


def test_wal_level_minimal(pg_factory: Callable[..., LocalInstance], tmp_path: Path) -> None:
    inst = pg_factory(15, wal_level="minimal", max_wal_senders=0)
    message = refused(new_kloset(tmp_path / "k"), inst.dsn())
    assert message.startswith("wal_level is minimal") and "wal_level = replica" in message
    # pg_basebackup itself trips over max_wal_senders = 0 first (minimal requires it).
    explained = explain_basebackup_failure(raw_basebackup_stderr(inst))
    assert explained is not None and "max_wal_senders" in explained


def test_all_wal_senders_busy(pg_factory: Callable[..., LocalInstance], tmp_path: Path) -> None:
    inst = pg_factory(15, wal_level="replica", max_wal_senders=1)
    waldir = tmp_path / "wal"
    waldir.mkdir()
    receiver = subprocess.Popen([str(inst.binaries.path("pg_receivewal")), "-D", str(waldir),
                                 "-w", "-n"], env=inst.env("postgres"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while inst.scalar("SELECT count(*) FROM pg_stat_replication") < 1:
            assert receiver.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        message = refused(new_kloset(tmp_path / "k"), inst.dsn())
        assert message.startswith("no free WAL sender slot: 1 of 1 (max_wal_senders)")
        assert "raise max_wal_senders" in message
        explained = explain_basebackup_failure(raw_basebackup_stderr(inst))
        assert explained is not None and explained.startswith("no free WAL sender slot")
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)


def test_extra_tablespace_is_refused(pg_factory: Callable[..., LocalInstance],
                                     pg_shared_dir: Path, tmp_path: Path) -> None:
    inst = pg_factory(15, wal_level="replica", max_wal_senders=2)
    location = pg_shared_dir / "ts"
    location.mkdir()
    os.chown(location, inst.user.uid, inst.user.gid)
    inst.execute(f"CREATE TABLESPACE extra LOCATION '{location}'")
    message = refused(new_kloset(tmp_path / "k"), inst.dsn())
    assert "1 tablespace(s)" in message and "single tablespace" in message
    explained = explain_basebackup_failure(raw_basebackup_stderr(inst))
    assert explained is not None and "single tablespace" in explained


def basebackup_cmdlines() -> list[str]:
    """argv of every pg_basebackup running now (read while it runs)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"pg_basebackup"):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def test_password_never_reaches_argv(pg15: LocalInstance, tmp_path: Path) -> None:
    """A DSN with a password over TCP: pg_basebackup gets it from a passfile."""
    from tests.fixtures.pg import PG_TEST_PASSWORD

    kloset = new_kloset(tmp_path / "k")
    seen: list[str] = []
    cmdlines: list[str] = []

    def log(line: str) -> None:
        seen.append(line)
        cmdlines.extend(basebackup_cmdlines())

    dsn = pg15.dsn(tcp=True)
    assert PG_TEST_PASSWORD in dsn
    result = backup_physical(kloset, dsn, log=log, fast_checkpoint=True)
    snap = kloset.resolve(result.snapshot_id)
    assert cmdlines and all("-D - -Ft" in c for c in cmdlines)
    assert not any(PG_TEST_PASSWORD in c for c in cmdlines)
    assert PG_TEST_PASSWORD not in repr(snap.meta) and PG_TEST_PASSWORD not in "".join(seen)
    assert snap.meta["server"].startswith("127.0.0.1:")
