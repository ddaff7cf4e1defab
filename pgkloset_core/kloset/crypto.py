"""Key hierarchy and authenticated encryption.

One random 32-byte master secret per kloset; every working key is derived
from it with HKDF-SHA256 under a distinct label, so a key used for one purpose
is never used for another. See docs/FORMAT.md for the nonce-safety argument.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
SALT_LEN = 32

LABEL_ENCRYPTION = b"pgkloset/v1/encryption"
LABEL_CHUNK_ID = b"pgkloset/v1/chunk-id"
LABEL_CHUNKER = b"pgkloset/v1/chunker-seed"
LABEL_MAC = b"pgkloset/v1/mac"
LABEL_PACK = b"pgkloset/v1/pack"
LABEL_OBJECT = b"pgkloset/v1/object/"


class DecryptionFailed(Exception):
    """Authentication failed: wrong key, or the bytes were altered."""


def hkdf(ikm: bytes, info: bytes, *, salt: bytes | None = None, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def content_hash(data: bytes | memoryview) -> str:
    """Unkeyed BLAKE3-256 hex: the storage name of content-addressed files.

    Lets anyone (even without keys) detect that a file's bytes no longer match
    its name, so damage is reported by name.
    """
    return blake3.blake3(data, max_threads=1).hexdigest()


def content_hash_of_parts(parts: Iterable[bytes | memoryview]) -> str:
    """``content_hash`` of the parts' concatenation, without joining them."""
    hasher = blake3.blake3(max_threads=1)
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost parameters, stored in each key file."""

    salt: bytes
    iterations: int = 3
    memory_kib: int = 64 * 1024
    lanes: int = 4

    def derive(self, passphrase: bytes) -> bytes:
        return Argon2id(
            salt=self.salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        ).derive(passphrase)


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    return _aesgcm(key).encrypt(nonce, plaintext, aad)


def aead_decrypt(key: bytes, nonce: bytes | memoryview, ciphertext: bytes | memoryview, aad: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:  # only ever from damaged input; AESGCM would raise ValueError
        raise DecryptionFailed("authentication failed (bad nonce length)")
    try:
        return _aesgcm(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionFailed("authentication failed") from None


@lru_cache(maxsize=256)
def _aesgcm(key: bytes) -> AESGCM:
    return AESGCM(key)


class MasterKey:
    """The kloset's master secret and the keys derived from it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != MASTER_LEN:
            raise ValueError("master secret must be 32 bytes")
        self.secret = secret
        self.encryption_root = hkdf(secret, LABEL_ENCRYPTION)
        self.chunk_id_key = hkdf(secret, LABEL_CHUNK_ID)
        self.mac_key = hkdf(secret, LABEL_MAC)
        # pyfastcdc XORs a 64-bit seed into its gear table; a keyed seed keeps
        # chunk boundaries from revealing content to the storage provider.
        seed = int.from_bytes(hkdf(secret, LABEL_CHUNKER, length=8), "big") >> 1  # pyfastcdc shifts it left
        self.chunker_seed = seed or 1

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(MASTER_LEN))

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """Keyed BLAKE3-256 of a chunk's plaintext: its blob id."""
        return blake3.blake3(data, key=self.chunk_id_key, max_threads=1).digest()

    def mac(self, data: bytes) -> str:
        return blake3.blake3(data, key=self.mac_key, max_threads=1).hexdigest()

    def pack_key(self, salt: bytes) -> bytes:
        """Per-writer-session key for pack blobs (salt is random, 32 bytes)."""
        return _derive_cached(self.encryption_root, salt, LABEL_PACK)

    def object_key(self, salt: bytes, kind: bytes) -> bytes:
        """Per-object key for sealed metadata objects (index, snapshot, lock)."""
        return _derive_cached(self.encryption_root, salt, LABEL_OBJECT + kind)


@lru_cache(maxsize=1024)
def _derive_cached(root: bytes, salt: bytes, info: bytes) -> bytes:
    return hkdf(root, info, salt=salt)


class NonceCounter:
    """96-bit counter nonces for one session key: unique by construction."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> bytes:
        with self._lock:
            value = self._next
            self._next += 1
        return value.to_bytes(NONCE_LEN, "big")
