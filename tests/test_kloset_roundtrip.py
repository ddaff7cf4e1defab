"""Round trips: whatever goes in comes back byte for byte.

Library level with hypothesis (many entries, sizes up to ~3 MiB, random,
repetitive and self-similar data, two chunker configurations), then a 2 GiB
stream through the real CLI with a bound on the backup process's peak memory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgkloset_core.kloset.check import check
from pgkloset_core.kloset.repository import Kloset, KlosetConfig
from pgkloset_core.kloset.snapshot import LIST_BLOB_MAX_CHUNKS
from pgkloset_core.storage import open_backend
from tests.fixtures.kloset import (
    CHEAP_KDF,
    CLI,
    PASSPHRASE,
    GiB,
    MiB,
    measured_command,
    producer_command,
    seeded_bytes,
)
from tests.fixtures.storage import CountingBackend

# Chunks of ~300 bytes: a few MiB give thousands of chunks, so entries spill
# their chunk lists into list blobs and packs fill up quickly.
TINY_CHUNKS = {"min_chunk": 256, "avg_chunk": 256, "max_chunk": 1024, "pack_size": 256 * 1024}


def make_data(kind: str, seed: int, size: int) -> bytes:
    """Test data of a given shape, reproducible from (kind, seed, size)."""
    if kind == "random":
        return seeded_bytes(seed, size)
    if kind == "zeros":
        return bytes(size)
    rng = random.Random(seed)
    if kind == "repeat":  # a short block over and over: one or two distinct chunks
        block = rng.randbytes(rng.randint(1, 4096))
        return (block * (size // len(block) + 1))[:size]
    # "mixed": fresh random segments and copies of earlier ones (dedup inside a stream)
    out = bytearray()
    segments: list[bytes] = []
    while len(out) < size:
        if segments and rng.random() < 0.4:
            seg = rng.choice(segments)
        else:
            seg = rng.randbytes(rng.randint(1, 512 * 1024))
            segments.append(seg)
        out += seg
    return bytes(out[:size])


@pytest.fixture
def across_examples() -> dict:
    """State kept across the examples of one hypothesis test (fixtures run once per test)."""
    return {}


data_strategy = st.one_of(
    st.binary(max_size=4096),
    st.builds(make_data, st.sampled_from(["random", "zeros", "repeat", "mixed"]),
              st.integers(0, 2**32), st.integers(0, 3 * MiB)),
)
entries_strategy = st.lists(st.tuples(st.text(min_size=1, max_size=40), data_strategy),
                            min_size=1, max_size=4, unique_by=lambda e: e[0])


@pytest.mark.parametrize("config", [{}, TINY_CHUNKS], ids=["default-chunks", "tiny-chunks"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(entries=entries_strategy, tags=st.lists(st.text(max_size=10), max_size=3),
       meta=st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=3))
def test_streams_round_trip(new_lib_kloset, kloset_url, across_examples, config, entries, tags,
                            meta) -> None:
    # One kloset for all examples of a run: later examples dedup against earlier ones.
    if "kloset" not in across_examples:
        across_examples["kloset"] = new_lib_kloset(**config)
    kloset = across_examples["kloset"]
    writer = kloset.writer(kind="test", tags=tags, meta=meta)
    for name, data in entries:
        writer.add_bytes(name, data)
    snap = writer.commit()
    assert snap.summary["logical_bytes"] == sum(len(d) for _, d in entries)

    # Read back through a freshly opened kloset (nothing cached from the writer).
    reopened = Kloset.open(open_backend(kloset_url), PASSPHRASE)
    got = reopened.resolve(snap.id[:10])
    assert got.id == snap.id
    assert got.tags == tags and got.meta == meta
    assert [e.name for e in got.entries] == [n for n, _ in entries]
    for name, data in entries:
        entry = got.entry(name)
        assert entry is not None and entry.size == len(data)
        assert b"".join(reopened.read_entry(got, entry)) == data
    assert check(reopened).ok


def test_many_list_blobs_dedup_and_full_check(new_lib_kloset, kloset_url) -> None:
    """More chunks than one list blob holds; a second identical backup stores no data."""
    kloset = new_lib_kloset(**TINY_CHUNKS)
    # Chunk sizes depend on the kloset's keyed chunker: 12 MiB of ~0.4 KiB chunks is about
    # twice what one list blob holds, whatever the key.
    data = seeded_bytes(7, 12 * MiB)
    writer = kloset.writer(kind="test")
    entry = writer.add_bytes("big", data)
    writer.add_bytes("empty", b"")
    first = writer.commit()
    assert first.summary["chunks"] > LIST_BLOB_MAX_CHUNKS
    assert len(entry.lists) >= 2 and not entry.inline

    writer = kloset.writer(kind="test")
    writer.add_bytes("big", data)
    second = writer.commit()
    assert second.summary["new_blobs"] == 0
    assert second.summary["stored_bytes"] == 0

    reopened = Kloset.open(open_backend(kloset_url), PASSPHRASE)
    for snap_id in (first.id, second.id):
        snap = reopened.resolve(snap_id)
        assert b"".join(reopened.read_entry(snap, snap.entry("big"))) == data
    assert b"".join(reopened.read_entry(first, first.entry("empty"))) == b""
    report = check(reopened, read_data=True)
    assert report.ok, report.problems
    assert report.packs > 1 and report.blobs_verified > 0


def test_add_file_keeps_content_and_attributes(lib_kloset, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = seeded_bytes(3, 700_000)
    path.write_bytes(data)
    os.chmod(path, 0o640)
    writer = lib_kloset.writer(kind="files")
    writer.add_file("f.bin", str(path))
    writer.add_file("dir", str(tmp_path))
    snap = writer.commit()
    entry = lib_kloset.resolve(snap.id).entry("f.bin")
    assert entry.type == "file" and entry.mode == 0o640 and entry.size == len(data)
    assert b"".join(lib_kloset.read_entry(snap, entry)) == data
    assert lib_kloset.resolve(snap.id).entry("dir").type == "dir"


# ------------------------------------------------------------------ 2 GiB through the CLI

BIG_SIZE = 2 * GiB
RSS_LIMIT = 200 * MiB


@pytest.mark.slow
def test_two_gib_stream_round_trip_with_flat_memory(cli_kloset, popen_cli, tmp_path: Path,
                                                    record_property) -> None:
    hash_file = tmp_path / "produced.b3"
    backup_rss, cat_rss = tmp_path / "backup.rss", tmp_path / "cat.rss"
    producer = subprocess.Popen(producer_command(2024, BIG_SIZE, hash_file), stdout=subprocess.PIPE,
                                start_new_session=True)
    start = time.monotonic()
    backup = popen_cli("backup", "stream", "--name", "big.bin", "--json",
                       command=measured_command(backup_rss, CLI), stdin=producer.stdout,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdout.close()
    out, err = backup.communicate(timeout=600)
    backup_seconds = time.monotonic() - start
    assert producer.wait(timeout=60) == 0
    assert backup.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["logical_bytes"] == BIG_SIZE

    start = time.monotonic()
    cat = popen_cli("cat", "latest", command=measured_command(cat_rss, CLI),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hasher = blake3.blake3()
    restored = 0
    while block := cat.stdout.read(4 * MiB):
        hasher.update(block)
        restored += len(block)
    assert cat.wait(timeout=60) == 0, cat.stderr.read().decode()
    cat_seconds = time.monotonic() - start
    assert restored == BIG_SIZE
    assert hasher.hexdigest() == hash_file.read_text()

    figures = {
        "backup_mb_per_s": round(BIG_SIZE / 1e6 / backup_seconds, 1),
        "backup_peak_rss_mib": round(int(backup_rss.read_text()) / MiB, 1),
        "restore_mb_per_s": round(BIG_SIZE / 1e6 / cat_seconds, 1),
        "restore_peak_rss_mib": round(int(cat_rss.read_text()) / MiB, 1),
        "stored_bytes": result["stored_bytes"],
    }
    for k, v in figures.items():
        record_property(k, v)
    print(f"\n2 GiB stream: {figures}")
    assert int(backup_rss.read_text()) < RSS_LIMIT, figures
    assert int(cat_rss.read_text()) < RSS_LIMIT, figures


def test_a_kloset_compresses_at_the_level_its_config_records(tmp_path) -> None:
    """The default level is only for new klosets: an older one keeps writing at its own."""
    rng = random.Random(5)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(3, 9))) for _ in range(500)]
    data = b"\n".join(b" ".join(rng.choices(words, k=12)) for _ in range(40_000))
    stored = {}
    for name, overrides in (("default", None), ("level19", {"zstd_level": 19})):
        url = str(tmp_path / name)
        Kloset.init(open_backend(url), PASSPHRASE, kdf=CHEAP_KDF, config_overrides=overrides)
        kloset = Kloset.open(open_backend(url), PASSPHRASE)
        writer = kloset.writer(kind="test")
        writer.add_bytes("text", data)
        snap = writer.commit()
        assert b"".join(kloset.read_entry(snap, snap.entry("text"))) == data
        stored[name] = (kloset.config.zstd_level, snap.summary["stored_bytes"])
    assert stored["default"][0] == KlosetConfig.zstd_level == 2
    assert stored["level19"][0] == 19
    assert stored["level19"][1] < stored["default"][1] * 0.97



@pytest.mark.parametrize("batched", [True, False], ids=["batch-call", "one-call-per-chunk"])
def test_new_chunks_compressed_in_a_batch_are_stored_as_one_by_one(tmp_path, monkeypatch,
                                                                   batched: bool) -> None:
    """The writer compresses a batch's new chunks in one zstd call (one call per
    chunk where zstandard lacks it); either way a stored blob must be exactly
    what compressing its chunk alone gives, kept raw where that does not shrink."""
    import zstandard

    from pgkloset_core.kloset import writer as writer_mod
    from pgkloset_core.kloset.crypto import NONCE_LEN, aead_decrypt
    from pgkloset_core.kloset.pack import blob_aad, pack_name
    from pgkloset_core.kloset.sealed import CODEC_RAW, CODEC_ZSTD

    monkeypatch.setattr(writer_mod, "_MULTI_COMPRESS", batched)
    rng = random.Random(11)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 8))) for _ in range(300)]
    text = b"\n".join(b" ".join(rng.choices(words, k=10)) for _ in range(60_000))
    data = text[: 2 * MiB] + seeded_bytes(12, 3 * MiB) + text  # 2 MiB of text twice
    url = str(tmp_path / "k")
    Kloset.init(open_backend(url), PASSPHRASE, kdf=CHEAP_KDF)
    kloset = Kloset.open(open_backend(url), PASSPHRASE)
    writer = kloset.writer(kind="test")
    writer.add_bytes("mixed", data)
    snap = writer.commit()
    assert b"".join(kloset.read_entry(snap, snap.entry("mixed"))) == data
    assert snap.summary["new_blobs"] < snap.summary["chunks"]  # the repeat was not sealed again

    alone = zstandard.ZstdCompressor(level=kloset.config.zstd_level)
    codecs = {CODEC_RAW: 0, CODEC_ZSTD: 0}
    for blob_id, loc in kloset.load_index().items():
        stored = kloset.backend.read_range(pack_name(loc.pack_id), loc.offset, loc.length)
        payload = aead_decrypt(kloset.master.pack_key(loc.salt), stored[:NONCE_LEN],
                               stored[NONCE_LEN:], blob_aad(loc.blob_type, blob_id))
        raw = kloset.read_blob(blob_id)
        frame = alone.compress(raw)
        if len(frame) < len(raw):
            assert payload == bytes([CODEC_ZSTD]) + frame
        else:
            assert payload == bytes([CODEC_RAW]) + raw
        codecs[payload[0]] += 1
    assert codecs[CODEC_RAW] >= 10 and codecs[CODEC_ZSTD] >= 10  # 3 MiB of noise, ~7 MiB of text


def test_reading_back_fetches_each_packs_run_of_chunks_in_one_request(tmp_path) -> None:
    """A stream's new chunks lie side by side in its packs: reading it back takes
    one request per run, never a byte between or beyond the chunks it needs, and
    repeats (a chunk seen earlier, the same chunk twice in a row) still read right."""
    from pgkloset_core.errors import CorruptObject
    from pgkloset_core.kloset.pack import pack_name
    from pgkloset_core.kloset.snapshot import iter_refs

    noise = seeded_bytes(21, 6 * MiB)
    data = noise + bytes(3 * MiB) + noise[: 2 * MiB] + seeded_bytes(22, 2 * MiB)
    url = str(tmp_path / "k")
    Kloset.init(open_backend(url), PASSPHRASE, kdf=CHEAP_KDF)
    writer = Kloset.open(open_backend(url), PASSPHRASE).writer(kind="test")
    writer.add_bytes("runs", data)
    snap = writer.commit()

    counting = CountingBackend(open_backend(url))
    kloset = Kloset.open(counting, PASSPHRASE)
    entry = snap.entry("runs")
    refs = list(iter_refs(entry.inline)) if entry.inline else [
        ref for lst in entry.lists for ref in iter_refs(kloset.read_blob(bytes.fromhex(lst)))]
    index = kloset.load_index()
    counting.ranges.clear()
    assert b"".join(kloset.read_entry(snap, entry)) == data
    pack_reads = [r for r in counting.ranges if r[0].startswith("data/")]
    assert len(refs) > 150
    assert len(pack_reads) < len(refs) / 4, (len(pack_reads), len(refs))
    # Exactly the chunks' stored bytes (each as often as the stream names it)
    # and its chunk lists', nothing between or beyond them.
    lists = sum(index.lookup(bytes.fromhex(lst)).length for lst in entry.lists)
    assert sum(r[2] for r in pack_reads) == lists + sum(index.lookup(b).length for b, _ in refs)

    # One flipped byte inside a run: every chunk before it comes out, then the error.
    loc = index.lookup(refs[40][0])
    path = tmp_path / "k" / pack_name(loc.pack_id)
    raw = bytearray(path.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(raw)
    got = bytearray()
    with pytest.raises(CorruptObject):
        for chunk in Kloset.open(open_backend(url), PASSPHRASE).read_entry(snap, entry):
            got += chunk
    assert bytes(got) == data[: sum(length for _, length in refs[:40])]


def test_many_entries_read_through_one_pipeline_in_order_with_sizes_checked(tmp_path) -> None:
    """A physical restore reads a thousand-odd files through one pipeline: every
    chunk comes back tagged with its entry, empty entries included, and an
    entry whose chunks do not add up to its size is an error naming it."""
    import dataclasses

    from pgkloset_core.errors import CorruptObject
    from pgkloset_core.kloset.reader import iter_entries

    rng = random.Random(3)
    contents = {f"f{i:03d}": seeded_bytes(100 + i, rng.choice([0, 0, 1, 300, 9000, 200_000, 700_000]))
                for i in range(120)}
    url = str(tmp_path / "k")
    Kloset.init(open_backend(url), PASSPHRASE, kdf=CHEAP_KDF)
    kloset = Kloset.open(open_backend(url), PASSPHRASE)
    writer = kloset.writer(kind="test")
    for name, data in contents.items():
        writer.add_bytes(name, data)
    snap = writer.commit()
    entries = [snap.entry(name) for name in contents]
    assert sum(1 for d in contents.values() if not d) >= 10

    got: dict[int, bytearray] = {}
    last = -1
    for index, chunk in iter_entries(kloset, snap, entries):
        assert index >= last  # in order, never back
        last = index
        got.setdefault(index, bytearray()).extend(chunk)
    assert {entries[i].name: bytes(b) for i, b in got.items()} == {
        name: data for name, data in contents.items() if data}

    for victim in (5, len(entries) - 1):  # one in the middle, the last one
        wrong = list(entries)
        wrong[victim] = dataclasses.replace(entries[victim], size=entries[victim].size + 1)
        with pytest.raises(CorruptObject, match=wrong[victim].name):
            for _ in iter_entries(kloset, snap, wrong):
                pass


def test_reader_threads_follow_what_the_backend_wants_in_flight(tmp_path) -> None:
    """A local store gets no more reader threads than cores; a remote one (which a
    slow read stands in for here) gets its reads in flight, and the bytes are the same."""
    import os
    import threading
    import time

    from pgkloset_core.storage.fs import FilesystemBackend
    from pgkloset_core.storage.retry import RetryingBackend

    data = seeded_bytes(31, 8 * MiB)
    url = str(tmp_path / "k")
    Kloset.init(open_backend(url), PASSPHRASE, kdf=CHEAP_KDF)
    writer = Kloset.open(open_backend(url), PASSPHRASE).writer(kind="test")
    writer.add_bytes("s", data)
    snap = writer.commit()

    local = FilesystemBackend(tmp_path / "k")
    assert 1 <= local.reads_in_flight <= min(4, os.cpu_count() or 1)
    assert RetryingBackend(local).reads_in_flight == local.reads_in_flight

    class Remote(CountingBackend):
        def __init__(self, inner, in_flight: int) -> None:
            super().__init__(inner)
            self.reads_in_flight = in_flight
            self.threads: set[str] = set()

        def read_range(self, name: str, offset: int, length: int) -> bytes:
            if name.startswith("data/"):
                self.threads.add(threading.current_thread().name)
                time.sleep(0.01)
            return super().read_range(name, offset, length)

    for in_flight in (1, 3):
        remote = Remote(open_backend(url), in_flight)
        kloset = Kloset.open(remote, PASSPHRASE)  # type: ignore[arg-type]
        assert b"".join(kloset.read_entry(snap, snap.entry("s"))) == data
        # (The chunk lists are read by the consumer's thread; the chunks by the readers.)
        readers = {t for t in remote.threads if t.startswith("pgkloset-read")}
        assert len(readers) == in_flight, remote.threads
