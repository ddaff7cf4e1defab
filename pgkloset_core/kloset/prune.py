"""Prune: remove data no snapshot references, safely, with a grace period.

Under an exclusive lock prune reads every snapshot and computes the blobs in
use, then classifies every pack: *kept*, *repacked* (its unused share is
above ``max_repack_ratio``: its used blobs are copied into new packs), or
*garbage* (nothing in it is used, or it is not in the index at all, as left
by a killed backup). Garbage is deleted only once it has been garbage for
``grace`` seconds, measured across prunes by a sealed *pending* record
(``pending/<hash>``), because storage backends have no reliable mtime. A
pack that a late writer (one whose lock went stale) makes useful again
before then is simply kept.

Order, so a prune killed at any point leaves a consistent kloset and the next
prune finishes the job: write new packs, write the pending record, write the
compacted index (its last delta supersedes every delta read), delete the
superseded deltas and records, then delete packs. No index that readers use
ever names a pack that has been deleted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import zstandard

from pgkloset_core.errors import CorruptObject, KlosetError, SnapshotNotFound, UsageError
from pgkloset_core.kloset.crypto import content_hash
from pgkloset_core.kloset.index import BlobEntry, BlobIndex, PackRecord, encode_delta
from pgkloset_core.kloset.locks import Lock
from pgkloset_core.kloset.pack import open_blob, pack_name
from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.kloset.repository import INDEX_PREFIX, Kloset
from pgkloset_core.kloset.sealed import KIND_INDEX, seal, seal_json, unseal_json
from pgkloset_core.kloset.writer import _BlobSink
from pgkloset_core.storage.base import ObjectNotFound, StorageError

PENDING_PREFIX = "pending/"
KIND_PENDING = b"pending"
PENDING_VERSION = 1
DEFAULT_GRACE = 3600.0
DEFAULT_MAX_REPACK_RATIO = 0.25
COMPACT_PACKS_PER_DELTA = 4096
TEMPORARY_MIN_AGE = 3600.0

Step = Callable[[str], None]


@dataclass
class PruneReport:
    """What prune did (or, with ``dry_run``, would do)."""

    dry_run: bool
    grace_seconds: float
    max_repack_ratio: float
    snapshots: int = 0
    packs: int = 0
    used_blobs: int = 0
    unindexed_packs: int = 0
    packs_deleted: int = 0
    bytes_freed: int = 0
    packs_repacked: int = 0
    blobs_repacked: int = 0
    packs_written: int = 0
    bytes_written: int = 0
    packs_waiting: int = 0
    bytes_waiting: int = 0
    index_deltas_deleted: int = 0
    index_deltas_written: int = 0
    temporaries_deleted: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _State:
    """Everything prune reads before deciding."""

    stored: dict[str, int]  # pack id -> size on storage
    delta_names: list[str]  # every index delta read (all get superseded)
    live: dict[str, PackRecord]  # packs of the deltas not superseded
    pending: dict[str, float]  # pack id -> when it was first seen as garbage
    pending_names: list[str]


@dataclass
class _Plan:
    keep: list[str]
    repack: dict[str, list[BlobEntry]]  # pack id -> the used blobs to copy out
    garbage: dict[str, float]  # pack id -> first seen as garbage
    delete: list[str]
    dropped_missing: list[str]


class _RepackSink(_BlobSink):
    """The backup's pack writer, collecting records instead of writing its own deltas."""

    def __init__(self, kloset: Kloset) -> None:
        super().__init__(kloset)
        self.records: list[PackRecord] = []

    def _collect(self, fut: Future[PackRecord]) -> None:
        self.records.append(fut.result())


def prune(kloset: Kloset, lock: Lock, *, grace: float = DEFAULT_GRACE,
          max_repack_ratio: float = DEFAULT_MAX_REPACK_RATIO, dry_run: bool = False,
          on_step: Step | None = None, now: float | None = None) -> PruneReport:
    """Remove unreferenced data; ``on_step`` is called after each durable step."""
    if not lock.exclusive:
        raise UsageError("prune needs an exclusive lock")
    if grace < 0:
        raise UsageError("the grace period cannot be negative")
    if not 0 <= max_repack_ratio <= 1:
        raise UsageError("--max-repack-ratio must be between 0 and 1")
    step = on_step or (lambda _name: None)
    now = time.time() if now is None else now
    report = PruneReport(dry_run=dry_run, grace_seconds=grace, max_repack_ratio=max_repack_ratio)
    lock.ensure_valid()
    state = _read_state(kloset)
    try:
        index = BlobIndex.build(state.live.values())
        kloset._index = index  # list blobs are read through exactly this view
        used = _used_blobs(kloset, index, report)
        plan = _plan(state, used, grace, max_repack_ratio, now)
        _keep_frozen(kloset, plan, report)
        _fill_report(report, state, plan, used)
        if dry_run:
            return report
        new_records = _repack(kloset, lock, state, plan, report)
        step("packs-written")
        _commit(kloset, lock, state, plan, new_records, now, report, step)
        report.temporaries_deleted = _remove_temporaries(kloset, max(grace, TEMPORARY_MIN_AGE))
    finally:
        kloset._index = None  # the next reader loads the index as it now is
    return report


# -- reading -----------------------------------------------------------------


def _read_state(kloset: Kloset) -> _State:
    # Packs are listed before the index: a pack indexed meanwhile is then merely
    # "unindexed" (kept through the grace period), never missing from our view.
    stored = {o.name.rsplit("/", 1)[-1]: o.size for o in kloset.backend.list("data/")}
    delta_names, live, superseded = [], {}, set()
    records: dict[str, list[PackRecord]] = {}
    for name in kloset.index_names():
        try:
            packs, sup = kloset.read_index_delta(name)
        except ObjectNotFound:
            continue
        except CorruptObject as exc:
            raise KlosetError(f"prune refuses to run on a damaged index ({exc}); "
                              "run `pgkloset check`") from None
        delta_names.append(name)
        records[name] = packs
        superseded.update(INDEX_PREFIX + s for s in sup)
    for name in delta_names:
        if name not in superseded:
            for rec in records[name]:
                live.setdefault(rec.pack_id, rec)
    for pack_id in live.keys() - stored.keys():
        try:  # written after the listing (a late writer): not missing
            stored[pack_id] = kloset.backend.stat(pack_name(pack_id)).size
        except ObjectNotFound:
            continue
    pending, pending_names = read_pending(kloset)
    return _State(stored, delta_names, live, pending, pending_names)


def read_pending(kloset: Kloset) -> tuple[dict[str, float], list[str]]:
    """Merged pending-deletion times (earliest wins) and the names of every record."""
    docs: dict[str, dict[str, Any]] = {}
    for obj in kloset.backend.list(PENDING_PREFIX):
        try:
            data = kloset.backend.read(obj.name)
        except ObjectNotFound:
            continue
        if content_hash(data) != obj.name.removeprefix(PENDING_PREFIX):
            raise CorruptObject(obj.name, "content does not match its name")
        doc = unseal_json(kloset.master, KIND_PENDING, data, obj.name)
        if not isinstance(doc, dict) or doc.get("version") != PENDING_VERSION:
            raise CorruptObject(obj.name, "not a pending-deletion record of a known version")
        docs[obj.name] = doc
    superseded = {PENDING_PREFIX + s for d in docs.values() for s in d.get("supersedes", [])}
    merged: dict[str, float] = {}
    for name, doc in docs.items():
        if name in superseded:
            continue
        for pack_id, since in dict(doc.get("packs", {})).items():
            merged[str(pack_id)] = min(float(since), merged.get(str(pack_id), float("inf")))
    return merged, sorted(docs)


def _used_blobs(kloset: Kloset, index: BlobIndex, report: PruneReport) -> set[bytes]:
    used: set[bytes] = set()
    for sid in kloset.snapshot_ids():
        try:
            snap = kloset.load_snapshot(sid)
        except SnapshotNotFound:
            continue  # removed meanwhile
        except KlosetError as exc:
            raise KlosetError(f"prune refuses to run: {exc}; run `pgkloset check`") from None
        report.snapshots += 1
        for entry in snap.entries:
            for list_id in entry.lists:
                used.add(bytes.fromhex(list_id))
            try:
                for blob_id, _length in iter_refs_of(kloset, snap, entry):
                    if index.lookup(blob_id) is None:
                        raise CorruptObject(f"snapshots/{sid}",
                                            f"chunk {blob_id.hex()[:16]} is not in the index")
                    used.add(blob_id)
            except (CorruptObject, StorageError) as exc:
                raise KlosetError(f"prune refuses to run, data is already missing ({exc}); "
                                  "run `pgkloset check`") from None
    return used


# -- deciding ------------------------------------------------------------------


def _plan(state: _State, used: set[bytes], grace: float, ratio: float, now: float) -> _Plan:
    # Each used blob is owned by one pack; packs waiting for deletion own only what
    # exists nowhere else, so copies made by an earlier repack take over.
    where: dict[bytes, list[str]] = {}
    for pack_id, rec in state.live.items():
        if pack_id not in state.stored:
            continue
        for b in rec.blobs:
            if b.blob_id in used:
                where.setdefault(b.blob_id, []).append(pack_id)
    missing_used = used - where.keys()
    if missing_used:
        blob = min(missing_used).hex()[:16]
        raise KlosetError(f"prune refuses to run: blob {blob} is needed but its pack is missing; "
                          "run `pgkloset check`")
    owner = {blob: min(packs, key=lambda p: (p in state.pending, p)) for blob, packs in where.items()}
    owned: dict[str, list[BlobEntry]] = {}
    for pack_id, rec in state.live.items():
        owned[pack_id] = [b for b in rec.blobs if owner.get(b.blob_id) == pack_id]

    keep, repack, garbage = [], {}, {}
    dropped = [p for p in state.live if p not in state.stored]
    for pack_id, rec in state.live.items():
        if pack_id not in state.stored:
            continue
        total = sum(b.length for b in rec.blobs)
        mine = sum(b.length for b in owned[pack_id])
        if mine == 0:
            garbage[pack_id] = state.pending.get(pack_id, now)
        elif total and (total - mine) / total > ratio:
            repack[pack_id] = owned[pack_id]
        else:
            keep.append(pack_id)
    # A blob a repacked pack owns needs no copy when a kept pack holds it too.
    kept = set(keep)
    for pack_id, blobs in list(repack.items()):
        repack[pack_id] = [b for b in blobs if not any(p in kept for p in where[b.blob_id])]
    for pack_id in list(repack):
        garbage[pack_id] = state.pending.get(pack_id, now)
    for pack_id in state.stored:
        if pack_id not in state.live:  # unindexed: a killed (or very late) writer's pack
            garbage[pack_id] = state.pending.get(pack_id, now)
    delete = sorted(p for p, since in garbage.items() if now - since >= grace)
    return _Plan(keep, repack, garbage, delete, dropped)


def _keep_frozen(kloset: Kloset, plan: _Plan, report: PruneReport) -> None:
    """Packs in an archive storage class are not repacked (reading them needs a thaw)."""
    if not getattr(kloset.backend, "may_be_cold", False):
        return
    from pgkloset_core.storage.base import READABLE

    frozen = [p for p in plan.repack if kloset.backend.cold_state(pack_name(p))[0] not in READABLE]
    for pack_id in frozen:
        del plan.repack[pack_id]
        plan.garbage.pop(pack_id, None)
        plan.delete = [p for p in plan.delete if p != pack_id]
        plan.keep.append(pack_id)
    if frozen:
        report.notes.append(f"{len(frozen)} partly unused pack(s) in cold storage were not "
                            "repacked (thaw them first to reclaim their space)")


def _fill_report(report: PruneReport, state: _State, plan: _Plan, used: set[bytes]) -> None:
    report.packs = len(state.stored)
    report.used_blobs = len(used)
    report.unindexed_packs = sum(1 for p in state.stored if p not in state.live)
    report.packs_deleted = len(plan.delete)
    report.bytes_freed = sum(state.stored[p] for p in plan.delete)
    report.packs_repacked = len(plan.repack)
    report.blobs_repacked = sum(len(b) for b in plan.repack.values())
    waiting = [p for p in plan.garbage if p not in set(plan.delete)]
    report.packs_waiting = len(waiting)
    report.bytes_waiting = sum(state.stored[p] for p in waiting)
    if plan.dropped_missing:
        report.notes.append(f"{len(plan.dropped_missing)} indexed pack(s) were already gone and "
                            "held nothing in use; dropped from the index")
    if waiting:
        report.notes.append(f"{len(waiting)} unused pack(s) wait for the grace period "
                            f"({report.grace_seconds:.0f}s) before deletion")


# -- writing -------------------------------------------------------------------


def _repack(kloset: Kloset, lock: Lock, state: _State, plan: _Plan,
            report: PruneReport) -> list[PackRecord]:
    """Copy the used blobs of mostly-unused packs into new packs (not yet indexed)."""
    todo = {p: blobs for p, blobs in plan.repack.items() if blobs}
    if not todo:
        return []
    lock.ensure_valid()
    sink = _RepackSink(kloset)
    compressor = zstandard.ZstdCompressor(level=kloset.config.zstd_level)
    try:
        for pack_id in sorted(todo):
            name = pack_name(pack_id)
            data = kloset.backend.read(name)
            if content_hash(data) != pack_id:
                raise CorruptObject(name, "content does not match its name; prune stopped before "
                                          "deleting anything")
            salt = state.live[pack_id].salt
            for b in todo[pack_id]:
                plain = open_blob(kloset.master, salt, b.blob_type, b.blob_id,
                                  data[b.offset : b.offset + b.length], name)
                sink.add(b.blob_id, b.blob_type, sink.seal(b.blob_type, b.blob_id, plain, compressor),
                         len(plain))
        sink.flush()
    finally:
        sink.close()
    report.packs_written = len(sink.records)
    report.bytes_written = sink.stored_bytes
    return sink.records


def _commit(kloset: Kloset, lock: Lock, state: _State, plan: _Plan, new_records: list[PackRecord],
            now: float, report: PruneReport, step: Step) -> None:
    backend = kloset.backend
    deleting = set(plan.delete)

    # 1. Remember when each garbage pack was first seen (deleted ones too, so a prune
    #    killed before deleting them lets the next one delete them at once).
    lock.ensure_valid()
    rewrite = plan.garbage != state.pending or len(state.pending_names) > 1
    record = state.pending_names[0] if state.pending_names and not rewrite else None
    if rewrite:
        if plan.garbage:
            record = write_pending(kloset, plan.garbage, supersedes=state.pending_names, now=now)
        step("pending-written")

    # 2. The compacted index: kept, repacked-but-waiting and new packs; never a pack
    #    about to be deleted. Only its last delta supersedes the old ones.
    records = [rec for p, rec in state.live.items() if p in state.stored and p not in deleting]
    records += new_records
    index_changed = bool(new_records or deleting & state.live.keys() or plan.dropped_missing)
    if index_changed or len(state.delta_names) > 1:
        lock.ensure_valid()
        report.index_deltas_written = _write_index(kloset, records, state.delta_names)
        step("index-written")
        # 3. Superseded deltas and pending records go.
        for name in state.delta_names:
            backend.delete(name)
        report.index_deltas_deleted = len(state.delta_names)
        step("index-cleaned")
    if rewrite:
        for name in state.pending_names:
            backend.delete(name)

    # 4. Finally the packs.
    if deleting:
        lock.ensure_valid()
    for pack_id in plan.delete:
        backend.delete(pack_name(pack_id))
        step("pack-deleted")
    # 5. The record need not name deleted packs any more.
    if record is not None and deleting:
        waiting = {p: t for p, t in plan.garbage.items() if p not in deleting}
        if waiting:
            write_pending(kloset, waiting, supersedes=[record], now=now)
        backend.delete(record)


def _write_index(kloset: Kloset, records: list[PackRecord], supersedes: list[str]) -> int:
    chunks = [records[i : i + COMPACT_PACKS_PER_DELTA]
              for i in range(0, len(records), COMPACT_PACKS_PER_DELTA)] or [[]]
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        sup = [s.removeprefix(INDEX_PREFIX) for s in supersedes] if last else []
        data = seal(kloset.master, KIND_INDEX, encode_delta(chunk, sup))
        kloset.backend.write(INDEX_PREFIX + content_hash(data), data)
    return len(chunks)


def write_pending(kloset: Kloset, packs: dict[str, float], *, supersedes: Iterable[str],
                  now: float) -> str:
    doc = {
        "version": PENDING_VERSION,
        "written": now,
        "packs": dict(sorted(packs.items())),
        "supersedes": sorted(s.removeprefix(PENDING_PREFIX) for s in supersedes),
    }
    data = seal_json(kloset.master, KIND_PENDING, doc)
    name = PENDING_PREFIX + content_hash(data)
    kloset.backend.write(name, data)
    return name


def _remove_temporaries(kloset: Kloset, min_age: float) -> int:
    """Partial files of killed writers (local klosets only; other backends write atomically)."""
    from pgkloset_core.storage.fs import FilesystemBackend

    if not isinstance(kloset.backend, FilesystemBackend):
        return 0
    removed = 0
    cutoff = time.time() - min_age
    for path in kloset.backend.leftover_temporaries():
        try:
            if path.stat().st_mtime < cutoff:
                os.unlink(path)
                removed += 1
        except OSError:
            continue
    return removed


def describe(report: PruneReport) -> list[str]:
    """Human summary lines for the CLI."""
    from pgkloset_core.cli_common import human_bytes

    verb = "would free" if report.dry_run else "freed"
    lines = [
        f"{report.snapshots} snapshots, {report.packs} packs, {report.used_blobs} blobs in use",
        f"{verb} {human_bytes(report.bytes_freed)}: {report.packs_deleted} pack(s) deleted, "
        f"{report.blobs_repacked} blob(s) from {report.packs_repacked} pack(s) repacked"
        + (f" into {report.packs_written} new pack(s)" if report.packs_written else ""),
    ]
    if report.packs_waiting:
        lines.append(f"{report.packs_waiting} unused pack(s) ({human_bytes(report.bytes_waiting)}) "
                     "wait for the grace period")
    return lines


def report_json(report: PruneReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=True)
