"""The contenders: how each tool is installed, initialised and run.

Every command is a real child process measured by bench.measure; pgkloset
runs through its CLI exactly as an operator would. Peers run the way their
documentation recommends for PostgreSQL dumps, encrypted and with zstd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import BenchError, Measurement, Stage, run, tree_bytes

__all__ = ["BenchError", "Repos", "Result", "run", "ensure_peers", "versions"]
from bench.workload import DB, BenchCluster
from pgkloset_core.postgres.pgenv import stdio_buffered

PASSPHRASE = "bench-passphrase-not-secret"
PEER_PACKAGES = {"restic": "restic", "borg": "borgbackup", "pgbackrest": "pgbackrest"}


def ensure_peers(log: Callable[[str], None]) -> dict[str, bool]:
    """Install restic, borg and pgBackRest from Debian when missing (needs root)."""
    missing = [pkg for exe, pkg in PEER_PACKAGES.items() if shutil.which(exe) is None]
    if missing:
        if os.geteuid() != 0:
            log(f"not root: cannot install {', '.join(missing)}; those peers are skipped "
                "(run as root or `apt-get install` them)")
        else:
            log(f"installing Debian packages: {' '.join(missing)}")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False,
                           capture_output=True)
            done = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                log(f"apt-get install failed: {done.stderr.strip()[-500:]}")
    return {exe: shutil.which(exe) is not None for exe in PEER_PACKAGES}


def versions(cluster: BenchCluster) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except OSError:
            return "missing"
        return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 \
            else "missing"

    return {
        "postgres": cluster.instance.binaries.version,
        "pg_dump": first_line([cluster.tool("pg_dump"), "--version"]),
        "restic": first_line(["restic", "version"]),
        "borg": first_line(["borg", "--version"]),
        "pgbackrest": first_line(["pgbackrest", "version"]),
        "pgkloset": first_line([sys.executable, "-m", "pgkloset_core.cli", "--version"]),
        "python": sys.version.split()[0],
    }


@dataclass
class Result:
    """A measurement plus what the tool reported and the repository size after it."""

    measurement: Measurement
    repo_bytes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = self.measurement.to_json()
        # The backup tool is the last stage (pg_dump | restic: restic's own RSS).
        doc["tool_rss_mib"] = round(self.measurement.procs[-1].maxrss_mib, 1)
        doc["repo_bytes"] = self.repo_bytes
        doc["info"] = self.info
        return doc


class Repos:
    """Where every repository of the run lives, and the tools' environments."""

    def __init__(self, root: Path, cluster: BenchCluster) -> None:
        self.root = root
        self.cluster = cluster
        root.mkdir(parents=True, exist_ok=True)
        self.kloset_logical = root / "pgkloset-logical"
        self.kloset_physical = root / "pgkloset-physical"
        self.kloset_stream = root / "pgkloset-stream"
        self.restic = root / "restic"
        self.borg = root / "borg"
        self.cache = root / "cache"
        self.cache.mkdir(exist_ok=True)

    # --------------------------------------------------------------- envs

    def kloset_env(self, repo: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGKLOSET_REPO=str(repo), PGKLOSET_PASSPHRASE=PASSPHRASE)
        return env

    def restic_env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": PASSPHRASE, "RESTIC_REPOSITORY": str(self.restic),
                "RESTIC_CACHE_DIR": str(self.cache / "restic")}

    def borg_env(self) -> dict[str, str]:
        return {**os.environ, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(self.cache),
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def pgkloset(self, repo: Path, *args: str) -> Stage:
        return Stage("pgkloset", [sys.executable, "-m", "pgkloset_core.cli", *args],
                     env=self.kloset_env(repo))

    def pg_dump(self, *extra: str) -> Stage:
        return Stage("pg_dump", [self.cluster.tool("pg_dump"), "-Fc", "-Z0", *extra, "-d", DB],
                     env=self.cluster.env())

    # -------------------------------------------------------------- init

    def init(self, peers: dict[str, bool]) -> None:
        for repo in (self.kloset_logical, self.kloset_physical, self.kloset_stream):
            if not repo.exists():
                run(f"init {repo.name}", [self.pgkloset(repo, "init")])
        if peers.get("restic") and not self.restic.exists():
            run("restic init", [Stage("restic", ["restic", "init", "--repository-version", "2"],
                                      env=self.restic_env())])
        if peers.get("borg") and not self.borg.exists():
            run("borg init", [Stage("borg", ["borg", "init", "--encryption", "repokey-blake2",
                                             str(self.borg)], env=self.borg_env())])


# ------------------------------------------------------------------ logical


def logical_limit(repos: Repos, day: int, label: str = "") -> Result:
    return Result(run(label or f"pg_dump day {day}", [repos.pg_dump()]))


def logical_pgkloset(repos: Repos, day: int, repo: Path | None = None,
                     label: str = "", env: dict[str, str] | None = None) -> Result:
    """``backup logical`` into the run's kloset, or into ``repo`` (a paired run's copy);
    ``env`` adds variables (``--pair-env``)."""
    repo = repo or repos.kloset_logical
    stage = repos.pgkloset(repo, "backup", "logical", "--dsn",
                           repos.cluster.dsn(), "--database", DB, "--bin-dir",
                           str(repos.cluster.bin_dir), "--json", "--tag", f"day-{day:02d}")
    if env:
        stage = Stage(stage.name, stage.argv, env={**(stage.env or {}), **env})
    m = run(label or f"pgkloset logical day {day}", [stage], capture=True)
    results = json.loads(m.stdout)
    db = next(r for r in results if r["kind"] == "logical")
    info = {"snapshot_id": db["snapshot_id"], "logical_bytes": db["logical_bytes"],
            "stored_bytes_new": sum(int(r["stored_bytes"]) for r in results),
            "writer_seconds": db["seconds"]}
    return Result(m, tree_bytes(repo), info)


def logical_pgkloset_stream(repos: Repos, day: int) -> Result:
    """Diagnostic: the bare pipeline, ``pg_dump | pgkloset backup stream``.

    No globals snapshot, no exported snapshot or row counts: the difference to
    ``backup logical`` is what those cost.
    """
    stage = repos.pgkloset(repos.kloset_stream, "backup", "stream", "--name", "bench.dump",
                           "--json", "--tag", f"day-{day:02d}")
    dump = repos.pg_dump()  # buffered as backup logical buffers it (pgenv.stdio_buffered)
    dump = Stage(dump.name, stdio_buffered(dump.argv, stdout=True), env=dump.env)
    m = run(f"pg_dump | pgkloset backup stream day {day}", [dump, stage], capture=True)
    doc = json.loads(m.stdout)
    return Result(m, tree_bytes(repos.kloset_stream), {
        "logical_bytes": doc["logical_bytes"], "stored_bytes_new": doc["stored_bytes"],
        "writer_seconds": doc["seconds"]})


def logical_restic(repos: Repos, day: int) -> Result:
    restic = Stage("restic", ["restic", "backup", "--stdin", "--stdin-filename", "bench.dump",
                              "--host", "bench", "--tag", f"day-{day:02d}", "--json", "--quiet"],
                   env=repos.restic_env())
    m = run(f"restic day {day}", [repos.pg_dump(), restic], capture=True)
    info: dict[str, Any] = {}
    for line in m.stdout.splitlines():
        if '"summary"' in line:
            doc = json.loads(line)
            info = {"data_added": doc.get("data_added"),
                    "total_bytes_processed": doc.get("total_bytes_processed")}
    return Result(m, tree_bytes(repos.restic), info)


def logical_borg(repos: Repos, day: int) -> Result:
    borg = Stage("borg", ["borg", "create", "--compression", "zstd,3", "--json",
                          f"{repos.borg}::day-{day:02d}", "-"], env=repos.borg_env())
    m = run(f"borg day {day}", [repos.pg_dump(), borg], capture=True)
    info: dict[str, Any] = {}
    try:
        stats = json.loads(m.stdout)["archive"]["stats"]
        info = {"deduplicated_size": stats.get("deduplicated_size"),
                "original_size": stats.get("original_size")}
    except (ValueError, KeyError):
        pass
    return Result(m, tree_bytes(repos.borg), info)


LOGICAL: dict[str, Callable[[Repos, int], Result]] = {
    "pg_dump": logical_limit, "pgkloset": logical_pgkloset, "restic": logical_restic,
    "borg": logical_borg, "pgkloset_stream": logical_pgkloset_stream,
}


# ----------------------------------------------------------------- physical


def physical_limit(repos: Repos, day: int) -> Result:
    c = repos.cluster
    stage = Stage("pg_basebackup", [c.tool("pg_basebackup"), "-D", "-", "-Ft", "-X", "fetch",
                                    "-c", "fast", "--manifest-checksums=CRC32C"],
                  env=c.env("postgres"))
    return Result(run(f"pg_basebackup day {day}", [stage]))


def physical_pgkloset(repos: Repos, day: int) -> Result:
    c = repos.cluster
    stage = repos.pgkloset(repos.kloset_physical, "backup", "physical", "--dsn",
                           c.dsn("postgres"), "--fast-checkpoint", "--bin-dir",
                           str(c.bin_dir), "--json", "--tag", f"day-{day:02d}")
    m = run(f"pgkloset physical day {day}", [stage], capture=True)
    doc = json.loads(m.stdout)
    info = {k: doc.get(k) for k in ("snapshot_id", "logical_bytes", "stored_bytes", "seconds",
                                     "file_count")}
    return Result(m, tree_bytes(repos.kloset_physical), info)


def physical_pgbackrest(repos: Repos, day: int, kind: str) -> Result:
    c = repos.cluster
    assert c.pgbr is not None
    stage = Stage("pgbackrest", c.pgbackrest_argv("backup", f"--type={kind}"), cwd="/")
    m = run(f"pgbackrest {kind} day {day}", [stage])
    repo = c.pgbr.repo
    info = {"type": kind, "backup_dir_bytes": tree_bytes(repo / "backup"),
            "archive_dir_bytes": tree_bytes(repo / "archive"),
            "process_max": c.pgbr.process_max}
    return Result(m, tree_bytes(repo), info)


# ------------------------------------------------------------------ restore


def createdb(cluster: BenchCluster, name: str) -> None:
    cluster.instance.execute(f"DROP DATABASE IF EXISTS {name}")
    cluster.instance.execute(f"CREATE DATABASE {name}")


def dropdb(cluster: BenchCluster, name: str) -> None:
    cluster.instance.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def dump_to_file(repos: Repos, path: Path, label: str) -> Result:
    return Result(run(label, [repos.pg_dump("-f", str(path))]), info={"bytes": path.stat().st_size}
                  if path.exists() else {})


def restore_pg_restore(repos: Repos, dump: Path, target: str,
                       list_file: Path | None = None) -> Result:
    c = repos.cluster
    argv = [c.tool("pg_restore"), "--exit-on-error", "--single-transaction", "-d", target]
    if list_file is not None:
        argv += ["-L", str(list_file)]
    m = run(f"pg_restore into {target}", [Stage("pg_restore", [*argv, str(dump)],
                                                   env=c.env(target))])
    return Result(m, info={"bytes_read": m.procs[0].rchar, "dump_bytes": dump.stat().st_size})


def table_list(repos: Repos, dump: Path, table: str, out: Path) -> Path:
    """pg_restore -l filtered to one table, its data, indexes and constraints."""
    c = repos.cluster
    toc = subprocess.run([c.tool("pg_restore"), "-l", str(dump)], capture_output=True,
                         text=True, check=True).stdout
    schema, name = table.split(".", 1)
    pattern = re.compile(rf" {re.escape(schema)} {re.escape(name)}(_\w+)? ")
    keep = [line for line in toc.splitlines()
            if line and not line.startswith(";") and pattern.search(line)]
    if not keep:
        raise BenchError(f"table {table} not found in {dump}")
    out.write_text("\n".join(keep) + "\n")
    return out


def restore_pgkloset(repos: Repos, snapshot: str, target: str) -> Result:
    c = repos.cluster
    stage = repos.pgkloset(repos.kloset_logical, "restore", snapshot, "--to", c.dsn(target),
                           "--bin-dir", str(c.bin_dir), "--json")
    m = run(f"pgkloset restore into {target}", [stage], capture=True)
    return Result(m, info=json.loads(m.stdout))


def probe(repos: Repos, label: str, *args: str) -> Result:
    c = repos.cluster
    stage = Stage("pgkloset", [sys.executable, "-m", "bench.probe", "--repo",
                               str(repos.kloset_logical), "--bin-dir", str(c.bin_dir), *args],
                  env=repos.kloset_env(repos.kloset_logical),
                  cwd=str(Path(__file__).resolve().parent.parent))
    m = run(label, [stage], capture=True)
    return Result(m, info=json.loads(m.stdout))


def restore_physical_pgkloset(repos: Repos, snapshot: str, target: Path) -> Result:
    stage = repos.pgkloset(repos.kloset_physical, "restore", snapshot, "--to-dir", str(target),
                           "--json")
    m = run("pgkloset physical restore", [stage], capture=True)
    doc = json.loads(m.stdout)
    return Result(m, info={k: doc.get(k) for k in ("file_count", "bytes_written", "verified",
                                                    "seconds")})


def restore_physical_pgbackrest(repos: Repos, target: Path) -> Result:
    c = repos.cluster
    target.mkdir(mode=0o700)
    if c.owner:
        os.chown(target, *c.owner)
    stage = Stage("pgbackrest", c.pgbackrest_argv("restore", f"--pg1-path={target}"), cwd="/")
    m = run("pgbackrest restore", [stage])
    return Result(m, info={"bytes_written": tree_bytes(target)})
