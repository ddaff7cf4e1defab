"""`forget` with a retention policy, through the real CLI, on a synthetic timeline.

Snapshots are made by the library with explicit times (``Kloset.writer(time=...)``),
then ``forget --dry-run --json`` must give exactly what the pure
``retention.apply_policy`` decides for the same snapshots, and the real
``forget`` must remove exactly those and nothing else.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta

import pytest

from pgkloset_core.errors import UsageError
from pgkloset_core.kloset.retention import RetentionPolicy, SnapshotRef, apply_policy
from tests.test_maintenance_common import Repo, assert_one_line_error, make_repo

START = datetime(2025, 1, 1, 0, 0, tzinfo=UTC)


def _commit(kloset, when: datetime, *, kind: str, meta: dict, tags: list[str], entry: str) -> str:
    writer = kloset.writer(kind=kind, meta=meta, tags=tags, time=when)
    writer.add_bytes(entry, b"tiny payload, deduplicated across the timeline")
    return writer.commit().id


@pytest.fixture(scope="module")
def timeline(tmp_path_factory) -> tuple[Repo, dict[str, SnapshotRef]]:
    """~140 snapshots in four groups over half a year; returns refs with the expected group."""
    repo = make_repo(tmp_path_factory.mktemp("policy") / "k")
    kloset = repo.open()
    refs: dict[str, SnapshotRef] = {}

    def add(when: datetime, group: tuple[str, ...], **kw) -> None:
        sid = _commit(kloset, when, **kw)
        refs[sid] = SnapshotRef(sid, when, frozenset(kw["tags"]), group)

    for i in range(60):  # every 71 hours: several per week, some days empty
        when = START + timedelta(hours=71 * i)
        add(when, ("db1", "sales", "logical"), kind="logical",
            meta={"server": "db1", "database": "sales"}, tags=["nightly"], entry="sales.dump")
    for i in range(40):  # daily, every 10th tagged release
        when = START + timedelta(days=100 + i, hours=3)
        tags = ["release"] if i % 10 == 0 else []
        add(when, ("db1", "crm", "logical"), kind="logical",
            meta={"server": "db1", "database": "crm"}, tags=tags, entry="crm.dump")
    host = socket.gethostname()
    for name in ("a", "b"):  # plain streams: grouped by hostname and entry name
        for i in range(20):
            when = START + timedelta(days=150, hours=5 * i + (name == "b"))
            add(when, (host, name, "stream"), kind="stream", meta={}, tags=[], entry=name)
    return repo, refs


def expected(refs: dict[str, SnapshotRef], policy: RetentionPolicy) -> list[dict]:
    return [d.as_dict() for d in apply_policy(refs.values(), policy)]


POLICIES = [
    (["--keep-last", "3"], RetentionPolicy(keep_last=3)),
    (["--keep-daily", "5", "--keep-weekly", "4", "--keep-monthly", "unlimited"],
     RetentionPolicy(keep_daily=5, keep_weekly=4, keep_monthly=-1)),
    (["--keep-within", "2w", "--keep-yearly", "1"],
     RetentionPolicy(keep_within=timedelta(weeks=2), keep_yearly=1)),
    (["--keep-hourly", "10", "--keep-tag", "release"],
     RetentionPolicy(keep_hourly=10, keep_tags=("release",))),
]


@pytest.mark.parametrize(("args", "policy"), POLICIES, ids=lambda p: str(p)[:40])
def test_dry_run_matches_apply_policy(timeline, args, policy) -> None:
    repo, refs = timeline
    before = repo.snapshot_ids()
    out = repo.json("forget", *args, "--dry-run")
    assert out["dry_run"] is True and out["removed"] == []
    assert out["group_by"] == ["server", "database", "kind"]
    assert out["groups"] == expected(refs, policy)
    want_remove = {r["id"] for g in out["groups"] for r in g["remove"]}
    assert set(out["remove"]) == want_remove and want_remove, "the policy should remove something"
    assert set(out["keep"]) | want_remove == set(refs)
    assert len(out["groups"]) == 4  # sales, crm, and the two plain streams apart
    assert repo.snapshot_ids() == before, "a dry run removes nothing"


def test_group_by_and_tag_filter(timeline) -> None:
    repo, refs = timeline
    one_group = {sid: SnapshotRef(r.id, r.time, r.tags, ()) for sid, r in refs.items()}
    out = repo.json("forget", "--keep-last", "2", "--group-by", "", "--dry-run")
    assert out["groups"] == expected(one_group, RetentionPolicy(keep_last=2))
    assert len(out["keep"]) == 2

    by_kind = {sid: SnapshotRef(r.id, r.time, r.tags, (r.group[2],)) for sid, r in refs.items()}
    out = repo.json("forget", "--keep-weekly", "2", "--group-by", "kind", "--dry-run")
    assert out["groups"] == expected(by_kind, RetentionPolicy(keep_weekly=2))

    tagged = {sid: r for sid, r in refs.items() if "release" in r.tags}
    out = repo.json("forget", "--tag", "release", "--keep-last", "1", "--dry-run")
    assert out["groups"] == expected(tagged, RetentionPolicy(keep_last=1))
    assert set(out["keep"]) | set(out["remove"]) == set(tagged)


def test_dry_run_text_gives_reasons(timeline) -> None:
    repo, refs = timeline
    text = repo.run("forget", "--keep-daily", "2", "--keep-tag", "release", "--dry-run").stdout.decode()
    assert "group server=db1, database=crm, kind=logical" in text
    assert "tag:release" in text and "daily 2025-" in text
    assert "would remove" in text
    assert repo.snapshot_ids() == set(refs)


def test_forget_removes_exactly_the_policy_choice(tmp_path) -> None:
    repo = make_repo(tmp_path / "k")
    kloset = repo.open()
    refs = {}
    for i in range(30):
        when = START + timedelta(hours=9 * i)
        db = "x" if i % 3 else "y"
        sid = _commit(kloset, when, kind="logical", meta={"server": "s", "database": db},
                      tags=[], entry="d")
        refs[sid] = SnapshotRef(sid, when, frozenset(), ("s", db, "logical"))
    policy = RetentionPolicy(keep_daily=3, keep_last=2)
    decisions = apply_policy(refs.values(), policy)
    want_removed = {r.id for d in decisions for r in d.remove}
    out = repo.json("forget", "--keep-daily", "3", "--keep-last", "2")
    assert out["dry_run"] is False
    assert set(out["removed"]) == want_removed
    assert out["groups"] == [d.as_dict() for d in decisions]
    assert repo.snapshot_ids() == set(refs) - want_removed
    # Applying the same policy again is a no-op.
    again = repo.json("forget", "--keep-daily", "3", "--keep-last", "2")
    assert again["removed"] == []
    assert repo.snapshot_ids() == set(refs) - want_removed


def test_forget_by_id_and_refusals(tmp_path) -> None:
    repo = make_repo(tmp_path / "k")
    ids = [repo.backup("s", f"data {i}".encode()) for i in range(3)]
    assert_one_line_error(repo.run("forget", check=False), "nothing to forget")
    assert_one_line_error(repo.run("forget", ids[0], "--keep-last", "1", check=False), "not both")
    assert_one_line_error(repo.run("forget", "--keep-last", "-2", check=False), "keep_last")
    assert_one_line_error(repo.run("forget", "--keep-within", "3x", check=False), "invalid duration")
    assert_one_line_error(repo.run("forget", "--keep-last", "1", "--group-by", "a,,b", check=False),
                          "--group-by")
    assert repo.snapshot_ids() == set(ids)

    dry = repo.json("forget", ids[0][:10], "--dry-run")
    assert dry["remove"] == [ids[0]] and dry["removed"] == []
    assert repo.snapshot_ids() == set(ids)
    out = repo.json("forget", ids[0][:10], ids[1])
    assert out["removed"] == [ids[0], ids[1]]
    assert repo.snapshot_ids() == {ids[2]}
    assert b"removed snapshot" in repo.run("forget", "latest").stdout
    assert repo.snapshot_ids() == set()


def test_writer_refuses_a_naive_time(tmp_path) -> None:
    kloset = make_repo(tmp_path / "k").open()
    with pytest.raises(UsageError, match="timezone"):
        kloset.writer(kind="x", time=datetime(2025, 1, 1))  # noqa: DTZ001 - on purpose


def test_forget_with_prune(tmp_path) -> None:
    repo = make_repo(tmp_path / "k", pack_size=256 * 1024)
    from tests.test_maintenance_common import random_bytes

    kloset = repo.open()
    for i in range(4):
        writer = kloset.writer(kind="stream", time=START + timedelta(days=i))
        writer.add_bytes("s", random_bytes(i, 600_000))
        writer.commit()
    out = json.loads(repo.run("forget", "--keep-last", "1", "--prune", "--json").stdout)
    assert len(out["removed"]) == 3
    # the default grace period keeps the garbage for now, but it is known and waiting
    assert out["prune"]["packs_deleted"] == 0 and out["prune"]["packs_waiting"] > 0
    assert repo.cat("latest") == random_bytes(3, 600_000)
