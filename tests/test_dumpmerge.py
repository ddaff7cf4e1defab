"""The plan of a dump in parts and the one archive its parts make (dumpsplit.py, dumpmerge.py).

Archives come from the real pg_dump of PostgreSQL 15, written to a pipe as
a backup takes them; the merged archive is checked against pg_restore and
against the dump scanner, byte range by byte range.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pgkloset_core.postgres.dumpmap import DumpScanner, Unsupported
from pgkloset_core.postgres.dumpmerge import MergedDump, Part
from pgkloset_core.postgres.dumpsplit import AUTO_MIN_BYTES, plan_parts, table_pattern
from pgkloset_core.postgres.instance import LocalInstance

DB = "dm_source"
ODD = 'we.ird*"x'  # a table name full of pattern characters, and a double quote


@pytest.fixture(scope="module")
def source(pg15: LocalInstance) -> LocalInstance:
    pg15.execute(f"CREATE DATABASE {DB}")
    pg15.psql(f"""
        CREATE SCHEMA "Odd Schema";
        CREATE TABLE public.big (id bigserial PRIMARY KEY, t text, j jsonb);
        INSERT INTO public.big (t, j) SELECT md5(i::text), jsonb_build_object('i', i)
            FROM generate_series(1, 20000) i;
        CREATE TABLE "Odd Schema"."{ODD.replace('"', '""')}" (id int REFERENCES public.big, v text);
        INSERT INTO "Odd Schema"."{ODD.replace('"', '""')}" SELECT i, 'v' || i
            FROM generate_series(1, 500) i;
        CREATE TABLE public.small (a int, b text);
        INSERT INTO public.small SELECT i, 'y' FROM generate_series(1, 50) i;
        CREATE INDEX small_a ON public.small (a);
        CREATE MATERIALIZED VIEW public.mv AS SELECT count(*) FROM public.big;
        SELECT lo_from_bytea(0, 'blob bytes');
    """, DB)
    return pg15


def _dump(instance: LocalInstance, *args: str) -> bytes:
    """pg_dump -Fc -Z0 into a pipe (offsets unset, as in a backup)."""
    return subprocess.run([str(instance.binaries.bin_dir / "pg_dump"), "-Fc", "-Z0", *args,
                           "-d", DB], capture_output=True, check=True,
                          env=instance.env(DB)).stdout


def _part(data: bytes) -> Part:
    scanner = DumpScanner(keep_head=True)
    scanner.feed(data)
    found = scanner.finish()
    assert found is not None and scanner.head is not None, scanner.failed
    return Part(found, scanner.head)


def _merge(datas: list[bytes]) -> tuple[MergedDump, bytes]:
    merged = MergedDump([_part(d) for d in datas])
    out = b"".join(merged.read(None, lambda i, rs: [datas[i][a:b] for a, b in rs]))
    return merged, out


def _split(source: LocalInstance) -> list[bytes]:
    moved = [("public", "big"), ("Odd Schema", ODD)]
    main = _dump(source, *(f"--exclude-table-data={table_pattern(t)}" for t in moved))
    part = _dump(source, "--data-only", *(a for t in moved for a in ("-t", table_pattern(t))))
    return [main, part]


def _listing(source: LocalInstance, archive: bytes) -> list[str]:
    out = subprocess.run([str(source.binaries.bin_dir / "pg_restore"), "-l"], input=archive,
                         capture_output=True, check=True).stdout.decode()
    return sorted(ln.split(" ", 3)[3] for ln in out.splitlines() if ln and ln[0] != ";")


def test_patterns_match_exactly_the_named_tables(source: LocalInstance) -> None:
    main, part = _split(source)
    merged, _out = _merge([main, part])
    assert merged.tables == [("Odd Schema", ODD), ("public", "big")]


def test_merged_archive_is_what_one_dump_lists(source: LocalInstance) -> None:
    merged, out = _merge(_split(source))
    assert len(out) == merged.size
    assert _listing(source, out) == _listing(source, _dump(source))
    # The scanner, run over the merged bytes, finds exactly the map the merge computed.
    scanner = DumpScanner()
    scanner.feed(out)
    found = scanner.finish()
    assert found is not None, scanner.failed
    assert (found.toc_end, found.blocks, found.blob_ids) == \
        (merged.map.toc_end, merged.map.blocks, merged.map.blob_ids)


def test_ranges_read_the_same_bytes_as_slices(source: LocalInstance) -> None:
    datas = _split(source)
    merged, out = _merge(datas)
    for dump_id, _start, _length in merged.map.blocks:
        ranges = merged.map.ranges({dump_id})
        got = b"".join(merged.read(ranges, lambda i, rs: [datas[i][a:b] for a, b in rs]))
        assert got == b"".join(out[a:b] for a, b in ranges)
    odd = [(3, 17), (17, 18), (merged.map.toc_end - 5, merged.size - 3)]
    got = b"".join(merged.read(odd, lambda i, rs: [datas[i][a:b] for a, b in rs]))
    assert got == b"".join(out[a:b] for a, b in odd)


def test_merged_archive_restores_from_a_pipe(source: LocalInstance, tmp_path: Path) -> None:
    _merged, out = _merge(_split(source))
    source.execute("CREATE DATABASE dm_restored")
    subprocess.run([str(source.binaries.bin_dir / "pg_restore"), "--exit-on-error",
                    "--single-transaction", "-d", "dm_restored"], input=out, check=True,
                   capture_output=True, env=source.env("dm_restored"))
    q = (f'SELECT (SELECT md5(string_agg(t::text, \',\' ORDER BY id)) FROM public.big t), '
         f'(SELECT count(*) FROM "Odd Schema"."{ODD.replace(chr(34), chr(34) * 2)}"), '
         f'(SELECT count FROM public.mv), (SELECT last_value FROM public.big_id_seq)')
    assert source.execute(q, "dm_restored") == source.execute(q, DB)


def test_parts_that_do_not_fit_are_refused(source: LocalInstance) -> None:
    main, part = _split(source)
    whole = _dump(source)
    with pytest.raises(Unsupported, match="does not fit"):  # the table's data is in both
        MergedDump([_part(whole), _part(part)])
    with pytest.raises(Unsupported, match="other than tables"):  # large objects in a part
        MergedDump([_part(main), _part(whole)])
    with pytest.raises(Unsupported):
        MergedDump([_part(main)])
    merged = MergedDump([_part(main), _part(part)])
    short = part[:-7]
    with pytest.raises(Unsupported, match="ended early"):
        b"".join(merged.read(None, lambda i, rs: [([main, short][i])[a:b] for a, b in rs]))


def test_plan_spreads_the_largest_tables() -> None:
    mib = 1024 * 1024
    sizes = [("app", "events", 1600 * mib), ("app", "accounts", 1340 * mib),
             ("app", "customers", 100 * mib), ("app", "tiny", 1 * mib), ("app", "empty", 0)]
    assert plan_parts(sizes, None) == [[("app", "events")]]
    assert plan_parts(sizes, 1) == []
    three = plan_parts(sizes, 3)
    assert three == [[("app", "accounts")], [("app", "events")]]  # customers: the main part
    # Below the default's threshold only an explicit number splits.
    small = [("s", "a", AUTO_MIN_BYTES // 2), ("s", "b", AUTO_MIN_BYTES // 4)]
    assert plan_parts(small, None) == []
    assert plan_parts(small, 2) == [[("s", "a")]]
    # Tables under 1% of the database stay in the main part.
    many = [("s", f"t{i}", 10) for i in range(500)] + [("s", "big", 10_000)]
    assert plan_parts(many, 2) == [[("s", "big")]]
    assert plan_parts([], 4) == []


def test_table_pattern_quotes_everything() -> None:
    assert table_pattern(("public", "big")) == '"public"."big"'
    assert table_pattern(("Odd Schema", 'a"b*')) == '"Odd Schema"."a""b*"'
