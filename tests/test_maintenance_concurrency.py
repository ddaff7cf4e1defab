"""Eight backup processes write into one kloset while forget and prune run in a loop.

Every backup is a real ``pgkloset backup stream`` process; the data overlaps
(shared random blocks plus a unique part) so dedup links snapshots to packs of
other writers, and ``--max-repack-ratio 0.1`` makes prune rewrite packs too.
All of them queue on locks with ``--lock-wait``. Afterwards: the snapshots that
exist are exactly those committed minus those forget reported removing, each
restores byte for byte, and ``check --read-data`` passes.
"""

from __future__ import annotations

import json
import random
import threading
import time

from tests.test_maintenance_common import MiB, make_repo, random_bytes, sha256

WRITERS = 8
ROUNDS = 4
BLOCK = 512 * 1024
SHARED = [random_bytes(5000 + i, BLOCK) for i in range(6)]


def backup_data(writer: int, round_no: int) -> bytes:
    rng = random.Random(writer * 100 + round_no)
    shared = b"".join(rng.choice(SHARED) for _ in range(4))
    return shared + random_bytes(writer * 1000 + round_no, MiB + rng.randrange(BLOCK))


def test_many_writers_with_forget_and_prune(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=MiB)
    committed: dict[str, str] = {}  # snapshot id -> sha256 of its input
    removed: set[str] = set()
    failures: list[str] = []
    stats = {"rounds": 0, "deleted": 0, "repacked": 0}
    writers_done = threading.Event()
    wait = ("--lock-wait", "300s")

    def writer(n: int) -> None:
        for r in range(ROUNDS):
            data = backup_data(n, r)
            proc = repo.run(*wait, "backup", "stream", "--name", f"w{n}", "--json", input=data,
                            check=False)
            if proc.returncode != 0:
                failures.append(f"backup w{n}/{r}: {proc.stderr.decode()}")
                return
            committed[json.loads(proc.stdout)["snapshot_id"]] = sha256(data)

    def maintenance() -> None:
        while True:
            last = writers_done.is_set()
            proc = repo.run(*wait, "forget", "--keep-last", "2", "--group-by",
                            "server,database,kind", "--json", check=False)
            if proc.returncode != 0:
                failures.append(f"forget: {proc.stderr.decode()}")
                return
            removed.update(json.loads(proc.stdout)["removed"])
            grace = "2s" if stats["rounds"] % 2 else "0"  # some garbage waits across rounds
            proc = repo.run(*wait, "prune", "--grace", grace, "--max-repack-ratio", "0.1", "--json",
                            check=False)
            if proc.returncode != 0:
                failures.append(f"prune: {proc.stderr.decode()}")
                return
            report = json.loads(proc.stdout)
            stats["rounds"] += 1
            stats["deleted"] += report["packs_deleted"]
            stats["repacked"] += report["blobs_repacked"]
            if last:
                return
            time.sleep(0.3)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    janitor = threading.Thread(target=maintenance)
    for t in threads:
        t.start()
    time.sleep(1.0)
    janitor.start()
    for t in threads:
        t.join(timeout=600)
    writers_done.set()
    janitor.join(timeout=600)
    assert not failures, failures
    assert len(committed) == WRITERS * ROUNDS
    assert stats["rounds"] >= 2 and stats["deleted"] > 0, stats

    # Nothing committed was lost except what forget reported removing...
    assert removed <= committed.keys()
    assert repo.snapshot_ids() == committed.keys() - removed
    # ...and the final forget left the two newest of each writer.
    assert len(committed.keys() - removed) == WRITERS * 2
    kloset = repo.open()
    for sid in committed.keys() - removed:
        snap = kloset.load_snapshot(sid)
        data = b"".join(kloset.read_entry(snap, snap.entries[0]))
        assert sha256(data) == committed[sid], f"snapshot {sid[:12]} restored wrong bytes"
    report = repo.check_read_data()
    assert report["snapshots"] == WRITERS * 2
    assert repo.names("locks") == []
