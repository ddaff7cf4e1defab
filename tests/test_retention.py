"""Retention policy: hand-made timelines per rule, and properties over random ones.

The property tests check apply_policy against a reference written in another
style (per-rule sets from sorted buckets rather than one streaming pass), and
re-check every reason string on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgkloset_core.errors import UsageError
from pgkloset_core.kloset.retention import (
    DEFAULT_GROUP_BY,
    UNLIMITED,
    GroupDecision,
    RetentionPolicy,
    SnapshotRef,
    apply_policy,
    format_duration,
    group_key,
    parse_duration,
    parse_group_by,
)

G = ("srv", "db", "logical")


def snap(
    sid: str, time: datetime, tags: tuple[str, ...] = (), group: tuple[str, ...] = G
) -> SnapshotRef:
    """Shorthand for a snapshot in the default test group."""
    return SnapshotRef(id=sid, time=time, tags=frozenset(tags), group=group)


def at(*args: int) -> datetime:
    """A UTC datetime."""
    return datetime(*args, tzinfo=UTC)


def only(decisions: list[GroupDecision]) -> GroupDecision:
    """The single group decision of a one-group timeline."""
    assert len(decisions) == 1
    return decisions[0]


def kept(decision: GroupDecision) -> dict[str, list[str]]:
    """Kept snapshot id -> reasons."""
    return {s.id: reasons for s, reasons in decision.keep}


# ---------------------------------------------------------------- each rule


def test_keep_daily_keeps_newest_of_each_of_the_newest_days() -> None:
    snaps = [
        snap(f"d{day:02d}h{hour:02d}", at(2026, 11, day, hour))
        for day in range(11, 21)
        for hour in (3, 11, 19)
    ]
    d = only(apply_policy(snaps, RetentionPolicy(keep_daily=3)))
    assert kept(d) == {
        "d20h19": ["daily 2026-11-20"],
        "d19h19": ["daily 2026-11-19"],
        "d18h19": ["daily 2026-11-18"],
    }
    assert len(d.remove) == 27
    assert [s.id for s, _ in d.keep] == ["d20h19", "d19h19", "d18h19"]  # newest first


def test_buckets_without_snapshots_do_not_count() -> None:
    # Days 1, 5 and 9: keep_daily=2 keeps days 9 and 5, not "the last 2 calendar days".
    snaps = [
        snap("a", at(2026, 3, 1, 12)),
        snap("b", at(2026, 3, 5, 12)),
        snap("c", at(2026, 3, 9, 12)),
    ]
    assert set(kept(only(apply_policy(snaps, RetentionPolicy(keep_daily=2))))) == {"c", "b"}


def test_keep_last_with_ties_broken_by_id() -> None:
    t = at(2026, 5, 1, 10)
    snaps = [snap("b", t), snap("a", t), snap("c", t), snap("old", t - timedelta(days=1))]
    d = only(apply_policy(snaps, RetentionPolicy(keep_last=2)))
    # Same time: the larger id counts as newer, so the order is c, b, a, old.
    assert kept(d) == {"c": ["last"], "b": ["last"]}
    assert [s.id for s in d.remove] == ["a", "old"]
    # Input order does not matter.
    d2 = only(apply_policy(list(reversed(snaps)), RetentionPolicy(keep_last=2)))
    assert kept(d2) == kept(d)


def test_keep_hourly() -> None:
    snaps = [
        snap("h10a", at(2026, 1, 1, 10, 5)),
        snap("h10b", at(2026, 1, 1, 10, 55)),
        snap("h12", at(2026, 1, 1, 12, 0)),
        snap("h13", at(2026, 1, 1, 13, 59, 59)),
    ]
    d = only(apply_policy(snaps, RetentionPolicy(keep_hourly=3)))
    assert kept(d) == {
        "h13": ["hourly 2026-01-01 13:00"],
        "h12": ["hourly 2026-01-01 12:00"],
        "h10b": ["hourly 2026-01-01 10:00"],
    }


def test_keep_weekly_uses_iso_weeks_across_the_year_boundary() -> None:
    # Mon 2025-12-29 and Fri 2026-01-02 share ISO week 2026-W01; Sun 2025-12-28 is 2025-W52.
    snaps = [
        snap("sun", at(2025, 12, 28, 9)),
        snap("mon", at(2025, 12, 29, 9)),
        snap("fri", at(2026, 1, 2, 9)),
    ]
    d = only(apply_policy(snaps, RetentionPolicy(keep_weekly=2)))
    assert kept(d) == {"fri": ["weekly 2026-W01"], "sun": ["weekly 2025-W52"]}
    assert [s.id for s in d.remove] == ["mon"]


def test_keep_monthly_and_yearly() -> None:
    snaps = [
        snap("2024-06", at(2024, 6, 1)),
        snap("2024-12", at(2024, 12, 31, 23)),
        snap("2025-01", at(2025, 1, 1)),
        snap("2025-03a", at(2025, 3, 2)),
        snap("2025-03b", at(2025, 3, 30)),
    ]
    d = only(apply_policy(snaps, RetentionPolicy(keep_monthly=2)))
    assert kept(d) == {"2025-03b": ["monthly 2025-03"], "2025-01": ["monthly 2025-01"]}
    d = only(apply_policy(snaps, RetentionPolicy(keep_yearly=5)))
    assert kept(d) == {"2025-03b": ["yearly 2025"], "2024-12": ["yearly 2024"]}


def test_unlimited_keeps_every_bucket() -> None:
    snaps = [snap(f"s{i}", at(2026, 1, 1 + i // 2, 6 * (i % 2))) for i in range(10)]
    d = only(apply_policy(snaps, RetentionPolicy(keep_daily=UNLIMITED)))
    assert len(d.keep) == 5 and len(d.remove) == 5
    d = only(apply_policy(snaps, RetentionPolicy(keep_last=UNLIMITED)))
    assert len(d.keep) == 10 and not d.remove


def test_keep_within_is_relative_to_the_newest_snapshot_and_inclusive() -> None:
    newest = at(2020, 6, 10, 12)  # long ago: "within" must not be measured from now
    snaps = [
        snap("newest", newest),
        snap("edge", newest - timedelta(days=7)),
        snap("out", newest - timedelta(days=7, seconds=1)),
    ]
    d = only(apply_policy(snaps, RetentionPolicy(keep_within=parse_duration("7d"))))
    assert kept(d) == {"newest": ["within 7d"], "edge": ["within 7d"]}
    assert [s.id for s in d.remove] == ["out"]


def test_keep_tags_and_several_reasons() -> None:
    snaps = [
        snap("new", at(2026, 2, 2), tags=("release", "nightly")),
        snap("mid", at(2026, 2, 1), tags=("nightly",)),
        snap("old", at(2025, 1, 1), tags=("release",)),
    ]
    policy = RetentionPolicy(keep_last=1, keep_daily=1, keep_tags=("release", "nightly"))
    d = only(apply_policy(snaps, policy))
    assert kept(d) == {
        "new": ["last", "daily 2026-02-02", "tag:release", "tag:nightly"],
        "mid": ["tag:nightly"],
        "old": ["tag:release"],
    }


def test_newest_is_always_kept_even_when_no_rule_keeps_it() -> None:
    snaps = [snap("new", at(2026, 2, 2)), snap("rel", at(2026, 1, 1), tags=("release",))]
    d = only(apply_policy(snaps, RetentionPolicy(keep_tags=("release",))))
    assert kept(d) == {"new": ["newest"], "rel": ["tag:release"]}


def test_times_are_bucketed_in_utc() -> None:
    est = timezone(timedelta(hours=-5))
    # 23:30 in UTC-5 on the 1st is 04:30 UTC on the 2nd: same UTC day as "b".
    a = snap("a", datetime(2026, 3, 1, 23, 30, tzinfo=est))
    b = snap("b", at(2026, 3, 2, 1))
    assert a.time.tzinfo is UTC
    d = only(apply_policy([a, b], RetentionPolicy(keep_daily=2)))
    assert kept(d) == {"a": ["daily 2026-03-02"]}


def test_naive_time_is_a_bug() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SnapshotRef(id="x", time=datetime(2026, 1, 1), tags=frozenset(), group=())


def test_policy_applies_per_group() -> None:
    meta = [
        {"id": "p1", "server": "prod", "database": "app", "kind": "logical", "host": "h1"},
        {"id": "p2", "server": "prod", "database": "app", "kind": "logical", "host": "h1"},
        {"id": "s1", "server": "stage", "database": "app", "kind": "logical", "host": "h1"},
        {"id": "s2", "server": "stage", "database": "app", "kind": "logical", "host": "h1"},
    ]

    def refs(fields: tuple[str, ...]) -> list[SnapshotRef]:
        return [
            SnapshotRef(m["id"], at(2026, 1, 1 + i), frozenset(), group_key(m, fields))
            for i, m in enumerate(meta)
        ]

    ds = apply_policy(refs(DEFAULT_GROUP_BY), RetentionPolicy(keep_last=1))
    assert [(d.group, list(kept(d))) for d in ds] == [
        (("prod", "app", "logical"), ["p2"]),
        (("stage", "app", "logical"), ["s2"]),
    ]
    (one,) = apply_policy(refs(parse_group_by("host")), RetentionPolicy(keep_last=1))
    assert one.group == ("h1",) and list(kept(one)) == ["s2"]
    (one,) = apply_policy(refs(parse_group_by("")), RetentionPolicy(keep_last=1))
    assert one.group == () and list(kept(one)) == ["s2"]


def test_group_key_and_group_by_parsing() -> None:
    assert group_key({"server": "a", "kind": "logical"}, DEFAULT_GROUP_BY) == ("a", "", "logical")
    assert parse_group_by(" server , database,kind ") == ("server", "database", "kind")
    assert parse_group_by("") == ()
    for bad in ("server,,kind", "host,host", ","):
        with pytest.raises(UsageError):
            parse_group_by(bad)


def test_as_dict_is_json_ready() -> None:
    (d,) = apply_policy(
        [snap("a", at(2026, 1, 1)), snap("b", at(2025, 1, 1))], RetentionPolicy(keep_last=1)
    )
    assert d.as_dict() == {
        "group": list(G),
        "keep": [{"id": "a", "time": "2026-01-01T00:00:00+00:00", "reasons": ["last"]}],
        "remove": [{"id": "b", "time": "2025-01-01T00:00:00+00:00"}],
    }


def test_empty_input_gives_no_groups() -> None:
    assert apply_policy([], RetentionPolicy(keep_last=1)) == []


def test_duplicate_ids_are_a_bug() -> None:
    with pytest.raises(ValueError, match="twice"):
        apply_policy(
            [snap("a", at(2026, 1, 1)), snap("a", at(2026, 1, 2))], RetentionPolicy(keep_last=1)
        )


# ---------------------------------------------------------------- empty policy


def test_empty_policy_is_refused() -> None:
    assert RetentionPolicy().is_empty()
    with pytest.raises(UsageError, match="empty policy"):
        apply_policy([snap("a", at(2026, 1, 1))], RetentionPolicy())
    with pytest.raises(UsageError, match="empty policy"):
        apply_policy([], RetentionPolicy.from_mapping({"keep_daily": None}))
    assert not RetentionPolicy(keep_tags=("x",)).is_empty()
    assert not RetentionPolicy(keep_within=timedelta(hours=1)).is_empty()
    assert not RetentionPolicy(keep_yearly=UNLIMITED).is_empty()


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("4h", timedelta(hours=4)),
        ("2w", timedelta(days=14)),
        ("1m", timedelta(days=30)),
        ("1y", timedelta(days=365)),
        ("1y2m3d4h", timedelta(days=365 + 60 + 3, hours=4)),
        ("4h1y", timedelta(days=365, hours=4)),
        (" 7d ", timedelta(days=7)),
        ("0y7d", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "d",
        "7",
        "7x",
        "7 d",
        "1d2d",
        "-1d",
        "1.5d",
        "7D",
        "5min",
        "0d",
        "0h0d",
        "99999999999y",
        "P7D",
    ],
)
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(UsageError, match="duration"):
        parse_duration(text)


def test_parse_duration_non_string() -> None:
    with pytest.raises(UsageError):
        parse_duration(7)  # type: ignore[arg-type]


def test_format_duration() -> None:
    assert format_duration(timedelta(days=7)) == "7d"
    assert format_duration(timedelta(hours=36)) == "1d12h"
    assert format_duration(timedelta(hours=5)) == "5h"
    assert format_duration(timedelta(minutes=90)) == "1:30:00"


# ---------------------------------------------------------------- config


def test_from_mapping() -> None:
    p = RetentionPolicy.from_mapping(
        {
            "keep_last": 3,
            "keep-daily": "7",
            "keep_weekly": "unlimited",
            "keep_within": "30d",
            "keep_tags": "release",
        }
    )
    assert p == RetentionPolicy(
        keep_last=3,
        keep_daily=7,
        keep_weekly=UNLIMITED,
        keep_within=timedelta(days=30),
        keep_tags=("release",),
    )
    assert p.describe() == "last 3, daily 7, weekly unlimited, within 30d, tag:release"
    assert RetentionPolicy.from_mapping({"keep_tags": ["a", "b", "a"]}).keep_tags == ("a", "b")
    assert RetentionPolicy.from_mapping(
        {"keep_within": timedelta(hours=2)}
    ).keep_within == timedelta(hours=2)
    assert RetentionPolicy.from_mapping({}).is_empty()


@pytest.mark.parametrize(
    "data",
    [
        {"keep_lats": 3},
        {"keep_last": -2},
        {"keep_last": "many"},
        {"keep_last": 1.5},
        {"keep_last": True},
        {"keep_within": "forever"},
        {"keep_within": 30},
        {"keep_tags": 5},
        {"keep_tags": [""]},
        {"keep_tags": ["a,b"]},
        {"keep_last": 1, "keep-last": 2},
    ],
)
def test_from_mapping_errors(data: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        RetentionPolicy.from_mapping(data)


def test_from_mapping_needs_a_mapping() -> None:
    with pytest.raises(UsageError, match="mapping"):
        RetentionPolicy.from_mapping(["keep_last"])  # type: ignore[arg-type]


def test_constructor_validates() -> None:
    with pytest.raises(UsageError):
        RetentionPolicy(keep_daily=-5)
    with pytest.raises(UsageError):
        RetentionPolicy(keep_within=timedelta(0))
    assert RetentionPolicy(keep_tags="release").keep_tags == ("release",)  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

# Independent bucket definitions: (policy field, reason prefix, sortable bucket key, label).
BucketFn = Callable[[datetime], Hashable]
REF_BUCKETS: list[tuple[str, str, BucketFn, Callable[[datetime], str]]] = [
    (
        "keep_hourly",
        "hourly",
        lambda t: (t.year, t.month, t.day, t.hour),
        lambda t: f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:00",
    ),
    ("keep_daily", "daily", lambda t: t.date(), lambda t: t.date().isoformat()),
    (
        "keep_weekly",
        "weekly",
        lambda t: tuple(t.isocalendar())[:2],
        lambda t: f"{t.isocalendar()[0]:04d}-W{t.isocalendar()[1]:02d}",
    ),
    (
        "keep_monthly",
        "monthly",
        lambda t: (t.year, t.month),
        lambda t: f"{t.year:04d}-{t.month:02d}",
    ),
    ("keep_yearly", "yearly", lambda t: t.year, lambda t: f"{t.year:04d}"),
]
TAGS = ("release", "nightly", "pre-upgrade")
GROUPS = [("prod", "app", "logical"), ("prod", "app", "physical"), ("stage", "billing", "logical")]
ZONES = [
    UTC,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-8)),
    timezone(timedelta(hours=14)),
]


def utc(t: datetime) -> datetime:
    return t.astimezone(UTC)


def within_label(delta: timedelta) -> str:
    hours = int(delta.total_seconds()) // 3600
    return f"{hours // 24}d{hours % 24}h".replace("d0h", "d").removeprefix("0d")


def reference(snaps: list[SnapshotRef], policy: RetentionPolicy) -> dict[str, set[str]]:
    """Reasons per snapshot id, computed rule by rule over ascending lists."""
    out: dict[str, set[str]] = {s.id: set() for s in snaps}
    groups: dict[tuple[str, ...], list[SnapshotRef]] = {}
    for s in snaps:
        groups.setdefault(s.group, []).append(s)
    for members in groups.values():
        asc = sorted(members, key=lambda s: (utc(s.time), s.id))
        count = len(asc) if policy.keep_last == UNLIMITED else policy.keep_last
        for s in asc[max(0, len(asc) - count) :] if count else []:
            out[s.id].add("last")
        for name, prefix, key, label in REF_BUCKETS:
            wanted = getattr(policy, name)
            if wanted == 0:
                continue
            newest_in: dict[Hashable, SnapshotRef] = {}
            for s in asc:  # ascending, so the last write per bucket is its newest
                newest_in[key(utc(s.time))] = s
            chosen = sorted(newest_in, reverse=True)  # type: ignore[type-var]
            if wanted != UNLIMITED:
                chosen = chosen[:wanted]
            for b in chosen:
                s = newest_in[b]
                out[s.id].add(f"{prefix} {label(utc(s.time))}")
        if policy.keep_within is not None:
            cutoff = utc(asc[-1].time) - policy.keep_within
            for s in asc:
                if utc(s.time) >= cutoff:
                    out[s.id].add(f"within {within_label(policy.keep_within)}")
        for s in asc:
            out[s.id] |= {f"tag:{t}" for t in s.tags & set(policy.keep_tags)}
        if not out[asc[-1].id]:
            out[asc[-1].id].add("newest")
    return out


def reason_is_valid(
    s: SnapshotRef, reason: str, group: list[SnapshotRef], policy: RetentionPolicy
) -> bool:
    """Re-check one reason string from first principles."""
    order = sorted(group, key=lambda x: (x.time, x.id), reverse=True)
    rank = order.index(s)
    if reason == "last":
        return policy.keep_last == UNLIMITED or rank < policy.keep_last
    if reason == "newest":
        return rank == 0
    if reason.startswith("tag:"):
        tag = reason[4:]
        return tag in policy.keep_tags and tag in s.tags
    if reason.startswith("within "):
        return (
            policy.keep_within is not None
            and reason == f"within {within_label(policy.keep_within)}"
            and order[0].time - s.time <= policy.keep_within
        )
    for name, prefix, key, label in REF_BUCKETS:
        if reason.startswith(prefix + " "):
            wanted = getattr(policy, name)
            mine = key(s.time)
            if wanted == 0 or reason != f"{prefix} {label(s.time)}":
                return False
            same_bucket = [x for x in order if key(x.time) == mine]
            if same_bucket[0] is not s:  # must be the newest of its bucket
                return False
            newer_buckets = {key(x.time) for x in order if key(x.time) != mine and x.time >= s.time}
            return wanted == UNLIMITED or len(newer_buckets) < wanted
    return False


counts = st.one_of(st.just(0), st.just(0), st.integers(1, 6), st.just(UNLIMITED))
policies = st.builds(
    RetentionPolicy,
    keep_last=counts,
    keep_hourly=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_monthly=counts,
    keep_yearly=counts,
    keep_within=st.one_of(st.none(), st.integers(1, 24 * 900).map(lambda h: timedelta(hours=h))),
    keep_tags=st.lists(st.sampled_from(TAGS), unique=True, max_size=2).map(tuple),
).filter(lambda p: not p.is_empty())


@st.composite
def timelines(draw: st.DrawFn) -> list[SnapshotRef]:
    """Random snapshots over a few years, with clusters and exact-time ties."""
    n_groups = draw(st.integers(1, 3))
    base = draw(st.datetimes(datetime(2022, 1, 1), datetime(2026, 12, 1)))
    wide = st.datetimes(
        datetime(2022, 1, 1), datetime(2026, 12, 31), timezones=st.sampled_from(ZONES)
    )
    near = st.integers(0, 60 * 24 * 21).map(
        lambda m: (base + timedelta(minutes=m)).replace(tzinfo=UTC)
    )
    tied = st.sampled_from(
        [base.replace(tzinfo=UTC), (base + timedelta(days=3)).replace(tzinfo=UTC)]
    )
    times = st.one_of(wide, near, tied)
    items = draw(
        st.lists(
            st.tuples(
                st.text("0123456789abcdef", min_size=4, max_size=8),
                times,
                st.frozensets(st.sampled_from(TAGS), max_size=2),
                st.sampled_from(GROUPS[:n_groups]),
            ),
            max_size=40,
            unique_by=lambda item: item[0],
        )
    )
    return [SnapshotRef(id=i, time=t, tags=tags, group=g) for i, t, tags, g in items]


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(timelines(), policies)
def test_every_reason_is_valid(snaps: list[SnapshotRef], policy: RetentionPolicy) -> None:
    for d in apply_policy(snaps, policy):
        group = [s for s in snaps if s.group == d.group]
        for s, reasons in d.keep:
            assert reasons, s
            assert len(reasons) == len(set(reasons))
            for reason in reasons:
                assert reason_is_valid(s, reason, group, policy), (s, reason)


@PROPS
@given(timelines(), policies)
def test_matches_reference(snaps: list[SnapshotRef], policy: RetentionPolicy) -> None:
    expected = reference(snaps, policy)
    seen: set[str] = set()
    for d in apply_policy(snaps, policy):
        for s, reasons in d.keep:
            assert set(reasons) == expected[s.id], (s, reasons)
            seen.add(s.id)
        for s in d.remove:
            assert expected[s.id] == set(), s
            seen.add(s.id)
    assert seen == set(expected)


@PROPS
@given(timelines(), policies)
def test_newest_of_each_group_is_kept(snaps: list[SnapshotRef], policy: RetentionPolicy) -> None:
    decisions = apply_policy(snaps, policy)
    assert {d.group for d in decisions} == {s.group for s in snaps}
    for d in decisions:
        newest = max((s for s in snaps if s.group == d.group), key=lambda s: (s.time, s.id))
        assert d.keep[0][0] == newest
        assert newest not in d.remove


@PROPS
@given(timelines(), policies)
def test_keep_and_remove_partition_the_input(
    snaps: list[SnapshotRef], policy: RetentionPolicy
) -> None:
    decisions = apply_policy(snaps, policy)
    out = [s for d in decisions for s, _ in d.keep] + [s for d in decisions for s in d.remove]
    assert sorted(out, key=lambda s: s.id) == sorted(snaps, key=lambda s: s.id)
    for d in decisions:
        assert all(s.group == d.group for s, _ in d.keep)
        assert all(s.group == d.group for s in d.remove)
        for part in ([s for s, _ in d.keep], d.remove):  # newest first
            assert part == sorted(part, key=lambda s: (s.time, s.id), reverse=True)


@PROPS
@given(timelines(), policies)
def test_result_does_not_depend_on_input_order(
    snaps: list[SnapshotRef], policy: RetentionPolicy
) -> None:
    assume(len(snaps) > 1)
    assert apply_policy(snaps, policy) == apply_policy(list(reversed(snaps)), policy)


@given(
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
)
def test_parse_duration_roundtrip(y: int, m: int, w: int, d: int, h: int) -> None:
    parts = [(y, "y"), (m, "m"), (w, "w"), (d, "d"), (h, "h")]
    total = timedelta(days=365 * y + 30 * m + 7 * w + d, hours=h)
    assume(total > timedelta(0))
    text = "".join(f"{n}{u}" for n, u in parts if n)
    assert parse_duration(text) == total
    assert parse_duration(format_duration(total)) == total
