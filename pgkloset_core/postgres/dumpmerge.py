"""One custom-format archive out of a dump taken in parts.

A database's COPY runs in one server backend, which needs a whole core: a
single pg_dump can go no faster than that backend, however idle the rest
of the machine. So a backup may dump in parts, all in the same exported
snapshot: the main part is a whole ``pg_dump -Fc`` except the data of a
few large tables (``--exclude-table-data``), each other part a
``pg_dump -Fc --data-only`` of some of those tables. Their backends run
side by side. Each part is stored as it came, with its own dump map.

pg_restore wants one archive. This module describes the archive a single
pg_dump would have made, built from the parts' bytes without a copy: the
main part's header and table of contents with one TABLE DATA entry added
per moved table (taken from its part, with a new dump id and a dependency
on the main part's TABLE entry), placed before the first post-data entry,
then the main part's data blocks, then the moved tables' blocks (their
headers carrying the new ids). The added entries are placed so that the
data blocks come in the table of contents' order, as pg_restore reading a
pipe requires. ``MergedDump.map`` is that archive's dump map, so a partial
restore selects blocks exactly as from a single dump.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pgkloset_core.postgres.dumpmap import (
    BLK_DATA,
    DumpMap,
    TocLayout,
    Unsupported,
    encode_int,
    encode_str,
    read_toc,
)

SECTION_POST_DATA = 4  # pg_backup.h: NONE 1, PRE_DATA 2, DATA 3, POST_DATA 4
PARTS_KEY = "dump_parts"  # snapshot meta: the entries of the other parts, in order
PART_TABLES_KEY = "tables"  # a part entry's meta: [[schema, table], ...] whose data it holds

ReadPart = Callable[[int, list[tuple[int, int]]], Iterable[bytes]]


@dataclass(frozen=True)
class Part:
    """One stored archive of a dump: its map and its bytes up to the end of its TOC."""

    map: DumpMap
    head: bytes

    @property
    def toc(self) -> TocLayout:
        return read_toc(self.head)


@dataclass(frozen=True)
class _Piece:
    """A run of the merged archive: bytes of part ``part`` from ``start``, or literal bytes."""

    part: int  # -1: literal
    start: int
    length: int
    literal: bytes = b""


class MergedDump:
    """The single archive the parts make; raises Unsupported when they do not fit."""

    def __init__(self, parts: list[Part]) -> None:
        if len(parts) < 2:
            raise Unsupported("a merged dump needs a main part and at least one more")
        main = parts[0].toc
        isz = main.int_size
        tables = {(e.namespace, e.tag): e.dump_id for e in main.entries if e.desc == "TABLE"}
        own_data = {(e.namespace, e.tag) for e in main.entries if e.desc == "TABLE DATA"}
        post = [e for e in main.entries if e.section == SECTION_POST_DATA]
        insert_at = post[0].start if post else main.end
        if any(e.has_data and e.start >= insert_at for e in main.entries):
            raise Unsupported("the main part has data after its first post-data entry")
        next_id = max((e.dump_id for e in main.entries), default=0) + 1
        added = bytearray()
        tail: list[_Piece] = []  # the moved blocks, after the main part's
        seen: set[tuple[str, str]] = set()
        renumbered: dict[tuple[int, int], int] = {}  # (part, old dump id): merged id
        for index, part in enumerate(parts[1:], start=1):
            toc = part.toc
            if toc.version != main.version or toc.int_size != isz:
                raise Unsupported("the parts were made by different pg_dump versions")
            data = [e for e in toc.entries if e.has_data]
            if any(e.desc != "TABLE DATA" for e in data):
                raise Unsupported(f"part {index} holds data other than tables'")
            if [e.dump_id for e in data] != [b[0] for b in part.map.blocks]:
                raise Unsupported(f"part {index}'s blocks do not match its table of contents")
            new_ids: dict[int, int] = {}
            for e in data:
                key = (e.namespace, e.tag)
                if key not in tables or key in own_data or key in seen:
                    raise Unsupported(f"table {e.namespace}.{e.tag} of part {index} does not "
                                      "fit the main part")
                seen.add(key)
                new_ids[e.dump_id] = renumbered[(index, e.dump_id)] = next_id
                added += encode_int(next_id, isz)
                added += part.head[e.start + 1 + isz:e.deps_start]
                added += encode_str(str(tables[key]), isz) + encode_str(None, isz)
                added += part.head[e.deps_end:e.end]
                next_id += 1
            for dump_id, start, length in part.map.blocks:
                header = 2 + isz
                tail.append(_Piece(-1, 0, header, bytes((BLK_DATA,)) + encode_int(new_ids[dump_id], isz)))
                tail.append(_Piece(index, start + header, length - header))
        count_end = main.count_pos + 1 + isz
        base = parts[0].map
        pieces = [
            _Piece(0, 0, main.count_pos),
            _Piece(-1, 0, 1 + isz, encode_int(len(main.entries) + len(seen), isz)),
            _Piece(0, count_end, insert_at - count_end),
            _Piece(-1, 0, len(added), bytes(added)),
            _Piece(0, insert_at, base.size - insert_at),
            *tail,
        ]
        self.pieces = [p for p in pieces if p.length > 0]
        self.size = sum(p.length for p in self.pieces)
        shift = len(added)
        blocks = [(i, s + shift, n) for i, s, n in base.blocks]
        pos = base.size + shift
        for index, part in enumerate(parts[1:], start=1):
            for dump_id, _start, length in part.map.blocks:
                blocks.append((renumbered[(index, dump_id)], pos, length))
                pos += length
        if pos != self.size:
            raise Unsupported("merged archive size does not add up")
        self.map = DumpMap(size=self.size, toc_end=base.toc_end + shift, blocks=blocks,
                           blob_ids=set(base.blob_ids))
        self.tables = sorted(seen)

    def read(self, ranges: list[tuple[int, int]] | None,
             read_part: ReadPart) -> Iterator[bytes | memoryview]:
        """The merged archive's bytes in ``ranges`` (None: all), read through ``read_part``.

        ``read_part(index, ranges)`` yields part ``index``'s bytes in those
        ascending ranges. Each part is read in one pass per run of pieces.
        """
        pieces = self._select(ranges if ranges is not None else [(0, self.size)])
        i = 0
        while i < len(pieces):
            part = pieces[i].part
            if part < 0:
                yield pieces[i].literal
                i += 1
                continue
            j = i
            wanted: list[tuple[int, int]] = []
            while j < len(pieces) and pieces[j].part in (part, -1):
                p = pieces[j]
                if p.part == part:
                    if wanted and wanted[-1][1] == p.start:
                        wanted[-1] = (wanted[-1][0], p.start + p.length)
                    else:
                        wanted.append((p.start, p.start + p.length))
                j += 1
            source = _Exact(read_part(part, wanted))
            for p in pieces[i:j]:
                if p.part < 0:
                    yield p.literal
                else:
                    yield from source.take(p.length)
            source.finish()
            i = j

    def _select(self, ranges: list[tuple[int, int]]) -> list[_Piece]:
        """The pieces (cut to size) covering ascending, non-overlapping ``ranges``."""
        out: list[_Piece] = []
        starts = []
        pos = 0
        for p in self.pieces:
            starts.append(pos)
            pos += p.length
        k = 0
        for lo, hi in ranges:
            if not 0 <= lo <= hi <= self.size:
                raise ValueError(f"range {lo}-{hi} outside a {self.size}-byte archive")
            while k < len(self.pieces) and starts[k] + self.pieces[k].length <= lo:
                k += 1
            m = k
            while m < len(self.pieces) and starts[m] < hi:
                p, at = self.pieces[m], starts[m]
                a, b = max(lo, at) - at, min(hi, at + p.length) - at
                if b > a:
                    out.append(_Piece(p.part, p.start + a, b - a, p.literal[a:b]))
                m += 1
        return out


class _Exact:
    """Takes exact byte counts out of a stream of byte strings, without copying them."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._it = iter(stream)
        self._data: bytes = b""
        self._off = 0

    def take(self, n: int) -> Iterator[bytes | memoryview]:
        while n > 0:
            left = len(self._data) - self._off
            if not left:
                data = next(self._it, None)
                if data is None:
                    raise Unsupported("a part of the dump ended early")
                self._data, self._off = data, 0
                continue
            if self._off == 0 and left <= n:
                yield self._data  # the whole string, as it came
            else:
                yield memoryview(self._data)[self._off:self._off + min(n, left)]
            step = min(n, left)
            self._off += step
            n -= step

    def finish(self) -> None:
        if self._off < len(self._data) or next(self._it, None) is not None:
            raise Unsupported("a part of the dump is longer than its map")
