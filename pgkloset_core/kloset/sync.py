"""Sync: copy snapshots from one kloset to another, re-encrypted for the destination.

The destination has its own master key, so chunk ids differ between the two
klosets and snapshot ids differ too. A copied snapshot records where it came
from in ``meta["origin_snapshot"]`` (the id of the first snapshot of the
chain), and that *identity* decides what is missing: a copy of a copy, or a
copy synced back to where it came from, is recognised and skipped.

No re-chunking: each source chunk is read, verified, hashed with the
destination's key and stored there unless the destination holds it already;
entries keep their chunk boundaries. Within one run a map from source to
destination chunk ids means a chunk shared by many snapshots is read from
the source only once. Each snapshot is committed by its manifest only, so an
interrupted sync leaves at most unreferenced packs (prune removes them) and
running it again continues.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pgkloset_core.errors import CorruptObject
from pgkloset_core.kloset.locks import Lock
from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.kloset.thaw import Progress as ThawProgress
from pgkloset_core.kloset.thaw import ThawPending
from pgkloset_core.kloset.writer import KnownChunk

ORIGIN_KEY = "origin_snapshot"
READ_AHEAD = 8
CHUNK_MAP_MAX = 1_000_000  # ~150 MB; cleared when full (only costs re-reading)
ENTRY_ATTRS = ("mode", "uid", "gid", "user", "group", "mtime", "meta")


@dataclass
class SyncedSnapshot:
    source_id: str
    snapshot_id: str
    kind: str
    logical_bytes: int
    stored_bytes: int
    new_blobs: int


@dataclass
class SyncReport:
    copied: list[SyncedSnapshot] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # source ids the destination holds already
    missing: list[str] = field(default_factory=list)  # source ids to copy (dry run: not copied)
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored_bytes for c in self.copied)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "copied": [asdict(c) for c in self.copied],
            "present": self.present,
            "missing": self.missing,
            "stored_bytes": self.stored_bytes,
            "logical_bytes": sum(c.logical_bytes for c in self.copied),
            "seconds": round(self.seconds, 3),
        }


def identity(snapshot: Snapshot) -> str:
    """The id of the original snapshot this one is (a copy of)."""
    origin = snapshot.meta.get(ORIGIN_KEY)
    return origin if isinstance(origin, str) and origin else snapshot.id


def plan_sync(source: Kloset, dest: Kloset, refs: Sequence[str] = ()) -> tuple[list[Snapshot], list[Snapshot]]:
    """(missing at the destination, already there), oldest first."""
    if refs:
        chosen: dict[str, Snapshot] = {}
        for ref in refs:
            snap = source.resolve(ref)
            chosen.setdefault(snap.id, snap)
        wanted = sorted(chosen.values(), key=lambda s: (s.time, s.id))
    else:
        wanted = source.snapshots()
    have = {identity(s) for s in dest.snapshots()}
    missing = [s for s in wanted if identity(s) not in have]
    present = [s for s in wanted if identity(s) in have]
    return missing, present


def sync(source: Kloset, dest: Kloset, refs: Sequence[str] = (), *, lock_wait: float = 0.0,
         dry_run: bool = False, wait_thaw: bool = True, progress: Callable[[int], None] | None = None,
         thaw_progress: ThawProgress | None = None,
         on_copied: Callable[[SyncedSnapshot], None] | None = None) -> SyncReport:
    """Copy the snapshots of ``source`` (all, or ``refs``) that ``dest`` lacks."""
    started = time.monotonic()
    report = SyncReport(dry_run=dry_run)
    with source.lock(exclusive=False, operation="sync", wait=lock_wait), \
            dest.lock(exclusive=False, operation="sync", wait=lock_wait) as dest_lock:
        missing, present = plan_sync(source, dest, refs)
        report.present = [s.id for s in present]
        report.missing = [s.id for s in missing]
        if dry_run or not missing:
            report.seconds = time.monotonic() - started
            return report
        if not wait_thaw:
            _request_all_thaws(source, missing)
        chunk_map: dict[bytes, bytes] = {}
        for snap in missing:
            source.prepare_read(snap, wait=True, progress=thaw_progress)
            copied = _copy(source, dest, snap, dest_lock, chunk_map, progress)
            report.copied.append(copied)
            if on_copied is not None:
                on_copied(copied)
    report.seconds = time.monotonic() - started
    return report


def _request_all_thaws(source: Kloset, snapshots: list[Snapshot]) -> None:
    """``--no-wait``: ask for every thaw at once, then stop if any is still running."""
    pending = []
    for snap in snapshots:
        try:
            source.prepare_read(snap, wait=False)
        except ThawPending:
            pending.append(snap)
    if pending:
        raise ThawPending(f"{len(pending)} of {len(snapshots)} snapshot(s) to copy are being thawed "
                          f"from cold storage at the source; run the same sync again later and it "
                          f"continues from there")


def _copy(source: Kloset, dest: Kloset, snap: Snapshot, lock: Lock, chunk_map: dict[bytes, bytes],
          progress: Callable[[int], None] | None) -> SyncedSnapshot:
    meta = {**snap.meta, ORIGIN_KEY: identity(snap)}
    with dest.writer(kind=snap.kind, tags=list(snap.tags), meta=meta, lock=lock,
                     time=snap.time) as writer:
        writer.hostname = snap.hostname or None
        writer.username = snap.username or None
        for entry in snap.entries:
            attrs = {k: getattr(entry, k) for k in ENTRY_ATTRS}
            if entry.inline or entry.lists or entry.type in ("stream", "file"):
                chunks = _source_chunks(source, dest, snap, entry, chunk_map)
                writer.add_chunks(entry.name, chunks, entry_type=entry.type, progress=progress,
                                  **attrs)
            else:
                writer.add_special(entry.name, entry.type, target=entry.target, **attrs)
        copy = writer.commit()
    return SyncedSnapshot(source_id=snap.id, snapshot_id=copy.id, kind=copy.kind,
                          logical_bytes=int(copy.summary["logical_bytes"]),
                          stored_bytes=int(copy.summary["stored_bytes"]),
                          new_blobs=int(copy.summary["new_blobs"]))


def _source_chunks(source: Kloset, dest: Kloset, snap: Snapshot, entry: Entry,
                   chunk_map: dict[bytes, bytes]) -> Iterator[bytes | KnownChunk]:
    """The entry's chunks in order, read ahead; chunks copied earlier in this run by id only."""
    where = f"snapshot {snap.short_id} entry {entry.name}"

    def fetch(src_id: bytes, length: int) -> tuple[bytes, bytes]:
        data = source.read_blob(src_id)
        if len(data) != length:
            raise CorruptObject(where, f"chunk of {len(data)} bytes, expected {length}")
        return data, dest.master.chunk_id(data)

    total = 0
    with ThreadPoolExecutor(max_workers=READ_AHEAD // 2, thread_name_prefix="pgkloset-sync") as pool:
        window: deque[tuple[bytes, int, Future[tuple[bytes, bytes]] | bytes]] = deque()
        refs = iter_refs_of(source, snap, entry)
        try:
            while True:
                while len(window) < READ_AHEAD:
                    ref = next(refs, None)
                    if ref is None:
                        break
                    src_id, length = ref
                    known = chunk_map.get(src_id)
                    window.append((src_id, length, known or pool.submit(fetch, src_id, length)))
                if not window:
                    break
                src_id, length, fut = window.popleft()
                total += length
                if isinstance(fut, bytes):
                    yield KnownChunk(fut, length)
                    continue
                data, dest_id = fut.result()
                if len(chunk_map) >= CHUNK_MAP_MAX:
                    chunk_map.clear()
                chunk_map[src_id] = dest_id
                yield data
        finally:
            for _src, _len, pending in window:
                if isinstance(pending, Future):
                    pending.cancel()
    if total != entry.size:
        raise CorruptObject(where, f"{total} bytes, expected {entry.size}")
