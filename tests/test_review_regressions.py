"""Regressions found in review: secrets in messages, tracebacks, silent storage errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pgkloset_core.errors import KlosetError, UsageError
from pgkloset_core.kloset import locks
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.pgenv import ConnTarget
from pgkloset_core.storage.base import StorageError
from pgkloset_core.storage.fs import FilesystemBackend
from tests.fixtures.kloset import assert_one_line_error


def test_invalid_dsn_message_quotes_nothing_and_is_one_line() -> None:
    with pytest.raises(UsageError) as caught:
        ConnTarget.parse("host=db password=hunter2 secret-token")
    message = str(caught.value)
    assert "secret-token" not in message and "hunter2" not in message
    assert "\n" not in message and message.startswith("invalid connection string (")


def test_passphrase_file_that_is_not_text(lib_kloset, run_cli, tmp_path) -> None:
    bad = tmp_path / "pass.bin"
    bad.write_bytes(b"\xff\xfe\x00binary")
    proc = run_cli("snapshots", check=False,
                   env_extra={"PGKLOSET_PASSPHRASE": None,
                              "PGKLOSET_PASSPHRASE_FILE": str(bad)})
    assert_one_line_error(proc, "not UTF-8", exit_code=2)


def test_sql_check_file_that_is_not_text(tmp_path) -> None:
    from pgkloset_core.postgres.drill import DrillError, SqlCheck

    bad = tmp_path / "check.sql"
    bad.write_bytes(b"SELECT \xff\xfe")
    with pytest.raises(DrillError, match="not UTF-8"):
        SqlCheck.from_file(bad)


def test_drill_work_dir_that_cannot_be_created() -> None:
    from pgkloset_core.postgres.drill import DrillError, _make_work_dir

    with pytest.raises(DrillError, match="cannot create work directory"):
        _make_work_dir("/proc/pgkloset-no-such-dir/x", None)


@pytest.mark.parametrize("text, needle", [
    ("klosets: !foo bar\n", "constructor for the tag"),
    ("klosets:\n  a:\n    url: 2024-02-30\n", "day is out of range"),
    ("x: &a [*a]\n", "refers to itself"),
])
def test_config_yaml_errors_are_config_errors(text: str, needle: str) -> None:
    from pgkloset_dagster.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=needle):
        parse_config(text, source="pgkloset.yaml")


def test_unreadable_folder_is_not_an_empty_listing(tmp_path) -> None:
    """Prune must never mistake an unreadable snapshots/ for "no snapshots"."""
    backend = FilesystemBackend(tmp_path / "k")
    backend.write("snapshots/aa", b"x")
    backend.write("snapshots/sub/bb", b"y")
    (tmp_path / "k" / "snapshots" / "sub").chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that allow it
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is needed to drop root's read override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    script = (
        "from pgkloset_core.storage.fs import FilesystemBackend\n"
        "from pgkloset_core.storage.base import StorageError\n"
        f"b = FilesystemBackend({str(tmp_path / 'k')!r})\n"
        "try:\n"
        "    print(sorted(o.name for o in b.list('snapshots/')))\n"
        "except StorageError as exc:\n"
        "    print('StorageError', exc)\n"
    )
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True,
                              text=True, cwd=str(Path(__file__).parent.parent), timeout=60)
    finally:
        (tmp_path / "k" / "snapshots" / "sub").chmod(0o700)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("StorageError cannot list"), proc.stdout


class _LockReadFails(FilesystemBackend):
    """Lock objects can be listed but not read (a storage hiccup)."""

    def read(self, name: str) -> bytes:
        if name.startswith(locks.LOCKS_PREFIX):
            raise StorageError(f"cannot read {name}: I/O error")
        return super().read(name)


def test_unreadable_lock_blocks_an_exclusive_lock(tmp_path) -> None:
    from pgkloset_core.kloset.keys import KdfCost

    kl = Kloset.init(FilesystemBackend(tmp_path / "k"), "pw", kdf=KdfCost(1, 1024, 1))
    with kl.lock(exclusive=False, operation="backup"):
        flaky = _LockReadFails(tmp_path / "k")
        with pytest.raises(KlosetError):
            locks.acquire(flaky, kl.master, exclusive=True, operation="prune")
        assert len(list(kl.backend.list(locks.LOCKS_PREFIX))) == 1  # only the backup's lock


def test_physical_restore_into_unwritable_place(lib_kloset, run_cli) -> None:
    with lib_kloset.lock(exclusive=False, operation="backup") as lock, \
            lib_kloset.writer(kind="physical", meta={"pg_major": 15}, lock=lock) as w:
        w.add_bytes("PG_VERSION", b"15\n")
        snap = w.commit()
    proc = run_cli("restore", snap.id, "--to-dir", "/proc/pgkloset-nope", check=False)
    assert_one_line_error(proc, "cannot restore into /proc/pgkloset-nope")


def test_restore_spool_failure_leaves_no_temporary_dump(lib_kloset, tmp_path, monkeypatch) -> None:
    from pgkloset_core.postgres.restore_logical import _Archive

    with lib_kloset.lock(exclusive=False, operation="backup") as lock, \
            lib_kloset.writer(kind="logical", meta={"entry": "db.dump", "format": "custom"},
                              lock=lock) as w:
        w.add_bytes("db.dump", os.urandom(200_000))
        snap = w.commit()
    for obj in list(lib_kloset.backend.list("data/")):
        lib_kloset.backend.delete(obj.name)
    lib_kloset._index = None
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    # The spool is written when pg_restore first needs the dump (after any -l pass).
    with pytest.raises(KlosetError), _Archive(lib_kloset, snap, spool=True,
                                              progress=None) as archive:
        archive.run(["true"], dict(os.environ), what="pg_restore", log=None, cancel=None)
    assert list(spool.iterdir()) == []


def test_dsn_with_sslpassword_is_refused_before_any_tool_runs() -> None:
    from pgkloset_core.errors import UsageError
    from pgkloset_core.postgres.pgenv import ConnTarget

    with pytest.raises(UsageError) as info:
        ConnTarget.parse("host=db sslpassword=hunter2-ssl user=x")
    assert "hunter2-ssl" not in str(info.value)
    assert "\n" not in str(info.value)
