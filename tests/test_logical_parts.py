"""A logical backup dumped in parts (--streams), against real PostgreSQL 15 clusters.

The many-kinds-of-objects database (partitions, inheritance, large objects,
row security, ...) is backed up with three pg_dump processes side by side
and restored into a separate cluster: whole, in parallel, one moved table
alone, and as the single archive ``pgkloset cat`` writes for pg_restore.
Every restore is compared with the source, and the archive's table of
contents with that of a backup in one part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider
from tests.fixtures.logical_db import (
    PASSPHRASE,
    REPO_ROOT,
    build_kitchen,
    build_plain,
    error_lines,
    make_kloset,
    run_cli,
    schema_dump,
    snapshots,
    table_checksums,
)

DB = "lg_parts"


@pytest.fixture(scope="module")
def parted(pg15: LocalInstance, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The source, a kloset, and one backup of it in three streams."""
    build_kitchen(pg15, DB)
    repo = tmp_path_factory.mktemp("lgp") / "kloset"
    make_kloset(repo)
    env = {"PGKLOSET_DSN": pg15.dsn("postgres", tcp=True)}
    done = run_cli(repo, "backup", "logical", "--database", DB, "--streams", "3", "--json",
                   env=env)
    assert done.returncode == 0, done.stderr
    return {"repo": repo, "source": pg15, "env": env}


@pytest.fixture(scope="module")
def target(pg_provider: LocalInstanceProvider, parted: dict[str, Any]) -> Iterator[LocalInstance]:
    with pg_provider.start(15) as instance:
        glob = next(s for s in snapshots(parted["repo"]) if s.kind == "globals")
        done = run_cli(parted["repo"], "restore", glob.id, "--to", instance.dsn("postgres"))
        assert done.returncode == 0, done.stderr
        yield instance


def _logical(repo: Path) -> Any:
    return next(s for s in reversed(snapshots(repo)) if s.kind == "logical")


def _toc(repo: Path, snapshot: str, bin_dir: Path) -> Counter[str]:
    """The archive ``cat`` writes, listed by pg_restore -l: (desc, schema, name, owner) lines."""
    env = {**os.environ, "PGKLOSET_REPO": str(repo), "PGKLOSET_PASSPHRASE": PASSPHRASE}
    cat = subprocess.run([sys.executable, "-m", "pgkloset_core.cli", "cat", snapshot], env=env,
                         capture_output=True, check=True, cwd=REPO_ROOT)
    listed = subprocess.run([str(bin_dir / "pg_restore"), "-l"], input=cat.stdout,
                            capture_output=True, check=True).stdout.decode()
    # "3361; 0 16471 TABLE DATA app big postgres": leave out the ids and oids.
    return Counter(ln.split(" ", 3)[3] for ln in listed.splitlines()
                   if ln and not ln.startswith(";"))


def test_parts_are_recorded_and_tables_dumped_once(parted: dict[str, Any]) -> None:
    snap = _logical(parted["repo"])
    parts = snap.meta["dump_parts"]
    assert parts == [f"{DB}.dump.part1", f"{DB}.dump.part2"]
    moved = [tuple(t) for name in parts for t in snap.entry(name).meta["tables"]]
    assert moved and len(moved) == len(set(moved))
    # Every moved table is one the snapshot counted rows for, and each part has its map.
    assert {f"{s}.{t}" for s, t in moved} <= set(snap.meta["tables"])
    for name in [snap.meta["entry"], *parts]:
        assert snap.entry(name).meta["pg_dump_map"]["blocks"]


def test_archive_lists_what_a_single_dump_lists(parted: dict[str, Any],
                                                tmp_path: Path) -> None:
    source: LocalInstance = parted["source"]
    repo = parted["repo"]
    single = tmp_path / "single"
    make_kloset(single)
    done = run_cli(single, "backup", "logical", "--database", DB, "--streams", "1",
                   env=parted["env"])
    assert done.returncode == 0, done.stderr
    assert "dump_parts" not in _logical(single).meta
    bin_dir = source.binaries.bin_dir
    merged = _toc(repo, _logical(repo).id, bin_dir)
    assert merged == _toc(single, _logical(single).id, bin_dir)
    assert sum(n for line, n in merged.items() if line.startswith("TABLE DATA ")) >= 8


def test_full_restore_matches_source(parted: dict[str, Any], target: LocalInstance) -> None:
    done = run_cli(parted["repo"], "restore", "latest", "--database", DB, "--create",
                   "--to", target.dsn(DB))
    assert done.returncode == 0, done.stderr
    source: LocalInstance = parted["source"]
    assert schema_dump(target, DB) == schema_dump(source, DB)
    assert table_checksums(target, DB) == table_checksums(source, DB)
    assert target.scalar("SELECT convert_from(lo_get(oid), 'UTF8') FROM "
                         "pg_largeobject_metadata", DB) == "large object payload"


def test_parallel_restore_matches_source(parted: dict[str, Any], target: LocalInstance) -> None:
    done = run_cli(parted["repo"], "restore", "latest", "--database", DB, "--create",
                   "--jobs", "2", "--to", target.dsn("lg_parts_par"))
    assert done.returncode == 0, done.stderr
    assert table_checksums(target, "lg_parts_par") == table_checksums(parted["source"], DB)


def test_moved_table_restores_alone(parted: dict[str, Any], target: LocalInstance) -> None:
    snap = _logical(parted["repo"])
    moved = {f"{s}.{t}" for part in snap.meta["dump_parts"] for s, t in
             snap.entry(part).meta["tables"]}
    name = "app.product"  # needs no extension; a partition and an inheritance pair move too
    assert {name, "app.events_2023", "app.vehicle", "app.truck"} <= moved
    db = "lg_parts_one"
    done = run_cli(parted["repo"], "restore", "latest", "--database", DB, "--table", name,
                   "--create", "--to", target.dsn(db))
    assert done.returncode == 0, done.stderr
    restored = table_checksums(target, db)
    assert list(restored) == [name]
    assert restored[name] == table_checksums(parted["source"], DB)[name]


def test_later_backup_follows_every_part(pg15: LocalInstance, tmp_path: Path,
                                         pg_shared_dir: Path) -> None:
    """A second backup in parts deduplicates against the first; a drill restores it."""
    db = "lg_parts_plain"
    build_plain(pg15, db, rows=60000)
    repo = tmp_path / "kloset"
    make_kloset(repo)
    env = {"PGKLOSET_DSN": pg15.dsn("postgres", tcp=True)}
    for _ in range(2):
        done = run_cli(repo, "backup", "logical", "--database", db, "--streams", "2", "--json",
                       env=env)
        assert done.returncode == 0, done.stderr
    first, second = [s for s in snapshots(repo) if s.kind == "logical"]
    assert second.meta["dump_parts"] == [f"{db}.dump.part1"]
    assert second.summary["followed_bytes"] > 0.5 * second.summary["logical_bytes"]
    assert second.summary["stored_bytes"] < 0.1 * first.summary["stored_bytes"]
    result = json.loads(done.stdout)
    assert next(r for r in result if r["kind"] == "logical")["total_rows"] == 120000
    drill = run_cli(repo, "drill", "latest", "--work-dir", str(pg_shared_dir))
    assert drill.returncode == 0, drill.stderr
    assert "ok   rows shop.item: expected 60000, got 60000" in drill.stdout
    assert "result: PASSED" in drill.stdout


def test_streams_refused_with_directory_format(parted: dict[str, Any]) -> None:
    done = run_cli(parted["repo"], "backup", "logical", "--database", DB, "--format",
                   "directory", "--streams", "2", env=parted["env"])
    assert done.returncode != 0
    assert error_lines(done) == ["pgkloset: error: --streams is for the custom format "
                                 "(directory format has --jobs)"]
    done = run_cli(parted["repo"], "backup", "logical", "--database", DB, "--streams", "9",
                   env=parted["env"])
    assert done.returncode != 0 and "--streams" in done.stderr


def test_a_failing_part_commits_nothing(parted: dict[str, Any], tmp_path: Path) -> None:
    """A part's pg_dump fails: its error is the one reported, the main dump is stopped."""
    source: LocalInstance = parted["source"]
    real = source.binaries.bin_dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in real.iterdir():
        (bin_dir / tool.name).symlink_to(tool)
    (bin_dir / "pg_dump").unlink()
    (bin_dir / "pg_dump").write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = --data-only ] && { echo "pg_dump: error: part refused" >&2;'
        " exit 1; }; done\n"
        f'exec {real / "pg_dump"} "$@"\n')
    (bin_dir / "pg_dump").chmod(0o755)
    before = [s.id for s in snapshots(parted["repo"])]
    done = run_cli(parted["repo"], "backup", "logical", "--database", DB, "--streams", "2",
                   "--bin-dir", str(bin_dir), env=parted["env"])
    assert done.returncode != 0
    lines = error_lines(done)
    assert len(lines) == 1 and "pg_dump exited with code 1" in lines[0], done.stderr
    assert "part refused" in lines[0]
    after = [s for s in snapshots(parted["repo"]) if s.id not in before]
    assert all(s.kind == "globals" for s in after)  # the database's snapshot was not made
