"""Cutting a stream into content-defined chunks, following its previous version.

Most of tonight's dump is yesterday's, byte for byte. FastCDC's cut points
depend only on the bytes since the last cut, so where yesterday's chunk
list says "the next chunk is these L bytes" and the next L bytes hash to
that chunk's id, FastCDC would have cut at exactly the same place: the
cutter takes the chunk without running the gear hash over it (hashing, which
the writer needs anyway, is four times cheaper than cutting). Where the
prediction fails, it cuts as usual from there and looks each new chunk up in
the previous list to pick up the thread again. The result is the same
chunks plain cutting gives, for less CPU (tests check both).

The stream is read in large blocks by a thread of its own, ahead of the
cutting; chunks are memoryviews into the blocks, not copies, and a block
lives as long as a chunk of it is in flight.
"""

from __future__ import annotations

import bisect
import queue
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple

from pyfastcdc import FastCDC

BLOCK_SIZE = 2 * 1024 * 1024  # bytes read before cutting (pipes give 1 MiB per read at most)
READ_AHEAD_BLOCKS = 4  # blocks read ahead of the cutting
FOLLOW_MAX = 1 << 20  # chunks of a previous version remembered (~64 GiB at 64 KiB chunks)
_POS_BITS = 24  # sort keys: id prefix with its low 24 bits replaced by the position
_POS_MASK = (1 << _POS_BITS) - 1

ChunkId = Callable[[memoryview], bytes]


class HashedChunk(NamedTuple):
    """A chunk whose id the cutter computed already (the writer does not hash it again)."""

    data: memoryview
    blob_id: bytes


def _prefix(blob_id: bytes) -> int:
    return int.from_bytes(blob_id[:8], "little")


class PreviousCuts:
    """An entry's chunk list in an earlier snapshot: 8-byte id prefixes and lengths.

    12 bytes per chunk plus an 8-byte sort key for finding a chunk by id. A
    prefix collision can only make a prediction fail or succeed by chance;
    chunk ids are still the full hash of the bytes stored, so data is never
    wrong, at worst cut differently. The last chunk is left out: the end of
    the stream cut it, not its content.
    """

    def __init__(self, refs: Iterable[tuple[bytes, int]], limit: int = FOLLOW_MAX) -> None:
        self.prefixes = array("Q")
        self.lengths = array("I")
        for blob_id, length in refs:
            if len(self.prefixes) > limit:
                break
            self.prefixes.append(_prefix(blob_id))
            self.lengths.append(length)
        if self.prefixes:
            self.prefixes.pop()
            self.lengths.pop()
        self._keys = array("Q", sorted((p & ~_POS_MASK) | i for i, p in enumerate(self.prefixes)))

    def __len__(self) -> int:
        return len(self.prefixes)

    def refs(self) -> Iterator[tuple[bytes, int]]:
        """(id prefix, length) in order: enough for whatever needs only prefixes."""
        for prefix, length in zip(self.prefixes, self.lengths, strict=True):
            yield prefix.to_bytes(8, "little"), length

    def find(self, blob_id: bytes) -> int | None:
        """Position of a chunk with this id in the list, or None."""
        prefix = _prefix(blob_id)
        high = prefix & ~_POS_MASK
        i = bisect.bisect_left(self._keys, high)
        while i < len(self._keys) and self._keys[i] & ~_POS_MASK == high:
            pos = self._keys[i] & _POS_MASK
            if self.prefixes[pos] == prefix:
                return pos
            i += 1
        return None


class Cutter:
    """Yields a stream's chunks: memoryviews, or HashedChunks when following a previous list."""

    def __init__(self, chunker: FastCDC, chunk_id: ChunkId,
                 previous: PreviousCuts | None = None, block_size: int = BLOCK_SIZE) -> None:
        self.chunker = chunker
        self.max_size = chunker.max_size
        self.chunk_id = chunk_id
        self.previous = previous if previous else None
        self.block_size = max(block_size, 2 * self.max_size)
        self.followed_bytes = 0  # taken as predicted, without cutting
        self.cut_bytes = 0  # cut with FastCDC

    def cut(self, stream: BinaryIO) -> Iterator[memoryview | HashedChunk]:
        head = self.max_size  # room before each block for the previous block's uncut tail
        reader = _ReadAhead(stream, head, self.block_size)
        try:
            tail = b""
            nxt: int | None = 0  # position in the previous list expected next
            eof = False
            while not eof:
                block, n, eof = reader.get()
                p = head - len(tail)
                block[p:head] = tail
                view = memoryview(block)
                # Cut only with max_size bytes ahead (or at the end): exactly as a
                # cut over the whole stream at once would.
                while p < n and (eof or n - p >= self.max_size):
                    if self.previous is None:
                        length = self._cut_length(view[p:n])
                        self.cut_bytes += length
                        yield view[p:p + length]
                        p += length
                        continue
                    chunk, nxt = self._next_following(view, p, n, nxt)
                    yield chunk
                    p += len(chunk.data)
                tail = bytes(view[p:n])
                del view
        finally:
            reader.close()

    def _next_following(self, view: memoryview, p: int, n: int,
                        nxt: int | None) -> tuple[HashedChunk, int | None]:
        prev = self.previous
        assert prev is not None
        guess: HashedChunk | None = None
        if nxt is not None and nxt < len(prev) and n - p >= self.max_size:
            length = prev.lengths[nxt]
            data = view[p:p + length]
            guess = HashedChunk(data, self.chunk_id(data))
            if _prefix(guess.blob_id) == prev.prefixes[nxt]:
                self.followed_bytes += length
                return guess, nxt + 1
        length = self._cut_length(view[p:n])
        self.cut_bytes += length
        if guess is not None and len(guess.data) == length:
            chunk = guess  # same cut, changed content: its hash is already known
        else:
            data = view[p:p + length]
            chunk = HashedChunk(data, self.chunk_id(data))
        found = prev.find(chunk.blob_id)
        return chunk, (found + 1 if found is not None else None)

    def _cut_length(self, rest: memoryview) -> int:
        return next(iter(self.chunker.cut_buf(rest))).length


class _ReadAhead:
    """Reads the stream in a thread of its own, a few blocks ahead of the cutting.

    Without it the producer (pg_dump) stalls on a full pipe whenever the
    cutter is busy, and its server backend with it: reading and cutting then
    take turns instead of overlapping (measured: a third slower on the parts
    of a dump that changed).
    """

    def __init__(self, stream: BinaryIO, head: int, block_size: int,
                 depth: int = READ_AHEAD_BLOCKS) -> None:
        self.queue: queue.Queue[tuple[bytearray, int, bool] | BaseException] = \
            queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stream, head, block_size),
                                       name="pgkloset-read", daemon=True)
        self.thread.start()

    def _run(self, stream: BinaryIO, head: int, block_size: int) -> None:
        try:
            readinto = _readinto(stream)
            eof = False
            while not eof and not self.stopped.is_set():
                block = bytearray(head + block_size)
                view = memoryview(block)
                n = head
                while n < len(block):
                    got = readinto(view[n:])
                    if not got:
                        eof = True
                        break
                    n += got
                del view
                self._put((block, n, eof))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item: tuple[bytearray, int, bool] | BaseException) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> tuple[bytearray, int, bool]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop reading (the thread ends at its next block, or at the stream's end)."""
        self.stopped.set()


def _readinto(stream: BinaryIO) -> Callable[[memoryview], int]:
    readinto = getattr(stream, "readinto", None)
    if callable(readinto):
        return lambda buf: readinto(buf) or 0

    def by_read(buf: memoryview) -> int:
        data = stream.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    return by_read
