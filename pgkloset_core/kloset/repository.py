"""The kloset: opening, keys, index, snapshots and blob reads.

This is the single entry point later layers use: ``Kloset.init`` or
``Kloset.open`` on a backend, then ``writer()`` to make snapshots and
``read_entry()`` to stream them back.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgkloset_core.errors import (
    AmbiguousSnapshot,
    CorruptObject,
    KlosetError,
    NotAKloset,
    SnapshotNotFound,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from pgkloset_core.kloset import locks
from pgkloset_core.kloset.crypto import MasterKey, content_hash
from pgkloset_core.kloset.index import (
    BlobIndex,
    DeltaRun,
    PackRecord,
    decode_delta,
    decode_delta_run,
)
from pgkloset_core.kloset.keys import KEYS_PREFIX, KdfCost, KeyFile, make_key_file, parse_key_file
from pgkloset_core.kloset.pack import open_blob, pack_name
from pgkloset_core.kloset.sealed import KIND_INDEX, KIND_SNAPSHOT, seal_json, unseal, unseal_json
from pgkloset_core.kloset.snapshot import SNAPSHOTS_PREFIX, Entry, Snapshot
from pgkloset_core.storage.base import Backend, ObjectNotFound, StorageError

FORMAT_NAME = "pgkloset-kloset"
FORMAT_VERSION = 1
CONFIG_NAME = "config"
INDEX_PREFIX = "index/"
# Deleted (it never exists) before an exclusive lock: append-only credentials fail here,
# before forget or prune has changed anything.
DELETE_PROBE = SNAPSHOTS_PREFIX + "delete-probe"


@dataclass(frozen=True)
class KlosetConfig:
    """Repository-wide parameters, fixed at init (changing them would break dedup)."""

    id: str
    created: str
    # 64 KiB on average, normalization level 3 (chunk sizes held close to the
    # average): a month of daily dumps stores 11% less than 256 KiB with level 1,
    # at the same speed (docs/BENCHMARKS.md); the price is 4x the index entries.
    min_chunk: int = 16 * 1024
    avg_chunk: int = 64 * 1024
    max_chunk: int = 256 * 1024
    normalized_chunking: int = 3
    pack_size: int = 32 * 1024 * 1024
    # zstd level 2: on this project's benchmark dump (64 KiB chunks) it compresses
    # 1.5x faster than level 3 for 0.6-0.9% more bytes (docs/BENCHMARKS.md, ninth round).
    zstd_level: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "id": self.id,
            "created": self.created,
            "chunker": {
                "algorithm": "fastcdc2020",
                "min_size": self.min_chunk,
                "avg_size": self.avg_chunk,
                "max_size": self.max_chunk,
                "normalized_chunking": self.normalized_chunking,
            },
            "pack_size": self.pack_size,
            "compression": {"algorithm": "zstd", "level": self.zstd_level},
            "extra": self.extra,
        }

    def serialize(self, master: MasterKey) -> bytes:
        body = self.body()
        body["mac"] = master.mac(_canonical(body))
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> tuple[KlosetConfig, dict[str, Any]]:
        """Decode without authenticating (the caller verifies ``mac`` once keyed)."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise NotAKloset("the repository's config is not a pgkloset config") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise NotAKloset("the repository's config is not a pgkloset config")
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise UnsupportedFormat(
                f"kloset format version {version} is not supported by this pgkloset "
                f"(it reads version {FORMAT_VERSION}); upgrade pgkloset"
            )
        try:
            ch = doc["chunker"]
            cfg = cls(
                id=str(doc["id"]),
                created=str(doc["created"]),
                min_chunk=int(ch["min_size"]),
                avg_chunk=int(ch["avg_size"]),
                max_chunk=int(ch["max_size"]),
                normalized_chunking=int(ch["normalized_chunking"]),
                pack_size=int(doc["pack_size"]),
                zstd_level=int(doc["compression"]["level"]),
                extra=dict(doc.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CorruptObject(CONFIG_NAME, "config is incomplete") from None
        return cfg, doc


def ready(kloset: Kloset | Future[Kloset]) -> Kloset:
    """The kloset, waiting for a background ``open_soon`` if need be."""
    return kloset.result() if isinstance(kloset, Future) else kloset


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class Kloset:
    """An opened kloset: backend plus the unlocked master key."""

    def __init__(self, backend: Backend, master: MasterKey, config: KlosetConfig, key_name: str) -> None:
        self.backend = backend
        self.master = master
        self.config = config
        self.key_name = key_name
        self._index: BlobIndex | None = None

    # -- creation and opening -------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, passphrase: str, *, kdf: KdfCost | None = None,
             config_overrides: dict[str, Any] | None = None) -> Kloset:
        if not passphrase:
            raise UsageError("an empty passphrase is not allowed")
        if backend.exists(CONFIG_NAME):
            raise KlosetError(f"a kloset already exists at {backend.url}")
        if any(True for _ in backend.list("")):
            raise KlosetError(f"{backend.url} is not empty; a kloset needs an empty location")
        master = MasterKey.generate()
        config = KlosetConfig(
            id=secrets.token_hex(16),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            **(config_overrides or {}),
        )
        name, data = make_key_file(master, passphrase, config.id, kdf or KdfCost())
        # The key goes first: a config without a key would be a kloset nobody can open.
        backend.write(name, data)
        try:
            backend.write(CONFIG_NAME, config.serialize(master))
        except Exception:
            # A lone key file would make the location "not empty" for the next init.
            with contextlib.suppress(StorageError):
                backend.delete(name)
            raise
        return cls(backend, master, config, name)

    @staticmethod
    def read_config(backend: Backend) -> tuple[KlosetConfig, dict[str, Any]]:
        try:
            data = backend.read(CONFIG_NAME)
        except ObjectNotFound:
            raise NotAKloset(f"no kloset at {backend.url} (no config found; run `pgkloset init`)") from None
        return KlosetConfig.parse(data)

    @classmethod
    def open_soon(cls, backend: Backend, passphrase: str) -> Future[Kloset]:
        """Open in a background thread: Argon2id (~0.2 s) runs while the caller connects.

        Backups call this so the key unlock overlaps the server round trips
        and tool start-up they need anyway; ``ready`` waits for the result
        (and raises what ``open`` would have raised).
        """
        future: Future[Kloset] = Future()

        def work() -> None:
            try:
                future.set_result(cls.open(backend, passphrase))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)

        threading.Thread(target=work, daemon=True, name="pgkloset-unlock").start()
        return future

    @classmethod
    def open(cls, backend: Backend, passphrase: str) -> Kloset:
        config, doc = cls.read_config(backend)
        key_files, damaged = cls._key_files(backend)
        for key in key_files:
            if key.kloset_id != config.id:
                continue
            master = key.unwrap(passphrase)
            if master is None:
                continue
            body = {k: v for k, v in doc.items() if k != "mac"}
            if master.mac(_canonical(body)) != doc.get("mac"):
                raise CorruptObject(CONFIG_NAME, "config failed authentication (damaged or tampered)")
            return cls(backend, master, config, key.name)
        if damaged:
            names = ", ".join(d.object_name for d in damaged)
            raise WrongPassphrase(f"no key file opens with this passphrase; damaged key file(s): {names}")
        if not key_files:
            raise NotAKloset(f"no key files at {backend.url}: the kloset cannot be opened")
        raise WrongPassphrase("wrong passphrase: no key file of this kloset opens with it")

    @staticmethod
    def _key_files(backend: Backend) -> tuple[list[KeyFile], list[CorruptObject]]:
        keys, damaged = [], []
        for obj in backend.list(KEYS_PREFIX):
            try:
                keys.append(parse_key_file(obj.name, backend.read(obj.name)))
            except CorruptObject as exc:
                damaged.append(exc)
            except ObjectNotFound:
                continue
        return keys, damaged

    # -- keys -----------------------------------------------------------------

    def list_keys(self) -> tuple[list[KeyFile], list[CorruptObject]]:
        return self._key_files(self.backend)

    def add_key(self, passphrase: str, kdf: KdfCost | None = None) -> str:
        if not passphrase:
            raise UsageError("an empty passphrase is not allowed")
        name, data = make_key_file(self.master, passphrase, self.config.id, kdf or KdfCost())
        self.backend.write(name, data)
        return name

    def remove_key(self, key_ref: str) -> str:
        keys, _ = self.list_keys()
        matches = [k for k in keys if k.key_id.startswith(key_ref.removeprefix(KEYS_PREFIX))]
        if not matches:
            raise KlosetError(f"no key file matches {key_ref!r}")
        if len(matches) > 1:
            raise KlosetError(f"key id {key_ref!r} is ambiguous ({len(matches)} key files match)")
        target = matches[0]
        if target.name == self.key_name:
            raise KlosetError("refusing to remove the key file in use; open with another passphrase")
        if len(keys) <= 1:
            raise KlosetError("refusing to remove the last key file")
        self.backend.delete(target.name)
        return target.name

    # -- index ----------------------------------------------------------------

    def index_names(self) -> list[str]:
        return sorted(o.name for o in self.backend.list(INDEX_PREFIX))

    def read_index_delta(self, name: str) -> tuple[list[PackRecord], list[str]]:
        return decode_delta(self._index_payload(name), name)

    def _index_payload(self, name: str) -> bytes:
        """An index delta's plaintext, checked against its name and key."""
        data = self.backend.read(name)
        if content_hash(data) != name.removeprefix(INDEX_PREFIX):
            raise CorruptObject(name, "content does not match its name")
        return unseal(self.master, KIND_INDEX, data, name)

    def load_index(self, *, refresh: bool = False) -> BlobIndex:
        """All index deltas, merged (deltas superseded by a compaction are skipped)."""
        if self._index is None or refresh:
            runs: dict[str, DeltaRun] = {}
            superseded: set[str] = set()
            for name in self.index_names():
                try:
                    run = decode_delta_run(self._index_payload(name), name)
                except ObjectNotFound:
                    continue  # removed by a concurrent prune after listing
                runs[name] = run
                superseded.update(INDEX_PREFIX + s for s in run.superseded)
            self._index = BlobIndex.from_runs(
                run for name, run in runs.items() if name not in superseded)
        return self._index

    # -- snapshots ------------------------------------------------------------

    def snapshot_ids(self) -> list[str]:
        return [o.name.removeprefix(SNAPSHOTS_PREFIX) for o in self.backend.list(SNAPSHOTS_PREFIX)]

    def load_snapshot(self, snapshot_id: str) -> Snapshot:
        name = SNAPSHOTS_PREFIX + snapshot_id
        try:
            data = self.backend.read(name)
        except ObjectNotFound:
            raise SnapshotNotFound(f"snapshot {snapshot_id[:16]} not found") from None
        if content_hash(data) != snapshot_id:
            raise CorruptObject(name, "content does not match its name")
        return Snapshot.from_json(snapshot_id, unseal_json(self.master, KIND_SNAPSHOT, data, name), name)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        found = []
        for sid in self.snapshot_ids():
            try:
                found.append(self.load_snapshot(sid))
            except SnapshotNotFound:
                continue  # forgotten meanwhile
        return sorted(found, key=lambda s: (s.time, s.id))

    def resolve(self, ref: str) -> Snapshot:
        """A snapshot by full id, unique prefix, or ``latest``."""
        ref = ref.strip().lower()
        if not ref:
            raise UsageError("empty snapshot id")
        if ref == "latest":
            snaps = self.snapshots()
            if not snaps:
                raise SnapshotNotFound("the kloset has no snapshots yet")
            return snaps[-1]
        if any(c not in "0123456789abcdef" for c in ref):
            raise SnapshotNotFound(f"no snapshot matches {ref!r} (ids are hexadecimal)")
        matches = [sid for sid in self.snapshot_ids() if sid.startswith(ref)]
        if not matches:
            raise SnapshotNotFound(f"no snapshot matches {ref!r}")
        if len(matches) > 1:
            raise AmbiguousSnapshot(f"snapshot id prefix {ref!r} is ambiguous: it matches {len(matches)} snapshots")
        return self.load_snapshot(matches[0])

    def write_snapshot(self, snapshot: Snapshot) -> str:
        data = seal_json(self.master, KIND_SNAPSHOT, snapshot.to_json())
        snapshot_id = content_hash(data)
        self.backend.write(SNAPSHOTS_PREFIX + snapshot_id, data)
        snapshot.id = snapshot_id
        return snapshot_id

    def forget(self, snapshot_ids: list[str]) -> None:
        for sid in snapshot_ids:
            self.backend.delete(SNAPSHOTS_PREFIX + sid)

    # -- reading data ---------------------------------------------------------

    def read_blob(self, blob_id: bytes) -> bytes:
        blobs, error = self.read_blobs([blob_id])
        if error is not None:
            raise error
        return blobs[0]

    def read_blobs(self, blob_ids: Sequence[bytes]) -> tuple[list[bytes], KlosetError | None]:
        """Several blobs in order, those stored side by side in a pack in one read.

        A backup writes a stream's new chunks one after the other, so reading
        it back takes long runs of each pack: one request per run instead of
        one per chunk (fewer system calls here, fewer GETs on S3). Stops at
        the first blob that cannot be read and returns the ones before it
        with the error, so a reader still hands out everything before a
        damaged chunk.
        """
        index = self.load_index()
        out: list[bytes] = []
        try:
            locs = [index.lookup(blob_id) for blob_id in blob_ids]
            i = 0
            while i < len(locs):
                first = locs[i]
                if first is None:
                    raise CorruptObject(f"blob {blob_ids[i].hex()[:16]}", "not in the index (missing data)")
                run_locs, end = [first], first.offset + first.length
                while i + len(run_locs) < len(locs):
                    nxt = locs[i + len(run_locs)]
                    if nxt is None or nxt.pack_id != first.pack_id or nxt.offset != end:
                        break
                    run_locs.append(nxt)
                    end += nxt.length
                name = pack_name(first.pack_id)
                run = memoryview(self.backend.read_range(name, first.offset, end - first.offset))
                for k, loc in enumerate(run_locs, start=i):
                    start = loc.offset - first.offset
                    out.append(open_blob(self.master, loc.salt, loc.blob_type, blob_ids[k],
                                         run[start:start + loc.length], name))
                i += len(run_locs)
        except KlosetError as exc:
            return out, exc
        return out, None

    def read_entry(self, snapshot: Snapshot, entry: Entry,
                   ranges: Sequence[tuple[int, int]] | None = None) -> Iterator[bytes]:
        """The entry's bytes; with ``ranges``, only those (start, end) byte ranges."""
        from pgkloset_core.kloset.reader import iter_entry

        return iter_entry(self, snapshot, entry, ranges=ranges)

    def prepare_read(self, snapshot: Snapshot, entries: list[Entry] | None = None, *,
                     wait: bool = True, poll_interval: float | None = None,
                     progress: Any = None) -> Any:
        """Thaw from cold storage what reading ``entries`` (default: all) needs.

        Call before ``read_entry`` in restores and drills. A no-op on backends
        without cold storage; with ``wait=False`` raises ThawPending while packs thaw.
        """
        if not self.backend.may_be_cold:
            return None
        from pgkloset_core.kloset.thaw import prepare_read

        return prepare_read(self, snapshot, entries, wait=wait, poll_interval=poll_interval,
                            progress=progress)

    # -- writing --------------------------------------------------------------

    def lock(self, *, exclusive: bool, operation: str, wait: float = 0.0) -> locks.Lock:
        if exclusive:
            self.backend.delete(DELETE_PROBE)  # raises DeleteDenied for append-only credentials
        return locks.acquire(self.backend, self.master, exclusive=exclusive, operation=operation, wait=wait)

    def writer(self, *, kind: str, tags: list[str] | None = None, meta: dict[str, Any] | None = None,
               lock: locks.Lock | None = None, workers: int | None = None,
               time: datetime | None = None):  # noqa: ANN201
        """A SnapshotWriter; ``time`` (timezone-aware) overrides the snapshot's time."""
        from pgkloset_core.kloset.writer import SnapshotWriter

        return SnapshotWriter(self, kind=kind, tags=tags or [], meta=meta or {}, lock=lock,
                              workers=workers or max(2, os.cpu_count() or 2), start_time=time)
