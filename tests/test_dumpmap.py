"""The dump map: pg_dump's data blocks found while the dump streams into the kloset.

Real dumps of PostgreSQL 15 and 16 are scanned at several feed sizes and
compared with what pg_restore itself lists; the database holds the cases the
scanner's end-marker search must survive (an empty table, a row whose chunk
header has four zero bytes, escaped newlines and ``\\.`` in data, large
objects whose bytes contain the end-marker pattern). Partial restores are
measured by the bytes they fetch from storage through a counting backend, and
compared table by table with the source.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgkloset_core.errors import KlosetError
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Snapshot
from pgkloset_core.postgres import dumpmap
from pgkloset_core.postgres.dumpmap import (
    DUMP_MAP_KEY,
    CleanChunks,
    DumpMap,
    DumpScanner,
    parse_toc,
)
from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider
from pgkloset_core.postgres.logical import backup_logical
from pgkloset_core.postgres.restore_logical import RestoreFailed, restore_logical
from pgkloset_core.storage import open_backend
from tests.fixtures.logical_db import PASSPHRASE, build_plain, make_kloset, table_checksums
from tests.fixtures.storage import CountingBackend

DB = "dm_src"
HUGE_ROW = 2**24  # the COPY line's length: its chunk header is 00 00 00 00 01
# Bytes that look like a block end followed by a block header, inside a large object.
TRAP = b"\x00" * 5 + b"\x01\x00" + (4000).to_bytes(4, "little") + b"\x00" * 9


def _build_source(instance: LocalInstance) -> None:
    instance.execute(f"CREATE DATABASE {DB}")
    instance.psql(f"""
        CREATE TABLE aa_wide (id int PRIMARY KEY, body text);
        INSERT INTO aa_wide SELECT g, md5(random()::text) || md5(random()::text)
            || md5(random()::text) || md5(random()::text) FROM generate_series(1, 80000) g;
        CREATE TABLE bb_empty (a int);
        CREATE TABLE cc_huge (t text);
        INSERT INTO cc_huge VALUES (repeat('h', {HUGE_ROW - 1}));
        CREATE TABLE dd_odd (t text);
        INSERT INTO dd_odd VALUES (E'line\\nbreak'), ('\\.'), (''), (NULL), (E'tab\\there');
        CREATE SCHEMA side;
        CREATE TABLE side.mid (id int, v numeric);
        INSERT INTO side.mid SELECT g, g / 7.0 FROM generate_series(1, 3000) g;
        CREATE TABLE zz_late (id int PRIMARY KEY, name text UNIQUE);
        CREATE INDEX zz_late_name_idx ON zz_late (lower(name));
        INSERT INTO zz_late SELECT g, 'name ' || g FROM generate_series(1, 50) g;
        SELECT lo_from_bytea(0, '\\x{TRAP.hex()}'::bytea);
        SELECT lo_from_bytea(0, decode(repeat('00', 100000), 'hex'));
    """, DB)


@pytest.fixture(scope="module")
def source(pg15: LocalInstance) -> LocalInstance:
    _build_source(pg15)
    return pg15


def _dump(instance: LocalInstance, dbname: str, *extra: str) -> bytes:
    return subprocess.run([str(instance.binaries.path("pg_dump")), *extra, dbname],
                          env=instance.env(dbname), capture_output=True, check=True).stdout


def _listed_data_ids(instance: LocalInstance, dump: bytes) -> list[int]:
    listing = subprocess.run([str(instance.binaries.path("pg_restore")), "-l"], input=dump,
                             capture_output=True, check=True).stdout.decode()
    return [int(ln.split(";", 1)[0]) for ln in listing.splitlines()
            if ln[:1].isdigit() and (" TABLE DATA " in ln or " BLOBS " in ln)]


def _scan(dump: bytes, feed: int) -> DumpScanner:
    scanner = DumpScanner()
    for i in range(0, len(dump), feed):
        scanner.feed(dump[i:i + feed])
    return scanner


def _assert_map_of(dump: bytes, found: DumpMap, listed: list[int]) -> None:
    assert [b[0] for b in found.blocks] == listed
    assert found.size == len(dump)
    assert found.blocks[0][1] == found.toc_end
    for (dump_id, start, length), nxt in zip(found.blocks, [*found.blocks[1:], None],
                                             strict=True):
        assert dump[start] in (1, 3)
        assert int.from_bytes(dump[start + 2:start + 6], "little") == dump_id
        assert dump[start + length - 5:start + length] == b"\x00" * 5
        assert (nxt[1] if nxt else len(dump)) == start + length
    assert DumpMap.from_json(found.to_json(), len(dump)) == found


@pytest.mark.parametrize("feed", [4093, 65536, 1 << 30])
def test_map_of_a_15_dump_matches_pg_restore(source: LocalInstance, feed: int) -> None:
    dump = _dump(source, DB, "-Fc", "-Z0")
    found = _scan(dump, feed).finish()
    assert found is not None
    listed = _listed_data_ids(source, dump)
    assert len(listed) == 7  # six tables' data and the large objects
    _assert_map_of(dump, found, listed)


def test_map_fed_byte_by_byte(pg15: LocalInstance) -> None:
    build_plain(pg15, "dm_small", rows=300)
    dump = _dump(pg15, "dm_small", "-Fc", "-Z0")
    scanner = _scan(dump, 1)
    found = scanner.finish()
    assert found is not None, scanner.failed
    _assert_map_of(dump, found, _listed_data_ids(pg15, dump))


def test_map_of_a_16_dump_matches_pg_restore(pg16: LocalInstance) -> None:
    _build_source(pg16)  # archive version 1.15: the header's compression byte
    dump = _dump(pg16, DB, "-Fc", "-Z0")
    assert dump[5:8] == b"\x01\x0f\x00"
    found = _scan(dump, 65536).finish()
    assert found is not None
    _assert_map_of(dump, found, _listed_data_ids(pg16, dump))


def test_toc_parse_names_entries(source: LocalInstance) -> None:
    dump = _dump(source, DB, "-Fc", "-Z0")
    entries, int_size, end = parse_toc(dump)
    assert int_size == 4 and 0 < end < len(dump)
    data = {(e.namespace, e.tag) for e in entries if e.desc == "TABLE DATA"}
    assert data == {("public", "aa_wide"), ("public", "bb_empty"), ("public", "cc_huge"),
                    ("public", "dd_odd"), ("side", "mid"), ("public", "zz_late")}
    assert not any(e.has_data for e in entries if e.desc in ("TABLE", "INDEX", "SCHEMA"))


@pytest.mark.parametrize("case", ["compressed", "plain", "directory-toc", "cut-in-data",
                                  "cut-in-toc", "garbage", "trailing-bytes", "empty"])
def test_streams_that_cannot_be_mapped_give_none(source: LocalInstance, case: str,
                                                 tmp_path: Path) -> None:
    good = _dump(source, DB, "-Fc", "-Z0")
    if case == "compressed":
        data = _dump(source, DB, "-Fc", "-Z6")
    elif case == "plain":
        data = _dump(source, DB, "-Fp")
    elif case == "directory-toc":
        _dump(source, DB, "-Fd", "-f", str(tmp_path / "d"))
        data = (tmp_path / "d" / "toc.dat").read_bytes()
    elif case == "cut-in-data":
        data = good[:len(good) // 2]
    elif case == "cut-in-toc":
        data = good[:parse_toc(good)[2] - 10]
    elif case == "garbage":
        data = bytes(range(256)) * 100
    elif case == "trailing-bytes":
        data = good + b"\x01\x00\x00\x00\x00\x00"
    else:
        data = b""
    scanner = _scan(data, 8192) if data else DumpScanner()
    assert scanner.finish() is None
    assert scanner.failed


def test_map_is_the_same_with_and_without_memmem(source: LocalInstance,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """libc's memmem where it exists, bytes.find elsewhere: the same blocks either way."""
    dump = _dump(source, DB, "-Fc", "-Z0")
    with_memmem = _scan(dump, 65536).finish()
    monkeypatch.setattr(dumpmap, "_MEMMEM", None)
    without = _scan(dump, 65536).finish()
    assert with_memmem is not None and with_memmem == without
    _assert_map_of(dump, with_memmem, _listed_data_ids(source, dump))


def test_map_is_the_same_fed_views_into_a_buffer(source: LocalInstance) -> None:
    """The writer feeds views into its read blocks, searched in place: the same map as bytes."""
    dump = _dump(source, DB, "-Fc", "-Z0")
    block = bytearray(dump)
    scanner = DumpScanner()
    for i in range(0, len(dump), 65536):
        scanner.feed(memoryview(block)[i:i + 65536])
    found = scanner.finish()
    assert found is not None, scanner.failed
    assert found == _scan(dump, 65536).finish()
    block.append(0)  # no view of the buffer is left behind


@pytest.mark.parametrize("where", [0, 1, 500, 994])
def test_holds_finds_a_needle_inside_a_view_and_not_outside(where: int) -> None:
    needle = b"\x00" * 5 + b"\x01\x00"
    buf = bytearray(b"x" * 1000)
    buf[where:where + len(needle)] = needle[:1000 - where]
    view = memoryview(buf)
    whole = where + len(needle) <= 1000
    assert dumpmap._holds(view, needle) is whole
    assert dumpmap._holds(view.toreadonly(), needle) is whole
    assert dumpmap._holds(bytes(buf), needle) is whole
    # A view that stops one byte short of the needle's end must not see it.
    assert dumpmap._holds(view[:where + len(needle) - 1], needle) is False
    assert dumpmap._holds(view[where + 1:], needle) is False
    assert dumpmap._holds(view[:0], needle) is False
    view.release()
    buf.append(0)  # the search left no export behind


def test_blocks_out_of_toc_order_give_no_map(source: LocalInstance) -> None:
    """Each block end is searched with the next header the TOC names: swapped blocks never map."""
    dump = _dump(source, DB, "-Fc", "-Z0")
    found = _scan(dump, 1 << 30).finish()
    assert found is not None
    (_, s1, n1), (_, s2, n2) = found.blocks[0], found.blocks[1]
    assert s1 + n1 == s2
    swapped = dump[:s1] + dump[s2:s2 + n2] + dump[s1:s1 + n1] + dump[s2 + n2:]
    for feed in (4093, 1 << 30):
        scanner = _scan(swapped, feed)
        assert scanner.finish() is None
        assert scanner.failed


# ----------------------------------------------------------- restores


@pytest.fixture(scope="module")
def backed_up(source: LocalInstance, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:
    repo = tmp_path_factory.mktemp("dm") / "kloset"
    kloset = make_kloset(repo)
    results = backup_logical(kloset, source.dsn(), [DB])
    snap_id = next(r.snapshot_id for r in results if r.kind == "logical")
    return {"repo": repo, "snapshot_id": snap_id}


@pytest.fixture(scope="module")
def target(pg_provider: LocalInstanceProvider) -> Iterator[LocalInstance]:
    with pg_provider.start(15) as instance:
        yield instance


def _counting(repo: Path) -> tuple[Kloset, CountingBackend]:
    backend = CountingBackend(open_backend(str(repo)))
    return Kloset.open(backend, PASSPHRASE), backend  # type: ignore[arg-type]


def _whole_read(kloset: Kloset, backend: CountingBackend, snap: Snapshot) -> int:
    before = backend.bytes_read
    for _ in kloset.read_entry(snap, snap.entries[0]):
        pass
    return backend.bytes_read - before


def _restore(backed_up: dict[str, Any], target: LocalInstance, dbname: str,
             snap: Snapshot | None = None, **options: Any) -> tuple[int, int]:
    """(bytes the restore fetched, bytes a whole read of the dump fetches)."""
    kloset, backend = _counting(backed_up["repo"])
    snap = snap or kloset.resolve(backed_up["snapshot_id"])
    whole = _whole_read(kloset, backend, snap)
    target.execute(f"CREATE DATABASE {dbname}")
    before = backend.bytes_read
    restore_logical(kloset, snap, target.dsn(dbname), **options)
    return backend.bytes_read - before, whole


def test_snapshot_records_the_map(backed_up: dict[str, Any]) -> None:
    kloset, _ = _counting(backed_up["repo"])
    snap = kloset.resolve(backed_up["snapshot_id"])
    entry = snap.entries[0]
    found = DumpMap.from_json(entry.meta.get(DUMP_MAP_KEY), entry.size)
    assert found is not None and len(found.blocks) == 7


def test_late_small_table_restore_reads_a_small_share(backed_up: dict[str, Any],
                                                      source: LocalInstance,
                                                      target: LocalInstance) -> None:
    read, whole = _restore(backed_up, target, "dm_late", tables=["public.zz_late"])
    assert read < whole * 0.10, (read, whole)
    assert table_checksums(target, "dm_late") == {
        "public.zz_late": table_checksums(source, DB)["public.zz_late"]}
    indexes = {r[0] for r in target.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'zz_late'", "dm_late")}
    assert indexes == {"zz_late_pkey", "zz_late_name_key", "zz_late_name_idx"}


def test_two_tables_around_a_huge_one(backed_up: dict[str, Any], source: LocalInstance,
                                      target: LocalInstance) -> None:
    read, whole = _restore(backed_up, target, "dm_two",
                           tables=["public.dd_odd", "public.bb_empty"], jobs=2)
    assert read < whole * 0.10, (read, whole)  # the 16 MiB row is not fetched
    src = table_checksums(source, DB)
    assert table_checksums(target, "dm_two") == {
        k: src[k] for k in ("public.bb_empty", "public.dd_odd")}


def test_schema_restore_and_schema_only(backed_up: dict[str, Any], source: LocalInstance,
                                        target: LocalInstance) -> None:
    read, whole = _restore(backed_up, target, "dm_side", schemas=["side"])
    assert read < whole * 0.10, (read, whole)
    assert table_checksums(target, "dm_side") == {
        "side.mid": table_checksums(source, DB)["side.mid"]}
    read, whole = _restore(backed_up, target, "dm_schema_only", create=False,
                           schema_only=True)
    assert read < whole * 0.10, (read, whole)
    assert target.scalar("SELECT count(*) FROM aa_wide", "dm_schema_only") == 0


def test_whole_restore_is_unchanged(backed_up: dict[str, Any], source: LocalInstance,
                                    target: LocalInstance) -> None:
    _restore(backed_up, target, "dm_whole")
    assert table_checksums(target, "dm_whole") == table_checksums(source, DB)
    query = "SELECT string_agg(md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata"
    assert target.scalar(query, "dm_whole") == source.scalar(query, DB)


def _resealed(backed_up: dict[str, Any], change: Any) -> Snapshot:
    """The same snapshot written again with its dump entry's map changed."""
    kloset, _ = _counting(backed_up["repo"])
    snap = copy.deepcopy(kloset.resolve(backed_up["snapshot_id"]))
    change(snap.entries[0].meta)
    kloset.write_snapshot(snap)
    return snap


def test_snapshot_without_map_reads_the_whole_dump(backed_up: dict[str, Any],
                                                   source: LocalInstance,
                                                   target: LocalInstance) -> None:
    snap = _resealed(backed_up, lambda meta: meta.pop(DUMP_MAP_KEY))
    read, whole = _restore(backed_up, target, "dm_nomap", snap, tables=["public.zz_late"])
    assert read >= whole * 0.9
    assert table_checksums(target, "dm_nomap") == {
        "public.zz_late": table_checksums(source, DB)["public.zz_late"]}


def test_a_wrong_map_fails_loudly_and_changes_nothing(backed_up: dict[str, Any],
                                                      target: LocalInstance) -> None:
    kloset, _ = _counting(backed_up["repo"])
    snap = kloset.resolve(backed_up["snapshot_id"])
    toc_end = snap.entries[0].meta[DUMP_MAP_KEY]["toc_end"]
    toc = b"".join(kloset.read_entry(snap, snap.entries[0], ranges=[(0, toc_end)]))
    late = next(e.dump_id for e in parse_toc(toc)[0]
                if e.desc == "TABLE DATA" and e.tag == "zz_late")

    def shift(meta: dict[str, Any]) -> None:
        blocks = meta[DUMP_MAP_KEY]["blocks"]
        at = next(i for i, b in enumerate(blocks) if b[0] == late)
        blocks[at - 1][1] += 3  # zz_late's block now seems to start 3 bytes late
        blocks[at][1] -= 3

    wrong = _resealed(backed_up, shift)
    with pytest.raises(RestoreFailed) as err:
        _restore(backed_up, target, "dm_wrong", wrong, tables=["public.zz_late"])
    assert "pg_restore" in str(err.value)
    assert target.scalar("SELECT count(*) FROM pg_class WHERE relname = 'zz_late'",
                         "dm_wrong") == 0
    assert isinstance(err.value, KlosetError)


# ------------------------------------------------- chunks known to be clean


def _cut(dump: bytes) -> list[tuple[bytes, bytes]]:
    """(chunk, id) pairs as the writer makes them (any stable id does for the scanner)."""
    import hashlib

    from pyfastcdc import FastCDC

    chunks = [bytes(c.data) for c in FastCDC(16384, min_size=4096, max_size=65536,
                                            normalized_chunking=1).cut_buf(dump)]
    return [(c, hashlib.blake2b(c, digest_size=32).digest()) for c in chunks]


def test_clean_chunks_are_skipped_and_the_map_is_the_same(source: LocalInstance) -> None:
    dump = _dump(source, DB, "-Fc", "-Z0")
    pieces = _cut(dump)
    plain = _scan(dump, 1 << 30).finish()
    assert plain is not None
    clean = CleanChunks.from_dump(plain, [(i, len(c)) for c, i in pieces])
    assert len(clean) > len(pieces) // 2  # most chunks lie inside table data
    scanner = DumpScanner()
    for chunk, blob_id in pieces:
        scanner.feed(chunk, blob_id in clean)
    assert scanner.finish() == plain


def test_a_false_clean_claim_gives_no_map(source: LocalInstance) -> None:
    """Claiming the chunks that hold block ends are clean loses them: no map, never a wrong one."""
    dump = _dump(source, DB, "-Fc", "-Z0")
    pieces = _cut(dump)
    plain = _scan(dump, 1 << 30).finish()
    assert plain is not None
    ends = {start + length for _id, start, length in plain.blocks[:-1]}
    scanner = DumpScanner()
    pos = 0
    lied = 0
    for chunk, _blob_id in pieces:
        holds_end = any(pos + 10 < end <= pos + len(chunk) - 10 for end in ends)
        lied += holds_end
        scanner.feed(chunk, holds_end)
        pos += len(chunk)
    assert lied > 0
    assert scanner.finish() is None
    assert scanner.failed and "ends inside a data block" in scanner.failed


def test_second_backup_maps_through_clean_chunks(source: LocalInstance,
                                                 tmp_path: Path) -> None:
    kloset = make_kloset(tmp_path / "k")
    first = backup_logical(kloset, source.dsn(), [DB])
    from pgkloset_core.postgres.logical import previous_dumps

    found = previous_dumps(kloset, [DB, "other"])
    assert list(found) == [DB]
    assert len(found[DB].clean) > 10  # the second backup skips these
    assert len(found[DB].cuts) > 10  # and follows these
    source.execute("INSERT INTO zz_late SELECT g, 'later ' || g FROM generate_series(51, 80) g",
                   DB)
    try:
        second = backup_logical(kloset, source.dsn(), [DB])
    finally:
        source.execute("DELETE FROM zz_late WHERE id > 50", DB)
    maps = []
    for results in (first, second):
        snap = kloset.resolve(next(r.snapshot_id for r in results if r.kind == "logical"))
        entry = snap.entries[0]
        found = DumpMap.from_json(entry.meta.get(DUMP_MAP_KEY), entry.size)
        assert found is not None
        dump = b"".join(kloset.read_entry(snap, entry))
        assert found == _scan(dump, 1 << 30).finish()  # the same as reading every byte
        maps.append(found)
        followed = snap.summary["followed_bytes"]
        # The first backup has nothing to follow; the second follows all but the end.
        assert followed == 0 if results is first else followed > 0.9 * entry.size
    late = [b for b in maps[1].blocks if b[0] == maps[0].blocks[-3][0]]
    assert [b[0] for b in maps[0].blocks] == [b[0] for b in maps[1].blocks]
    assert late and late[0][2] > maps[0].blocks[-3][2]  # zz_late's block grew
