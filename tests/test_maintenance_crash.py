"""A prune killed with SIGKILL at any step leaves a consistent kloset, and the next
prune finishes the job.

The prune runs in a child process (the library's ``prune`` with an ``on_step``
hook that SIGKILLs its own process at the chosen step): after the repacked packs
are written, after the pending record, after the new index, after the old
index deltas are gone, and in the middle of deleting packs.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pgkloset_core.kloset.prune import prune
from tests.test_maintenance_common import (
    PASSPHRASE,
    ROOT,
    SMALL_CHUNKS,
    MiB,
    Repo,
    make_repo,
    random_bytes,
)

CHILD = r"""
import os, signal, sys
from pgkloset_core.kloset.prune import prune
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend

url, passphrase, kill_at, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kloset = Kloset.open(open_backend(url), passphrase)
seen = 0

def step(name):
    global seen
    if name == kill_at:
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)

lock = kloset.lock(exclusive=True, operation="prune")
prune(kloset, lock, grace=0, max_repack_ratio=0.25, on_step=step)
print("prune finished without reaching the kill point")
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Five snapshots, the three oldest forgotten: garbage packs and half-used packs."""
    repo = make_repo(tmp_path_factory.mktemp("crash") / "k", pack_size=MiB, **SMALL_CHUNKS)
    kloset = repo.open()
    made = {}
    for i in range(5):
        # shared and unique pieces interleaved: the first backup's packs end up half used
        data = b"".join(random_bytes(100 + j, 300_000) + random_bytes(i * 10 + j, 300_000)
                        for j in range(4))
        writer = kloset.writer(kind="stream")
        writer.add_bytes("s", data)
        made[writer.commit().id] = data
    ids = list(made)
    kloset.forget(ids[:3])
    return repo.path, {sid: made[sid] for sid in ids[3:]}


def library_prune(repo: Repo, **kwargs) -> dict:
    kloset = repo.open()
    with kloset.lock(exclusive=True, operation="prune") as lock:
        return prune(kloset, lock, grace=0, max_repack_ratio=0.25, **kwargs).to_json()


def assert_restores(repo: Repo, kept: dict[str, bytes]) -> None:
    kloset = repo.open()
    assert set(kloset.snapshot_ids()) == set(kept)
    for sid, data in kept.items():
        snap = kloset.load_snapshot(sid)
        assert b"".join(kloset.read_entry(snap, snap.entries[0])) == data


@pytest.mark.parametrize(("kill_at", "nth"), [
    ("packs-written", 1),
    ("pending-written", 1),
    ("index-written", 1),
    ("index-cleaned", 1),
    ("pack-deleted", 2),
])
def test_prune_killed_midway(template, tmp_path, kill_at: str, nth: int) -> None:
    repo = Repo(tmp_path / "k")
    shutil.copytree(template[0], repo.path)
    kept = template[1]
    plan = library_prune(repo, dry_run=True)
    assert plan["blobs_repacked"] > 0 and plan["packs_deleted"] >= 3, plan

    child = subprocess.run([sys.executable, "-c", CHILD, str(repo.path), PASSPHRASE, kill_at,
                            str(nth)], cwd=ROOT, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout.decode() + child.stderr.decode()

    # Consistent right after the kill: every remaining snapshot restores, check passes.
    assert_restores(repo, kept)
    repo.check_read_data()

    # The next prune (the dead prune's lock is stale) finishes the job.
    repo.run("prune", "--grace", "0")
    left = library_prune(repo, dry_run=True)
    assert left["packs_deleted"] == left["packs_waiting"] == left["blobs_repacked"] == 0, left
    assert left["unindexed_packs"] == 0
    assert len(repo.names("index")) == 1 and repo.names("pending") == []
    assert left["packs"] <= plan["packs"] - plan["packs_deleted"] + plan["packs_repacked"]
    assert_restores(repo, kept)
    repo.check_read_data()
    assert b"removed exclusive lock by prune" in repo.run("unlock").stdout
    assert repo.names("locks") == []
