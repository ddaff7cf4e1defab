"""`prune`: frees space, repacks mostly-unused packs, honours the grace period, and
never deletes what a snapshot (or a late writer) needs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from pgkloset_core.kloset.pack import pack_name
from pgkloset_core.kloset.prune import prune as run_prune
from pgkloset_core.kloset.prune import read_pending
from pgkloset_core.kloset.reader import iter_refs_of
from tests.test_maintenance_common import (
    MiB,
    Repo,
    assert_one_line_error,
    disk_usage,
    make_repo,
    random_bytes,
)

PACK = 1 * MiB
SLACK = 64 * 1024  # pack headers, encryption overhead and a snapshot's chunk list
HOUR = 3600.0


def fill(repo: Repo, count: int, size: int = 2 * MiB) -> dict[str, bytes]:
    """``count`` snapshots of stream ``s`` sharing a common half."""
    common = random_bytes(1000, size // 2)
    made = {}
    for i in range(count):
        data = common + random_bytes(i, size // 2)
        made[repo.backup("s", data)] = data
    return made


def prune(repo: Repo, *args: str) -> dict:
    return repo.json("prune", *args)


def test_prune_after_forget_frees_space(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=PACK)
    made = fill(repo, 6)
    out = repo.json("forget", "--keep-last", "2")
    assert len(out["removed"]) == 4
    kept = {sid: made[sid] for sid in out["keep"]}
    before = disk_usage(repo.path)

    dry = prune(repo, "--grace", "0", "--dry-run")
    assert dry["dry_run"] and dry["packs_deleted"] > 0
    assert disk_usage(repo.path) == before, "a dry run changes nothing"

    report = prune(repo, "--grace", "0")
    after = disk_usage(repo.path)
    assert report["packs_deleted"] == dry["packs_deleted"]
    assert report["bytes_freed"] >= 3 * 2 * MiB // 2, report  # four unique halves, minus slack
    assert before - after >= report["bytes_freed"] - report["bytes_written"] - 64 * 1024
    assert after < before * 0.6
    for sid, data in kept.items():
        assert repo.cat(sid) == data
    repo.check_read_data()
    # Nothing left to do, and no maintenance leftovers.
    again = prune(repo, "--grace", "0")
    assert again["packs_deleted"] == again["packs_waiting"] == again["blobs_repacked"] == 0
    assert len(repo.names("index")) == 1 and repo.names("pending") == []


def test_repack_keeps_used_blobs_of_mostly_unused_packs(tmp_path) -> None:
    repo = make_repo(tmp_path / "k")  # default 32 MiB packs: each backup makes one pack
    data = random_bytes(2, 3 * MiB)
    gone = repo.backup("s", data)
    kloset = repo.open()
    snap = kloset.resolve(gone)
    lengths = [n for _id, n in iter_refs_of(kloset, snap, snap.entries[0])]
    # Chunk boundaries are keyed per kloset: sizes come from the refs, never assumed.
    # max_chunk (at most 1 MiB) guarantees >= 3 chunks, so two kept leave >= 1/3 unused (> 0.25).
    assert len(lengths) >= 3 and sum(lengths) == len(data)
    kept_size = sum(lengths[:2])
    assert len(data) - kept_size > 0.25 * len(data)
    kept_data = data[:kept_size]  # ends on a chunk boundary: both chunks deduplicate
    kept_backup = repo.json("backup", "stream", "--name", "t", input=kept_data)
    kept = kept_backup["snapshot_id"]
    assert kept_backup["stored_bytes"] < SLACK, "both chunks were deduplicated"
    assert repo.json("snapshots")[-1]["id"] == kept
    repo.run("forget", gone)
    assert prune(repo, "--grace", "0", "--max-repack-ratio", "1")["blobs_repacked"] == 0

    report = prune(repo, "--grace", "0", "--max-repack-ratio", "0.25")
    assert report["packs_repacked"] == 1 and report["blobs_repacked"] == 2
    assert report["packs_written"] == 1 and report["packs_deleted"] == 1
    assert report["bytes_freed"] > len(data)
    # Only the two kept chunks (and the kept snapshot's own pack) remain.
    assert kept_size <= disk_usage(repo.path / "data") < kept_size + SLACK
    assert repo.cat(kept) == kept_data
    repo.check_read_data()


def test_grace_period_spans_prunes(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=PACK)
    made = fill(repo, 3)
    # The newest backup's packs hold only its own blobs: forgetting it makes them wholly
    # unused, so nothing is repacked (the oldest one's packs also hold the shared half).
    old = list(made)[-1]
    repo.run("forget", old)
    packs_before = repo.names("data")

    # A grace period no slow machine can outlast between two prunes.
    first = prune(repo, "--grace", "1h")
    assert first["packs_deleted"] == 0 and first["packs_waiting"] > 0
    assert first["packs_repacked"] == 0
    assert repo.names("data") == packs_before
    pending, names = read_pending(repo.open())
    assert len(names) == 1 and len(pending) == first["packs_waiting"]
    (since,) = set(pending.values())  # when the first prune saw them
    # Still inside the grace period: nothing goes, the clock is not restarted.
    assert prune(repo, "--grace", "1h")["packs_deleted"] == 0
    assert read_pending(repo.open())[0] == pending
    # One second short of the grace period, by a clock given to prune: still nothing.
    kloset = repo.open()
    with kloset.lock(exclusive=True, operation="prune") as lock:
        early = run_prune(kloset, lock, grace=HOUR, now=since + HOUR - 1)
    assert early.packs_deleted == 0 and early.packs_waiting == first["packs_waiting"]
    assert repo.names("data") == packs_before
    assert read_pending(repo.open())[0] == pending
    # Real time since the first prune now exceeds a shorter grace period: they go.
    time.sleep(max(0.0, since + 2.5 - time.time()))
    last = prune(repo, "--grace", "2s")
    assert last["packs_deleted"] == first["packs_waiting"] and last["packs_waiting"] == 0
    assert len(repo.names("data")) == len(packs_before) - last["packs_deleted"]
    assert repo.names("pending") == []
    for sid in set(made) - {old}:
        assert repo.cat(sid) == made[sid]
    repo.check_read_data()


def test_garbage_made_useful_again_is_kept(tmp_path) -> None:
    """A pack waiting for deletion stays indexed; a backup that deduplicates against
    it (as a late writer would) makes it used again, and prune then keeps it."""
    repo = make_repo(tmp_path / "k", pack_size=PACK)
    data = random_bytes(7, 3 * MiB)
    first = repo.backup("s", data)
    repo.run("forget", first)
    waiting = prune(repo)  # default grace: 1h
    assert waiting["packs_waiting"] > 0 and waiting["packs_deleted"] == 0
    again = repo.json("backup", "stream", "--name", "s", input=data)
    assert again["stored_bytes"] < 64 * 1024, "the data was deduplicated against waiting packs"
    report = prune(repo, "--grace", "0")
    assert report["packs_deleted"] == 0 and report["packs_waiting"] == 0
    assert repo.cat(again["snapshot_id"]) == data
    repo.check_read_data()


def test_unindexed_packs_of_a_dead_writer_wait_then_go(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=PACK)
    keep = repo.backup("s", random_bytes(1, MiB))
    kloset = repo.open()
    writer = kloset.writer(kind="stream")
    writer.add_bytes("s", random_bytes(2, 3 * MiB))
    writer.sink.flush()  # packs uploaded, no index delta, no snapshot: a writer that died
    writer.close()
    stray = [n for n in repo.names("data")]
    report = prune(repo, "--grace", "1h")
    assert report["unindexed_packs"] >= 2 and report["packs_deleted"] == 0
    assert repo.names("data") == stray
    # Backdate the pending record as if the hour had passed.
    pending, names = read_pending(kloset)
    from pgkloset_core.kloset.prune import write_pending

    write_pending(kloset, {p: t - 7200 for p, t in pending.items()}, supersedes=names,
                  now=time.time())
    for name in names:
        kloset.backend.delete(name)
    report = prune(repo, "--grace", "1h")
    assert report["packs_deleted"] == len(pending) and report["unindexed_packs"] == len(pending)
    assert repo.cat(keep) == random_bytes(1, MiB)
    assert all(repo.path.joinpath(pack_name(p)).exists() is False for p in pending)
    repo.check_read_data()


def test_prune_refuses_a_damaged_index_and_changes_nothing(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=PACK)
    made = fill(repo, 2)
    repo.run("forget", sorted(made)[0])
    (delta, *_rest) = repo.names("index")
    path = repo.path / delta
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    objects = repo.names("data") + repo.names("index")
    assert_one_line_error(repo.run("prune", "--grace", "0", check=False), "damaged index",
                          "pgkloset check")
    assert repo.names("data") + repo.names("index") == objects


def test_prune_on_snapshots_with_timeline_and_empty_kloset(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=PACK)
    assert prune(repo, "--grace", "0")["packs"] == 0
    kloset = repo.open()
    for i in range(3):
        w = kloset.writer(kind="stream", time=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=i))
        w.add_bytes("s", random_bytes(i, MiB))
        w.commit()
    repo.run("forget", "--keep-last", "1", "--group-by", "")
    text = repo.run("prune", "--grace", "0").stdout.decode()
    assert "freed" in text and "pack(s) deleted" in text
    repo.run("forget", "latest")
    assert prune(repo, "--grace", "0")["packs_deleted"] >= 1
    assert repo.names("data") == [] and len(repo.names("index")) == 1
    repo.check_read_data()
