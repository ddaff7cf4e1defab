"""ManifestChecksums: the backup manifest's checksums as a physical restore checks them."""

from __future__ import annotations

import hashlib
import json
import sys

import crc32c
import pytest

from pgkloset_core.postgres.manifest import ChecksumMismatch, ManifestChecksums


def manifest(*files: dict[str, object]) -> bytes:
    return json.dumps({"PostgreSQL-Backup-Manifest-Version": 1, "Files": list(files),
                       "WAL-Ranges": [], "Manifest-Checksum": "0" * 64}).encode()


def crc_hex(data: bytes) -> str:
    return crc32c.crc32c(data).to_bytes(4, sys.byteorder).hex()


DATA = bytes(range(256)) * 300


def test_crc32c_and_sha_files_are_checked_piece_by_piece() -> None:
    parsed = ManifestChecksums.parse(manifest(
        {"Path": "base/1/1259", "Size": len(DATA), "Checksum-Algorithm": "CRC32C",
         "Checksum": crc_hex(DATA)},
        {"Path": "global/1262", "Size": len(DATA), "Checksum-Algorithm": "SHA256",
         "Checksum": hashlib.sha256(DATA).hexdigest()}))
    assert parsed is not None and parsed.complete
    for name in ("base/1/1259", "./global/1262"):
        check = parsed.check_for(name)
        assert check is not None
        for at in range(0, len(DATA), 1000):
            check.update(memoryview(DATA)[at:at + 1000])
        check.verify()


def test_one_changed_byte_is_a_mismatch_naming_the_file() -> None:
    parsed = ManifestChecksums.parse(manifest(
        {"Path": "base/1/1259", "Size": len(DATA), "Checksum-Algorithm": "CRC32C",
         "Checksum": crc_hex(DATA)}))
    assert parsed is not None
    check = parsed.check_for("base/1/1259")
    assert check is not None
    check.update(DATA[:-1] + b"\x00")
    with pytest.raises(ChecksumMismatch, match=r'"base/1/1259" has checksum .* \(CRC32C\)'):
        check.verify()


def test_what_pg_verifybackup_leaves_out_is_left_out() -> None:
    parsed = ManifestChecksums.parse(manifest(
        *({"Path": p, "Size": 1, "Checksum-Algorithm": "CRC32C", "Checksum": "00000000"}
          for p in ("postgresql.auto.conf", "standby.signal", "recovery.signal",
                    "pg_wal/archive_status/x.done", "backup_label")),
        {"Path": "PG_VERSION", "Size": 3, "Checksum-Algorithm": "NONE"}))
    assert parsed is not None and parsed.complete
    assert set(parsed.files) == {"backup_label"}
    assert parsed.check_for("PG_VERSION") is None


def test_encoded_paths_and_unknown_algorithms() -> None:
    name = "base/1/caf\u00e9"
    parsed = ManifestChecksums.parse(manifest(
        {"Encoded-Path": name.encode().hex(), "Size": 3, "Checksum-Algorithm": "CRC32C",
         "Checksum": crc_hex(b"abc")},
        {"Path": "base/1/2", "Size": 3, "Checksum-Algorithm": "MD17", "Checksum": "ff"}))
    assert parsed is not None
    assert not parsed.complete  # pg_verifybackup then checks every checksum itself
    check = parsed.check_for(name)
    assert check is not None
    check.update(b"abc")
    check.verify()
    assert parsed.check_for("base/1/2") is None


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"Files": 3}', b'{"Files": [3]}',
                                 b'{"Files": [{"Path": "a", "Checksum-Algorithm": "CRC32C"}]}'])
def test_an_unreadable_manifest_gives_no_checks(raw: bytes) -> None:
    assert ManifestChecksums.parse(raw) is None
