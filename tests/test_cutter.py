"""The cutter: the same chunks as FastCDC over the whole stream, with or without a previous version to follow."""

from __future__ import annotations

import fcntl
import io
import os
import random
import threading
import time
from pathlib import Path

import blake3
import pytest
from pyfastcdc import FastCDC

from pgkloset_core.kloset.cutter import PIPE_SIZE, Cutter, HashedChunk, PreviousCuts
from pgkloset_core.kloset.reader import iter_refs_of, previous_version
from pgkloset_core.kloset.repository import Kloset
from tests.fixtures.kloset import CliKloset, RunCli, backup_json
from tests.fixtures.logical_db import make_kloset

KEY = bytes(range(32))
AVG, MIN, MAX = 4096, 1024, 16384  # small chunks: many cuts in little data


def chunker() -> FastCDC:
    return FastCDC(AVG, min_size=MIN, max_size=MAX, normalized_chunking=3, seed=12345)


def chunk_id(data: memoryview | bytes) -> bytes:
    return blake3.blake3(data, key=KEY).digest()


class ShortReads(io.RawIOBase):
    """A stream that returns a random, often tiny, number of bytes per read (like a pipe)."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data = data
        self.pos = 0
        self.rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.rng.choice([1, 7, 100, 4096, 70_000, 1 << 20]),
                len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def whole_cut(data: bytes) -> list[bytes]:
    """FastCDC over the whole buffer at once: the reference."""
    return [bytes(c.data) for c in chunker().cut_buf(data)]


def cutter_cut(data: bytes, previous: PreviousCuts | None = None, seed: int = 0,
               block_size: int = 2 * MAX) -> tuple[list[bytes], Cutter]:
    cutter = Cutter(chunker(), chunk_id, previous, block_size=block_size)
    out = []
    for chunk in cutter.cut(ShortReads(data, seed)):  # type: ignore[arg-type]
        if isinstance(chunk, HashedChunk):
            assert chunk.blob_id == chunk_id(chunk.data)
            out.append(bytes(chunk.data))
        else:
            out.append(bytes(chunk))
    return out, cutter


def refs_of(chunks: list[bytes]) -> list[tuple[bytes, int]]:
    return [(chunk_id(c), len(c)) for c in chunks]


def sample(size: int, seed: int) -> bytes:
    """Text-like rows with random parts, and a run of zeros: cuts of every kind."""
    rng = random.Random(seed)
    rows = []
    total = 0
    while total < size:
        row = (f"{rng.randrange(10**9)}\t{rng.choice(['alpha', 'beta', 'gamma'])}\t"
               f"{rng.randbytes(rng.randrange(0, 60)).hex()}\n").encode()
        rows.append(row)
        total += len(row)
    data = b"".join(rows)[:size]
    return data[: size // 2] + bytes(3 * MAX) + data[size // 2:]


@pytest.mark.parametrize("size", [0, 1, MIN - 1, MIN, MAX - 1, MAX, MAX + 1, 3 * MAX + 17, 600_000])
def test_plain_cuts_equal_fastcdc_over_the_whole_stream(size: int) -> None:
    data = sample(size, seed=size)[:size] if size else b""
    for seed in range(3):
        got, cutter = cutter_cut(data, seed=seed)
        assert b"".join(got) == data
        assert got == whole_cut(data)
        assert cutter.followed_bytes == 0


def test_large_blocks_and_a_plain_file_give_the_same_cuts(tmp_path: Path) -> None:
    data = sample(3_000_000, seed=9)
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f:
        got = [bytes(c) for c in Cutter(chunker(), chunk_id).cut(f)]  # type: ignore[arg-type]
    assert got == whole_cut(data)


def edits(v1: bytes) -> dict[str, bytes]:
    rng = random.Random(5)
    n = len(v1)
    mid = n // 2
    return {
        "same": v1,
        "insert in the middle": v1[:mid] + rng.randbytes(5000) + v1[mid:],
        "delete a range": v1[:mid] + v1[mid + 30_000:],
        "change in place": v1[:mid] + bytes(b ^ 0xFF for b in v1[mid:mid + 10]) + v1[mid + 10:],
        "prepend": rng.randbytes(777) + v1,
        "append": v1 + rng.randbytes(40_000),
        "cut short": v1[: n - 50_000],
        "many small changes": b"".join(
            v1[i:i + 20_000] + (b"x" if i % 60_000 == 0 else b"")
            for i in range(0, n, 20_000)),
    }


@pytest.mark.parametrize("case", list(edits(sample(400_000, 1))))
def test_following_a_previous_version_gives_the_same_cuts(case: str) -> None:
    v1 = sample(400_000, seed=1)
    v2 = edits(v1)[case]
    previous = PreviousCuts(refs_of(whole_cut(v1)))
    got, cutter = cutter_cut(v2, previous, seed=3)
    assert b"".join(got) == v2
    assert got == whole_cut(v2)
    # The unchanged bulk was taken as predicted, not cut again.
    assert cutter.followed_bytes > 0.6 * len(v2)
    assert cutter.followed_bytes + cutter.cut_bytes == len(v2)
    if case == "same":
        assert cutter.cut_bytes < 2 * MAX  # only the end, which the previous list never predicts


def test_unrelated_previous_version_costs_nothing_but_a_lookup() -> None:
    v1, v2 = random.Random(1).randbytes(200_000), random.Random(2).randbytes(200_000)
    got, cutter = cutter_cut(v2, PreviousCuts(refs_of(whole_cut(v1))))
    assert got == whole_cut(v2)
    assert cutter.followed_bytes == 0


def test_foreign_boundaries_still_give_exact_data() -> None:
    """A previous list cut some other way (e.g. synced from another chunker): data stays exact."""
    v1 = sample(300_000, seed=4)
    fixed = [v1[i:i + 10_000] for i in range(0, len(v1), 10_000)]
    v2 = v1[:150_000] + b"changed" + v1[150_000:]
    got, cutter = cutter_cut(v2, PreviousCuts(refs_of(fixed)))
    assert b"".join(got) == v2
    assert cutter.followed_bytes > 0  # it did follow the foreign cuts where bytes matched


def test_previous_cuts_find_and_leave_out_the_last_chunk() -> None:
    # Ids that share their high bits, so the sort key's position bits must tell them apart.
    base = b"\x00\x00\x00" + b"\xab" * 29
    ids = [bytes([i]) + base[1:] for i in range(5)] + [chunk_id(b"other"), chunk_id(b"last")]
    cuts = PreviousCuts([(blob_id, 100 + i) for i, blob_id in enumerate(ids)])
    assert len(cuts) == len(ids) - 1
    for pos, blob_id in enumerate(ids[:-1]):
        assert cuts.find(blob_id) == pos
        assert cuts.lengths[pos] == 100 + pos
    assert cuts.find(chunk_id(b"last")) is None
    assert cuts.find(chunk_id(b"never")) is None
    assert [length for _, length in cuts.refs()] == [100 + i for i in range(6)]
    assert len(PreviousCuts([])) == 0


def test_previous_cuts_are_bounded() -> None:
    refs = [(chunk_id(str(i).encode()), 10) for i in range(1000)]
    cuts = PreviousCuts(refs, limit=100)
    assert len(cuts) == 100
    assert cuts.find(refs[50][0]) == 50
    assert cuts.find(refs[500][0]) is None


def test_writer_following_stores_the_same_chunks(tmp_path: Path) -> None:
    """Within one kloset, with and without the previous version: same refs, same bytes."""
    kloset = make_kloset(tmp_path / "k")
    v1 = random.Random(1).randbytes(8_000_000)
    v2 = v1[:1_000_000] + b"new rows" * 1000 + v1[1_000_000:2_500_000] + v1[2_600_000:]
    snaps = []
    for data in (v1, v2):
        with kloset.writer(kind="stream") as w:
            w.add_stream("s", io.BytesIO(data))
            snaps.append(w.commit())

    previous = previous_version(kloset, "s", kind="stream")
    assert previous is not None and len(previous) > 10
    with kloset.writer(kind="stream") as w:
        w.add_stream("s", io.BytesIO(v2), previous=previous)
        followed = w.commit()
    assert followed.summary["followed_bytes"] > 0.75 * len(v2)
    assert snaps[1].summary["followed_bytes"] == 0  # no previous given
    assert followed.summary["new_blobs"] == 0  # every chunk was stored by the plain cut of v2
    plain_refs = list(iter_refs_of(kloset, snaps[1], snaps[1].entries[0]))
    assert list(iter_refs_of(kloset, followed, followed.entries[0])) == plain_refs
    assert b"".join(kloset.read_entry(followed, followed.entries[0])) == v2


def test_backup_stream_follows_the_last_stream_of_the_same_name(cli_kloset: CliKloset,
                                                               run_cli: RunCli) -> None:
    v1 = random.Random(7).randbytes(8_000_000)  # the kloset's keyed chunker: ~64 KiB chunks
    v2 = v1[:700_000] + b"tonight" + v1[700_000:]
    backup_json(run_cli, "db.dump", v1)
    backup_json(run_cli, "other.dump", random.Random(8).randbytes(500_000))
    backup_json(run_cli, "db.dump", v2)
    kloset = Kloset.open(cli_kloset.backend, cli_kloset.passphrase)
    first, other, second = kloset.snapshots()
    assert first.summary["followed_bytes"] == other.summary["followed_bytes"] == 0
    # Not followed: the chunk with the change, and the last max_size bytes (256 KiB).
    assert second.summary["followed_bytes"] > 0.85 * len(v2)
    assert b"".join(kloset.read_entry(second, second.entries[0])) == v2


class FailingStream(io.RawIOBase):
    """Gives some bytes, then the read fails (a broken pipe, a disk error)."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise OSError(5, "Input/output error")
        n = min(len(buf), self.left)
        buf[:n] = b"a" * n
        self.left -= n
        return n


def test_a_read_error_reaches_the_consumer() -> None:
    with pytest.raises(OSError, match="Input/output error"):
        for _ in Cutter(chunker(), chunk_id).cut(FailingStream(200_000)):  # type: ignore[arg-type]
            pass


class Endless(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        buf[:] = random.randbytes(len(buf))
        return len(buf)


def test_the_read_ahead_thread_stops_when_the_consumer_does() -> None:
    import threading

    before = set(threading.enumerate())
    chunks = Cutter(chunker(), chunk_id).cut(Endless())  # type: ignore[arg-type]
    for _ in range(5):
        next(chunks)
    readers = [t for t in set(threading.enumerate()) - before if t.name == "pgkloset-read"]
    assert len(readers) == 1
    chunks.close()  # what happens when the writer fails and drops the generator
    readers[0].join(timeout=5)
    assert not readers[0].is_alive()


def test_read_buffers_are_reused_so_memory_stays_flat() -> None:
    data = random.Random(3).randbytes(48 * 1024 * 1024)
    big = FastCDC(65536, min_size=16384, max_size=262144, normalized_chunking=3, seed=1)
    for previous in (None, PreviousCuts(refs_of([bytes(c.data) for c in big.cut_buf(data)]))):
        cutter = Cutter(big, chunk_id, previous)
        got = [c.data if isinstance(c, HashedChunk) else c for c in cutter.cut(io.BytesIO(data))]
        assert b"".join(got) == data
        # ~21 blocks of 2 MiB went through; a handful of buffers carried them.
        assert cutter.blocks_allocated <= 8


def test_views_are_the_same_chunks_and_their_blocks_come_back() -> None:
    """Chunks as views into the read blocks: no copies, the same cuts, a few blocks reused."""
    data = random.Random(3).randbytes(48 * 1024 * 1024)
    big = FastCDC(65536, min_size=16384, max_size=262144, normalized_chunking=3, seed=1)
    plain = [bytes(c.data) for c in big.cut_buf(data)]
    for previous in (None, PreviousCuts(refs_of(plain))):
        cutter = Cutter(big, chunk_id, previous, views=True)
        got = []
        for chunk in cutter.cut(io.BytesIO(data)):
            view = chunk.data if isinstance(chunk, HashedChunk) else chunk
            assert isinstance(view, memoryview)
            got.append(bytes(view))
            del chunk, view  # dropped once used, as the writer does
        assert got == plain
        assert cutter.blocks_allocated <= 8


def test_a_kept_view_keeps_its_block_from_being_read_into() -> None:
    """A consumer holding every chunk: no block is reused under it, so nothing changes."""
    data = random.Random(5).randbytes(24 * 1024 * 1024)
    big = FastCDC(65536, min_size=16384, max_size=262144, normalized_chunking=3, seed=1)
    cutter = Cutter(big, chunk_id, views=True)
    kept = list(cutter.cut(io.BytesIO(data)))
    assert b"".join(kept) == data  # type: ignore[arg-type]
    assert cutter.blocks_allocated >= 24 * 1024 * 1024 // (2 * 1024 * 1024)


def test_huge_chunk_settings_read_in_the_callers_thread() -> None:
    """Blocks of 4 MiB maximum chunks exceed the read-ahead budget: no thread, same cuts."""
    import threading

    huge = FastCDC(1 << 20, min_size=1 << 18, max_size=1 << 22, normalized_chunking=3, seed=1)
    data = random.Random(4).randbytes(20 * 1024 * 1024)
    before = {t for t in threading.enumerate() if t.name == "pgkloset-read"}
    cutter = Cutter(huge, chunk_id)
    chunks = cutter.cut(io.BytesIO(data))
    first = next(chunks)
    assert {t for t in threading.enumerate() if t.name == "pgkloset-read"} == before
    got = [first, *chunks]
    assert got == [bytes(c.data) for c in huge.cut_buf(data)]
    assert cutter.blocks_allocated == 1


def test_large_chunks_are_copied_even_when_views_are_asked_for() -> None:
    """4 MiB chunks in 4 MiB blocks: a view would hold a whole block per chunk waiting."""
    huge = FastCDC(1 << 20, min_size=1 << 18, max_size=1 << 22, normalized_chunking=3, seed=1)
    data = random.Random(4).randbytes(12 * 1024 * 1024)
    cutter = Cutter(huge, chunk_id, views=True)
    got = list(cutter.cut(io.BytesIO(data)))
    assert all(type(c) is bytes for c in got)
    assert b"".join(got) == data  # type: ignore[arg-type]
    assert cutter.blocks_allocated == 1


def _pipe_writer(fd: int, data: bytes, piece: int) -> threading.Thread:
    """Write ``data`` into a pipe in small pieces, like pg_dump's 4-8 KiB writes."""

    def run() -> None:
        with os.fdopen(fd, "wb", buffering=0) as out:
            for i in range(0, len(data), piece):
                out.write(data[i:i + piece])
                if i % (64 * piece) == 0:
                    time.sleep(0.001)  # a producer slower than the reader

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_shell_pipe_is_widened_and_cut_as_a_whole() -> None:
    """A 64 KiB shell pipe is widened so pg_dump can write ahead of the reader;
    small writes from a producer slower than the reader give the same chunks."""
    data = random.Random(7).randbytes(6 << 20)
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 64 * 1024)  # what a shell pipeline gets
    writer = _pipe_writer(w, data, 4096)
    cutter = Cutter(chunker(), chunk_id)
    with os.fdopen(r, "rb") as stream:
        got = [bytes(c) for c in cutter.cut(stream)]
        assert fcntl.fcntl(stream.fileno(), fcntl.F_GETPIPE_SZ) >= PIPE_SIZE
    writer.join()
    assert got == whole_cut(data)
    assert cutter.read_calls > 1


def test_streams_that_are_no_pipes_are_read_as_they_come() -> None:
    data = random.Random(8).randbytes(4 << 20)
    cutter = Cutter(chunker(), chunk_id)
    # ShortReads gives as little as one byte per read.
    assert [bytes(c) for c in cutter.cut(ShortReads(data, 3))] == whole_cut(data)  # type: ignore[arg-type]
    assert cutter.read_calls > 20
