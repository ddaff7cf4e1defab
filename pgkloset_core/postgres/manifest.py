"""The checksums of ``backup_manifest``, checked while a physical restore writes the files.

``pg_verifybackup`` checks a restored data directory against the manifest
pg_basebackup wrote: every file present, of its size, with its checksum,
and the WAL the backup needs. Its checksum pass reads every byte back from
the disk. The restore has each byte in hand as it writes it, so it computes
the checksums then (CRC32C at ~20 GB/s, the manifest's default) and runs
``pg_verifybackup --skip-checksums`` afterwards for the rest: the same
checks, without reading a restored cluster back a second time.

Checked as pg_verifybackup checks them: the files it leaves out
(``postgresql.auto.conf`` and the signal files, which a base backup may
rewrite, and everything under ``pg_wal``) are left out here too; a
CRC32C is compared in this machine's byte order, as pg_verifybackup
running here would compare it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys
from dataclasses import dataclass
from typing import Any

import crc32c

# pg_verifybackup's ignore list (pg_verifybackup.c, should_ignore_relpath); pg_wal is a prefix.
IGNORED = frozenset({"backup_manifest", "postgresql.auto.conf", "recovery.signal",
                     "standby.signal"})
HASHLIB_ALGORITHMS = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384",
                      "SHA512": "sha512"}


class ChecksumMismatch(Exception):
    """A restored file's bytes do not match its checksum in the manifest."""


class FileCheck:
    """One file's running checksum, fed the bytes in order as they are written."""

    def __init__(self, path: str, algorithm: str, expected: str) -> None:
        self.path = path
        self.algorithm = algorithm
        self.expected = expected.lower()
        self._crc = 0
        self._hash = (hashlib.new(HASHLIB_ALGORITHMS[algorithm])
                      if algorithm in HASHLIB_ALGORITHMS else None)

    def update(self, data: bytes | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        else:
            self._crc = crc32c.crc32c(data, self._crc)

    def hexdigest(self) -> str:
        if self._hash is not None:
            return self._hash.hexdigest()
        return self._crc.to_bytes(4, sys.byteorder).hex()

    def verify(self) -> None:
        got = self.hexdigest()
        if got != self.expected:
            raise ChecksumMismatch(f'"{self.path}" has checksum {got} where backup_manifest '
                                   f"says {self.expected} ({self.algorithm})")


@dataclass(frozen=True)
class ManifestChecksums:
    """Per file path (as in the snapshot), its algorithm and checksum."""

    files: dict[str, tuple[str, str]]
    complete: bool  # every listed checksum is one computed here: pg_verifybackup may skip them

    @classmethod
    def parse(cls, data: bytes) -> ManifestChecksums | None:
        """The manifest's file checksums; None when it cannot be read (pg_verifybackup
        then checks everything itself, and says what is wrong with it)."""
        try:
            doc = json.loads(data)
            listed = doc["Files"]
            if not isinstance(listed, list):
                return None
            files: dict[str, tuple[str, str]] = {}
            complete = True
            for item in listed:
                path = _path(item)
                algorithm = str(item.get("Checksum-Algorithm", "NONE")).upper()
                if path is None or not wanted(path):
                    continue
                if algorithm == "NONE":
                    continue
                if algorithm != "CRC32C" and algorithm not in HASHLIB_ALGORITHMS:
                    complete = False
                    continue
                files[path] = (algorithm, str(item["Checksum"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(files=files, complete=complete)

    def check_for(self, name: str) -> FileCheck | None:
        """The running check for the entry ``name``, or None if the manifest has none."""
        path = posixpath.normpath(name)
        found = self.files.get(path)
        return FileCheck(path, *found) if found else None


def wanted(path: str) -> bool:
    """Whether pg_verifybackup checks this path's checksum."""
    return path not in IGNORED and path != "pg_wal" and not path.startswith("pg_wal/")


def _path(item: Any) -> str | None:
    """A manifest entry's path: ``Path``, or ``Encoded-Path`` (hex, for names not in UTF-8)."""
    if "Path" in item:
        return posixpath.normpath(str(item["Path"]))
    if "Encoded-Path" in item:
        raw = bytes.fromhex(str(item["Encoded-Path"]))
        return posixpath.normpath(raw.decode("utf-8", "surrogateescape"))
    return None
