"""Writing snapshots: chunk, hash, dedup, compress, encrypt, pack, upload.

The stages overlap: the chunker reads and cuts in the calling thread, a
worker pool hashes, compresses and encrypts (BLAKE3, zstd and AES-GCM all
release the GIL), and packs upload in a background thread. Queues are
bounded, so memory stays flat whatever the size of the stream.

Commit order: packs, then the index delta, then the snapshot manifest. Only
the manifest makes a snapshot exist; a writer that dies earlier leaves
unreferenced packs that prune removes.

List blobs go to packs of their own, written as metadata (``metadata_writes``):
on cold storage they stay hot, so ``check`` and restore planning can read
chunk lists without thawing data.
"""

from __future__ import annotations

import getpass
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, BinaryIO, NamedTuple

import zstandard
from pyfastcdc import FastCDC

from pgkloset_core.errors import KlosetError, UsageError
from pgkloset_core.kloset.crypto import SALT_LEN, NonceCounter, content_hash
from pgkloset_core.kloset.cutter import Cutter, HashedChunk, PreviousCuts
from pgkloset_core.kloset.index import BLOB_DATA, BLOB_LIST, PackRecord, encode_delta
from pgkloset_core.kloset.locks import Lock
from pgkloset_core.kloset.pack import FinishedPack, PackBuilder, pack_name, seal_blob, seal_frame
from pgkloset_core.kloset.repository import INDEX_PREFIX, Kloset
from pgkloset_core.kloset.sealed import KIND_INDEX, seal
from pgkloset_core.kloset.snapshot import (
    CHUNK_REF,
    INLINE_MAX_CHUNKS,
    LIST_BLOB_MAX_CHUNKS,
    Entry,
    Snapshot,
)
from pgkloset_core.procs import lower_thread_priority, worker_nice
from pgkloset_core.storage.base import metadata_writes

PACKS_PER_DELTA = 64
BATCH_BYTES = 1024 * 1024  # chunk bytes per worker task (a hashed chunk counts half)
Prepared = tuple[bytes, int, bytes | None]  # blob id, length, sealed blob (None: known)
_MULTI_COMPRESS = hasattr(zstandard.ZstdCompressor, "multi_compress_to_buffer")
Chunk = bytes | memoryview | HashedChunk
Observer = Callable[[bytes | memoryview, bytes], None]  # (chunk data, blob id), in stream order
Progress = Callable[[int], None]


class KnownChunk(NamedTuple):
    """A chunk this kloset already holds, given by id (``add_chunks`` skips its bytes)."""

    blob_id: bytes
    length: int


_Pending = tuple[Future[list[Prepared]], list[Chunk]]  # a batch at the workers


class _BlobSink:
    """Packs sealed blobs and uploads full packs in the background."""

    def __init__(self, kloset: Kloset, nice: int = 0) -> None:
        self.kloset = kloset
        self.salt = os.urandom(SALT_LEN)
        self.key = kloset.master.pack_key(self.salt)
        self.nonces = NonceCounter()
        self.pack = PackBuilder(self.salt)
        self.list_pack = PackBuilder(self.salt)
        self.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgkloset-upload",
                                           initializer=lower_thread_priority, initargs=(nice,))
        self.uploads: deque[Future[PackRecord]] = deque()
        self.pending_records: list[PackRecord] = []
        self.delta_names: list[str] = []
        self.seen: set[bytes] = set()
        self.stored_bytes = 0
        self.new_blobs = 0
        self._lock = threading.Lock()
        # Streams of one snapshot may be added from several threads (a dump in parts).
        self._adding = threading.RLock()

    def seal(self, blob_type: int, blob_id: bytes, data: bytes | memoryview,
             compressor: zstandard.ZstdCompressor | None) -> bytes:
        return seal_blob(self.key, self.nonces.next(), blob_type, blob_id, data, compressor)

    def seal_frame(self, blob_type: int, blob_id: bytes, data: bytes | memoryview,
                   frame: bytes | memoryview) -> bytes:
        return seal_frame(self.key, self.nonces.next(), blob_type, blob_id, data, frame)

    def add(self, blob_id: bytes, blob_type: int, sealed: bytes, raw_length: int) -> None:
        with self._adding:
            if blob_id in self.seen:
                return
            self.seen.add(blob_id)
            self.new_blobs += 1
            lists = blob_type == BLOB_LIST
            builder = self.list_pack if lists else self.pack
            builder.add(blob_id, blob_type, sealed, raw_length)
            if len(builder) >= self.kloset.config.pack_size:
                self._ship(lists=lists)

    def _ship(self, *, lists: bool = False) -> None:
        builder = self.list_pack if lists else self.pack
        if builder.empty:
            return
        finished = builder.finish(self.key, self.nonces.next())
        if lists:
            self.list_pack = PackBuilder(self.salt)
        else:
            self.pack = PackBuilder(self.salt)
        # At most one pack uploading and one being filled: bounded memory.
        while self.uploads:
            self._collect(self.uploads.popleft())
        self.uploads.append(self.uploader.submit(self._upload, finished, lists))

    def _upload(self, finished: FinishedPack, lists: bool = False) -> PackRecord:
        record = finished.record()
        name = pack_name(record.pack_id)
        if lists:
            with metadata_writes():
                self.kloset.backend.write_parts(name, finished.parts)
        else:
            self.kloset.backend.write_parts(name, finished.parts)
        with self._lock:
            self.stored_bytes += finished.size
        return record

    def _collect(self, fut: Future[PackRecord]) -> None:
        record = fut.result()
        self.kloset.load_index().add_pack(record)
        self.pending_records.append(record)
        if len(self.pending_records) >= PACKS_PER_DELTA:
            self.write_delta()

    def flush(self) -> None:
        with self._adding:
            self._ship()
            self._ship(lists=True)
            while self.uploads:
                self._collect(self.uploads.popleft())

    def write_delta(self) -> None:
        if not self.pending_records:
            return
        data = seal(self.kloset.master, KIND_INDEX, encode_delta(self.pending_records))
        name = INDEX_PREFIX + content_hash(data)
        self.kloset.backend.write(name, data)
        self.stored_bytes += len(data)
        self.delta_names.append(name)
        self.pending_records = []

    def close(self) -> None:
        self.uploader.shutdown(wait=True, cancel_futures=True)


class SnapshotWriter:
    """Builds one snapshot from streams and files; ``commit()`` makes it exist.

    Streams may be added from several threads at once (a dump taken in
    parts); the entries keep the order in which they were finished.
    """

    def __init__(self, kloset: Kloset, *, kind: str, tags: list[str], meta: dict[str, Any],
                 lock: Lock | None, workers: int, start_time: datetime | None = None) -> None:
        self.kloset = kloset
        self.kind = kind
        self.tags = list(tags)
        self.meta = dict(meta)
        self.lock = lock
        self.entries: list[Entry] = []
        self.started = time.monotonic()
        if start_time is not None and start_time.utcoffset() is None:
            raise UsageError("a snapshot time must carry a timezone")
        # An explicit time is for imports and tests that build a timeline; normally "now".
        self.start_time = start_time or datetime.now(UTC)
        self.logical_bytes = 0
        self.followed_bytes = 0  # taken as a previous version predicted, without cutting
        self._entries_lock = threading.Lock()
        try:
            # Opt-in: the seal workers and the uploader can fall behind and catch
            # up; the reader, pg_dump and the database's queries cannot.
            self.nice = worker_nice()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.sink = _BlobSink(kloset, self.nice)
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pgkloset-seal",
                                       initializer=lower_thread_priority, initargs=(self.nice,))
        self._local = threading.local()
        self.index = kloset.load_index()
        cfg = kloset.config
        self.chunker = FastCDC(cfg.avg_chunk, min_size=cfg.min_chunk, max_size=cfg.max_chunk,
                               normalized_chunking=cfg.normalized_chunking, seed=kloset.master.chunker_seed)
        self.closed = False
        self.chunk_count = 0
        # Who made the snapshot; sync keeps the original's.
        self.hostname: str | None = None
        self.username: str | None = None

    # -- the pipeline ---------------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "zstd", None)
        if comp is None:
            comp = self._local.zstd = zstandard.ZstdCompressor(level=self.kloset.config.zstd_level)
        return comp

    def _consume(self, result: Prepared, refs: _RefList) -> None:
        blob_id, length, sealed = result
        if sealed is not None:  # sink.add drops a twin sealed meanwhile by another worker
            self.sink.add(blob_id, BLOB_DATA, sealed, length)
        refs.append(blob_id, length)

    def add_stream(self, name: str, stream: BinaryIO, *, entry_type: str = "stream",
                   progress: Progress | None = None,
                   observe: Observer | None = None, fixed: bool = False,
                   previous: PreviousCuts | None = None, **attrs: Any) -> Entry:
        """Chunk and store everything ``stream`` yields until EOF.

        ``previous``: the chunk list of this stream's earlier version (another
        snapshot's entry); the cutter follows it where the bytes are the same,
        for the same chunks at less CPU (kloset/cutter.py).

        ``observe(data, blob_id)`` sees every chunk in stream order, with its
        id (the dump scanner maps pg_dump's archive this way, without a second
        pass, and skips chunks it knows). ``data`` may be a memoryview into
        the cutter's read block: copy what is kept, since a view kept keeps
        its whole block from being reused. ``fixed`` cuts at every
        ``avg_chunk`` bytes instead of content-defined boundaries: for files
        changed in place (PostgreSQL's 8 KiB pages never shift), where
        content-defined cutting finds nothing more and costs a pass over
        every byte.
        """
        self._check_open(name)
        if fixed:
            size = self.kloset.config.avg_chunk
            return self.add_chunks(name, iter(lambda: _read_full(stream, size), b""),
                                   entry_type=entry_type, progress=progress, observe=observe,
                                   **attrs)
        # Chunks view the cutter's read blocks (no copy); add_chunks drops each
        # once sealed and observed, which hands its block back to the reader.
        cutter = Cutter(self.chunker, self.kloset.master.chunk_id, previous, views=True)
        try:
            return self.add_chunks(name, cutter.cut(stream), entry_type=entry_type,
                                   progress=progress, observe=observe, **attrs)
        finally:
            with self._entries_lock:
                self.followed_bytes += cutter.followed_bytes

    def add_chunks(self, name: str, chunks: Iterable[Chunk | KnownChunk], *,
                   entry_type: str = "stream", progress: Progress | None = None,
                   observe: Observer | None = None, **attrs: Any) -> Entry:
        """Store content already cut into chunks (``sync`` keeps the source's boundaries).

        A ``KnownChunk`` names a chunk this kloset holds already, so its bytes
        need not be read again. Chunks go to the workers in batches of about
        BATCH_BYTES: one task per 64 KiB chunk cost more in hand-offs between
        threads (and GIL traffic) than the hashing itself.
        """
        self._check_open(name)
        refs = _RefList(self)
        window: deque[_Pending | KnownChunk] = deque()
        depth = self.workers * 2
        size = 0
        batch: list[Chunk] = []
        batch_bytes = 0

        def submit() -> None:
            nonlocal batch, batch_bytes
            if batch:
                window.append((self.pool.submit(self._prepare_batch, batch), batch))
                batch, batch_bytes = [], 0

        try:
            for chunk in chunks:
                if isinstance(chunk, KnownChunk):
                    if observe is not None:
                        raise UsageError("known chunks cannot be observed")
                    submit()
                    window.append(chunk)
                    length = chunk.length
                elif isinstance(chunk, HashedChunk):
                    length = len(chunk.data)
                    batch.append(chunk)
                    batch_bytes += length // 2
                else:
                    length = len(chunk)
                    batch.append(chunk)
                    batch_bytes += length
                if batch_bytes >= BATCH_BYTES:
                    submit()
                size += length
                while len(window) >= depth:
                    self._take(window.popleft(), refs, observe)
                if progress:
                    progress(length)
            submit()
            while window:
                self._take(window.popleft(), refs, observe)
        except BaseException:
            for item in window:
                if not isinstance(item, KnownChunk):
                    item[0].cancel()
            raise
        entry = Entry(name=name, type=entry_type, size=size, **attrs)
        refs.finish(entry)
        with self._entries_lock:
            self.chunk_count += refs.total
            self.logical_bytes += size
            self.entries.append(entry)
        return entry

    def _prepare_batch(self, batch: list[Chunk]) -> list[Prepared]:
        """Hash each chunk; seal only those the kloset does not hold yet (runs in a worker).

        The new chunks of a batch are compressed in one call: one release of
        the GIL per batch instead of one per chunk. On two cores shared with
        pg_dump and the server, each hand-off of the GIL between threads was a
        futex wake-up, and those cost a first backup about a CPU-second.
        """
        master, seen, index = self.kloset.master, self.sink.seen, self.index
        prepared: list[Prepared] = []
        new: list[int] = []  # where the new chunks are in the batch
        datas: list[bytes | memoryview] = []  # and their bytes
        for chunk in batch:
            if isinstance(chunk, HashedChunk):
                data, blob_id = chunk
            else:
                data, blob_id = chunk, master.chunk_id(chunk)
            if blob_id not in seen and index.lookup(blob_id) is None:
                new.append(len(prepared))
                datas.append(data)
            prepared.append((blob_id, len(data), None))
        if new:
            for i, data, frame in zip(new, datas, self._compress_all(datas), strict=True):
                blob_id, length, _ = prepared[i]
                prepared[i] = (blob_id, length,
                               self.sink.seal_frame(BLOB_DATA, blob_id, data, frame))
        return prepared

    def _compress_all(self, datas: list[bytes | memoryview]) -> list[memoryview] | list[bytes]:
        """One zstd frame per input, the same bytes ``compress`` makes."""
        comp = self._compressor()
        if not _MULTI_COMPRESS:  # zstandard's cffi backend has no batch call
            return [comp.compress(d) for d in datas]
        frames = comp.multi_compress_to_buffer(datas, threads=0)
        return [memoryview(frames[i]) for i in range(len(datas))]

    def _take(self, item: _Pending | KnownChunk,
              refs: _RefList, observe: Observer | None) -> None:
        """Consume in order, so a known chunk stored earlier in this entry is seen by now."""
        if isinstance(item, KnownChunk):
            if item.blob_id not in self.sink.seen and self.index.lookup(item.blob_id) is None:
                raise KlosetError(f"chunk {item.blob_id.hex()[:16]} is not in the kloset")
            refs.append(item.blob_id, item.length)
            return
        future, batch = item
        for chunk, result in zip(batch, future.result(), strict=True):
            if observe is not None:
                observe(chunk.data if isinstance(chunk, HashedChunk) else chunk, result[0])
            self._consume(result, refs)

    def add_bytes(self, name: str, data: bytes, **attrs: Any) -> Entry:
        import io

        return self.add_stream(name, io.BytesIO(data), **attrs)

    def add_file(self, name: str, path: str, *, progress: Progress | None = None) -> Entry:
        """A regular file, directory or symlink with its mode, owner and mtime."""
        st = os.lstat(path)
        attrs: dict[str, Any] = {
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "user": _user_name(st.st_uid),
            "group": _group_name(st.st_gid),
            "mtime": st.st_mtime,
        }
        if stat.S_ISDIR(st.st_mode):
            return self.add_special(name, "dir", **attrs)
        if stat.S_ISLNK(st.st_mode):
            return self.add_special(name, "symlink", target=os.readlink(path), **attrs)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: only regular files, directories and symlinks can be stored")
        with open(path, "rb") as f:
            return self.add_stream(name, f, entry_type="file", progress=progress, **attrs)

    def add_special(self, name: str, entry_type: str, **attrs: Any) -> Entry:
        """An entry without content (directory, symlink)."""
        self._check_open(name)
        entry = Entry(name=name, type=entry_type, **attrs)
        with self._entries_lock:
            self.entries.append(entry)
        return entry

    def _check_open(self, name: str) -> None:
        if self.closed:
            raise KlosetError("snapshot writer already closed")
        if not name:
            raise UsageError("an entry needs a name")

    # -- commit ---------------------------------------------------------------

    def commit(self) -> Snapshot:
        """Upload what is left, write the index delta, then the manifest."""
        try:
            self.sink.flush()
            self.sink.write_delta()
            if self.lock is not None:
                self.lock.ensure_valid()
            seconds = time.monotonic() - self.started
            snapshot = Snapshot(
                id="",
                time=self.start_time,
                hostname=self.hostname or socket.gethostname(),
                username=self.username or _current_user(),
                kind=self.kind,
                tags=self.tags,
                meta=self.meta,
                entries=self.entries,
                summary={
                    "logical_bytes": self.logical_bytes,
                    "new_blobs": self.sink.new_blobs,
                    "chunks": self.chunk_count,
                    "seconds": round(seconds, 3),
                    "stored_bytes": self.sink.stored_bytes,
                    "followed_bytes": self.followed_bytes,
                },
                program="pgkloset",
            )
            self.kloset.write_snapshot(snapshot)
            return snapshot
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.sink.close()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RefList:
    """An entry's chunk list: inline when short, else spilled into list blobs."""

    def __init__(self, writer: SnapshotWriter) -> None:
        self.writer = writer
        self.buf = bytearray()
        self.count = 0
        self.total = 0
        self.lists: list[str] = []

    def append(self, blob_id: bytes, length: int) -> None:
        self.buf += CHUNK_REF.pack(blob_id, length)
        self.count += 1
        self.total += 1
        if self.count >= LIST_BLOB_MAX_CHUNKS:
            self._spill()

    def _spill(self) -> None:
        data = bytes(self.buf)
        w = self.writer
        blob_id = w.kloset.master.chunk_id(data)
        if blob_id not in w.sink.seen and w.index.lookup(blob_id) is None:
            w.sink.add(blob_id, BLOB_LIST, w.sink.seal(BLOB_LIST, blob_id, data, w._compressor()), len(data))
        self.lists.append(blob_id.hex())
        self.buf = bytearray()
        self.count = 0

    def finish(self, entry: Entry) -> None:
        if not self.lists and self.count <= INLINE_MAX_CHUNKS:
            entry.inline = bytes(self.buf)
            return
        if self.count:
            self._spill()
        entry.lists = self.lists


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only at the end of the stream."""
    data = stream.read(size)
    if not data or len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
