"""Snapshot manifests: what a snapshot holds and the facts recorded with it.

A manifest is a sealed JSON document in ``snapshots/<hash>``. Writing it is
the only commit point of a backup. Each entry's content is a list of
(chunk id, length) records, kept inline when short and otherwise in ``list``
blobs stored in packs like data, so manifests stay small for huge streams.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgkloset_core.errors import CorruptObject
from pgkloset_core.kloset.index import ID_LEN

SNAPSHOT_VERSION = 1
SNAPSHOTS_PREFIX = "snapshots/"
CHUNK_REF = struct.Struct("<32sI")  # chunk id, plaintext length
INLINE_MAX_CHUNKS = 64
LIST_BLOB_MAX_CHUNKS = 16384  # 576 KiB per list blob

ENTRY_TYPES = ("stream", "file", "dir", "symlink")


@dataclass
class Entry:
    """One named item of a snapshot: a stream, or a file-system object."""

    name: str
    type: str = "stream"
    size: int = 0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None
    mtime: float | None = None
    target: str | None = None  # symlink target
    inline: bytes = b""  # packed CHUNK_REF records when short
    lists: list[str] = field(default_factory=list)  # hex ids of list blobs
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "type": self.type, "size": self.size}
        for key in ("mode", "uid", "gid", "user", "group", "mtime", "target"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = value
        if self.inline:
            doc["inline"] = base64.b64encode(self.inline).decode()
        if self.lists:
            doc["lists"] = self.lists
        if self.meta:
            doc["meta"] = self.meta
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str = "snapshot entry") -> Entry:
        """Decode one entry; anything malformed is a CorruptObject naming ``where``."""
        try:
            entry = cls(
                name=str(doc["name"]),
                type=str(doc.get("type", "stream")),
                size=int(doc.get("size", 0)),
                mode=_optional(doc, "mode", int),
                uid=_optional(doc, "uid", int),
                gid=_optional(doc, "gid", int),
                user=_optional(doc, "user", str),
                group=_optional(doc, "group", str),
                mtime=_optional(doc, "mtime", (int, float)),
                target=_optional(doc, "target", str),
                inline=base64.b64decode(doc.get("inline", ""), validate=True),
                lists=[str(x) for x in doc.get("lists", [])],
                meta=dict(doc.get("meta", {})),
            )
            if entry.type not in ENTRY_TYPES:
                raise ValueError(f"unknown entry type {entry.type!r}")
            if entry.size < 0:
                raise ValueError("negative size")
            if len(entry.inline) % CHUNK_REF.size:
                raise ValueError("inline chunk list has a partial record")
            for blob in entry.lists:
                if len(bytes.fromhex(blob)) != ID_LEN:
                    raise ValueError("list blob id of the wrong length")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CorruptObject(where, f"invalid entry: {exc}") from None
        return entry


def _optional(doc: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    """An optional attribute of the given type (bool is not a number here)."""
    value = doc.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
        raise ValueError(f"{key} has the wrong type")
    return value


def iter_refs(packed: bytes) -> Iterator[tuple[bytes, int]]:
    """Decode packed (chunk id, length) records."""
    yield from CHUNK_REF.iter_unpack(packed)


@dataclass
class Snapshot:
    """A decoded manifest. ``id`` is the storage hash of the sealed file."""

    id: str
    time: datetime
    hostname: str
    username: str
    kind: str
    tags: list[str]
    meta: dict[str, Any]
    entries: list[Entry]
    summary: dict[str, Any]
    program: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def logical_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def entry(self, name: str) -> Entry | None:
        for e in self.entries:
            if e.name == name:
                return e
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SNAPSHOT_VERSION,
            "time": self.time.isoformat(),
            "hostname": self.hostname,
            "username": self.username,
            "kind": self.kind,
            "tags": self.tags,
            "meta": self.meta,
            "entries": [e.to_json() for e in self.entries],
            "summary": self.summary,
            "program": self.program,
        }

    @classmethod
    def from_json(cls, snapshot_id: str, doc: Any, name: str) -> Snapshot:
        try:
            if not isinstance(doc, dict):
                raise ValueError("manifest is not an object")
            if doc.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"unsupported snapshot version {doc.get('version')!r}")
            when = datetime.fromisoformat(doc["time"])
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return cls(
                id=snapshot_id,
                time=when,
                hostname=str(doc.get("hostname", "")),
                username=str(doc.get("username", "")),
                kind=str(doc.get("kind", "")),
                tags=[str(t) for t in doc.get("tags", [])],
                meta=dict(doc.get("meta", {})),
                entries=[Entry.from_json(e, name) for e in doc.get("entries", [])],
                summary=dict(doc.get("summary", {})),
                program=str(doc.get("program", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CorruptObject(name, f"invalid manifest: {exc}") from None

    def summary_json(self) -> dict[str, Any]:
        """The listing form used by ``snapshots --json``."""
        return {
            "id": self.id,
            "short_id": self.short_id,
            "time": self.time.isoformat(),
            "hostname": self.hostname,
            "kind": self.kind,
            "tags": self.tags,
            "logical_bytes": self.logical_bytes,
            "entries": [e.name for e in self.entries],
            "meta": self.meta,
        }
