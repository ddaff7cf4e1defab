"""Every decoder of stored bytes, fed garbage: only pgkloset's own errors come out.

A decoder may accept its input or raise a KlosetError (which the CLI turns
into one clear line); struct.error, ValueError, KeyError, IndexError,
OverflowError, RecursionError and friends are bugs. Inputs are random bytes,
random JSON-ish documents, valid objects with one field replaced, bit flips
and truncations of valid objects, and "authentic garbage": junk sealed with
the right key, which only a key holder (or a bug) could write but which
proves the code behind the authentication is robust too.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pgkloset_core.errors import CorruptObject, KlosetError
from pgkloset_core.kloset import locks
from pgkloset_core.kloset.crypto import NONCE_LEN, SALT_LEN, MasterKey, aead_encrypt, content_hash
from pgkloset_core.kloset.index import (
    BLOB_DATA,
    BLOB_LIST,
    BLOB_TYPES,
    INDEX_MAGIC,
    BlobEntry,
    BlobIndex,
    BlobLocation,
    PackRecord,
    decode_delta,
    decode_delta_run,
    encode_delta,
)
from pgkloset_core.kloset.keys import KEYS_PREFIX, make_key_file, parse_key_file
from pgkloset_core.kloset.pack import (
    END_MAGIC,
    FOOTER,
    PACK_MAGIC,
    TRAILER_AAD,
    PackBuilder,
    open_blob,
    read_trailer,
    seal_blob,
)
from pgkloset_core.kloset.repository import Kloset, KlosetConfig
from pgkloset_core.kloset.sealed import (
    KIND_INDEX,
    KIND_LOCK,
    KIND_SNAPSHOT,
    MAGIC,
    VERSION,
    seal,
    seal_json,
    unseal,
    unseal_json,
)
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.storage import open_backend
from tests.fixtures.kloset import CHEAP_KDF, PASSPHRASE

MASTER = MasterKey(bytes(range(32)))
KINDS = [KIND_INDEX, KIND_SNAPSHOT, KIND_LOCK]
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def expect_own_errors(fn, *args: Any) -> Any:
    """Call ``fn``: a result or a KlosetError is fine; anything else fails the test."""
    try:
        return fn(*args)
    except KlosetError:
        return None


# ------------------------------------------------------------------ strategies

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
                | st.floats() | st.text(max_size=20))
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)


def to_json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()  # may contain Infinity/NaN, which json.loads accepts


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """A valid object with a bit flipped, a truncation, or a byte inserted."""
    data = bytearray(valid)
    how = draw(st.sampled_from(["flip", "truncate", "insert", "flips"]))
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, max(0, len(data) - 1)))])
    if how == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=8)) + bytes(data[at:])
    for _ in range(draw(st.integers(1, 1 if how == "flip" else 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def replaced(draw, doc: Any) -> Any:
    """A copy of a JSON document with one value (found along a random path) replaced."""
    doc = json.loads(json.dumps(doc))
    node = doc
    while True:
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            key = draw(st.integers(0, len(node) - 1))
        else:
            return draw(json_values)
        if draw(st.booleans()) or not isinstance(node[key], dict | list) or not node[key]:
            if isinstance(node, dict) and draw(st.integers(0, 5)) == 0:
                del node[key]
            else:
                node[key] = draw(json_values)
            return doc
        node = node[key]


# ------------------------------------------------------------------ config


CONFIG = KlosetConfig(id="0123456789abcdef0123456789abcdef", created="2026-01-01T00:00:00+00:00")
CONFIG_BYTES = CONFIG.serialize(MASTER)


@FUZZ
@given(st.binary(max_size=300) | json_values.map(to_json_bytes)
       | replaced(json.loads(CONFIG_BYTES)).map(to_json_bytes) | mutated(CONFIG_BYTES))
@example(b"[" * 100_000)
@example(CONFIG_BYTES.replace(b'"pack_size": 33554432', b'"pack_size": 1e999'))
def test_config_parse(data: bytes) -> None:
    expect_own_errors(KlosetConfig.parse, data)


@pytest.fixture(scope="module")
def stored_kloset(tmp_path_factory):
    backend = open_backend(str(tmp_path_factory.mktemp("decoders") / "kloset"))
    Kloset.init(backend, PASSPHRASE, kdf=CHEAP_KDF)
    return backend


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_config_never_opens(stored_kloset, data) -> None:
    """Bit flips, inserts and truncations of a real config: open fails with our error,
    or (whitespace only) opens the very same config."""
    original = stored_kloset.read("config")
    damaged = data.draw(mutated(original))
    stored_kloset.write("config", damaged, overwrite=True)
    try:
        kloset = expect_own_errors(Kloset.open, stored_kloset, PASSPHRASE)
        if kloset is not None:
            assert json.loads(damaged) == json.loads(original)
    finally:
        stored_kloset.write("config", original, overwrite=True)


# ------------------------------------------------------------------ key files


KEY_NAME, KEY_BYTES = make_key_file(MASTER, PASSPHRASE, CONFIG.id, CHEAP_KDF)


def cheap_to_unwrap(key) -> bool:
    return key.kdf.memory_kib <= 8 * 1024 and key.kdf.iterations <= 2


@FUZZ
@given(st.binary(max_size=300) | json_values.map(to_json_bytes)
       | replaced(json.loads(KEY_BYTES)).map(to_json_bytes) | mutated(KEY_BYTES),
       st.booleans())
@example(b"[" * 100_000, True)
@example(KEY_BYTES.replace(b'"iterations": 1', b'"iterations": 1e999'), True)
@example(KEY_BYTES.replace(b'"lanes": 1', b'"lanes": 0'), True)
def test_key_file_parse(data: bytes, right_name: bool) -> None:
    # With the right name the decoder gets past the content-hash check to the JSON.
    name = KEYS_PREFIX + (content_hash(data) if right_name else "0" * 64)
    key = expect_own_errors(parse_key_file, name, data)
    if key is not None and cheap_to_unwrap(key):
        expect_own_errors(key.unwrap, PASSPHRASE)


@pytest.mark.parametrize("field,value", [("nonce", b"short"), ("salt", b"short"),
                                         ("wrapped", b"")])
def test_key_file_with_bad_lengths(field: str, value: bytes) -> None:
    doc = json.loads(KEY_BYTES)
    if field == "salt":
        doc["kdf"]["salt"] = base64.b64encode(value).decode()
    else:
        doc[field] = base64.b64encode(value).decode()
    data = json.dumps(doc).encode()
    key = expect_own_errors(parse_key_file, KEYS_PREFIX + content_hash(data), data)
    if key is not None:
        assert expect_own_errors(key.unwrap, PASSPHRASE) is None


def test_key_file_wrapping_a_short_master_key() -> None:
    """Authentic (the passphrase opens it) but the wrapped secret is not 32 bytes."""
    doc = json.loads(KEY_BYTES)
    key = parse_key_file(KEY_NAME, KEY_BYTES)
    kek = key.kdf.derive(PASSPHRASE.encode())
    nonce = os.urandom(NONCE_LEN)
    doc["nonce"] = base64.b64encode(nonce).decode()
    doc["wrapped"] = base64.b64encode(
        aead_encrypt(kek, nonce, b"short secret", b"pgkloset/key/v1/" + CONFIG.id.encode())).decode()
    data = json.dumps(doc).encode()
    crafted = parse_key_file(KEYS_PREFIX + content_hash(data), data)
    with pytest.raises(KlosetError):
        crafted.unwrap(PASSPHRASE)


# ------------------------------------------------------------------ sealed objects


def seal_raw(master: MasterKey, kind: bytes, plaintext: bytes) -> bytes:
    """Authentic envelope around arbitrary plaintext (codec byte and payload chosen freely)."""
    salt, nonce = os.urandom(SALT_LEN), os.urandom(NONCE_LEN)
    header = MAGIC + struct.pack("BB", VERSION, len(kind)) + kind + salt + nonce
    return header + aead_encrypt(master.object_key(salt, kind), nonce, plaintext, header)


SEALED = {kind: seal_json(MASTER, kind, {"some": "document", "n": [1, 2, 3]}) for kind in KINDS}


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_unseal(kind: bytes, data) -> None:
    blob = data.draw(
        st.binary(max_size=200)
        | st.binary(max_size=200).map(lambda b: MAGIC + bytes([VERSION]) + b)
        | st.sampled_from(KINDS).flatmap(lambda k: mutated(SEALED[k]))
        | st.binary(max_size=200).map(lambda b: seal_raw(MASTER, kind, b))
        | st.binary(max_size=200).map(lambda b: seal(MASTER, kind, b))
        | json_values.map(lambda v: seal(MASTER, kind, to_json_bytes(v)))
    )
    expect_own_errors(unseal, MASTER, kind, blob, "obj")
    expect_own_errors(unseal_json, MASTER, kind, blob, "obj")


@pytest.mark.parametrize("kind", KINDS)
def test_unseal_deeply_nested_and_wrong_kind(kind: bytes) -> None:
    expect_own_errors(unseal_json, MASTER, kind, seal(MASTER, kind, b"[" * 100_000), "obj")
    other = next(k for k in KINDS if k != kind)
    with pytest.raises(CorruptObject):
        unseal(MASTER, kind, SEALED[other], "obj")
    with pytest.raises(CorruptObject):
        unseal(MasterKey(bytes(32)), kind, SEALED[kind], "obj")


# ------------------------------------------------------------------ index deltas

blob_entries = st.builds(BlobEntry, st.binary(min_size=32, max_size=32), st.sampled_from(BLOB_TYPES),
                         st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
pack_records = st.builds(PackRecord, st.binary(min_size=32, max_size=32).map(bytes.hex),
                         st.binary(min_size=32, max_size=32),
                         st.lists(blob_entries, max_size=4).map(tuple))
VALID_DELTA = encode_delta([PackRecord("ab" * 32, bytes(32), (BlobEntry(bytes(32), 0, 40, 100, 90),)),
                            PackRecord("cd" * 32, bytes(range(32)), ())], ["ef" * 32])


@FUZZ
@given(packs=st.lists(pack_records, max_size=4),
       superseded=st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=3))
def test_delta_round_trip(packs, superseded) -> None:
    assert decode_delta(encode_delta(packs, superseded), "d") == (packs, superseded)


@FUZZ
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: INDEX_MAGIC + b)
       | mutated(VALID_DELTA))
@example(INDEX_MAGIC + struct.pack("<BII", 1, 2**32 - 1, 2**32 - 1))
def test_decode_delta(data: bytes) -> None:
    result = expect_own_errors(decode_delta, data, "index/x")
    run = expect_own_errors(decode_delta_run, data, "index/x")
    assert (result is None) == (run is None)  # the compact parser accepts exactly the same
    if result is not None:
        packs, superseded = result
        for pack in packs:
            assert len(pack.pack_id) == 64 and all(b.blob_type in BLOB_TYPES for b in pack.blobs)
        assert run.superseded == tuple(superseded)
        assert run.packs == tuple((p.pack_id, p.salt) for p in packs)


def _index_rows(index: BlobIndex) -> list[tuple[bytes, BlobLocation]]:
    return sorted(index.items(), key=lambda item: item[0])


@FUZZ
@given(deltas=st.lists(st.lists(pack_records, max_size=4), max_size=5),
       twins=st.integers(0, 3))
def test_index_from_runs_equals_the_index_from_records(deltas, twins) -> None:
    """Merging sorted runs gives the index that building from PackRecords gives:
    same blobs, locations, packs; a blob stored twice (two writers) appears once."""
    if deltas and deltas[0] and deltas[0][0].blobs:  # the same blob again, in other packs
        twin = deltas[0][0].blobs[0]
        for i in range(twins):
            deltas.append([PackRecord(f"{i:02x}" * 32, bytes(32), (twin,))])
    pack_ids = [p.pack_id for packs in deltas for p in packs]
    assume(len(set(pack_ids)) == len(pack_ids))  # pack ids are content hashes
    runs = [decode_delta_run(encode_delta(packs), "d") for packs in deltas]
    merged = BlobIndex.from_runs(runs)
    built = BlobIndex.build(p for packs in deltas for p in packs)
    assert [blob_id for blob_id, _ in _index_rows(merged)] == [b for b, _ in _index_rows(built)]
    ids = sorted({b.blob_id for packs in deltas for p in packs for b in p.blobs})
    assert len(merged) == len(ids)
    for blob_id in ids:  # each location is one of the blob's real ones
        loc = merged.lookup(blob_id)
        assert loc is not None and any(
            (p.pack_id, p.salt, b.blob_type, b.offset, b.length, b.raw_length)
            == (loc.pack_id, loc.salt, loc.blob_type, loc.offset, loc.length, loc.raw_length)
            for packs in deltas for p in packs for b in p.blobs if b.blob_id == blob_id)


# ------------------------------------------------------------------ packs and blobs

SALT = bytes(range(100, 132))


def build_pack(blobs: list[bytes]) -> bytes:
    key = MASTER.pack_key(SALT)
    builder = PackBuilder(SALT)
    for i, data in enumerate(blobs):
        blob_id = MASTER.chunk_id(data)
        builder.add(blob_id, BLOB_DATA, seal_blob(key, i.to_bytes(NONCE_LEN, "big"), BLOB_DATA,
                                                   blob_id, data, None), len(data))
    return b"".join(builder.finish(key, (len(blobs) + 1).to_bytes(NONCE_LEN, "big")).parts)


VALID_PACK = build_pack([b"first blob", b"second" * 20, b""])


def pack_with_trailer(body: bytes, plain_trailer: bytes) -> bytes:
    """A pack whose trailer is authentic but holds arbitrary records."""
    nonce = os.urandom(NONCE_LEN)
    header = PACK_MAGIC + bytes([1, 0, 0, 0]) + SALT
    trailer = nonce + aead_encrypt(MASTER.pack_key(SALT), nonce, plain_trailer, TRAILER_AAD + SALT)
    return header + body + trailer + FOOTER.pack(len(trailer), END_MAGIC)


@FUZZ
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: PACK_MAGIC + b"\x01\0\0\0" + b)
       | mutated(VALID_PACK)
       | st.tuples(st.binary(max_size=64), st.binary(max_size=120)).map(lambda t: pack_with_trailer(*t))
       | st.tuples(st.binary(max_size=64), st.binary(max_size=120)).map(
           lambda t: pack_with_trailer(t[0], b"PGKT" + t[1])))
@example(VALID_PACK[:-FOOTER.size] + FOOTER.pack(0, END_MAGIC))
@example(VALID_PACK[:-FOOTER.size] + FOOTER.pack(5, END_MAGIC))
@example(pack_with_trailer(b"", b"PGKT"))
def test_read_trailer(data: bytes) -> None:
    parsed = expect_own_errors(read_trailer, MASTER, data, "data/xx/pack")
    if parsed is not None:
        for entry in parsed.entries:
            assert entry.offset + entry.length <= len(data)


def test_read_trailer_of_valid_pack() -> None:
    parsed = read_trailer(MASTER, VALID_PACK, "p")
    assert [e.raw_length for e in parsed.entries] == [10, 120, 0]
    for entry, data in zip(parsed.entries, [b"first blob", b"second" * 20, b""], strict=True):
        stored = VALID_PACK[entry.offset : entry.offset + entry.length]
        assert open_blob(MASTER, SALT, entry.blob_type, entry.blob_id, stored, "p") == data


GOOD_ID = MASTER.chunk_id(b"payload")
GOOD_BLOB = seal_blob(MASTER.pack_key(SALT), bytes(NONCE_LEN), BLOB_DATA, GOOD_ID, b"payload", None)


def authentic_blob(blob_type: int, blob_id: bytes, payload: bytes) -> bytes:
    """A blob sealed with the right key and id around any payload (codec byte included)."""
    from pgkloset_core.kloset.pack import blob_aad

    nonce = os.urandom(NONCE_LEN)
    return nonce + aead_encrypt(MASTER.pack_key(SALT), nonce, payload, blob_aad(blob_type, blob_id))


@FUZZ
@given(blob_type=st.sampled_from([BLOB_DATA, BLOB_LIST]), data=st.data())
def test_open_blob(blob_type: int, data) -> None:
    stored = data.draw(st.binary(max_size=100) | mutated(GOOD_BLOB)
                       | st.binary(max_size=100).map(lambda p: authentic_blob(blob_type, GOOD_ID, p))
                       | st.binary(max_size=100).map(lambda p: authentic_blob(blob_type, GOOD_ID,
                                                                              b"\x01" + p)))
    result = expect_own_errors(open_blob, MASTER, SALT, blob_type, GOOD_ID, stored, "data/xx/p")
    if result is not None:
        assert result == b"payload"  # never anything but the bytes that match the id


# ------------------------------------------------------------------ manifests

VALID_ENTRY = Entry(name="db.dump", size=123, inline=bytes(36 * 2), lists=["ab" * 32],
                    mode=0o640, uid=0, gid=0, user="root", group="root", mtime=1.5,
                    meta={"k": "v"}).to_json()
VALID_MANIFEST = {
    "version": 1, "time": "2026-01-01T00:00:00+00:00", "hostname": "h", "username": "u",
    "kind": "stream", "tags": ["a"], "meta": {"m": 1}, "entries": [VALID_ENTRY],
    "summary": {"logical_bytes": 123}, "program": "pgkloset",
}


@FUZZ
@given(json_values | replaced(VALID_MANIFEST) | replaced(VALID_MANIFEST).flatmap(replaced))
@example({**VALID_MANIFEST, "entries": [{**VALID_ENTRY, "size": float("inf")}]})
@example({**VALID_MANIFEST, "time": 5})
def test_snapshot_from_json(doc: Any) -> None:
    snap = expect_own_errors(Snapshot.from_json, "ab" * 32, doc, "snapshots/x")
    if snap is not None:
        snap.summary_json()
        for entry in snap.entries:
            entry.to_json()
            assert isinstance(entry.size, int) and entry.size >= 0


@FUZZ
@given(json_values | replaced(VALID_ENTRY))
@example({**VALID_ENTRY, "size": float("inf")})
@example({**VALID_ENTRY, "type": "socket"})
@example({**VALID_ENTRY, "mode": "rwx"})
def test_entry_from_json(doc: Any) -> None:
    entry = expect_own_errors(Entry.from_json, doc)
    if entry is not None:
        assert entry.to_json()["name"] == entry.name
        assert entry.mode is None or type(entry.mode) is int
        assert entry.mtime is None or isinstance(entry.mtime, int | float)
        assert entry.user is None or isinstance(entry.user, str)


def test_valid_manifest_round_trip() -> None:
    snap = Snapshot.from_json("ab" * 32, VALID_MANIFEST, "snapshots/x")
    assert snap.to_json() == VALID_MANIFEST


# ------------------------------------------------------------------ locks

VALID_LOCK = {"exclusive": False, "hostname": "elsewhere", "pid": 12345, "username": "u",
              "operation": "backup", "created": 1.0, "refreshed": 2.0}


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_locks(tmp_path_factory, data) -> None:
    backend = open_backend(str(tmp_path_factory.mktemp("locks")))
    import socket

    here = {**VALID_LOCK, "hostname": socket.gethostname()}
    for i in range(3):
        doc = data.draw(json_values | replaced(VALID_LOCK) | replaced(here))
        blob = data.draw(st.just(seal_json(MASTER, KIND_LOCK, doc)) | mutated(SEALED[KIND_LOCK])
                         | st.binary(max_size=80))
        backend.write(f"locks/{i:064x}", blob)
    for info in expect_own_errors(locks.read_locks, backend, MASTER) or []:
        info.is_stale(locks.LockTiming())
        info.describe()
    expect_own_errors(locks.remove_stale, backend, MASTER)


@pytest.mark.parametrize("created", [9.2e18, 6.8e16, -6.3e10, float("nan"), 1e999])
def test_lock_with_absurd_creation_time_is_described(tmp_path, created) -> None:
    """A lock's time beyond what datetime holds still reads as a lock, with its raw time."""
    backend = open_backend(str(tmp_path))
    backend.write("locks/" + "0" * 64, seal_json(MASTER, KIND_LOCK, {**VALID_LOCK,
                                                                    "created": created}))
    (info,) = locks.read_locks(backend, MASTER)
    assert "shared lock by backup (pid 12345 on elsewhere, since an unreadable time" in (
        info.describe())


@pytest.mark.parametrize("pid", [2**40, 0, -1, 1e999])
def test_lock_with_absurd_pid_on_this_host(tmp_path, pid) -> None:
    """Such a lock is no live process of ours: stale (or unreadable), never a crash."""
    import socket

    backend = open_backend(str(tmp_path))
    doc = {**VALID_LOCK, "hostname": socket.gethostname(), "pid": pid, "refreshed": 4e9}
    backend.write("locks/" + "0" * 64, seal_json(MASTER, KIND_LOCK, doc))
    for info in locks.read_locks(backend, MASTER):
        assert info.is_stale(locks.LockTiming(), now=4e9)
    locks.remove_stale(backend, MASTER)
