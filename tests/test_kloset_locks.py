"""Locks: shared locks coexist, exclusive ones conflict, dead holders are stale,
and a writer whose lock is lost does not commit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from pgkloset_core.errors import LockError
from pgkloset_core.kloset import locks
from tests.fixtures.kloset import (
    PASSPHRASE,
    REPO_ROOT,
    assert_one_line_error,
    object_names,
)


def snapshot_count(run_cli) -> int:
    return len(json.loads(run_cli("snapshots", "--json").stdout))


def test_shared_locks_coexist(lib_kloset, run_cli) -> None:
    with lib_kloset.lock(exclusive=False, operation="backup") as one, \
            lib_kloset.lock(exclusive=False, operation="restore") as two:
        assert one.name != two.name
        infos = locks.read_locks(lib_kloset.backend, lib_kloset.master)
        assert {i.name for i in infos} == {one.name, two.name}
        # a CLI backup (shared) and check (shared) run alongside
        run_cli("backup", "stream", "--name", "s", input=b"while shared locks are held")
        run_cli("check")
    assert object_names(lib_kloset.backend, "locks/") == []


def test_exclusive_lock_conflicts(lib_kloset, run_cli) -> None:
    with lib_kloset.lock(exclusive=True, operation="prune"):
        proc = run_cli("backup", "stream", "--name", "s", input=b"x", check=False)
        assert_one_line_error(proc, "kloset is locked", "exclusive lock by prune", "--lock-wait")
        with pytest.raises(LockError):
            lib_kloset.lock(exclusive=False, operation="backup")
        with pytest.raises(LockError):
            lib_kloset.lock(exclusive=True, operation="prune")
    assert snapshot_count(run_cli) == 0
    with lib_kloset.lock(exclusive=False, operation="backup"):
        proc = run_cli("forget", "latest", check=False)
        assert_one_line_error(proc, "kloset is locked", "shared lock by backup")
    # A refused lock leaves no lock object of its own behind.
    assert object_names(lib_kloset.backend, "locks/") == []


def test_lock_wait_waits_then_succeeds(lib_kloset, run_cli, popen_cli, tmp_path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"waited for the lock")
    lock = lib_kloset.lock(exclusive=True, operation="prune")
    start = time.monotonic()
    with open(data, "rb") as stdin:
        proc = popen_cli("--lock-wait", "60s", "backup", "stream", "--name", "s", stdin=stdin,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2.0)
    assert proc.poll() is None, "the backup should be waiting for the exclusive lock"
    lock.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert time.monotonic() - start >= 2.0
    assert run_cli("cat", out.decode().strip()).stdout == b"waited for the lock"


def test_lock_wait_gives_up(lib_kloset, run_cli) -> None:
    with lib_kloset.lock(exclusive=True, operation="prune"):
        start = time.monotonic()
        proc = run_cli("--lock-wait", "1.5s", "backup", "stream", "--name", "s", input=b"x", check=False)
        assert time.monotonic() - start >= 1.5
        assert_one_line_error(proc, "kloset is locked")


HOLD_LOCK = r"""
import sys
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend
kloset = Kloset.open(open_backend(sys.argv[1]), sys.argv[2])
lock = kloset.lock(exclusive=True, operation="prune")
print(lock.name, flush=True)
sys.stdin.read()  # hold it until killed
"""


def test_lock_of_a_dead_process_is_stale(lib_kloset, run_cli, kloset_url) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, kloset_url, PASSPHRASE],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT)
    name = holder.stdout.readline().decode().strip()
    assert object_names(lib_kloset.backend, "locks/") == [name]
    # alive: it blocks a backup, and unlock (without --force) leaves it alone
    assert run_cli("backup", "stream", "--name", "s", input=b"x", check=False).returncode == 1
    assert b"no stale locks" in run_cli("unlock").stderr
    assert object_names(lib_kloset.backend, "locks/") == [name]

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (info,) = locks.read_locks(lib_kloset.backend, lib_kloset.master)
    assert info.pid == holder.pid and info.is_stale(locks.LockTiming())
    # stale: it no longer blocks anyone
    run_cli("backup", "stream", "--name", "s", input=b"after the holder died")
    proc = run_cli("unlock")
    assert b"removed exclusive lock by prune" in proc.stdout
    assert f"pid {holder.pid}".encode() in proc.stdout
    assert object_names(lib_kloset.backend, "locks/") == []


def test_lock_not_refreshed_for_too_long_is_stale(lib_kloset) -> None:
    timing = locks.LockTiming(refresh_interval=0.1, stale_after=0.3)
    lock = locks.acquire(lib_kloset.backend, lib_kloset.master, exclusive=True, operation="prune",
                         timing=timing)
    lock._stop.set()  # stop refreshing, as a hung or partitioned process would
    time.sleep(0.5)
    (info,) = locks.read_locks(lib_kloset.backend, lib_kloset.master)
    assert info.is_stale(timing)
    fresh = locks.acquire(lib_kloset.backend, lib_kloset.master, exclusive=True, operation="prune",
                          timing=timing)
    with pytest.raises(LockError, match="not refreshed"):
        lock.ensure_valid()
    fresh.release()
    lock.release()


def test_unlock_force_removes_live_locks(lib_kloset, run_cli) -> None:
    lock = lib_kloset.lock(exclusive=False, operation="backup")
    proc = run_cli("unlock", "--force")
    assert b"removed shared lock by backup" in proc.stdout
    assert object_names(lib_kloset.backend, "locks/") == []
    # its owner notices at commit time
    with pytest.raises(LockError, match="removed by another process"):
        lock.ensure_valid()
    lock.release()


@pytest.mark.parametrize("how", ["lost", "removed"])
def test_writer_with_a_lost_lock_does_not_commit(lib_kloset, kloset_backend, how) -> None:
    lock = lib_kloset.lock(exclusive=False, operation="backup")
    writer = lib_kloset.writer(kind="test", lock=lock)
    writer.add_bytes("s", b"never committed" * 1000)
    if how == "lost":
        lock.lost = "cannot refresh lock (simulated network partition)"
    else:
        kloset_backend.delete(lock.name)  # what `unlock --force` elsewhere does
    with pytest.raises(LockError, match="not committing"):
        writer.commit()
    lock.release()
    assert lib_kloset.snapshot_ids() == []
    assert object_names(kloset_backend, "snapshots/") == []


def test_lock_refresh_failure_marks_the_lock_lost(lib_kloset, kloset_backend,
                                                  local_kloset_dir) -> None:
    """A refresh that cannot write marks the lock lost (locks/ is swapped for a file,
    which, unlike a permission bit, stops root too)."""
    timing = locks.LockTiming(refresh_interval=0.1, stale_after=10)
    lock = locks.acquire(kloset_backend, lib_kloset.master, exclusive=False, operation="backup",
                         timing=timing)
    lost: list[str] = []
    lock.on_lost = lost.append
    writer = lib_kloset.writer(kind="test", lock=lock)
    writer.add_bytes("s", b"x")
    folder = local_kloset_dir / "locks"
    moved = local_kloset_dir / "locks.moved"
    folder.rename(moved)
    folder.write_text("not a folder")
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    folder.unlink()
    moved.rename(folder)
    assert lost and lock.lost
    with pytest.raises(LockError, match="lock lost"):
        writer.commit()
    lock.release()
    assert lib_kloset.snapshot_ids() == []
