"""Reading entries back: chunk refs to bytes, with read-ahead.

Blobs are fetched and decrypted by a small thread pool ahead of the
consumer, in order, so a restore overlaps storage latency with decryption.
Every blob is authenticated and re-hashed before a single byte is yielded.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from pgkloset_core.errors import CorruptObject
from pgkloset_core.kloset.snapshot import CHUNK_REF, Entry, Snapshot, iter_refs

if TYPE_CHECKING:
    from pgkloset_core.kloset.repository import Kloset

READ_AHEAD = 8


def iter_refs_of(kloset: Kloset, snapshot: Snapshot, entry: Entry) -> Iterator[tuple[bytes, int]]:
    """(chunk id, length) of every chunk of an entry, in order."""
    if entry.inline:
        yield from iter_refs(entry.inline)
    for list_id in entry.lists:
        data = kloset.read_blob(bytes.fromhex(list_id))
        if len(data) % CHUNK_REF.size:
            raise CorruptObject(f"snapshot {snapshot.short_id}", f"list blob {list_id[:16]} is malformed")
        yield from iter_refs(data)


def iter_entry(kloset: Kloset, snapshot: Snapshot, entry: Entry, *,
               read_ahead: int = READ_AHEAD) -> Iterator[bytes]:
    """The entry's bytes, chunk by chunk; raises CorruptObject rather than yield wrong data."""
    total = 0
    where = f"snapshot {snapshot.short_id} entry {entry.name}"
    with ThreadPoolExecutor(max_workers=max(1, read_ahead // 2), thread_name_prefix="pgkloset-read") as pool:
        window: deque[tuple[Future[bytes], int]] = deque()
        refs = iter_refs_of(kloset, snapshot, entry)
        try:
            while True:
                while len(window) < read_ahead:
                    ref = next(refs, None)
                    if ref is None:
                        break
                    window.append((pool.submit(kloset.read_blob, ref[0]), ref[1]))
                if not window:
                    break
                fut, length = window.popleft()
                data = fut.result()
                if len(data) != length:
                    raise CorruptObject(where, f"chunk of {len(data)} bytes, expected {length}")
                total += length
                yield data
        finally:
            for fut, _ in window:
                fut.cancel()
    if total != entry.size:
        raise CorruptObject(where, f"{total} bytes, expected {entry.size}")


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
