"""Reading entries back: chunk refs to bytes, with read-ahead.

Blobs are fetched and decrypted by a small thread pool ahead of the
consumer, in order, so a restore overlaps storage latency with decryption.
Every blob is authenticated and re-hashed before a single byte is yielded.
"""

from __future__ import annotations

import io
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from pgkloset_core.errors import CorruptObject, KlosetError
from pgkloset_core.kloset.snapshot import CHUNK_REF, Entry, Snapshot, iter_refs

if TYPE_CHECKING:
    from pgkloset_core.kloset.cutter import PreviousCuts
    from pgkloset_core.kloset.repository import Kloset

READ_AHEAD = 8  # batches in flight; half as many reader threads at most (see _fetch)
BATCH_BYTES = 512 * 1024
Parts = tuple[slice, ...] | None  # the parts of a chunk to yield; None: all of it
Tag = TypeVar("Tag")  # what a chunk's reader needs back with it (its parts, its entry)


def iter_refs_of(kloset: Kloset, snapshot: Snapshot, entry: Entry) -> Iterator[tuple[bytes, int]]:
    """(chunk id, length) of every chunk of an entry, in order."""
    if entry.inline:
        yield from iter_refs(entry.inline)
    for list_id in entry.lists:
        data = kloset.read_blob(bytes.fromhex(list_id))
        if len(data) % CHUNK_REF.size:
            raise CorruptObject(f"snapshot {snapshot.short_id}", f"list blob {list_id[:16]} is malformed")
        yield from iter_refs(data)


def previous_version(kloset: Kloset, name: str, *, kind: str) -> PreviousCuts | None:
    """The chunk list of entry ``name`` in the latest snapshot of ``kind`` that has it.

    The writer follows it to cut the new version for less CPU (kloset/cutter.py).
    Only a shortcut: None when there is none or it cannot be read.
    """
    from pgkloset_core.errors import KlosetError
    from pgkloset_core.kloset.cutter import PreviousCuts

    try:
        for snap in reversed(kloset.snapshots()):
            entry = snap.entry(name) if snap.kind == kind else None
            if entry is not None and entry.type in ("stream", "file"):
                return PreviousCuts(iter_refs_of(kloset, snap, entry))
    except KlosetError:
        pass
    return None


def iter_entry(kloset: Kloset, snapshot: Snapshot, entry: Entry, *,
               read_ahead: int = READ_AHEAD,
               ranges: Sequence[tuple[int, int]] | None = None) -> Iterator[bytes]:
    """The entry's bytes, chunk by chunk; raises CorruptObject rather than yield wrong data.

    With ``ranges`` (sorted, disjoint ``(start, end)`` byte offsets) only the
    chunks overlapping them are fetched, and only those bytes are yielded.
    """
    where = f"snapshot {snapshot.short_id} entry {entry.name}"
    wanted = _checked_ranges(ranges, entry.size) if ranges is not None else None
    total = 0
    refs = _pick(iter_refs_of(kloset, snapshot, entry), wanted)
    for data, part in _fetch(kloset, refs, read_ahead, where):
        if part is None:
            total += len(data)
            yield data
        else:
            piece = data[part[0]] if len(part) == 1 else b"".join(data[p] for p in part)
            total += len(piece)
            yield piece
    if wanted is None and total != entry.size:
        raise CorruptObject(where, f"{total} bytes, expected {entry.size}")
    if wanted is not None and total != sum(end - start for start, end in wanted):
        raise CorruptObject(where, f"chunk list ends before byte {wanted[-1][1]}")


def iter_entries(kloset: Kloset, snapshot: Snapshot, entries: Sequence[Entry], *,
                 read_ahead: int = READ_AHEAD) -> Iterator[tuple[int, bytes]]:
    """Every chunk of several entries in order, as (index into ``entries``, bytes).

    One pipeline across them: a data directory has over a thousand files,
    most of them small, and reading them one by one drained the readers at
    every file's end. Each entry's size is checked once its last chunk is out.
    """
    def refs() -> Iterator[tuple[bytes, int, int]]:
        for i, entry in enumerate(entries):
            for blob_id, length in iter_refs_of(kloset, snapshot, entry):
                yield blob_id, length, i

    current, total = 0, 0

    def check_upto(index: int) -> None:
        nonlocal current, total
        while current < index:
            entry = entries[current]
            if total != entry.size:
                raise CorruptObject(f"snapshot {snapshot.short_id} entry {entry.name}",
                                    f"{total} bytes, expected {entry.size}")
            current, total = current + 1, 0

    for data, index in _fetch(kloset, refs(), read_ahead, f"snapshot {snapshot.short_id}"):
        check_upto(index)
        total += len(data)
        yield index, data
    check_upto(len(entries))


def _fetch(kloset: Kloset, refs: Iterator[tuple[bytes, int, Tag]], read_ahead: int,
           where: str) -> Iterator[tuple[bytes, Tag]]:
    """Each ref's chunk with its tag, in order, fetched ahead by a small thread pool.

    Chunks go to the readers in batches of about BATCH_BYTES: one task per
    64 KiB chunk cost more in thread hand-offs than decrypting it. As many
    threads as the backend wants reads in flight (a local one: its cores).
    A chunk that cannot be read raises, after every chunk before it.
    """
    threads = max(1, min(read_ahead // 2, kloset.backend.reads_in_flight))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pgkloset-read") as pool:
        window: deque[tuple[Future[tuple[list[bytes], KlosetError | None]],
                            list[tuple[bytes, int, Tag]]]] = deque()
        batches = _batched(refs)
        try:
            while True:
                while len(window) < read_ahead:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    window.append((pool.submit(kloset.read_blobs, [b[0] for b in batch]), batch))
                if not window:
                    break
                fut, batch = window.popleft()
                blobs, error = fut.result()
                for data, (_, length, tag) in zip(blobs, batch, strict=False):
                    if len(data) != length:
                        raise CorruptObject(where, f"chunk of {len(data)} bytes, expected {length}")
                    yield data, tag
                if error is not None:
                    raise error
        finally:
            for fut, _ in window:
                fut.cancel()


def _batched(refs: Iterator[tuple[bytes, int, Tag]]) -> Iterator[list[tuple[bytes, int, Tag]]]:
    """Consecutive chunks in lists of about BATCH_BYTES (one read task each)."""
    batch: list[tuple[bytes, int, Tag]] = []
    size = 0
    for ref in refs:
        batch.append(ref)
        size += ref[1]
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _checked_ranges(ranges: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if not 0 <= start < end <= size or (out and start < out[-1][1]):
            raise ValueError(f"byte ranges must be sorted, disjoint and within {size} bytes")
        out.append((start, end))
    return out


def _pick(refs: Iterator[tuple[bytes, int]], wanted: list[tuple[int, int]] | None,
          ) -> Iterator[tuple[bytes, int, Parts]]:
    """The chunks to fetch, each with the parts of it to yield (None: all of it)."""
    if wanted is None:
        for blob_id, length in refs:
            yield blob_id, length, None
        return
    pos = 0
    todo = deque(wanted)
    for blob_id, length in refs:
        end = pos + length
        while todo and todo[0][1] <= pos:
            todo.popleft()
        if not todo:
            return
        parts = tuple(slice(max(a, pos) - pos, min(b, end) - pos)
                      for a, b in itertools.takewhile(lambda r, end=end: r[0] < end, todo))
        if parts:
            whole = len(parts) == 1 and parts[0] == slice(0, length)
            yield blob_id, length, None if whole else parts
        pos = end


class EntryReader(io.RawIOBase):
    """A read-only file object over an entry (for tools that want ``read()``)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
