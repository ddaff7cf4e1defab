"""`pgkloset sync`: local to S3 (moto over HTTP) and back, re-encrypted for each kloset's
keys, skipping what the destination holds, and safe to interrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgkloset_core.kloset.keys import KdfCost
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend
from tests.fixtures.storage import new_bucket

SOURCE_PASS = "sync source passphrase"
DEST_PASS = "sync destination passphrase"
CLI = [sys.executable, "-m", "pgkloset_core.cli"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_chunk": 4096, "avg_chunk": 16384, "max_chunk": 65536, "pack_size": 512 * 1024}
MiB = 1 << 20


def make(url: str, passphrase: str) -> Kloset:
    return Kloset.init(open_backend(url), passphrase, kdf=KdfCost(1, 1024, 1), config_overrides=SMALL)


def backup(kloset: Kloset, name: str, data: bytes, **meta: str) -> str:
    with kloset.lock(exclusive=False, operation="backup") as lock, \
            kloset.writer(kind="stream", tags=["nightly"], meta=meta, lock=lock) as writer:
        writer.add_bytes(name, data, mode=0o640)
        writer.add_special("etc", "dir", mode=0o755)
        return writer.commit().id


def env(source: str, dest_pass: str | None = DEST_PASS, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("PGKLOSET_")}
    out.update(PGKLOSET_REPO=source, PGKLOSET_PASSPHRASE=SOURCE_PASS, **extra)
    if dest_pass:
        out["PGKLOSET_TO_PASSPHRASE"] = dest_pass
    return out


def sync(source: str, dest: str, *args: str, dest_pass: str | None = DEST_PASS,
         source_pass: str = SOURCE_PASS, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([*CLI, "sync", "--from", source, "--to", dest, *args], capture_output=True,
                          env={**env(source, dest_pass), "PGKLOSET_PASSPHRASE": source_pass},
                          cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def sync_json(source: str, dest: str, *args: str, dest_pass: str | None = DEST_PASS) -> dict:
    return json.loads(sync(source, dest, "--json", *args, dest_pass=dest_pass).stdout)


def cat(url: str, passphrase: str, snapshot: str, entry: str = "db") -> bytes:
    proc = subprocess.run([*CLI, "cat", snapshot, entry], capture_output=True, cwd=ROOT, timeout=300,
                          env={**env(url), "PGKLOSET_PASSPHRASE": passphrase}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def test_sync_to_s3_and_back(tmp_path: Path, moto_server: str) -> None:
    local = str(tmp_path / "local")
    source = make(local, SOURCE_PASS)
    base = os.urandom(3 * MiB)
    datas = {backup(source, "db", base, server="pg1", database="app"): base,
             backup(source, "db", base[: 2 * MiB] + os.urandom(MiB), server="pg1", database="app"):
                 None}
    datas = {sid: data if data is not None else b"".join(source.read_entry(
        source.resolve(sid), source.resolve(sid).entry("db"))) for sid, data in datas.items()}
    s3 = f"s3://{new_bucket(moto_server)}/offsite?endpoint={moto_server}"
    make(s3, DEST_PASS)

    first = sync_json(local, s3)
    assert {c["source_id"] for c in first["copied"]} == set(datas)
    total = sum(len(d) for d in datas.values())
    assert first["logical_bytes"] == total
    # The second snapshot shares two thirds with the first: only the rest is stored.
    second_copy = next(c for c in first["copied"] if c["source_id"] == list(datas)[1])
    assert second_copy["stored_bytes"] < 1.5 * MiB
    remote = Kloset.open(open_backend(s3), DEST_PASS)
    copies = {s.meta["origin_snapshot"]: s for s in remote.snapshots()}
    assert set(copies) == set(datas)
    for sid, copy in copies.items():
        original = source.resolve(sid)
        assert copy.id != sid and copy.time == original.time and copy.tags == original.tags
        assert copy.hostname == original.hostname and copy.meta["database"] == "app"
        assert [(e.name, e.type, e.mode) for e in copy.entries] == \
            [(e.name, e.type, e.mode) for e in original.entries]
        assert cat(s3, DEST_PASS, copy.id) == datas[sid]
    # Re-encrypted with the destination's own keys: no pack or chunk id in common.
    assert not set(source.load_index().pack_ids()) & set(remote.load_index().pack_ids())

    again = sync_json(local, s3)
    assert again["copied"] == [] and again["stored_bytes"] == 0
    assert sorted(again["present"]) == sorted(datas)
    assert len(Kloset.open(open_backend(s3), DEST_PASS).snapshot_ids()) == 2

    # Back from S3 into a new local kloset: the bytes are the originals.
    back = str(tmp_path / "back")
    out = sync(s3, back, "--init", source_pass=DEST_PASS, dest_pass="third passphrase")
    assert b"copied 2 snapshot(s)" in out.stdout
    home = Kloset.open(open_backend(back), "third passphrase")
    for snap in home.snapshots():
        assert snap.meta["origin_snapshot"] in datas
        assert cat(back, "third passphrase", snap.id) == datas[snap.meta["origin_snapshot"]]
    # And to the original: it recognises its own snapshots.
    home_again = sync(s3, local, "--json", source_pass=DEST_PASS, dest_pass=SOURCE_PASS)
    assert json.loads(home_again.stdout)["copied"] == []
    wrong_source = sync(s3, local, source_pass="nope", dest_pass=SOURCE_PASS, check=False)
    assert wrong_source.stderr.decode().startswith("pgkloset: error: source s3://")


def test_named_snapshots_dry_run_and_errors(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    source = make(src, SOURCE_PASS)
    ids = [backup(source, "db", os.urandom(100_000)) for _ in range(3)]
    make(dst, DEST_PASS)
    dry = sync_json(src, dst, "--dry-run")
    assert dry["missing"] == ids and dry["copied"] == []
    assert Kloset.open(open_backend(dst), DEST_PASS).snapshot_ids() == []
    picked = sync_json(src, dst, ids[1][:10])
    assert [c["source_id"] for c in picked["copied"]] == [ids[1]]
    rest = sync_json(src, dst)
    assert [c["source_id"] for c in rest["copied"]] == [ids[0], ids[2]] and rest["present"] == [ids[1]]

    wrong = sync(src, dst, dest_pass="not it", check=False)
    err = wrong.stderr.decode()
    assert wrong.returncode != 0 and len(err.splitlines()) == 1, err
    assert err.startswith("pgkloset: error: destination") and "PGKLOSET_TO_PASSPHRASE" in err
    assert "not it" not in err
    missing = sync(src, str(tmp_path / "nowhere"), check=False)
    assert missing.returncode != 0 and missing.stderr.decode().startswith("pgkloset: error: no kloset")
    assert len(missing.stderr.decode().splitlines()) == 1


def test_interrupted_sync_resumes(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    source = make(src, SOURCE_PASS)
    data = os.urandom(24 * MiB)
    sid = backup(source, "db", data)
    make(dst, DEST_PASS)
    proc = subprocess.Popen([*CLI, "sync", "--from", src, "--to", dst], env=env(src), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data_dir = Path(dst) / "data"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if data_dir.exists() and sum(1 for _ in data_dir.rglob("*")) >= 6:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("sync finished before it could be interrupted")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    dest = Kloset.open(open_backend(dst), DEST_PASS)
    assert dest.snapshot_ids() == [], "nothing is committed before the manifest"
    done = sync_json(src, dst)
    assert [c["source_id"] for c in done["copied"]] == [sid]
    copy = Kloset.open(open_backend(dst), DEST_PASS).snapshots()[0]
    assert cat(dst, DEST_PASS, copy.id) == data
    check = subprocess.run([*CLI, "check", "--read-data", "--json"], capture_output=True, cwd=ROOT,
                           env={**env(dst), "PGKLOSET_PASSPHRASE": DEST_PASS}, timeout=300)
    assert json.loads(check.stdout)["ok"], check.stdout
