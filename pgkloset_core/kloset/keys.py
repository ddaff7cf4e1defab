"""Key files: the master secret wrapped by a passphrase-derived key.

Several key files may wrap the same master secret, so passphrases can be
added, changed and removed without touching data. A key file's storage name
is the BLAKE3 hash of its bytes, so damage is detectable without any key.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

from pgkloset_core.errors import CorruptObject
from pgkloset_core.kloset.crypto import (
    MASTER_LEN,
    NONCE_LEN,
    DecryptionFailed,
    KdfParams,
    MasterKey,
    aead_decrypt,
    aead_encrypt,
    content_hash,
)

KEY_VERSION = 1
KEYS_PREFIX = "keys/"
MAX_KDF_MEMORY_KIB = 16 * 1024 * 1024  # 16 GiB: beyond it a key file is damaged, not careful


@dataclass(frozen=True)
class KdfCost:
    """Argon2id cost for new key files (lower only in tests)."""

    iterations: int = 3
    memory_kib: int = 64 * 1024
    lanes: int = 4


@dataclass(frozen=True)
class KeyFile:
    name: str  # storage name: keys/<hash>
    kloset_id: str
    kdf: KdfParams
    nonce: bytes
    wrapped: bytes
    created: str
    hostname: str
    username: str

    @property
    def key_id(self) -> str:
        return self.name.removeprefix(KEYS_PREFIX)

    def unwrap(self, passphrase: str) -> MasterKey | None:
        """The master key, or None when this passphrase does not open it."""
        kek = self.kdf.derive(passphrase.encode())
        try:
            secret = aead_decrypt(kek, self.nonce, self.wrapped, _aad(self.kloset_id))
        except DecryptionFailed:
            return None
        if len(secret) != MASTER_LEN:
            raise CorruptObject(self.name, "the wrapped master key has the wrong length")
        return MasterKey(secret)


def _aad(kloset_id: str) -> bytes:
    return b"pgkloset/key/v1/" + kloset_id.encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_key_file(master: MasterKey, passphrase: str, kloset_id: str, cost: KdfCost) -> tuple[str, bytes]:
    """Serialized key file and its storage name."""
    params = KdfParams(os.urandom(16), cost.iterations, cost.memory_kib, cost.lanes)
    kek = params.derive(passphrase.encode())
    nonce = os.urandom(NONCE_LEN)
    doc = {
        "version": KEY_VERSION,
        "kloset_id": kloset_id,
        "kdf": {
            "algorithm": "argon2id",
            "salt": _b64(params.salt),
            "iterations": params.iterations,
            "memory_kib": params.memory_kib,
            "lanes": params.lanes,
        },
        "nonce": _b64(nonce),
        "wrapped": _b64(aead_encrypt(kek, nonce, master.secret, _aad(kloset_id))),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "username": _username(),
    }
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    return KEYS_PREFIX + content_hash(data), data


def parse_key_file(name: str, data: bytes) -> KeyFile:
    """Decode a key file; damage (bytes not matching the name) is reported by name."""
    if content_hash(data) != name.removeprefix(KEYS_PREFIX):
        raise CorruptObject(name, "key file damaged: content does not match its name")
    try:
        doc = json.loads(data)
        if doc.get("version") != KEY_VERSION:
            raise CorruptObject(name, f"unsupported key file version {doc.get('version')!r}")
        kdf = doc["kdf"]
        if kdf["algorithm"] != "argon2id":
            raise CorruptObject(name, f"unsupported KDF {kdf['algorithm']!r}")
        params = KdfParams(
            base64.b64decode(kdf["salt"], validate=True),
            int(kdf["iterations"]),
            int(kdf["memory_kib"]),
            int(kdf["lanes"]),
        )
        # Argon2id's own limits (RFC 9106), so that unwrap() cannot fail on them.
        if (len(params.salt) < 8 or not 1 <= params.iterations < 2**32 or not 1 <= params.lanes < 2**24
                or not 8 * params.lanes <= params.memory_kib <= MAX_KDF_MEMORY_KIB):
            raise CorruptObject(name, "key file has invalid KDF parameters")
        key = KeyFile(
            name=name,
            kloset_id=str(doc["kloset_id"]),
            kdf=params,
            nonce=base64.b64decode(doc["nonce"], validate=True),
            wrapped=base64.b64decode(doc["wrapped"], validate=True),
            created=str(doc.get("created", "")),
            hostname=str(doc.get("hostname", "")),
            username=str(doc.get("username", "")),
        )
        if len(key.nonce) != NONCE_LEN:
            raise CorruptObject(name, "key file has an invalid nonce")
        return key
    except CorruptObject:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise CorruptObject(name, f"key file unreadable: {type(exc).__name__}") from None


def _username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
