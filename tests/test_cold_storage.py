"""Cold storage on S3 (moto over HTTP): packs in DEEP_ARCHIVE are unreadable until thawed,
a restore thaws exactly the packs it needs (seen on the wire), and listing, check and
forget never need a thaw."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from pgkloset_core.kloset.index import BLOB_LIST
from pgkloset_core.kloset.keys import KdfCost
from pgkloset_core.kloset.pack import pack_name
from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Snapshot
from pgkloset_core.kloset.thaw import ThawPending, ThawProgress, plan_thaw, thaw
from pgkloset_core.storage import StorageError, open_backend
from pgkloset_core.storage.base import FROZEN, HOT, THAWED
from tests.fixtures.storage import FlakyHTTPProxy, new_bucket, s3_client

PASSPHRASE = "cold test passphrase"
CLI = [sys.executable, "-m", "pgkloset_core.cli"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_chunk": 4096, "avg_chunk": 16384, "max_chunk": 65536, "pack_size": 256 * 1024}
MiB = 1 << 20


class RecordingProxy(FlakyHTTPProxy):
    """Forwards every request untouched and remembers its request line."""

    def __init__(self, upstream_port: int) -> None:
        self.lines: list[str] = []
        self._record_lock = threading.Lock()
        super().__init__(upstream_port, rate=0.0)

    def _forward(self, request: bytes) -> bytes:
        with self._record_lock:
            self.lines.append(request.split(b"\r\n", 1)[0].decode())
        return super()._forward(request)

    def restored_keys(self, bucket: str) -> set[str]:
        """Object keys a RestoreObject was sent for (path-style: POST /bucket/key?restore)."""
        keys = set()
        for line in self.lines:
            method, target, _ = line.split(" ", 2)
            path, _, query = target.partition("?")
            if method == "POST" and "restore" in query.split("&"):
                keys.add(unquote(path).removeprefix(f"/{bucket}/"))
        return keys

    def clear(self) -> None:
        with self._record_lock:
            self.lines.clear()


@dataclass
class ColdKloset:
    url: str
    bucket: str
    prefix: str
    proxy: RecordingProxy
    endpoint: str
    snaps: dict[str, Snapshot]
    data: dict[str, bytes]

    def open(self) -> Kloset:
        return Kloset.open(open_backend(self.url), PASSPHRASE)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGKLOSET_")}
        env.update(PGKLOSET_REPO=self.url, PGKLOSET_PASSPHRASE=PASSPHRASE,
                   PGKLOSET_THAW_POLL_SECONDS="0.05", **extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*CLI, *args], capture_output=True, env=self.env(**extra), cwd=ROOT,
                              timeout=300, stdin=subprocess.DEVNULL)

    def storage_class(self, name: str) -> str:
        head = s3_client(self.endpoint).head_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
        return str(head.get("StorageClass", "STANDARD"))


def needed_packs(kloset: Kloset, snap: Snapshot) -> set[str]:
    """Every pack reading ``snap`` touches (list blobs included); needs readable lists."""
    index = kloset.load_index()
    packs = set()
    for entry in snap.entries:
        for list_id in entry.lists:
            packs.add(pack_name(index.lookup(bytes.fromhex(list_id)).pack_id))
        for blob_id, _ in iter_refs_of(kloset, snap, entry):
            packs.add(pack_name(index.lookup(blob_id).pack_id))
    return packs


@pytest.fixture
def cold(moto_server: str) -> Iterator[ColdKloset]:
    """A DEEP_ARCHIVE kloset with snapshots a (chunk lists), b (other data), c (short, inline)."""
    bucket = new_bucket(moto_server)
    upstream = int(moto_server.rsplit(":", 1)[1])
    with RecordingProxy(upstream) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        url = f"s3://{bucket}/kloset?endpoint={endpoint}&storage_class=DEEP_ARCHIVE"
        kloset = Kloset.init(open_backend(url), PASSPHRASE, kdf=KdfCost(1, 1024, 1),
                             config_overrides=SMALL)
        data = {"a": os.urandom(2 * MiB), "b": os.urandom(1 * MiB), "c": os.urandom(100_000)}
        snaps = {}
        for name, payload in data.items():
            with kloset.lock(exclusive=False, operation="backup") as lock, \
                    kloset.writer(kind="stream", lock=lock) as writer:
                writer.add_bytes(name, payload)
                snaps[name] = writer.commit()
        assert snaps["a"].entries[0].lists, "snapshot a should spill its chunk list into list blobs"
        assert not snaps["c"].entries[0].lists
        proxy.clear()
        yield ColdKloset(url, bucket, "kloset", proxy, moto_server, snaps, data)


@pytest.fixture
def slow_thaw() -> Iterator[None]:
    """Make moto report restores as in progress for a few requests before they finish."""
    from moto.moto_api import state_manager

    state_manager.set_transition("s3::keyrestore", {"progression": "manual", "times": 3})
    yield
    state_manager.unset_transition("s3::keyrestore")


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgkloset: error: "), lines
    return lines[0]


def test_frozen_packs_are_unreadable_and_list_packs_stay_hot(cold: ColdKloset) -> None:
    kloset = cold.open()
    snap = kloset.resolve(cold.snaps["a"].id)
    with pytest.raises(StorageError, match="cold storage"):
        b"".join(kloset.read_entry(snap, snap.entries[0]))
    index = kloset.load_index()
    list_packs = {loc.pack_id for _id, loc in index.items() if loc.blob_type == BLOB_LIST}
    data_packs = index.pack_ids() - list_packs
    assert list_packs and data_packs
    assert all(cold.storage_class(pack_name(p)) == "STANDARD" for p in list_packs)
    assert all(cold.storage_class(pack_name(p)) == "DEEP_ARCHIVE" for p in data_packs)
    for meta in ("config", f"snapshots/{snap.id}", kloset.index_names()[0]):
        assert cold.storage_class(meta) == "STANDARD"
    # A data pack reports frozen; a list pack hot.
    assert kloset.backend.cold_state(pack_name(next(iter(data_packs))))[0] == FROZEN
    assert kloset.backend.cold_state(pack_name(next(iter(list_packs))))[0] == HOT


def test_restore_thaws_exactly_the_packs_it_needs(cold: ColdKloset) -> None:
    sid = cold.snaps["a"].id
    plan = plan_thaw(cold.open(), cold.snaps["a"])
    assert plan.complete and plan.packs and plan.bytes > 0
    stopped = cold.run("cat", sid[:12], "--no-wait")
    line = one_error_line(stopped)
    assert stopped.returncode == 75 and "run the same command again" in line, line
    requested = cold.proxy.restored_keys(cold.bucket)
    assert requested == {f"kloset/{p}" for p in plan.packs}

    cold.proxy.clear()
    done = cold.run("cat", sid[:12])
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == cold.data["a"]
    assert cold.proxy.restored_keys(cold.bucket) == set(), "thawed packs are not requested again"
    # Exactly the packs snapshot a reads (its data packs; its list pack is hot), and
    # none of snapshot b's.
    kloset = cold.open()
    need = needed_packs(kloset, kloset.resolve(sid))
    frozen_need = {p for p in need if cold.storage_class(p) == "DEEP_ARCHIVE"}
    assert {f"kloset/{p}" for p in frozen_need} == requested
    other = needed_packs(kloset, kloset.resolve(cold.snaps["b"].id))
    assert other and not other & frozen_need
    assert kloset.backend.cold_state(sorted(frozen_need)[0])[0] == THAWED


def test_wait_reports_progress_until_thawed(cold: ColdKloset, slow_thaw: None) -> None:
    kloset = cold.open()
    snap = kloset.resolve(cold.snaps["b"].id)
    plan = plan_thaw(kloset, snap)
    seen: list[ThawProgress] = []
    result = thaw(kloset, plan, wait=True, poll_interval=0.01, progress=seen.append)
    assert sorted(result.requested) == sorted(plan.packs) and result.rounds == 1
    assert seen[0].thawed < seen[0].total, "moto keeps restores in progress for a while"
    assert seen[-1].thawed == seen[-1].total == len(plan.packs)
    assert [p.thawed for p in seen] == sorted(p.thawed for p in seen)
    assert b"".join(kloset.read_entry(snap, snap.entries[0])) == cold.data["b"]


def test_cli_waits_with_a_notice_then_restores(cold: ColdKloset, slow_thaw: None) -> None:
    done = cold.run("cat", cold.snaps["c"].id)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == cold.data["c"]
    assert "waiting for" in done.stderr.decode() and "thaw" in done.stderr.decode()


def test_frozen_chunk_lists_take_two_rounds(cold: ColdKloset) -> None:
    """A lifecycle rule may freeze the list packs too: thaw them first, then the data."""
    kloset = cold.open()
    snap = kloset.resolve(cold.snaps["a"].id)
    index = kloset.load_index()
    list_pack = pack_name(index.lookup(bytes.fromhex(snap.entries[0].lists[0])).pack_id)
    key = f"{cold.prefix}/{list_pack}"

    def freeze() -> None:  # a copy in place starts frozen, without any earlier thaw
        s3_client(cold.endpoint).copy_object(Bucket=cold.bucket, Key=key, StorageClass="DEEP_ARCHIVE",
                                             CopySource={"Bucket": cold.bucket, "Key": key})
        assert cold.storage_class(list_pack) == "DEEP_ARCHIVE"

    freeze()
    first = plan_thaw(kloset, snap)
    assert not first.complete and first.packs == [list_pack]
    with pytest.raises(ThawPending, match="chunk lists") as info:
        thaw(kloset, first, wait=False)
    assert "\n" not in str(info.value)
    assert cold.proxy.restored_keys(cold.bucket) == {key}, "no data pack is guessed at"
    freeze()
    result = thaw(kloset, plan_thaw(kloset, snap), wait=True, poll_interval=0.01)
    assert result.rounds == 2
    data_packs = needed_packs(kloset, snap) - {list_pack}
    assert result.requested[0] == list_pack and set(result.requested[1:]) == data_packs
    assert b"".join(kloset.read_entry(snap, snap.entries[0])) == cold.data["a"]


def test_listing_check_and_forget_never_thaw(cold: ColdKloset) -> None:
    listed = cold.run("snapshots", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    checked = cold.run("check")
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert b"no problems found" in checked.stdout
    forgot = cold.run("forget", cold.snaps["c"].id)
    assert forgot.returncode == 0, forgot.stderr.decode()
    assert cold.proxy.lines, "the commands went through the proxy"
    assert cold.proxy.restored_keys(cold.bucket) == set()
    assert not any("?restore" in line for line in cold.proxy.lines)
    # Only metadata was read: no GET of a data pack other than hot list packs.
    kloset = cold.open()
    index = kloset.load_index()
    list_packs = {pack_name(loc.pack_id) for _id, loc in index.items() if loc.blob_type == BLOB_LIST}
    read_packs = {line.split(" ")[1].split("?")[0].removeprefix(f"/{cold.bucket}/kloset/")
                  for line in cold.proxy.lines if line.startswith("GET ") and "/data/" in line}
    assert read_packs <= list_packs
    assert {s.id for s in kloset.snapshots()} == {cold.snaps["a"].id, cold.snaps["b"].id}
