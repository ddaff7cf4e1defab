"""Deduplication through the CLI: a slightly edited stream costs little."""

from __future__ import annotations

import random

from tests.fixtures.kloset import MiB, backup_json, seeded_bytes


def insert_at_places(data: bytes, places: int, size: int, seed: int) -> bytes:
    """``data`` with ``places`` fresh ``size``-byte inserts, one in each tenth."""
    rng = random.Random(seed)
    span = len(data) // places
    out = bytearray()
    for i in range(places):
        piece = data[i * span : (i + 1) * span if i < places - 1 else len(data)]
        cut = rng.randrange(len(piece))
        out += piece[:cut] + rng.randbytes(size) + piece[cut:]
    return bytes(out)


def test_insertions_store_under_ten_percent(cli_kloset, run_cli) -> None:
    original = seeded_bytes(11, 256 * MiB)
    edited = insert_at_places(original, places=10, size=1024, seed=12)
    assert len(edited) == len(original) + 10 * 1024

    first = backup_json(run_cli, "db.dump", original)
    second = backup_json(run_cli, "db.dump", edited)
    assert first["logical_bytes"] == len(original)
    assert second["logical_bytes"] == len(edited)
    assert first["stored_bytes"] >= len(original)  # random data does not compress
    assert second["stored_bytes"] < 0.10 * first["stored_bytes"], (first, second)

    assert run_cli("cat", first["snapshot_id"]).stdout == original
    assert run_cli("cat", second["snapshot_id"][:12], "db.dump").stdout == edited
