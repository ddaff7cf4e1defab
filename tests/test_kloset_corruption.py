"""Corruption: damage is reported by object name and never restored as wrong bytes."""

from __future__ import annotations

import json
import random

import pytest

from pgkloset_core.errors import CorruptObject, KlosetError
from pgkloset_core.kloset.pack import FOOTER, pack_name
from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.kloset.repository import Kloset
from tests.fixtures.kloset import (
    CHEAP_KDF,
    PASSPHRASE,
    MiB,
    assert_one_line_error,
    flip_byte,
    object_names,
    seeded_bytes,
)

BIG = 6 * MiB


@pytest.fixture
def damaged_kloset(new_lib_kloset):
    """A kloset with 1 MiB packs: a big snapshot (many packs) and a small one."""
    kloset = new_lib_kloset(pack_size=1 * MiB)
    data = seeded_bytes(21, BIG)
    writer = kloset.writer(kind="test")
    writer.add_bytes("big", data)
    big = writer.commit()
    writer = kloset.writer(kind="test")
    writer.add_bytes("small", b"a small stream")
    small = writer.commit()
    return kloset, big, small, data


def chunk_layout(kloset: Kloset, snap):
    """[(offset in the entry, length, blob location)] of every chunk of the snapshot's first entry."""
    entry = snap.entries[0]
    index = kloset.load_index(refresh=True)
    out, pos = [], 0
    for blob_id, length in iter_refs_of(kloset, snap, entry):
        out.append((pos, length, index.lookup(blob_id)))
        pos += length
    return out


def run_check(run_cli):
    return run_cli("check", "--read-data", check=False)


def assert_check_names(run_cli, name: str) -> None:
    proc = run_check(run_cli)
    err = proc.stderr.decode()
    assert proc.returncode == 3, (proc.returncode, err)
    assert "Traceback" not in err
    assert any(line.startswith("problem: ") and name in line for line in err.splitlines()), err
    report = json.loads(run_cli("check", "--read-data", "--json", check=False).stdout)
    assert report["ok"] is False
    assert any(name in p for p in report["problems"]), report


def test_intact_kloset_checks_clean(damaged_kloset, run_cli) -> None:
    proc = run_cli("check", "--read-data")
    assert b"no problems found" in proc.stdout and proc.stderr == b""


def test_damaged_pack(damaged_kloset, run_cli, kloset_backend) -> None:
    kloset, big, _small, data = damaged_kloset
    _pos, _length, loc = chunk_layout(kloset, big)[3]
    name = pack_name(loc.pack_id)
    flip_byte(kloset_backend, name, loc.offset + loc.length // 2)
    assert_check_names(run_cli, name)
    proc = run_cli("check", "--read-data-subset", "100", check=False)
    assert proc.returncode == 3 and name in proc.stderr.decode()
    # Without --read-data the structure is still fine: packs are not downloaded.
    assert run_cli("check").returncode == 0


def test_damaged_index_delta(damaged_kloset, run_cli, kloset_backend) -> None:
    name = object_names(kloset_backend, "index/")[0]
    flip_byte(kloset_backend, name)
    assert_check_names(run_cli, name)
    assert run_cli("check", check=False).returncode == 3  # found without reading data too
    # Restoring needs the index: it fails with one line naming the delta.
    assert_one_line_error(run_cli("cat", "latest", check=False), name)


def test_damaged_snapshot(damaged_kloset, run_cli, kloset_backend) -> None:
    _kloset, big, small, data = damaged_kloset
    name = f"snapshots/{small.id}"
    flip_byte(kloset_backend, name)
    assert_check_names(run_cli, name)
    assert_one_line_error(run_cli("cat", small.id, check=False), name)
    assert run_cli("cat", big.id).stdout == data  # the other snapshot is untouched


def test_damaged_unused_key_file(damaged_kloset, run_cli, kloset_backend) -> None:
    kloset = damaged_kloset[0]
    other = kloset.add_key("a second passphrase", CHEAP_KDF)
    flip_byte(kloset_backend, other)
    assert_check_names(run_cli, other)
    listing = run_cli("key", "list")
    assert other.removeprefix("keys/") in listing.stderr.decode()
    # The damaged key no longer opens the kloset; the intact one does.
    proc = run_cli("snapshots", check=False, env_extra={"PGKLOSET_PASSPHRASE": "a second passphrase"})
    assert_one_line_error(proc, other)


def test_damaged_only_key_file(damaged_kloset, run_cli, kloset_backend) -> None:
    (name,) = object_names(kloset_backend, "keys/")
    flip_byte(kloset_backend, name)
    for args in (("snapshots",), ("check", "--read-data"), ("cat", "latest")):
        assert_one_line_error(run_cli(*args, check=False), name)
    with pytest.raises(KlosetError, match=name):
        Kloset.open(kloset_backend, PASSPHRASE)


def test_damaged_config_fails_authentication(damaged_kloset, run_cli, kloset_backend) -> None:
    doc = json.loads(kloset_backend.read("config"))
    doc["pack_size"] += 1
    kloset_backend.write("config", json.dumps(doc).encode(), overwrite=True)
    assert_one_line_error(run_cli("snapshots", check=False), "config", "authentication")


def test_damaged_pack_trailer_only(damaged_kloset, run_cli, kloset_backend) -> None:
    """Reading does not need the trailer, check does: restore works, check names the pack."""
    kloset, big, _small, data = damaged_kloset
    loc = chunk_layout(kloset, big)[0][2]
    name = pack_name(loc.pack_id)
    size = kloset_backend.stat(name).size
    flip_byte(kloset_backend, name, size - FOOTER.size - 20)
    assert_check_names(run_cli, name)
    assert run_cli("cat", big.id).stdout == data


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_missing_or_short_pack_found_without_reading_data(damaged_kloset, run_cli, kloset_backend,
                                                          damage) -> None:
    kloset, big, _small, _data = damaged_kloset
    loc = chunk_layout(kloset, big)[-1][2]
    name = pack_name(loc.pack_id)
    if damage == "deleted":
        kloset_backend.delete(name)
    else:
        kloset_backend.write(name, kloset_backend.read(name)[: loc.offset], overwrite=True)
    proc = run_cli("check", check=False)
    assert proc.returncode == 3 and name in proc.stderr.decode()
    assert_check_names(run_cli, name)
    assert_one_line_error(run_cli("cat", big.id, check=False), name)


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_cat_of_damaged_pack_writes_only_a_correct_prefix(damaged_kloset, run_cli, kloset_backend,
                                                          which) -> None:
    kloset, big, _small, data = damaged_kloset
    layout = chunk_layout(kloset, big)
    pos, length, loc = layout[{"first": 0, "middle": len(layout) // 2, "last": -1}[which]]
    name = pack_name(loc.pack_id)
    flip_byte(kloset_backend, name, loc.offset + random.Random(pos).randrange(loc.length))

    proc = run_cli("cat", big.id, check=False)
    assert_one_line_error(proc, name)
    out = proc.stdout
    assert out == data[: len(out)], "cat wrote bytes that are not the original's"
    # Everything before the damaged chunk came out, nothing from it or after.
    assert len(out) == pos


def test_random_damage_never_yields_wrong_bytes(damaged_kloset, kloset_backend) -> None:
    """Library level: one flipped byte anywhere in any pack, then a full read."""
    kloset, big, _small, data = damaged_kloset
    rng = random.Random(5)
    packs = object_names(kloset_backend, "data/")
    failures = 0
    for _ in range(40):
        name = rng.choice(packs)
        original = kloset_backend.read(name)
        offset = rng.randrange(len(original))
        flip_byte(kloset_backend, name, offset, mask=1 << rng.randrange(8))
        reader = Kloset.open(kloset_backend, PASSPHRASE)
        got = bytearray()
        try:
            for block in reader.read_entry(big, big.entries[0]):
                got += block
        except CorruptObject as exc:
            failures += 1
            assert name in str(exc)
        assert bytes(got) == data[: len(got)]
        if len(got) == len(data):  # the flip hit bytes a read never uses (header, trailer)
            assert bytes(got) == data
        kloset_backend.write(name, original, overwrite=True)
    assert failures > 20  # most bytes of a pack are blob bytes
