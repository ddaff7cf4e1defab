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
cutting, into a few blocks that are reused (fresh ones cost page faults).
With ``views`` the chunks are memoryviews into those blocks instead of
copies: a block goes back to the reader only once no chunk views it any
more (CPython refuses to resize a bytearray with live views, which is how
that is checked), so a chunk's bytes never change under it.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import queue
import stat
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple

from pyfastcdc import FastCDC

BLOCK_SIZE = 2 * 1024 * 1024  # bytes read before cutting (pipes give 1 MiB per read at most)
READ_AHEAD_BYTES = 6 * 1024 * 1024  # blocks read ahead of the cutting (a thread needs two)
PIPE_SIZE = 1 << 20  # a pipe widened to this lets pg_dump write ahead while the reader is busy
VIEW_CHUNKS_PER_BLOCK = 8  # chunks handed out as views only if a block holds this many
FOLLOW_MAX = 1 << 20  # chunks of a previous version remembered (~64 GiB at 64 KiB chunks)
_POS_BITS = 24  # sort keys: id prefix with its low 24 bits replaced by the position
_POS_MASK = (1 << _POS_BITS) - 1

ChunkId = Callable[[memoryview], bytes]


class HashedChunk(NamedTuple):
    """A chunk whose id the cutter computed already (the writer does not hash it again)."""

    data: bytes | memoryview
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
    """Yields a stream's chunks: bytes, or HashedChunks when following a previous list.

    ``views``: chunks are memoryviews into the read blocks rather than
    copies (one memcpy per byte saved). They are writable (the dump scanner
    hands them to libc's memmem); consumers only read them. A consumer that
    keeps them keeps their blocks, so it should drop each chunk once done.
    Only where a block holds many chunks: with a few large chunks per block,
    each chunk waiting in the writer's window would hold a block of its own
    (docs/BENCHMARKS.md, third round's RSS), so those are still copied.
    """

    def __init__(self, chunker: FastCDC, chunk_id: ChunkId,
                 previous: PreviousCuts | None = None, block_size: int = BLOCK_SIZE,
                 views: bool = False) -> None:
        self.chunker = chunker
        self.max_size = chunker.max_size
        self.chunk_id = chunk_id
        self.previous = previous if previous else None
        self.block_size = max(block_size, self.max_size)  # a tail plus a block holds a chunk
        self.views = views and self.max_size * VIEW_CHUNKS_PER_BLOCK <= self.block_size
        self.followed_bytes = 0  # taken as predicted, without cutting
        self.cut_bytes = 0  # cut with FastCDC
        self.blocks_allocated = 0  # read buffers made (the rest were reused)
        self.read_calls = 0  # reads of the stream

    def cut(self, stream: BinaryIO) -> Iterator[bytes | memoryview | HashedChunk]:
        head = self.max_size  # room before each block for the previous block's uncut tail
        reader = _ReadAhead(stream, head, self.block_size)
        retired: deque[bytearray] = deque()  # blocks cut, maybe still viewed by chunks
        take: Callable[[memoryview], bytes | memoryview] = _same if self.views else bytes
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
                        yield take(view[p:p + length])
                    else:
                        length, blob_id, nxt = self._next_following(view, p, n, nxt)
                        yield HashedChunk(take(view[p:p + length]), blob_id)
                    p += length
                tail = bytes(view[p:n])
                view.release()
                # Blocks go back to the reader in the order they were cut, each once
                # the chunks viewing it are dropped: memory stays at a few blocks.
                retired.append(block)
                while retired and reader.recycle(retired[0]):
                    retired.popleft()
        finally:
            reader.close()
            self.blocks_allocated = reader.allocated
            self.read_calls = reader.reads

    def _next_following(self, view: memoryview, p: int, n: int,
                        nxt: int | None) -> tuple[int, bytes, int | None]:
        """The next chunk's length and id, and where in the previous list to look next."""
        prev = self.previous
        assert prev is not None
        guess: tuple[int, bytes] | None = None
        if nxt is not None and nxt < len(prev) and n - p >= self.max_size:
            length = prev.lengths[nxt]
            guess = length, self.chunk_id(view[p:p + length])
            if _prefix(guess[1]) == prev.prefixes[nxt]:
                self.followed_bytes += length
                return length, guess[1], nxt + 1
        length = self._cut_length(view[p:n])
        self.cut_bytes += length
        if guess is not None and guess[0] == length:
            blob_id = guess[1]  # same cut, changed content: its hash is already known
        else:
            blob_id = self.chunk_id(view[p:p + length])
        found = prev.find(blob_id)
        return length, blob_id, (found + 1 if found is not None else None)

    def _cut_length(self, rest: memoryview) -> int:
        return next(iter(self.chunker.cut_buf(rest))).length


class _ReadAhead:
    """Reads the stream in a thread of its own, a few blocks ahead of the cutting.

    Without it the producer (pg_dump) waits on a full pipe whenever the
    cutter is busy, so reading and cutting take turns instead of
    overlapping. (On the benchmark's two cores this made no wall-time
    difference of its own that the noise would show.)
    """

    def __init__(self, stream: BinaryIO, head: int, block_size: int,
                 budget: int = READ_AHEAD_BYTES) -> None:
        self.readinto = _readinto(stream)
        self.size = head + block_size
        self.head = head
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.allocated = 0
        self.reads = 0
        self.eof = False
        self.stopped = threading.Event()
        # Blocks too large for the budget (huge chunk settings) are read in the
        # caller's thread, one at a time: memory before speed.
        self.threaded = 2 * self.size <= budget
        self.queue: queue.Queue[tuple[bytearray, int, bool] | BaseException] = \
            queue.Queue(maxsize=max(1, budget // self.size - 1))
        # Never wait for a pipe to fill: sleeping after short reads saved CPU
        # (pg_dump writes ~6 KiB at a time) but cost wall time, because the
        # GIL comes back late and pg_dump then blocks on a full pipe
        # (docs/BENCHMARKS.md, fifth round).
        _widen_pipe(stream)
        if self.threaded:
            threading.Thread(target=self._run, name="pgkloset-read", daemon=True).start()

    def _fill(self) -> tuple[bytearray, int, bool]:
        try:
            block = self.free.get_nowait()
        except queue.Empty:
            block = bytearray(self.size)
            self.allocated += 1
        view = memoryview(block)
        n = self.head
        while n < len(block):
            got = self.readinto(view[n:])
            self.reads += 1
            if not got:
                self.eof = True
                break
            n += got
        view.release()
        return block, n, self.eof

    def _run(self) -> None:
        try:
            while not self.eof and not self.stopped.is_set():
                self._put(self._fill())
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
        if not self.threaded:
            return self._fill()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def recycle(self, block: bytearray) -> bool:
        """Hand a block back for reading into, if nothing views it any more."""
        try:
            block.append(0)  # a block still viewed cannot be resized: never reuse it then
        except BufferError:
            return False
        block.pop()
        self.free.put(block)
        return True

    def close(self) -> None:
        """Stop reading (the thread ends at its next block, or at the stream's end)."""
        self.stopped.set()


def _same(view: memoryview) -> memoryview:
    return view


def _widen_pipe(stream: BinaryIO) -> None:
    """Widen the pipe behind ``stream`` to PIPE_SIZE (Linux; no pipe: nothing).

    Either end may widen a pipe; a shell's ``pg_dump | pgkloset`` gets 64 KiB.
    """
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    getsize = getattr(fcntl, "F_GETPIPE_SZ", None)
    try:
        fd = stream.fileno()
        if setsize is None or getsize is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, getsize) < PIPE_SIZE:
            fcntl.fcntl(fd, setsize, PIPE_SIZE)
    except (AttributeError, OSError, ValueError):  # above pipe-max-size; io.UnsupportedOperation
        return


def _readinto(stream: BinaryIO) -> Callable[[memoryview], int]:
    """One read call at a time (``readinto1``), straight into the block: the
    cutter gets whatever the pipe held, without a second copy through a buffer."""
    readinto = getattr(stream, "readinto1", None) or getattr(stream, "readinto", None)
    if callable(readinto):
        return lambda buf: readinto(buf) or 0

    def by_read(buf: memoryview) -> int:
        data = stream.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    return by_read
