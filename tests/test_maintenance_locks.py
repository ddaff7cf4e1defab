"""Locks end to end: a backup that loses its lock does not commit, `unlock` removes only
stale locks, every maintenance command waits with --lock-wait, and a waiting prune
is not starved by a stream of overlapping backups."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from pgkloset_core.kloset import locks
from tests.test_maintenance_common import (
    Repo,
    assert_one_line_error,
    make_repo,
    random_bytes,
)


def slow_backup(repo: Repo, data_block: bytes, break_lock, *, seconds: float = 4.0):
    """A `backup stream` (lock refreshed every second) fed slowly; ``break_lock`` runs
    once its lock exists. Returns the finished process and its stderr."""
    proc = repo.popen("backup", "stream", "--name", "slow", "--json",
                      env=repo.env(PGKLOSET_LOCK_REFRESH_SECONDS="1"),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not repo.names("locks"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    break_lock()
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # keep the stream trickling while refreshes fail
        proc.stdin.write(data_block)
        proc.stdin.flush()
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    return proc, out, err.decode()


def test_backup_that_cannot_refresh_its_lock_does_not_commit(tmp_path) -> None:
    repo = make_repo(tmp_path / "k")
    before = repo.backup("s", b"committed before")
    folder, moved = repo.path / "locks", repo.path / "locks.moved"

    def break_lock() -> None:
        # A file where the folder was: no refresh can write (root ignores permission bits).
        folder.rename(moved)
        folder.write_text("not a folder")

    proc, out, err = slow_backup(repo, random_bytes(1, 64 * 1024), break_lock)
    folder.unlink()
    moved.rename(folder)
    assert proc.returncode != 0 and out == b""
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "lock lost, not committing" in err and "cannot refresh lock" in err
    assert repo.snapshot_ids() == {before}
    repo.check_read_data()


def test_backup_whose_lock_was_removed_does_not_commit(tmp_path) -> None:
    """The refresh must not quietly recreate a lock that another process removed."""
    repo = make_repo(tmp_path / "k")

    def remove_lock() -> None:
        (name,) = repo.names("locks")
        (repo.path / name).unlink()  # what `unlock --force` elsewhere does

    proc, out, err = slow_backup(repo, random_bytes(2, 64 * 1024), remove_lock)
    assert proc.returncode != 0 and out == b""
    assert "Traceback" not in err and "removed by another process" in err, err
    assert repo.snapshot_ids() == set()
    assert repo.names("locks") == [] and repo.names("snapshots") == []


def test_unlock_removes_only_stale_locks(tmp_path) -> None:
    repo = make_repo(tmp_path / "k")
    kloset = repo.open()
    live = kloset.lock(exclusive=False, operation="backup")
    dead = subprocess.Popen(["sleep", "60"])
    stale = locks.Lock(kloset.backend, kloset.master, True, "prune", locks.LockTiming())
    stale.write()
    # Rewrite it as if held by the (soon dead) process.
    doc = stale._doc(time.time())
    doc["pid"] = dead.pid
    from pgkloset_core.kloset.sealed import KIND_LOCK, seal_json

    kloset.backend.write(stale.name, seal_json(kloset.master, KIND_LOCK, doc), overwrite=True)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()

    out = repo.json("unlock")
    assert [r["name"] for r in out["removed"]] == [stale.name]
    assert repo.names("locks") == [live.name]
    assert b"no stale locks" in repo.run("unlock").stderr
    assert repo.names("locks") == [live.name]
    assert b"removed shared lock by backup" in repo.run("unlock", "--force").stdout
    assert repo.names("locks") == []
    live.release()


@pytest.mark.parametrize("args", [
    ("forget", "--keep-last", "1"),
    ("forget", "--keep-last", "1", "--dry-run"),
    ("prune", "--grace", "0"),
    ("prune", "--dry-run"),
    ("check",),
])
def test_commands_wait_with_lock_wait(tmp_path, args) -> None:
    repo = make_repo(tmp_path / "k")
    repo.backup("s", b"one")
    kloset = repo.open()
    with kloset.lock(exclusive=True, operation="prune"):
        assert_one_line_error(repo.run(*args, check=False), "kloset is locked", "--lock-wait")
    holder = kloset.lock(exclusive=True, operation="prune")
    threading.Timer(1.5, holder.release).start()
    start = time.monotonic()
    repo.run("--lock-wait", "60s", *args)
    assert time.monotonic() - start >= 1.4


def test_waiting_prune_is_not_starved_by_overlapping_backups(tmp_path) -> None:
    """Two holders of shared locks take turns so that one is always held; a prune
    waiting for its exclusive lock still gets it, because it keeps its place."""
    repo = make_repo(tmp_path / "k")
    kloset = repo.open()
    stop = threading.Event()
    turns = [0, 0]

    def backups(n: int) -> None:
        while not stop.is_set():
            with kloset.lock(exclusive=False, operation="backup", wait=120):
                turns[n] += 1
                time.sleep(0.8)

    def start_second() -> None:
        time.sleep(0.4)
        backups(1)

    threads = [threading.Thread(target=backups, args=(0,)), threading.Thread(target=start_second)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        # A starved prune would give up after 60 s with a LockError (repo.json raises).
        report = repo.json("--lock-wait", "60s", "prune", "--grace", "0")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert report["dry_run"] is False
    assert min(turns) >= 1
    assert repo.names("locks") == []
