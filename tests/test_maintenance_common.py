"""Helpers shared by the maintenance tests (forget, prune, locks); holds no tests itself.

Klosets are real local directories made by the library with a cheap KDF; the
CLI runs as a real ``python -m pgkloset_core.cli`` subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgkloset_core.kloset.keys import KdfCost
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend

PASSPHRASE = "maintenance test passphrase"
CLI = [sys.executable, "-m", "pgkloset_core.cli"]
ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@dataclass
class Repo:
    """A kloset directory plus ways to drive it through the CLI."""

    path: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, PGKLOSET_REPO=str(self.path), PGKLOSET_PASSPHRASE=PASSPHRASE)
        env.pop("PGKLOSET_PASSPHRASE_FILE", None)
        env.update(extra)
        return env

    def run(self, *args: str, input: bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([*CLI, *args], input=input, capture_output=True, cwd=ROOT,
                              env=env or self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pgkloset {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.decode()}")
        return proc

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.run(*args, "--json", **kwargs).stdout)

    def popen(self, *args: str, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen([*CLI, *args], cwd=ROOT, env=env or self.env(), **kwargs)

    def open(self) -> Kloset:
        return Kloset.open(open_backend(str(self.path)), PASSPHRASE)

    def backup(self, name: str, data: bytes, *extra: str) -> str:
        return self.json("backup", "stream", "--name", name, *extra, input=data)["snapshot_id"]

    def snapshot_ids(self) -> set[str]:
        return {s["id"] for s in self.json("snapshots")}

    def cat(self, snapshot_id: str) -> bytes:
        return self.run("cat", snapshot_id).stdout

    def names(self, prefix: str) -> list[str]:
        folder = self.path / prefix
        if not folder.exists():
            return []
        return sorted(str(p.relative_to(self.path)) for p in folder.rglob("*")
                      if p.is_file() and ".tmp-" not in p.name)

    def check_read_data(self) -> dict[str, Any]:
        proc = self.run("check", "--read-data", "--json", check=False)
        report = json.loads(proc.stdout)
        assert proc.returncode == 0 and report["ok"], report["problems"]
        return report


SMALL_CHUNKS = {"min_chunk": 16 * 1024, "avg_chunk": 64 * 1024, "max_chunk": 256 * 1024}


def make_repo(path: Path, *, pack_size: int | None = None, **overrides: Any) -> Repo:
    """A new kloset; ``overrides`` are KlosetConfig fields (e.g. ``**SMALL_CHUNKS``)."""
    if pack_size:
        overrides["pack_size"] = pack_size
    Kloset.init(open_backend(str(path)), PASSPHRASE, kdf=KdfCost(1, 1024, 1),
                config_overrides=overrides)
    return Repo(path)


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_usage(path: Path) -> int:
    """Bytes of every file under ``path`` (what the kloset occupies)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pgkloset: error: "), err
    for needle in needles:
        assert needle in err, err
    return err
