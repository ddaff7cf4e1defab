"""Packs: many encrypted blobs in one storage object, with a trailer index.

Layout (see docs/FORMAT.md)::

    "PGKP" | version u8 | 3 zero bytes | session salt (32)
    blob* : nonce (12) | AES-256-GCM(codec u8 | payload) + tag (16)
    trailer: nonce (12) | AES-256-GCM(trailer records) + tag (16)
    trailer length u32 LE | "PGKE"

Blob associated data is ``"pgkloset/blob" | type | blob id``, so a blob cannot
be moved under another id or type. The trailer lets the index be rebuilt
from packs alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from pgkloset_core.errors import CorruptObject
from pgkloset_core.kloset.crypto import (
    NONCE_LEN,
    SALT_LEN,
    TAG_LEN,
    DecryptionFailed,
    MasterKey,
    aead_decrypt,
    aead_encrypt,
    content_hash_of_parts,
)
from pgkloset_core.kloset.index import BLOB_TYPES, BlobEntry, PackRecord
from pgkloset_core.kloset.sealed import CODEC_RAW, CODEC_ZSTD, decompress

PACK_MAGIC = b"PGKP"
PACK_VERSION = 1
HEADER_LEN = 8 + SALT_LEN
FOOTER = struct.Struct("<I4s")
END_MAGIC = b"PGKE"
TRAILER_MAGIC = b"PGKT"
TRAILER_AAD = b"pgkloset/pack-trailer"
_TRAILER_RECORD = struct.Struct("<32sBIII")
BLOB_OVERHEAD = NONCE_LEN + TAG_LEN + 1


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


def blob_aad(blob_type: int, blob_id: bytes) -> bytes:
    return b"pgkloset/blob" + bytes([blob_type]) + blob_id


def seal_blob(key: bytes, nonce: bytes, blob_type: int, blob_id: bytes, data: bytes | memoryview,
              compressor: zstandard.ZstdCompressor | None) -> bytes:
    """Compress (only when it shrinks) and encrypt one blob."""
    frame = compressor.compress(data) if compressor is not None else None
    return seal_frame(key, nonce, blob_type, blob_id, data, frame)


def seal_frame(key: bytes, nonce: bytes, blob_type: int, blob_id: bytes, data: bytes | memoryview,
               frame: bytes | memoryview | None) -> bytes:
    """Encrypt one blob given its zstd frame (made in a batch), kept only when it shrinks."""
    if frame is not None and len(frame) < len(data):
        payload = bytes([CODEC_ZSTD]) + frame
    else:
        payload = bytes([CODEC_RAW]) + bytes(data)
    return nonce + aead_encrypt(key, nonce, payload, blob_aad(blob_type, blob_id))


def open_blob(master: MasterKey, salt: bytes, blob_type: int, blob_id: bytes,
              stored: bytes | memoryview, where: str) -> bytes:
    """Decrypt, decompress and re-hash one blob; never return wrong bytes."""
    if len(stored) < NONCE_LEN + TAG_LEN + 1:
        raise CorruptObject(where, f"blob {blob_id.hex()[:16]} truncated")
    stored = memoryview(stored)  # slices below without a copy
    try:
        payload = aead_decrypt(master.pack_key(salt), stored[:NONCE_LEN], stored[NONCE_LEN:],
                               blob_aad(blob_type, blob_id))
    except DecryptionFailed:
        raise CorruptObject(where, f"blob {blob_id.hex()[:16]} failed authentication") from None
    data = decompress(payload, where)
    if master.chunk_id(data) != blob_id:
        raise CorruptObject(where, f"blob {blob_id.hex()[:16]} does not match its id")
    return data


class PackBuilder:
    """Collects sealed blobs of one session; uploaded as one object.

    Blobs are kept as a list of parts (no growing buffer to copy); the upload
    thread hashes them and hands them to ``Backend.write_parts``, which joins
    them only where the backend needs one buffer.
    """

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self.parts: list[bytes] = [PACK_MAGIC + bytes([PACK_VERSION, 0, 0, 0]) + salt]
        self.size = HEADER_LEN
        self.entries: list[BlobEntry] = []

    def __len__(self) -> int:
        return self.size

    @property
    def empty(self) -> bool:
        return not self.entries

    def add(self, blob_id: bytes, blob_type: int, sealed: bytes, raw_length: int) -> None:
        self.entries.append(BlobEntry(blob_id, blob_type, self.size, len(sealed), raw_length))
        self.parts.append(sealed)
        self.size += len(sealed)

    def finish(self, key: bytes, nonce: bytes) -> FinishedPack:
        """Append the encrypted trailer and footer."""
        plain = bytearray(TRAILER_MAGIC + struct.pack("<I", len(self.entries)))
        for e in self.entries:
            plain += _TRAILER_RECORD.pack(e.blob_id, e.blob_type, e.offset, e.length, e.raw_length)
        trailer = nonce + aead_encrypt(key, nonce, bytes(plain), TRAILER_AAD + self.salt)
        self.parts.append(trailer + FOOTER.pack(len(trailer), END_MAGIC))
        finished = FinishedPack(self.parts, self.salt, tuple(self.entries))
        self.parts = []
        return finished


@dataclass
class FinishedPack:
    parts: list[bytes]
    salt: bytes
    entries: tuple[BlobEntry, ...]

    @property
    def size(self) -> int:
        return sum(map(len, self.parts))

    def record(self) -> PackRecord:
        """The pack's index record (pack id = hash of its bytes, taken part by part)."""
        return PackRecord(content_hash_of_parts(self.parts), self.salt, self.entries)


@dataclass(frozen=True)
class ParsedPack:
    salt: bytes
    entries: tuple[BlobEntry, ...]


def read_trailer(master: MasterKey, data: bytes, name: str) -> ParsedPack:
    """Parse a whole pack's header and trailer (used by check and index rebuild)."""
    if len(data) < HEADER_LEN + FOOTER.size or data[:4] != PACK_MAGIC:
        raise CorruptObject(name, "not a pack (bad magic or too short)")
    if data[4] != PACK_VERSION:
        raise CorruptObject(name, f"unsupported pack version {data[4]}")
    salt = data[8:HEADER_LEN]
    trailer_len, end = FOOTER.unpack_from(data, len(data) - FOOTER.size)
    if end != END_MAGIC or trailer_len > len(data) - HEADER_LEN - FOOTER.size:
        raise CorruptObject(name, "bad pack footer")
    start = len(data) - FOOTER.size - trailer_len
    trailer = data[start : start + trailer_len]
    try:
        plain = aead_decrypt(master.pack_key(salt), trailer[:NONCE_LEN], trailer[NONCE_LEN:],
                             TRAILER_AAD + salt)
    except DecryptionFailed:
        raise CorruptObject(name, "pack trailer failed authentication") from None
    if len(plain) < 8 or plain[:4] != TRAILER_MAGIC:
        raise CorruptObject(name, "bad trailer")
    (count,) = struct.unpack_from("<I", plain, 4)
    if len(plain) != 8 + count * _TRAILER_RECORD.size:
        raise CorruptObject(name, "trailer length mismatch")
    entries = []
    for i in range(count):
        blob_id, btype, offset, length, raw = _TRAILER_RECORD.unpack_from(plain, 8 + i * _TRAILER_RECORD.size)
        if btype not in BLOB_TYPES or offset < HEADER_LEN or offset + length > start:
            raise CorruptObject(name, "trailer entry out of range")
        entries.append(BlobEntry(blob_id, btype, offset, length, raw))
    return ParsedPack(salt, tuple(entries))

