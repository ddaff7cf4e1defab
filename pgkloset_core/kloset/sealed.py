"""Sealed objects: the encrypted envelope of every metadata file.

Index deltas, snapshot manifests and locks are stored as::

    "PGKO" | version u8 | kind-length u8 | kind | salt (32) | nonce (12) | AES-256-GCM(ciphertext + tag)

The header is the associated data, so an object cannot be passed off as
another kind. The key is derived per object from a random salt.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

import zstandard

from pgkloset_core.errors import CorruptObject
from pgkloset_core.kloset.crypto import (
    NONCE_LEN,
    SALT_LEN,
    DecryptionFailed,
    MasterKey,
    aead_decrypt,
    aead_encrypt,
)

MAGIC = b"PGKO"
VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1

KIND_INDEX = b"index"
KIND_SNAPSHOT = b"snapshot"
KIND_LOCK = b"lock"


def compress(data: bytes, level: int = 3) -> bytes:
    """A codec byte then the payload; zstd only when it shrinks the data."""
    packed = zstandard.ZstdCompressor(level=level).compress(data)
    if len(packed) < len(data):
        return bytes([CODEC_ZSTD]) + packed
    return bytes([CODEC_RAW]) + data


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """One per thread: a restore decompresses every chunk, and a new one costs a context."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def decompress(data: bytes, name: str, max_size: int = 1 << 31) -> bytes:
    if not data:
        raise CorruptObject(name, "empty payload")
    codec = data[0]
    if codec == CODEC_RAW:
        return data[1:]
    if codec == CODEC_ZSTD:
        try:
            return _decompressor().decompress(memoryview(data)[1:], max_output_size=max_size)
        except zstandard.ZstdError as exc:
            raise CorruptObject(name, f"cannot decompress: {exc}") from None
    raise CorruptObject(name, f"unknown codec {codec}")


def seal(master: MasterKey, kind: bytes, payload: bytes) -> bytes:
    salt = os.urandom(SALT_LEN)
    nonce = os.urandom(NONCE_LEN)
    header = MAGIC + struct.pack("BB", VERSION, len(kind)) + kind + salt + nonce
    key = master.object_key(salt, kind)
    return header + aead_encrypt(key, nonce, compress(payload), header)


def unseal(master: MasterKey, kind: bytes, data: bytes, name: str) -> bytes:
    """Decrypt and authenticate; any problem is a CorruptObject naming ``name``."""
    if len(data) < 6 or data[:4] != MAGIC:
        raise CorruptObject(name, "not a pgkloset object (bad magic)")
    version, kind_len = data[4], data[5]
    if version != VERSION:
        raise CorruptObject(name, f"unsupported object version {version}")
    pos = 6 + kind_len
    if data[6:pos] != kind:
        raise CorruptObject(name, f"expected a {kind.decode()} object")
    salt = data[pos : pos + SALT_LEN]
    nonce = data[pos + SALT_LEN : pos + SALT_LEN + NONCE_LEN]
    body_start = pos + SALT_LEN + NONCE_LEN
    if len(data) < body_start + 16:
        raise CorruptObject(name, "truncated")
    try:
        plain = aead_decrypt(master.object_key(salt, kind), nonce, data[body_start:], data[:body_start])
    except DecryptionFailed:
        raise CorruptObject(name, "authentication failed (damaged or tampered)") from None
    return decompress(plain, name)


def seal_json(master: MasterKey, kind: bytes, value: Any) -> bytes:
    return seal(master, kind, json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def unseal_json(master: MasterKey, kind: bytes, data: bytes, name: str) -> Any:
    raw = unseal(master, kind, data, name)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptObject(name, f"invalid JSON: {exc}") from None
