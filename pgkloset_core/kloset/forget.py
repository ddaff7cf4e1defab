"""Forget: choose snapshots to remove, by id or by retention policy, then remove them.

The decision itself is the pure ``retention.apply_policy``; this module only
turns kloset snapshots into ``SnapshotRef`` values (with their group) and
removes manifests. Data stays until ``prune``.

Groups: each ``--group-by`` field is read from the snapshot: ``kind``,
``hostname``, ``tags`` (sorted, comma-joined) and ``entries`` (entry names,
sorted, comma-joined) are built in; any other name is a ``meta`` field. A
snapshot whose meta has neither ``server`` nor ``database`` (a ``backup
stream``, say) uses its hostname as ``server`` and its entry names as
``database``, so two differently named streams never share one history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgkloset_core.errors import UsageError
from pgkloset_core.kloset.locks import Lock
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.retention import (
    DEFAULT_GROUP_BY,
    GroupDecision,
    RetentionPolicy,
    SnapshotRef,
    apply_policy,
    group_key,
)
from pgkloset_core.kloset.snapshot import Snapshot

__all__ = [
    "DEFAULT_GROUP_BY",
    "ForgetPlan",
    "forget",
    "group_attributes",
    "plan_ids",
    "plan_policy",
    "snapshot_ref",
]


def group_attributes(snapshot: Snapshot) -> dict[str, str]:
    """The values ``--group-by`` fields are read from (see the module doc)."""
    attrs = {str(k): str(v) for k, v in snapshot.meta.items()
             if isinstance(v, str | int | float | bool)}
    entries = ",".join(sorted(e.name for e in snapshot.entries))
    attrs.update(kind=snapshot.kind, hostname=snapshot.hostname,
                 tags=",".join(sorted(snapshot.tags)), entries=entries)
    if not attrs.get("server") and not attrs.get("database"):
        attrs["server"] = snapshot.hostname
        attrs["database"] = entries
    return attrs


def snapshot_ref(snapshot: Snapshot, group_by: Sequence[str]) -> SnapshotRef:
    return SnapshotRef(id=snapshot.id, time=snapshot.time, tags=frozenset(snapshot.tags),
                       group=group_key(group_attributes(snapshot), group_by))


@dataclass
class ForgetPlan:
    """What forget removes and keeps; ``decisions`` is empty for explicit ids."""

    remove: list[Snapshot]
    keep: list[Snapshot] = field(default_factory=list)
    decisions: list[GroupDecision] = field(default_factory=list)
    policy: RetentionPolicy | None = None
    group_by: tuple[str, ...] = ()

    def to_json(self, *, dry_run: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "dry_run": dry_run,
            "remove": [s.id for s in self.remove],
            "removed": [] if dry_run else [s.id for s in self.remove],
            "keep": [s.id for s in self.keep],
        }
        if self.policy is not None:
            doc["policy"] = self.policy.describe()
            doc["group_by"] = list(self.group_by)
            doc["groups"] = [d.as_dict() for d in self.decisions]
        return doc


def plan_ids(kloset: Kloset, refs: Iterable[str]) -> ForgetPlan:
    """Resolve every id (full, prefix or ``latest``) before anything is removed."""
    chosen: dict[str, Snapshot] = {}
    for ref in refs:
        snap = kloset.resolve(ref)
        chosen.setdefault(snap.id, snap)
    return ForgetPlan(remove=list(chosen.values()))


def plan_policy(snapshots: Iterable[Snapshot], policy: RetentionPolicy, *,
                group_by: Sequence[str] = DEFAULT_GROUP_BY,
                tags: Sequence[str] = ()) -> ForgetPlan:
    """Apply ``policy`` per group to the snapshots carrying every tag in ``tags``.

    Snapshots without those tags are outside the policy: neither kept nor removed.
    """
    if policy.is_empty():
        raise UsageError("refusing to forget with an empty policy (it would remove every "
                         "snapshot); give at least one --keep-* option")
    considered = {s.id: s for s in snapshots if set(tags) <= set(s.tags)}
    decisions = apply_policy((snapshot_ref(s, group_by) for s in considered.values()), policy)
    remove = [considered[r.id] for d in decisions for r in d.remove]
    keep = [considered[r.id] for d in decisions for r, _reasons in d.keep]
    return ForgetPlan(remove=remove, keep=keep, decisions=decisions, policy=policy,
                      group_by=tuple(group_by))


def forget(kloset: Kloset, plan: ForgetPlan, lock: Lock) -> list[str]:
    """Remove the plan's manifests under an exclusive lock; returns the removed ids."""
    if not lock.exclusive:
        raise UsageError("forget needs an exclusive lock")
    lock.ensure_valid()
    ids = [s.id for s in plan.remove]
    kloset.forget(ids)
    return ids
