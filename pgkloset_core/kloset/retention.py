"""Retention policy: which snapshots `forget` keeps and why.

Pure logic, no I/O, so the CLI, the Dagster prune job and the tests share one
implementation. The semantics follow restic's `forget`:

- ``keep_last N``: the N newest snapshots.
- ``keep_hourly/daily/weekly/monthly/yearly N``: walk the snapshots from newest
  to oldest; the first snapshot seen in a bucket (hour, day, ISO week, month,
  year) is kept, until N distinct buckets have been kept. Buckets with no
  snapshot do not count. ``-1`` means unlimited (every bucket), as in restic.
- ``keep_within D``: every snapshot no older than D before the newest snapshot
  of its group (inclusive), so an idle database keeps its last history.
- ``keep_tags``: every snapshot that carries any of these tags.

A snapshot is kept if any rule keeps it, and every kept snapshot lists the
reasons ("last", "daily 2026-11-20", "within 7d", "tag:release"). The policy
applies per group (default: server, database, kind), and the newest snapshot of
every group is always kept (reason "newest" when no rule already keeps it), so
a policy of only ``keep_tags`` cannot empty a database's history. An empty
policy is refused: forgetting everything must never happen by omission.

All bucketing is done in UTC so the result does not depend on the machine's
timezone (restic uses local time; that makes the answer change with TZ).
Ordering is by (time, id): two snapshots with the same time are ordered by id,
so the result is deterministic.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pgkloset_core.errors import UsageError

__all__ = [
    "DEFAULT_GROUP_BY",
    "UNLIMITED",
    "GroupDecision",
    "RetentionPolicy",
    "SnapshotRef",
    "apply_policy",
    "format_duration",
    "group_key",
    "parse_duration",
    "parse_group_by",
]

#: Snapshot metadata fields that form a group unless the operator says otherwise.
DEFAULT_GROUP_BY: tuple[str, ...] = ("server", "database", "kind")

#: Count value meaning "every bucket" (restic's ``unlimited``).
UNLIMITED = -1

# Fixed unit lengths: a plain timedelta is timezone- and calendar-independent and
# serialises trivially. "m" is months (restic's choice), not minutes; a month is
# 30 days and a year 365 days, so "1m" may differ from a calendar month by 1-2 days.
_UNITS: dict[str, timedelta] = {
    "y": timedelta(days=365),
    "m": timedelta(days=30),
    "w": timedelta(weeks=1),
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
}
_DURATION_RE = re.compile(r"(?:\d+[ywmdh])+")
_PART_RE = re.compile(r"(\d+)([ywmdh])")
_DURATION_HELP = (
    "use number+unit parts with units y (365d), m (months, 30d), w, d, h, e.g. 30d or 1y6m"
)


def parse_duration(text: str) -> timedelta:
    """Parse a keep-within duration such as "30d", "2w" or "1y2m3d4h".

    Units: y = 365 days, m = 30 days (months, as in restic; there is no minute
    unit), w = 7 days, d = 24 hours, h = 1 hour. Each unit may appear once, in
    any order. Zero is refused because it would keep nothing beyond the newest.
    """
    if not isinstance(text, str):
        raise UsageError(f"invalid duration {text!r}: {_DURATION_HELP}")
    s = text.strip()
    if not _DURATION_RE.fullmatch(s):
        raise UsageError(f"invalid duration {text!r}: {_DURATION_HELP}")
    total = timedelta()
    seen: set[str] = set()
    try:
        for number, unit in _PART_RE.findall(s):
            if unit in seen:
                raise UsageError(f"invalid duration {text!r}: unit {unit!r} given twice")
            seen.add(unit)
            total += int(number) * _UNITS[unit]
    except OverflowError:
        raise UsageError(f"invalid duration {text!r}: too large") from None
    if total <= timedelta(0):
        raise UsageError(f"invalid duration {text!r}: must be longer than zero")
    return total


def format_duration(delta: timedelta) -> str:
    """Render a duration compactly ("7d", "1d12h") for reasons and logs."""
    if delta % timedelta(hours=1):
        return str(delta)
    hours = delta // timedelta(hours=1)
    days, hours = divmod(hours, 24)
    text = (f"{days}d" if days else "") + (f"{hours}h" if hours else "")
    return text or "0h"


_COUNT_FIELDS = (
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
)


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep; counts are 0 (rule off), N, or UNLIMITED (-1)."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: timedelta | None = None
    keep_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < UNLIMITED:
                raise UsageError(
                    f"{name} must be a whole number >= 0 or 'unlimited', got {value!r}"
                )
        if self.keep_within is not None and (
            not isinstance(self.keep_within, timedelta) or self.keep_within <= timedelta(0)
        ):
            raise UsageError(f"keep_within must be a positive duration, got {self.keep_within!r}")
        tags = (self.keep_tags,) if isinstance(self.keep_tags, str) else tuple(self.keep_tags)
        for tag in tags:
            if not isinstance(tag, str) or not tag.strip():
                raise UsageError(f"keep_tags entries must be non-empty strings, got {tag!r}")
            if "," in tag:
                # restic reads "a,b" as "both tags"; we do not, so refuse rather than match nothing.
                raise UsageError(f"keep tag {tag!r} contains a comma: give each tag separately")
        object.__setattr__(self, "keep_tags", tuple(dict.fromkeys(tags)))

    def is_empty(self) -> bool:
        """True when no rule is set, i.e. applying it would keep nothing."""
        return (
            all(getattr(self, name) == 0 for name in _COUNT_FIELDS)
            and self.keep_within is None
            and not self.keep_tags
        )

    def describe(self) -> str:
        """One line for logs and run metadata, e.g. "last 3, daily 7, within 30d"."""
        parts = []
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if value:
                parts.append(f"{name[5:]} {'unlimited' if value == UNLIMITED else value}")
        if self.keep_within is not None:
            parts.append(f"within {format_duration(self.keep_within)}")
        parts.extend(f"tag:{tag}" for tag in self.keep_tags)
        return ", ".join(parts) if parts else "(empty)"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RetentionPolicy:
        """Build a policy from YAML/JSON config.

        Keys: keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly,
        keep_yearly (int or "unlimited"), keep_within ("30d"), keep_tags (a tag
        or a list). Dashes are accepted for underscores. A null value leaves the
        rule off. Unknown keys are refused so a typo cannot silently drop a rule.
        """
        if not isinstance(data, Mapping):
            raise UsageError(f"retention policy must be a mapping, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        known = (*_COUNT_FIELDS, "keep_within", "keep_tags")
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise UsageError(
                    f"unknown retention key {raw_key!r} (expected one of: {', '.join(known)})"
                )
            if key in kwargs:
                raise UsageError(f"retention key {key!r} given twice")
            if value is None:
                continue
            if key in _COUNT_FIELDS:
                kwargs[key] = _parse_count(key, value)
            elif key == "keep_within":
                kwargs[key] = value if isinstance(value, timedelta) else parse_duration(value)
            else:
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, Sequence):
                    raise UsageError(f"keep_tags must be a tag or a list of tags, got {value!r}")
                kwargs[key] = tuple(value)
        return cls(**kwargs)


def _parse_count(key: str, value: Any) -> int:
    """Accept YAML ints, numeric strings (from env vars) and "unlimited"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "unlimited":
            return UNLIMITED
        if text.lstrip("-").isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < UNLIMITED:
        raise UsageError(f"{key} must be a whole number >= 0 or 'unlimited', got {value!r}")
    return value


@dataclass(frozen=True)
class SnapshotRef:
    """The little a retention decision needs to know about a snapshot."""

    id: str
    time: datetime
    tags: frozenset[str] = frozenset()
    group: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            # A naive time is a bug in the caller: its bucket would depend on guesswork.
            raise ValueError(f"snapshot {self.id}: time must be timezone-aware")
        object.__setattr__(self, "time", self.time.astimezone(UTC))
        object.__setattr__(self, "tags", frozenset(self.tags))
        object.__setattr__(self, "group", tuple(self.group))


def group_key(meta: Mapping[str, str], fields: Sequence[str]) -> tuple[str, ...]:
    """Group of a snapshot from its metadata; a missing field groups as ""."""
    return tuple(str(meta.get(name, "")) for name in fields)


def parse_group_by(text: str) -> tuple[str, ...]:
    """Parse "--group-by server,database,kind"; "" means one group for all."""
    if not text.strip():
        return ()
    fields = tuple(part.strip() for part in text.split(","))
    if any(not part for part in fields):
        raise UsageError(f"invalid --group-by {text!r}: empty field name")
    if len(set(fields)) != len(fields):
        raise UsageError(f"invalid --group-by {text!r}: field given twice")
    return fields


@dataclass(frozen=True)
class GroupDecision:
    """Outcome for one group: kept snapshots with reasons, and the rest. Newest first."""

    group: tuple[str, ...]
    keep: list[tuple[SnapshotRef, list[str]]] = field(default_factory=list)
    remove: list[SnapshotRef] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for `forget --json` and run metadata."""
        return {
            "group": list(self.group),
            "keep": [
                {"id": s.id, "time": s.time.isoformat(), "reasons": list(r)} for s, r in self.keep
            ],
            "remove": [{"id": s.id, "time": s.time.isoformat()} for s in self.remove],
        }


# (policy field, reason prefix, bucket label of a UTC time)
_BUCKETS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_hourly", "hourly", lambda t: t.strftime("%Y-%m-%d %H:00")),
    ("keep_daily", "daily", lambda t: t.strftime("%Y-%m-%d")),
    ("keep_weekly", "weekly", lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
    ("keep_monthly", "monthly", lambda t: t.strftime("%Y-%m")),
    ("keep_yearly", "yearly", lambda t: f"{t.year:04d}"),
)


def apply_policy(snapshots: Iterable[SnapshotRef], policy: RetentionPolicy) -> list[GroupDecision]:
    """Decide, per group, which snapshots to keep (with reasons) and which to remove.

    Groups come back sorted by key; within a group, keep and remove are newest
    first. Refuses an empty policy with UsageError.
    """
    if policy.is_empty():
        raise UsageError(
            "refusing to forget with an empty policy (it would remove every snapshot); "
            "give at least one keep rule"
        )
    groups: dict[tuple[str, ...], list[SnapshotRef]] = defaultdict(list)
    seen: set[str] = set()
    for snap in snapshots:
        if snap.id in seen:
            raise ValueError(f"snapshot {snap.id} given twice")
        seen.add(snap.id)
        groups[snap.group].append(snap)
    return [_decide(key, groups[key], policy) for key in sorted(groups)]


def _decide(
    key: tuple[str, ...], snaps: list[SnapshotRef], policy: RetentionPolicy
) -> GroupDecision:
    """restic's single newest-to-oldest pass, with per-rule bucket counters."""
    ordered = sorted(snaps, key=lambda s: (s.time, s.id), reverse=True)
    newest = ordered[0].time
    within_label = format_duration(policy.keep_within) if policy.keep_within else ""
    remaining = {name: getattr(policy, name) for name, _, _ in _BUCKETS}
    last_bucket: dict[str, str | None] = {name: None for name, _, _ in _BUCKETS}
    keep: list[tuple[SnapshotRef, list[str]]] = []
    remove: list[SnapshotRef] = []
    for index, snap in enumerate(ordered):
        reasons: list[str] = []
        if policy.keep_last == UNLIMITED or index < policy.keep_last:
            reasons.append("last")
        for name, prefix, label_of in _BUCKETS:
            if remaining[name] == 0:
                continue
            label = label_of(snap.time)
            # Times descend, so a new label is a new bucket and this is its newest snapshot.
            if label != last_bucket[name]:
                last_bucket[name] = label
                if remaining[name] != UNLIMITED:
                    remaining[name] -= 1
                reasons.append(f"{prefix} {label}")
        if policy.keep_within is not None and snap.time >= newest - policy.keep_within:
            reasons.append(f"within {within_label}")
        reasons.extend(f"tag:{tag}" for tag in policy.keep_tags if tag in snap.tags)
        if index == 0 and not reasons:
            reasons.append("newest")
        if reasons:
            keep.append((snap, reasons))
        else:
            remove.append(snap)
    return GroupDecision(group=key, keep=keep, remove=remove)
