"""The kloset core, logical backup and retention flows on S3 over real HTTP (moto's server
mode) and on SFTP (OpenSSH's sshd), plus one clear CLI line for each way of not reaching
the storage.

A representative subset of each suite runs here; the full suites run on the local file
system. ``kloset_url`` (tests/fixtures/kloset.py) is overridden, so the core tests imported
below run unchanged against each remote backend.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pgkloset_core.kloset.check import check
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.instance import LocalInstance
from pgkloset_core.storage import open_backend
from tests.fixtures.kloset import PASSPHRASE, MiB, seeded_bytes
from tests.fixtures.logical_db import build_plain, table_checksums
from tests.fixtures.storage import SshdServer, free_port
from tests.test_kloset_corruption import (  # noqa: F401 - fixture used by the imported tests
    damaged_kloset,
    test_damaged_pack,
    test_damaged_snapshot,
    test_intact_kloset_checks_clean,
    test_random_damage_never_yields_wrong_bytes,
)
from tests.test_kloset_roundtrip import test_add_file_keeps_content_and_attributes  # noqa: F401
from tests.test_storage_backends import moto_auth_server  # noqa: F401 - fixture

CLI = [sys.executable, "-m", "pgkloset_core.cli"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_chunk": 16 * 1024, "avg_chunk": 64 * 1024, "max_chunk": 256 * 1024,
         "pack_size": 1 * MiB}


@pytest.fixture(params=["s3", "sftp"])
def kloset_url(request: pytest.FixtureRequest) -> str:
    """The remote backends (the local one runs the full suites)."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def cli(url: str, *args: str, input: bytes | None = None, **env: str) -> subprocess.CompletedProcess[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PGKLOSET_")
            or k.startswith("PGKLOSET_SFTP_")}
    full.update(PGKLOSET_REPO=url, PGKLOSET_PASSPHRASE=PASSPHRASE, **env)
    return subprocess.run([*CLI, *args], capture_output=True, env=full, cwd=ROOT, timeout=300,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def one_error_line(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgkloset: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def edited(data: bytes, seed: int) -> bytes:
    """``data`` with a few small insertions (a database that changed a little)."""
    rng = random.Random(seed)
    out, pos = bytearray(), 0
    for cut in sorted(rng.sample(range(len(data)), 4)):
        out += data[pos:cut] + rng.randbytes(512)
        pos = cut
    return bytes(out + data[pos:])


# -- kloset core -------------------------------------------------------------------


def test_round_trip_dedup_and_full_check(new_lib_kloset, kloset_url: str) -> None:
    kloset = new_lib_kloset(**SMALL)
    first_data = seeded_bytes(31, 6 * MiB)
    second_data = edited(first_data, 32)
    snaps = []
    for data in (first_data, second_data):
        with kloset.lock(exclusive=False, operation="backup") as lock, \
                kloset.writer(kind="stream", lock=lock) as writer:
            writer.add_bytes("db", data)
            writer.add_bytes("empty", b"")
            snaps.append(writer.commit())
    assert snaps[0].summary["stored_bytes"] >= len(first_data)
    assert snaps[1].summary["stored_bytes"] < 0.25 * len(first_data), snaps[1].summary
    reopened = Kloset.open(open_backend(kloset_url), PASSPHRASE)
    for snap, data in zip(snaps, (first_data, second_data), strict=True):
        got = reopened.resolve(snap.id)
        assert b"".join(reopened.read_entry(got, got.entry("db"))) == data
        assert b"".join(reopened.read_entry(got, got.entry("empty"))) == b""
    report = check(reopened, read_data=True)
    assert report.ok, report.problems
    assert report.packs > 2 and report.blobs_verified > 0


# -- retention: forget and prune ------------------------------------------------------


def test_forget_and_prune_flow(kloset_url: str, new_lib_kloset) -> None:
    new_lib_kloset(**SMALL)
    base = seeded_bytes(41, 2 * MiB)
    made = {}
    for i in range(4):
        data = base + seeded_bytes(100 + i, 1 * MiB)
        out = json.loads(ok(cli(kloset_url, "backup", "stream", "--name", "s", "--json",
                                input=data)).stdout)
        made[out["snapshot_id"]] = data
    forgot = json.loads(ok(cli(kloset_url, "forget", "--keep-last", "2", "--json")).stdout)
    assert len(forgot["removed"]) == 2 and set(forgot["keep"]) == set(list(made)[2:])
    report = json.loads(ok(cli(kloset_url, "prune", "--grace", "0", "--json")).stdout)
    assert report["packs_deleted"] > 0 and report["bytes_freed"] >= 1 * MiB
    listed = json.loads(ok(cli(kloset_url, "snapshots", "--json")).stdout)
    assert [s["id"] for s in listed] == list(made)[2:]
    for sid in list(made)[2:]:
        assert ok(cli(kloset_url, "cat", sid)).stdout == made[sid]
    checked = json.loads(ok(cli(kloset_url, "check", "--read-data", "--json")).stdout)
    assert checked["ok"], checked["problems"]


# -- logical backup ----------------------------------------------------------------------


def test_logical_backup_and_restore(kloset_url: str, new_lib_kloset, pg15: LocalInstance,
                                    request: pytest.FixtureRequest) -> None:
    new_lib_kloset()
    db = f"suite_{request.node.callspec.id.replace('-', '_')}"
    target = f"{db}_back"
    for name in (db, target):
        pg15.execute(f'DROP DATABASE IF EXISTS "{name}"')
    build_plain(pg15, db, rows=500)
    done = ok(cli(kloset_url, "backup", "logical", "--database", db, "--json",
                  PGKLOSET_DSN=pg15.dsn("postgres", tcp=True)))
    results = json.loads(done.stdout)
    logical = next(r for r in results if r["kind"] == "logical")
    ok(cli(kloset_url, "restore", logical["snapshot_id"], "--create", "--to",
           pg15.dsn(target, tcp=True)))
    assert table_checksums(pg15, target) == table_checksums(pg15, db)
    assert table_checksums(pg15, db)["shop.item"][0] == 500


# -- one clear line for each way of not reaching the storage -------------------------------


def test_s3_wrong_credentials_one_line(moto_auth_server: dict[str, str]) -> None:  # noqa: F811
    srv = moto_auth_server
    url = f"s3://{srv['bucket']}/k?endpoint={srv['endpoint']}"
    proc = cli(url, "snapshots", AWS_ACCESS_KEY_ID=srv["key_id"],
               AWS_SECRET_ACCESS_KEY="not-the-secret-at-all")
    line = one_error_line(proc, "credentials", srv["bucket"])
    assert "not-the-secret-at-all" not in line and srv["secret"] not in line


def test_s3_missing_bucket_one_line(moto_server: str) -> None:
    proc = cli(f"s3://pgk-no-such-bucket/k?endpoint={moto_server}", "snapshots")
    one_error_line(proc, "pgk-no-such-bucket", "does not exist")


def test_s3_connection_refused_one_line(moto_server: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = cli(f"s3://pgk-bucket/k?endpoint={endpoint}&max_attempts=1", "snapshots")
    one_error_line(proc, "cannot connect", endpoint)


def test_sftp_unknown_host_key_one_line(sftp_url: str, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    proc = cli(sftp_url, "snapshots", PGKLOSET_SFTP_KNOWN_HOSTS=str(known))
    one_error_line(proc, "unknown SSH host key", "SHA256:")
    assert known.read_text() == "", "nothing is trusted without the opt-in"


def test_sftp_connection_refused_one_line(sftp_env: SshdServer) -> None:
    port = free_port()
    proc = cli(sftp_env.url("/tmp/k", port=port), "snapshots")
    one_error_line(proc, f"127.0.0.1:{port}", "connection refused")
