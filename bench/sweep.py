"""Chunk-size sweep: the same daily dumps into klosets that differ only in chunking.

Smaller chunks find more duplicates after rows move, but cost more hashing,
more index entries and more per-blob overhead; the sweep measures both sides
on this workload. Each kloset is created through the library (the CLI's
``init`` takes no chunker options, on purpose: they are fixed per kloset) and
written through the CLI's ``backup stream``, so the timings include what an
operator would pay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import run, tree_bytes
from bench.tools import PASSPHRASE, Repos, Result
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend

KIB = 1024


@dataclass(frozen=True)
class SweepPoint:
    label: str
    overrides: dict[str, int]


def point(avg_kib: int, zstd_level: int | None = None) -> SweepPoint:
    avg = avg_kib * KIB
    over = {"min_chunk": avg // 4, "avg_chunk": avg, "max_chunk": avg * 4}
    label = f"avg {avg_kib // 1024}M" if avg_kib >= 1024 else f"avg {avg_kib}K"
    if zstd_level is not None:
        over["zstd_level"] = zstd_level
        label += f" zstd {zstd_level}"
    return SweepPoint(label, over)


QUICK_POINTS = [point(32), point(64), point(64, 3), point(128), point(256), point(1024)]
# Each point costs a whole physical backup per day.
PHYSICAL_POINTS = [point(64), point(256), point(1024)]
FULL_POINTS = [point(32), point(64), point(128), point(256), point(512), point(1024),
               point(2048), point(64, 1), point(64, 3), point(256, 9)]


def _klosets(root: Path, prefix: str, points: list[SweepPoint]) -> dict[str, Path]:
    paths = {}
    for p in points:
        path = root / (prefix + p.label.replace(" ", "-"))
        if not path.exists():
            Kloset.init(open_backend(str(path)), PASSPHRASE, config_overrides=p.overrides)
        paths[p.label] = path
    return paths


class Sweep:
    """One kloset per point; ``ingest(day, dump)`` stores a day's dump in each.

    ``physical(day)`` backs the cluster up into a second set of klosets: data
    files change page by page, not row by row, so the best chunk size may differ.
    """

    def __init__(self, repos: Repos, points: list[SweepPoint],
                 physical_points: list[SweepPoint] | None = None) -> None:
        self.repos = repos
        self.points = points
        self.physical_points = physical_points or []
        self.paths = _klosets(repos.root, "sweep-", points)
        self.physical_paths = _klosets(repos.root, "sweep-physical-", self.physical_points)

    def physical(self, day: int) -> dict[str, Any]:
        c = self.repos.cluster
        out: dict[str, Any] = {}
        for p in self.physical_points:
            path = self.physical_paths[p.label]
            stage = self.repos.pgkloset(path, "backup", "physical", "--dsn", c.dsn("postgres"),
                                        "--fast-checkpoint", "--bin-dir", str(c.bin_dir),
                                        "--json", "--tag", f"day-{day:02d}")
            m = run(f"physical sweep {p.label} day {day}", [stage], capture=True)
            doc = json.loads(m.stdout)
            res = Result(m, tree_bytes(path), {
                "overrides": p.overrides, "stored_bytes_new": doc["stored_bytes"],
                "logical_bytes": doc["logical_bytes"], "writer_seconds": doc["seconds"]})
            out[p.label] = res.to_json()
        return out

    def ingest(self, day: int, dump: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.points:
            path = self.paths[p.label]
            stage = self.repos.pgkloset(path, "backup", "stream", "--name", "bench.dump",
                                        "--json", "--tag", f"day-{day:02d}")
            m = run(f"sweep {p.label} day {day}", [stage], stdin_path=str(dump), capture=True)
            doc = json.loads(m.stdout)
            res = Result(m, tree_bytes(path), {
                "overrides": p.overrides, "stored_bytes_new": doc["stored_bytes"],
                "logical_bytes": doc["logical_bytes"], "writer_seconds": doc["seconds"]})
            out[p.label] = res.to_json()
        return out
