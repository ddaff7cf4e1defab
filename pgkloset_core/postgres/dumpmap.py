"""Where each data block of a custom-format dump lies, noted while the dump streams by.

pg_dump writing to a pipe cannot seek back to fill in the data offsets of
its table of contents, so pg_restore reading such an archive from a pipe
must read every byte up to the data it wants: restoring one table out of a
snapshot would fetch nearly the whole snapshot. The scanner here follows the
dump as it passes through the writer and records where the header and table
of contents end and where each data block starts and how long it is. A
partial restore then fetches only the chunks covering the table of contents
and the wanted blocks and feeds pg_restore a shortened archive: the same
header and TOC, followed by just those blocks in their original order --
which pg_restore reads exactly as it reads the whole stream.

The layout followed is pg_dump's custom format (``pg_backup_archiver.c``
``ReadHead``/``ReadToc``, ``pg_backup_custom.c``), archive versions 1.12 to
1.16 (PostgreSQL 9.0 to 18), uncompressed data only (pgkloset dumps with
``-Z0``). Integers are a sign byte then ``intSize`` little-endian bytes.

Finding block ends without reading every row: in an uncompressed data block
every chunk is a length header followed by COPY text, which never holds a
NUL byte, and a header has at most four zero bytes in a row; so the first
run of five zero bytes after a block's header is its end marker (a zero
length). The scanner searches for that marker together with the header of
the block the TOC says comes next (eleven bytes; five zeros alone half match
every row header, so the longer needle skips faster), with libc's memmem,
which leaves the GIL to the other threads; where the next block's type is
not known, or for the last block, it searches for the marker alone.
Large-object blocks hold binary data and are walked chunk by chunk instead.
Anything unexpected makes the scanner give up: the snapshot then has
no map and partial restores read the whole dump, as before. A restore also
checks every block header it fetches against the map.
"""

from __future__ import annotations

import bisect
import ctypes
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
BLK_DATA = 1
BLK_BLOBS = 3
OFFSET_POS_NOT_SET = 1
OFFSET_POS_SET = 2
OFFSET_NO_DATA = 3
MIN_VERSION = (1, 12, 0)
MAX_VERSION = (1, 16, 0)
MAP_VERSION = 1
DUMP_MAP_KEY = "pg_dump_map"  # where the map lives in the dump entry's meta
ZEROS = b"\x00" * 5
BLOCK_TYPES = {"TABLE DATA": BLK_DATA, "BLOBS": BLK_BLOBS}  # by TOC entry desc
TOC_LIMIT = 256 * 1024 * 1024  # a table of contents larger than this is not mapped


def _libc_memmem() -> Callable[[bytes | int, int, bytes, int], int | None] | None:
    """glibc's memmem, which releases the GIL (ctypes calls do) and is faster than find."""
    try:
        fn = ctypes.CDLL(None).memmem
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return cast(Callable[[bytes | int, int, bytes, int], "int | None"], fn)


_MEMMEM = _libc_memmem()


def _holds(data: bytes | memoryview, needle: bytes) -> bool:
    """Whether ``needle`` occurs in ``data``: searched by memmem where libc has it.

    A writable view (a chunk inside the writer's read block) is searched in
    place; a read-only one is copied first (ctypes cannot point into it).
    """
    if _MEMMEM is not None and isinstance(data, memoryview) and not data.readonly and data.nbytes:
        pinned = ctypes.c_char.from_buffer(data)  # keeps the view exported during the call
        return _MEMMEM(ctypes.addressof(pinned), data.nbytes, needle, len(needle)) is not None
    data = bytes(data)  # a bytes object is returned as it is, not copied
    if _MEMMEM is None:
        return data.find(needle) >= 0
    return _MEMMEM(data, len(data), needle, len(needle)) is not None


class Unsupported(Exception):
    """The stream is not an archive this scanner can map (the caller stores no map)."""


class _NeedMore(Exception):
    """The buffer ends before the structure being read does."""


@dataclass(frozen=True)
class TocEntry:
    """One entry of the archive's table of contents (the parts a restore needs).

    The offsets locate the entry in the archive, so that dumpmerge.py can
    copy it with a new dump id and new dependencies: ``start`` (its dump id),
    ``deps_start`` (its first dependency), ``deps_end`` (after the NULL that
    ends them: its data offset follows) and ``end``.
    """

    dump_id: int
    desc: str
    namespace: str
    tag: str
    has_data: bool
    section: int = 0
    deps: tuple[int, ...] = ()
    start: int = 0
    deps_start: int = 0
    deps_end: int = 0
    end: int = 0


@dataclass(frozen=True)
class TocLayout:
    """A custom-format archive's header and table of contents, as parsed."""

    version: tuple[int, int, int]
    int_size: int
    count_pos: int  # where the entry count (an int) is written
    entries: list[TocEntry]
    end: int  # the first byte after the TOC


@dataclass
class DumpMap:
    """The table of contents' extent and every data block's (dump id, start, length)."""

    size: int
    toc_end: int
    blocks: list[tuple[int, int, int]] = field(default_factory=list)
    blob_ids: set[int] = field(default_factory=set)  # blocks of large objects (binary)

    def to_json(self) -> dict[str, Any]:
        # Blocks are contiguous from toc_end, so a length per block is enough.
        return {"version": MAP_VERSION, "size": self.size, "toc_end": self.toc_end,
                "blocks": [[dump_id, length] for dump_id, _start, length in self.blocks],
                "large_objects": sorted(self.blob_ids)}

    @classmethod
    def from_json(cls, doc: Any, size: int) -> DumpMap | None:
        """The map recorded with an entry of ``size`` bytes, or None when absent or unusable."""
        try:
            if not isinstance(doc, dict) or doc.get("version") != MAP_VERSION:
                return None
            if int(doc["size"]) != size:
                return None
            pos = toc_end = int(doc["toc_end"])
            blocks: list[tuple[int, int, int]] = []
            for dump_id, length in doc["blocks"]:
                dump_id, length = int(dump_id), int(length)
                if dump_id <= 0 or length <= 0:
                    return None
                blocks.append((dump_id, pos, length))
                pos += length
            if not 0 < toc_end <= size or pos != size:
                return None
            blob_ids = {int(x) for x in doc.get("large_objects", [])}
        except (KeyError, TypeError, ValueError):
            return None
        return cls(size=size, toc_end=toc_end, blocks=blocks, blob_ids=blob_ids)

    def ranges(self, dump_ids: set[int]) -> list[tuple[int, int]]:
        """(start, end) byte ranges of the header, TOC and the blocks of ``dump_ids``."""
        out = [(0, self.toc_end)]
        for dump_id, start, length in self.blocks:
            if dump_id in dump_ids:
                if out[-1][1] == start:
                    out[-1] = (out[-1][0], start + length)
                else:
                    out.append((start, start + length))
        return out

    def block_ids(self) -> set[int]:
        return {b[0] for b in self.blocks}


HEADER_MAX = 2 + 8  # block type, sign byte and the widest int size
CLEAN_MAX = 4_000_000  # chunk ids remembered as clean (8 bytes each)


class CleanChunks:
    """Chunks of an earlier dump that lay wholly inside table data blocks.

    Such a chunk holds no run of five zero bytes (COPY text and row headers
    never do), so the scanner need not search it again when the same chunk
    comes by in a later dump. Kept as a sorted array of 8-byte id prefixes; a
    prefix collision could only make the scanner miss a block end, which it
    then notices (no later block end is followed by the header the TOC
    expects next, so the stream ends inside a block) and maps nothing.
    """

    def __init__(self, prefixes: array[int]) -> None:
        self._prefixes = prefixes

    @classmethod
    def from_dump(cls, found: DumpMap, refs: Iterable[tuple[bytes, int]]) -> CleanChunks:
        inside: list[int] = []
        blocks = iter(found.blocks)
        block = next(blocks, None)
        pos = 0
        for blob_id, length in refs:
            start, end = pos, pos + length
            pos = end
            while block is not None and block[1] + block[2] <= start:
                block = next(blocks, None)
            if block is None or len(inside) >= CLEAN_MAX:
                break
            dump_id, b_start, b_len = block
            if (dump_id not in found.blob_ids and start >= b_start + HEADER_MAX
                    and end <= b_start + b_len - len(ZEROS)):
                inside.append(int.from_bytes(blob_id[:8], "little"))
        return cls(array("Q", sorted(set(inside))))

    @classmethod
    def union(cls, sets: Iterable[CleanChunks]) -> CleanChunks:
        """The chunks clean in any of ``sets`` (the parts of one dump)."""
        merged: set[int] = set()
        for one in sets:
            merged.update(one._prefixes)
        return cls(array("Q", sorted(merged)))

    def __contains__(self, blob_id: bytes) -> bool:
        key = int.from_bytes(blob_id[:8], "little")
        i = bisect.bisect_left(self._prefixes, key)
        return i < len(self._prefixes) and self._prefixes[i] == key

    def __len__(self) -> int:
        return len(self._prefixes)


class _Cursor:
    """Reads the archive's integers and strings from a buffer; raises _NeedMore at its end."""

    def __init__(self, buf: bytes | bytearray, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.int_size = 4
        self.off_size = 8

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise _NeedMore
        data = bytes(self.buf[self.pos:end])
        self.pos = end
        return data

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _NeedMore
        value = self.buf[self.pos]
        self.pos += 1
        return value

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(self.int_size), "little")
        return -value if sign else value

    def str(self) -> str | None:
        n = self.int()
        if n < 0:
            return None
        if n > TOC_LIMIT:
            raise Unsupported("string longer than the archive could hold")
        return self.take(n).decode("utf-8", "replace")


def parse_toc(buf: bytes | bytearray) -> tuple[list[TocEntry], int, int]:
    """(entries, int size, end offset of the TOC) of a custom-format archive's start.

    Raises _NeedMore when ``buf`` ends before the TOC does, Unsupported when
    it is not an uncompressed custom-format archive of a known version.
    """
    layout = read_toc(buf)
    return layout.entries, layout.int_size, layout.end


def read_toc(buf: bytes | bytearray) -> TocLayout:
    """The header and table of contents of a custom-format archive's start (see parse_toc)."""
    c = _Cursor(buf)
    if c.take(5) != MAGIC:
        raise Unsupported("not a custom-format archive")
    version = (c.byte(), c.byte(), c.byte())
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise Unsupported(f"archive version {'.'.join(map(str, version))}")
    c.int_size = c.byte()
    c.off_size = c.byte()
    if not 1 <= c.int_size <= 8 or not 1 <= c.off_size <= 16:
        raise Unsupported("implausible integer sizes")
    if c.byte() != FORMAT_CUSTOM:
        raise Unsupported("not the custom format")
    # 1.15 on: the algorithm (0 is none); before: the zlib level (0 is none, -1 default).
    compression = c.byte() if version >= (1, 15, 0) else c.int()
    if compression != 0:
        raise Unsupported("compressed archive")
    for _ in range(7):  # creation time
        c.int()
    for _ in range(3):  # database name, server version, pg_dump version
        c.str()
    count_pos = c.pos
    count = c.int()
    if count < 0:
        raise Unsupported("negative TOC count")
    entries: list[TocEntry] = []
    for _ in range(count):
        start = c.pos
        dump_id = c.int()
        if dump_id <= 0:
            raise Unsupported("entry id out of range")
        c.int()  # had a dumper
        c.str()  # table oid
        c.str()  # oid
        tag = c.str() or ""
        desc = c.str() or ""
        section = c.int()
        for _ in range(3):  # definition, drop statement, COPY statement
            c.str()
        namespace = c.str() or ""
        c.str()  # tablespace
        if version >= (1, 14, 0):
            c.str()  # table access method
        if version >= (1, 16, 0):
            c.int()  # relkind
        c.str()  # owner
        c.str()  # "with oids"
        deps_start = c.pos
        deps: list[int] = []
        while (dep := c.str()) is not None:  # dependencies, ended by a NULL string
            if dep.isdigit():
                deps.append(int(dep))
        deps_end = c.pos
        flag = c.byte()
        c.take(c.off_size)
        if flag not in (OFFSET_POS_NOT_SET, OFFSET_POS_SET, OFFSET_NO_DATA):
            raise Unsupported(f"unexpected data offset flag {flag}")
        entries.append(TocEntry(dump_id, desc, namespace, tag, flag != OFFSET_NO_DATA,
                                section, tuple(deps), start, deps_start, deps_end, c.pos))
    return TocLayout(version, c.int_size, count_pos, entries, c.pos)


def encode_int(value: int, int_size: int) -> bytes:
    """An archive integer: a sign byte, then ``int_size`` little-endian bytes."""
    return bytes((1 if value < 0 else 0,)) + abs(value).to_bytes(int_size, "little")


def encode_str(text: str | None, int_size: int) -> bytes:
    """An archive string: its length as an integer (-1 for NULL), then its bytes."""
    if text is None:
        return encode_int(-1, int_size)
    data = text.encode("utf-8")
    return encode_int(len(data), int_size) + data


class DumpScanner:
    """Fed a custom-format dump in order (``feed``), returns its DumpMap (``finish``).

    Memory stays small: only the table of contents is buffered; in data
    blocks at most a block header's worth of bytes is kept between feeds.
    """

    def __init__(self, keep_head: bool = False) -> None:
        self.keep_head = keep_head
        self.head: bytes | None = None  # with keep_head: the bytes up to the TOC's end
        self.failed: str | None = None
        self.buf = bytearray()
        self.base = 0  # absolute offset of buf[0]
        self.size = 0  # bytes fed so far
        self.state = "toc"
        self.next_try = 64 * 1024
        self.int_size = 4
        self.toc_end = 0
        # Data-bearing entries not yet seen, in TOC order: (dump id, block type or 0).
        self.expected: list[tuple[int, int]] = []
        self.needle = ZEROS  # what ends the current data block (see _needle)
        self.blocks: list[tuple[int, int, int]] = []
        self.blob_ids: set[int] = set()
        self.block_start = 0
        self.block_id = 0
        self.search_from = 0  # absolute offset where the end-marker search resumes
        self.blob_step = "oid"  # walking large objects: "oid", "len" or "skip"
        self.skip = 0

    # -- public ---------------------------------------------------------------

    def feed(self, data: bytes | memoryview, clean: bool = False) -> None:
        """The next bytes of the stream.

        ``clean``: the caller knows these bytes hold no five zero bytes in a
        row (a chunk seen inside a data block of an earlier dump), so inside a
        data block only the junction with the previous bytes is searched.
        """
        if self.failed:
            return
        if self.state == "data" and not self._feed_data(data, clean):
            return
        self.size += len(data)
        self.buf += data
        try:
            self._advance()
        except Unsupported as exc:
            self._fail(str(exc))

    def finish(self) -> DumpMap | None:
        """The map, or None (see ``failed``) when the stream could not be mapped."""
        if self.failed:
            return None
        try:
            if self.state == "toc":
                self._parse_toc(final=True)
            self._advance()  # whatever is buffered after a TOC parsed only now
            if self.state == "header":
                self._next_header(final=True)
            if self.state != "done":
                raise Unsupported(f"stream ends inside a {self.state} block")
        except Unsupported as exc:
            self._fail(str(exc))
            return None
        return DumpMap(size=self.size, toc_end=self.toc_end, blocks=self.blocks,
                       blob_ids=self.blob_ids)

    # -- states ---------------------------------------------------------------

    def _fail(self, why: str) -> None:
        self.failed = why
        self.buf = bytearray()

    def _advance(self) -> None:
        while True:
            before = (self.state, self.base, len(self.buf), len(self.blocks))
            if self.state == "toc":
                if len(self.buf) < self.next_try:
                    return
                self._parse_toc(final=False)
            elif self.state == "header":
                self._next_header(final=False)
            elif self.state == "data":
                self._end_data()
            elif self.state == "blobs":
                self._walk_blobs()
            elif self.state == "done":
                if self.buf:
                    raise Unsupported("bytes after the last data block")
                return
            if (self.state, self.base, len(self.buf), len(self.blocks)) == before:
                return  # waiting for more bytes

    def _parse_toc(self, *, final: bool) -> None:
        try:
            entries, self.int_size, end = parse_toc(self.buf)
        except _NeedMore:
            if final:
                raise Unsupported("stream ends inside the table of contents") from None
            if len(self.buf) > TOC_LIMIT:
                raise Unsupported("table of contents too large to map") from None
            self.next_try = len(self.buf) * 2
            return
        self.toc_end = end
        if self.keep_head:
            self.head = bytes(self.buf[:end])
        self.expected = [(e.dump_id, BLOCK_TYPES.get(e.desc, 0)) for e in entries if e.has_data]
        self._drop_to(end)
        self.state = "header"

    def _drop_to(self, absolute: int) -> None:
        """Forget buffered bytes before ``absolute``."""
        del self.buf[:absolute - self.base]
        self.base = absolute

    def _next_header(self, *, final: bool) -> None:
        """At a block boundary: the next block's header, or the end of the archive."""
        need = 2 + self.int_size
        if len(self.buf) < need:
            if final:
                if self.buf:
                    raise Unsupported("stream ends inside a block header")
                self.state = "done"
            return
        blk_type = self.buf[0]
        c = _Cursor(self.buf, 1)
        c.int_size = self.int_size
        dump_id = c.int()
        if blk_type not in (BLK_DATA, BLK_BLOBS):
            raise Unsupported(f"unknown block type {blk_type}")
        # Every entry the TOC marks as having data has a block, in TOC order; anything
        # else (or a block end missed) is a stream this scanner does not understand.
        if not self.expected or dump_id != self.expected[0][0]:
            raise Unsupported(f"block {dump_id} where the TOC has "
                              f"{self.expected[0][0] if self.expected else 'no more data'}")
        del self.expected[0]
        self.block_start, self.block_id = self.base, dump_id
        self.search_from = self.base + need
        if blk_type == BLK_DATA:
            self.state = "data"
            self.needle = self._needle()
        else:
            self.state, self.blob_step = "blobs", "oid"
            self.blob_ids.add(dump_id)
            self._drop_to(self.base + need)

    def _close_block(self, end: int) -> None:
        self.blocks.append((self.block_id, self.block_start, end - self.block_start))
        self._drop_to(end)
        self.state = "header"

    def _needle(self) -> bytes:
        """The end marker, followed by the next block's header when the TOC tells it."""
        if not self.expected or not self.expected[0][1]:
            return ZEROS
        dump_id, blk_type = self.expected[0]  # read from the TOC in int_size bytes: it fits
        return ZEROS + bytes((blk_type, 0)) + dump_id.to_bytes(self.int_size, "little")

    def _feed_data(self, data: bytes | memoryview, clean: bool) -> bool:
        """Inside a data block: search ``data`` without buffering it.

        Returns True when the block ends in ``data`` (the caller then buffers
        and parses on from there), False when all of ``data`` lies inside the
        block; only the last ``len(needle) - 1`` bytes are kept, for a marker
        cut between two feeds. ``clean`` data holds no marker of its own, so
        only its junction with the kept bytes is searched.
        """
        needle = self.needle
        keep = len(needle) - 1
        tail = self.buf[self.search_from - self.base:]
        if (tail + data[:keep]).find(needle) >= 0:
            return True
        if not clean and _holds(data, needle):
            return True
        self.size += len(data)
        if len(data) >= keep:
            self.buf = bytearray(data[len(data) - keep:])
        else:
            self.buf = (tail + data)[-keep:]
        self.base = self.search_from = self.size - len(self.buf)
        return False

    def _end_data(self) -> None:
        """Find the data block's end marker (and the next header, see _needle) in ``buf``."""
        at = self.buf.find(self.needle, self.search_from - self.base)
        if at < 0:
            keep_from = max(self.search_from,
                            self.base + len(self.buf) - (len(self.needle) - 1))
            self._drop_to(keep_from)
            self.search_from = keep_from
            return
        self._close_block(self.base + at + len(ZEROS))

    def _walk_blobs(self) -> None:
        """Large objects: (oid, chunks of (length, bytes)..., 0)... then oid 0."""
        width = 1 + self.int_size
        while True:
            if self.blob_step == "skip":
                n = min(self.skip, len(self.buf))
                self.skip -= n
                self._drop_to(self.base + n)
                if self.skip:
                    return
                self.blob_step = "len"
                continue
            if len(self.buf) < width:
                return
            c = _Cursor(self.buf)
            c.int_size = self.int_size
            value = c.int()
            self._drop_to(self.base + width)
            if value < 0:
                raise Unsupported("negative value in a large-object block")
            if self.blob_step == "oid":
                if value == 0:
                    self._close_block(self.base)
                    return
                self.blob_step = "len"
            elif value == 0:
                self.blob_step = "oid"
            else:
                self.blob_step, self.skip = "skip", value
