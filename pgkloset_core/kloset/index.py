"""The blob index: where every blob lives (pack, offset, length).

Written as immutable deltas, one per writer session (``index/<hash>``), so
concurrent writers never overwrite each other. Loaded into a compact form:
blob ids sorted in one ``bytearray`` (32 bytes each) with parallel arrays for
the location, about 50 bytes per blob instead of the ~200 a dict of tuples
costs; lookups are a binary search. Loading sorts each delta on its own into
one buffer and merges those runs, so no object per blob is ever made.
"""

from __future__ import annotations

import heapq
import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pgkloset_core.errors import CorruptObject

ID_LEN = 32
BLOB_DATA = 0
BLOB_LIST = 1
BLOB_TYPES = (BLOB_DATA, BLOB_LIST)

INDEX_MAGIC = b"PGKI"
INDEX_VERSION = 1
_RECORD = struct.Struct("<32sBIII")  # blob id, type, offset, length, raw length
_PACK_HEAD = struct.Struct("<32s32sI")  # pack id, pack salt, blob count
_KEYED = struct.Struct("<32sBIIII")  # a record and its pack's number: sorts by blob id


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """One blob inside a pack (offset and length of its stored bytes)."""

    blob_id: bytes
    blob_type: int
    offset: int
    length: int
    raw_length: int


@dataclass(frozen=True, slots=True)
class PackRecord:
    """A pack and every blob it holds, as written by one session."""

    pack_id: str  # hex content hash: data/<id[:2]>/<id>
    salt: bytes  # session salt the pack's blob key derives from
    blobs: tuple[BlobEntry, ...]


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: str
    salt: bytes
    blob_type: int
    offset: int
    length: int
    raw_length: int


def encode_delta(packs: Iterable[PackRecord], supersedes: Iterable[str] = ()) -> bytes:
    """Binary payload of an index delta (sealed by the caller)."""
    packs = list(packs)
    superseded = list(supersedes)
    out = bytearray(INDEX_MAGIC + struct.pack("<BII", INDEX_VERSION, len(packs), len(superseded)))
    for name in superseded:
        out += bytes.fromhex(name)
    for pack in packs:
        out += _PACK_HEAD.pack(bytes.fromhex(pack.pack_id), pack.salt, len(pack.blobs))
        for b in pack.blobs:
            out += _RECORD.pack(b.blob_id, b.blob_type, b.offset, b.length, b.raw_length)
    return bytes(out)


def _delta_head(data: bytes, name: str) -> tuple[int, list[str], int]:
    """Pack count, superseded delta ids and where the packs start (struct.error if short)."""
    if data[:4] != INDEX_MAGIC:
        raise CorruptObject(name, "not an index delta")
    version, npacks, nsup = struct.unpack_from("<BII", data, 4)
    if version != INDEX_VERSION:
        raise CorruptObject(name, f"unsupported index version {version}")
    pos = 13
    if nsup > (len(data) - pos) // ID_LEN:
        raise CorruptObject(name, "truncated")
    superseded = [data[pos + i * ID_LEN : pos + (i + 1) * ID_LEN].hex() for i in range(nsup)]
    return npacks, superseded, pos + nsup * ID_LEN


def _delta_packs(data: bytes, name: str, npacks: int,
                 pos: int) -> Iterator[tuple[bytes, bytes, range]]:
    """Each pack's id, salt and record offsets, checked: counts fit, blob types known,
    nothing trails (struct.error if short)."""
    size = _RECORD.size
    for _ in range(npacks):
        pack_id, salt, count = _PACK_HEAD.unpack_from(data, pos)
        pos += _PACK_HEAD.size
        if count > (len(data) - pos) // size:
            raise CorruptObject(name, "truncated")
        records = range(pos, pos + count * size, size)
        for rec in records:
            if data[rec + ID_LEN] not in BLOB_TYPES:
                raise CorruptObject(name, f"unknown blob type {data[rec + ID_LEN]}")
        yield pack_id, salt, records
        pos += count * size
    if pos != len(data):
        raise CorruptObject(name, "trailing bytes")


def decode_delta(data: bytes, name: str) -> tuple[list[PackRecord], list[str]]:
    """Packs and the superseded delta ids; malformed input is a CorruptObject."""
    try:
        npacks, superseded, pos = _delta_head(data, name)
        packs = [PackRecord(pack_id.hex(), salt,
                            tuple(BlobEntry(*_RECORD.unpack_from(data, rec)) for rec in records))
                 for pack_id, salt, records in _delta_packs(data, name, npacks, pos)]
        return packs, superseded
    except struct.error:
        raise CorruptObject(name, "truncated") from None


@dataclass(frozen=True, slots=True)
class DeltaRun:
    """A delta's blobs as one buffer of KEYED records sorted by id: ~50 bytes a blob.

    Loading thousands of deltas as PackRecord objects cost ~360 bytes a blob
    at the peak, and most of it stayed resident after the build (62 MiB for
    160,000 blobs); a run holds no object per blob.
    """

    records: bytes
    packs: tuple[tuple[str, bytes], ...]  # (pack id, salt) by the records' pack numbers
    superseded: tuple[str, ...]


def decode_delta_run(data: bytes, name: str) -> DeltaRun:
    """Like decode_delta (the same checks), into a sorted run."""
    try:
        npacks, superseded, pos = _delta_head(data, name)
        packs = []
        keys: list[bytes] = []
        size = _RECORD.size
        for no, (pack_id, salt, records) in enumerate(_delta_packs(data, name, npacks, pos)):
            tag = no.to_bytes(4, "little")
            keys.extend(data[rec : rec + size] + tag for rec in records)
            packs.append((pack_id.hex(), salt))
        keys.sort()
        return DeltaRun(b"".join(keys), tuple(packs), tuple(superseded))
    except struct.error:
        raise CorruptObject(name, "truncated") from None


def _run_keys(run: DeltaRun, r: int) -> Iterator[tuple[bytes, int]]:
    buf, size = run.records, _KEYED.size
    for i in range(0, len(buf), size):
        yield buf[i : i + size], r


class _SortedIds:
    """Sequence view of a sorted id bytearray, for bisect."""

    __slots__ = ("buf",)

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def __len__(self) -> int:
        return len(self.buf) // ID_LEN

    def __getitem__(self, i: int) -> bytes:
        return bytes(self.buf[i * ID_LEN : (i + 1) * ID_LEN])


class BlobIndex:
    """Compact, read-mostly map from blob id to its location."""

    def __init__(self) -> None:
        self._ids = bytearray()
        self._pack_no = array("I")
        self._type = array("B")
        self._offset = array("I")
        self._length = array("I")
        self._raw = array("I")
        self._packs: list[tuple[str, bytes]] = []
        self._pack_numbers: dict[str, int] = {}
        self._recent: dict[bytes, BlobLocation] = {}

    @classmethod
    def build(cls, packs: Iterable[PackRecord]) -> BlobIndex:
        index = cls()
        rows = []
        for pack in packs:
            no = index._pack_number(pack.pack_id, pack.salt)
            for b in pack.blobs:
                rows.append((b.blob_id, no, b.blob_type, b.offset, b.length, b.raw_length))
        rows.sort()
        index._extend(rows)
        return index

    @classmethod
    def from_runs(cls, runs: Iterable[DeltaRun]) -> BlobIndex:
        """Merge sorted delta runs: the same index as ``build``, one blob in flight at a time."""
        index = cls()
        runs = list(runs)
        numbers = [[index._pack_number(pack_id, salt) for pack_id, salt in run.packs] for run in runs]
        unpack = _KEYED.unpack

        def rows() -> Iterator[tuple[bytes, int, int, int, int, int]]:
            for key, r in heapq.merge(*(_run_keys(run, r) for r, run in enumerate(runs))):
                blob_id, btype, offset, length, raw, no = unpack(key)
                yield blob_id, numbers[r][no], btype, offset, length, raw

        index._extend(rows())
        return index

    def _extend(self, rows: Iterable[tuple[bytes, int, int, int, int, int]]) -> None:
        """Append rows sorted by blob id; a blob stored twice (concurrent writers) once."""
        last = None
        for blob_id, no, btype, offset, length, raw in rows:
            if blob_id == last:
                continue
            last = blob_id
            self._ids += blob_id
            self._pack_no.append(no)
            self._type.append(btype)
            self._offset.append(offset)
            self._length.append(length)
            self._raw.append(raw)

    def _pack_number(self, pack_id: str, salt: bytes) -> int:
        no = self._pack_numbers.get(pack_id)
        if no is None:
            no = len(self._packs)
            self._packs.append((pack_id, salt))
            self._pack_numbers[pack_id] = no
        return no

    def add_pack(self, pack: PackRecord) -> None:
        """Make a freshly written pack's blobs visible to this session."""
        for b in pack.blobs:
            self._recent.setdefault(
                b.blob_id,
                BlobLocation(pack.pack_id, pack.salt, b.blob_type, b.offset, b.length, b.raw_length),
            )

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        hit = self._recent.get(blob_id)
        if hit is not None:
            return hit
        ids = _SortedIds(self._ids)
        i = bisect_left(ids, blob_id)
        if i < len(ids) and ids[i] == blob_id:
            pack_id, salt = self._packs[self._pack_no[i]]
            return BlobLocation(pack_id, salt, self._type[i], self._offset[i], self._length[i], self._raw[i])
        return None

    def __contains__(self, blob_id: bytes) -> bool:
        return self.lookup(blob_id) is not None

    def __len__(self) -> int:
        return len(self._ids) // ID_LEN + len(self._recent)

    def pack_ids(self) -> set[str]:
        return {p for p, _ in self._packs} | {loc.pack_id for loc in self._recent.values()}

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        for i in range(len(self._ids) // ID_LEN):
            pack_id, salt = self._packs[self._pack_no[i]]
            yield bytes(self._ids[i * ID_LEN : (i + 1) * ID_LEN]), BlobLocation(
                pack_id, salt, self._type[i], self._offset[i], self._length[i], self._raw[i]
            )
        yield from self._recent.items()
