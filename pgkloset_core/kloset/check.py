"""Integrity checks: structure quickly, data on request.

Without ``read_data`` the check proves that every key file, index delta and
snapshot decrypts and authenticates, that every chunk a snapshot needs is in
the index and that every indexed pack exists with a plausible size. With
``read_data`` (or a random subset of packs) it also downloads packs,
verifies their names against their content, decrypts every blob and
re-hashes it. Problems are reported by object name; nothing is repaired.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pgkloset_core.errors import CorruptObject, KlosetError
from pgkloset_core.kloset.crypto import content_hash
from pgkloset_core.kloset.index import BlobEntry, BlobIndex, PackRecord
from pgkloset_core.kloset.pack import open_blob, pack_name, read_trailer
from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.kloset.repository import INDEX_PREFIX, Kloset
from pgkloset_core.storage.base import StorageError


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    snapshots: int = 0
    packs: int = 0
    packs_read: int = 0
    blobs_verified: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "snapshots": self.snapshots,
            "packs": self.packs,
            "packs_read": self.packs_read,
            "blobs_verified": self.blobs_verified,
            "bytes_read": self.bytes_read,
        }


def check(kloset: Kloset, *, read_data: bool = False, subset_percent: float | None = None,
          progress: Callable[[str], None] | None = None) -> CheckReport:
    report = CheckReport()
    say = progress or (lambda _msg: None)

    say("key files")
    _keys, damaged = kloset.list_keys()
    report.problems.extend(str(d) for d in damaged)

    say("index")
    packs: dict[str, PackRecord] = {}
    superseded: set[str] = set()
    good_records: dict[str, list[PackRecord]] = {}
    for name in kloset.index_names():
        try:
            records, sup = kloset.read_index_delta(name)
        except (CorruptObject, StorageError) as exc:
            report.problems.append(str(exc))
            continue
        good_records[name] = records
        superseded.update(INDEX_PREFIX + s for s in sup)
    for name, records in good_records.items():
        if name in superseded:
            continue
        for rec in records:
            packs.setdefault(rec.pack_id, rec)
    index = BlobIndex.build(packs.values())

    stored = {o.name.rsplit("/", 1)[-1]: o.size for o in kloset.backend.list("data/")}
    report.packs = len(packs)
    for pack_id, rec in packs.items():
        size = stored.get(pack_id)
        if size is None:
            report.problems.append(f"{pack_name(pack_id)}: missing (named by the index)")
        elif rec.blobs and max(b.offset + b.length for b in rec.blobs) > size:
            report.problems.append(f"{pack_name(pack_id)}: shorter than the index says ({size} bytes)")
    unindexed = [p for p in stored if p not in packs]
    if unindexed:
        report.notes.append(f"{len(unindexed)} pack(s) not in the index (left by an interrupted "
                            f"backup or a running one; prune removes them)")

    say("snapshots")
    saved_index = kloset._index
    kloset._index = index
    try:
        for sid in kloset.snapshot_ids():
            try:
                snap = kloset.load_snapshot(sid)
            except KlosetError as exc:
                report.problems.append(str(exc))
                continue
            report.snapshots += 1
            for entry in snap.entries:
                try:
                    for blob_id, _length in iter_refs_of(kloset, snap, entry):
                        if index.lookup(blob_id) is None:
                            report.problems.append(
                                f"snapshots/{sid}: entry {entry.name}: chunk {blob_id.hex()[:16]} missing")
                            break
                except (KlosetError, StorageError) as exc:
                    report.problems.append(f"snapshots/{sid}: entry {entry.name}: {exc}")
    finally:
        kloset._index = saved_index

    if read_data or subset_percent:
        chosen = [p for p in packs if p in stored]
        if subset_percent is not None and not read_data:
            want = max(1, round(len(chosen) * subset_percent / 100)) if chosen else 0
            chosen = random.sample(chosen, min(want, len(chosen)))
        for n, pack_id in enumerate(sorted(chosen), 1):
            say(f"reading pack {n}/{len(chosen)}")
            _read_pack(kloset, packs[pack_id], report)
    return report


def _read_pack(kloset: Kloset, rec: PackRecord, report: CheckReport) -> None:
    name = pack_name(rec.pack_id)
    try:
        data = kloset.backend.read(name)
    except StorageError as exc:
        report.problems.append(f"{name}: cannot read: {exc}")
        return
    report.packs_read += 1
    report.bytes_read += len(data)
    if content_hash(data) != rec.pack_id:
        report.problems.append(f"{name}: content does not match its name (damaged)")
    try:
        parsed = read_trailer(kloset.master, data, name)
    except CorruptObject as exc:
        report.problems.append(str(exc))
        parsed = None
    if parsed is not None and (parsed.salt != rec.salt or _key(parsed.entries) != _key(rec.blobs)):
        report.problems.append(f"{name}: the pack's trailer and the index disagree")
    for blob in rec.blobs:
        stored = data[blob.offset: blob.offset + blob.length]
        try:
            open_blob(kloset.master, rec.salt, blob.blob_type, blob.blob_id, stored, name)
            report.blobs_verified += 1
        except CorruptObject as exc:
            report.problems.append(str(exc))


def _key(entries: tuple[BlobEntry, ...]) -> list[tuple[bytes, int, int, int]]:
    return sorted((e.blob_id, e.blob_type, e.offset, e.length) for e in entries)
