"""Crash safety: a backup killed with SIGKILL at any point leaves a usable kloset.

The kloset is made by the library with 1 MiB packs, so a backup writes many
packs and (every 64 packs) intermediate index deltas. Each scenario kills a
real ``pgkloset backup stream`` process at one point, then proves: the kloset
opens, no snapshot appeared, ``check --read-data`` passes (unindexed packs are
only a note), earlier snapshots restore byte for byte, the dead process's
lock is stale (``unlock`` removes it), and the next backup works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from pgkloset_core.kloset.writer import PACKS_PER_DELTA
from pgkloset_core.storage.fs import FilesystemBackend
from tests.fixtures.kloset import (
    HOOKED_CLI,
    MiB,
    SeededStream,
    backup_json,
    object_names,
    seeded_bytes,
)

PACK_SIZE = 1 * MiB
FEED_BLOCK = 256 * 1024


@pytest.fixture
def crash_kloset(new_lib_kloset, run_cli):
    """A kloset with 1 MiB packs and two committed snapshots; returns {id: data}."""
    new_lib_kloset(pack_size=PACK_SIZE)
    committed = {}
    for seed in (1, 2):
        data = seeded_bytes(seed, 3 * MiB + seed)
        committed[backup_json(run_cli, f"base{seed}", data)["snapshot_id"]] = data
    return committed


def feed_until(proc: subprocess.Popen, stream: SeededStream, done: Callable[[], bool],
               limit: int) -> None:
    """Write the stream into the backup's stdin until ``done()``; stdin stays open."""
    while not done():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert stream.produced < limit, "the kill point was never reached"
        proc.stdin.write(stream.read(FEED_BLOCK))
        proc.stdin.flush()


def wait_until(done: Callable[[], bool], proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.002)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    if proc.stdin:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


def verify_after_crash(run_cli, backend, committed: dict[str, bytes], *,
                       expect_unindexed_note: bool) -> None:
    listed = json.loads(run_cli("snapshots", "--json").stdout)
    assert {s["id"] for s in listed} == set(committed), "a killed backup must not leave a snapshot"

    proc = run_cli("check", "--read-data")
    err = proc.stderr.decode()
    assert "problem" not in err, err
    assert ("not in the index" in err) == expect_unindexed_note, err
    assert b"no problems found" in proc.stdout

    for snapshot_id, data in committed.items():
        assert run_cli("cat", snapshot_id).stdout == data

    # The dead backup's lock is stale: unlock removes it and leaves no lock behind.
    assert object_names(backend, "locks/"), "the killed backup held a lock"
    unlocked = run_cli("unlock")
    assert b"removed shared lock by backup" in unlocked.stdout
    assert object_names(backend, "locks/") == []

    after = seeded_bytes(99, 2 * MiB + 5)
    snapshot_id = backup_json(run_cli, "after", after)["snapshot_id"]
    assert run_cli("cat", snapshot_id).stdout == after
    proc = run_cli("check", "--read-data")
    assert b"no problems found" in proc.stdout and b"problem:" not in proc.stderr


def start_backup(popen_cli, name: str, **kwargs) -> subprocess.Popen:
    return popen_cli("backup", "stream", "--name", name, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_killed_after_locking_before_any_pack(crash_kloset, popen_cli, run_cli, kloset_backend):
    packs = len(object_names(kloset_backend, "data/"))
    proc = start_backup(popen_cli, "killed")
    wait_until(lambda: bool(object_names(kloset_backend, "locks/")), proc)
    proc.stdin.write(seeded_bytes(5, 100_000))
    proc.stdin.flush()
    kill(proc)
    assert len(object_names(kloset_backend, "data/")) == packs
    verify_after_crash(run_cli, kloset_backend, crash_kloset, expect_unindexed_note=False)


@pytest.mark.parametrize("new_packs", [1, 5])
def test_killed_during_pack_uploads(crash_kloset, popen_cli, run_cli, kloset_backend, new_packs):
    packs = len(object_names(kloset_backend, "data/"))
    indexes = object_names(kloset_backend, "index/")
    proc = start_backup(popen_cli, "killed")
    feed_until(proc, SeededStream(7),
               lambda: len(object_names(kloset_backend, "data/")) >= packs + new_packs,
               limit=64 * MiB)
    kill(proc)
    assert object_names(kloset_backend, "index/") == indexes
    verify_after_crash(run_cli, kloset_backend, crash_kloset, expect_unindexed_note=True)


def test_killed_after_an_intermediate_index_delta(crash_kloset, popen_cli, run_cli, kloset_backend):
    """More than PACKS_PER_DELTA packs: an index delta is written mid-stream, then the kill."""
    indexes = set(object_names(kloset_backend, "index/"))
    proc = start_backup(popen_cli, "killed")
    feed_until(proc, SeededStream(8),
               lambda: set(object_names(kloset_backend, "index/")) - indexes != set(),
               limit=(PACKS_PER_DELTA + 20) * PACK_SIZE)
    kill(proc)
    # The indexed packs hold blobs no snapshot uses; packs after the delta are unindexed
    # (unless the kill landed exactly on a delta boundary).
    verify_after_crash_allowing_note(run_cli, kloset_backend, crash_kloset)
    # The orphaned-but-indexed blobs are reused, and restore correctly.
    again = SeededStream(8).read(32 * MiB)
    result = backup_json(run_cli, "again", again)
    assert result["stored_bytes"] < 2 * MiB, result
    assert run_cli("cat", result["snapshot_id"]).stdout == again


def verify_after_crash_allowing_note(run_cli, backend, committed) -> None:
    proc = run_cli("check", "--read-data")
    note = "not in the index" in proc.stderr.decode()
    verify_after_crash(run_cli, backend, committed, expect_unindexed_note=note)


# Kill points inside commit, hit exactly by a hooked copy of the real CLI that
# SIGKILLs itself (see tests/fixtures/kloset.py HOOKED_CLI).
COMMIT_KILL_POINTS = {
    # the final index delta is stored, the manifest is not written at all
    "between-index-and-snapshot": ("call:write_snapshot", False),
    # the final index delta is fsynced under a temporary name, never linked
    "index-delta-half-written": ("link:index/", True),
    # the manifest is fsynced under a temporary name, never linked
    "snapshot-half-written": ("link:snapshots/", False),
}


@pytest.mark.parametrize("point", list(COMMIT_KILL_POINTS))
def test_killed_inside_commit(crash_kloset, popen_cli, run_cli, kloset_backend, point) -> None:
    kill_at, unindexed = COMMIT_KILL_POINTS[point]
    if kill_at.startswith("link:") and not isinstance(kloset_backend, FilesystemBackend):
        pytest.skip("the link() crash point is specific to the file-system backend")
    indexes = set(object_names(kloset_backend, "index/"))
    data = seeded_bytes(9, 5 * MiB)
    proc = popen_cli("backup", "stream", "--name", "killed", command=[sys.executable, "-c", HOOKED_CLI],
                     env_extra={"PGKLOSET_TEST_KILL_AT": kill_at}, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _out, err = proc.communicate(data, timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()

    new_indexes = set(object_names(kloset_backend, "index/")) - indexes
    assert len(new_indexes) == (0 if unindexed else 1)
    if kill_at.startswith("link:"):
        folder = kill_at.removeprefix("link:")
        leftovers = [p for p in kloset_backend.leftover_temporaries() if f"/{folder}" in str(p)]
        assert len(leftovers) == 1, "the crash point was reached with the object written"
    verify_after_crash(run_cli, kloset_backend, crash_kloset, expect_unindexed_note=unindexed)
    if not unindexed:
        # the dead backup's data is indexed: backing up the same stream stores nothing new
        result = backup_json(run_cli, "again", data)
        assert result["stored_bytes"] < 64 * 1024, result
        assert run_cli("cat", result["snapshot_id"]).stdout == data
