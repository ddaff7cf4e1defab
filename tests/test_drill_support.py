"""Helpers shared by the drill tests (klosets, the CLI, re-sealed snapshots, leftovers).

Also tests the small pieces that need no server: SQL check files and the report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgkloset_core.kloset.keys import KdfCost
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.postgres.drill import CheckResult, DrillReport, SqlCheck, postgres_pids_under
from pgkloset_core.storage import open_backend

PASSPHRASE = "drill-test-passphrase"
CHEAP_KDF = KdfCost(1, 1024, 1)
CLI = [sys.executable, "-m", "pgkloset_core.cli"]
REPO_ROOT = Path(__file__).resolve().parents[1]
DROP = object()  # a transform result: leave the entry out

Transform = Callable[[Entry, bytes], "bytes | object"]


def new_kloset(path: Path) -> Kloset:
    return Kloset.init(open_backend(str(path)), PASSPHRASE, kdf=CHEAP_KDF)


def cli_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGKLOSET"))}
    env.update(PGKLOSET_REPO=str(repo), PGKLOSET_PASSPHRASE=PASSPHRASE,
               PYTHONPATH=str(REPO_ROOT))
    return env


def run_cli(repo: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=cli_env(repo),
                          cwd=REPO_ROOT, timeout=timeout)


def rewrite_snapshot(kloset: Kloset, snap: Snapshot, transform: Transform,
                     meta: dict[str, Any] | None = None) -> Snapshot:
    """A new, validly sealed snapshot whose entries went through `transform`."""
    with kloset.writer(kind=snap.kind, tags=list(snap.tags),
                       meta=dict(snap.meta if meta is None else meta)) as writer:
        for entry in snap.entries:
            attrs = {k: getattr(entry, k) for k in ("mode", "uid", "gid", "user", "group",
                                                    "mtime") if getattr(entry, k) is not None}
            if entry.meta:
                attrs["meta"] = dict(entry.meta)
            if entry.type in ("dir", "symlink"):
                if transform(entry, b"") is DROP:
                    continue
                if entry.target is not None:
                    attrs["target"] = entry.target
                writer.add_special(entry.name, entry.type, **attrs)
                continue
            data = b"".join(kloset.read_entry(snap, entry))
            out = transform(entry, data)
            if out is DROP:
                continue
            assert isinstance(out, bytes)
            writer.add_bytes(entry.name, out, entry_type=entry.type, **attrs)
        return writer.commit()


def leftovers(work_dir: Path) -> tuple[list[str], list[int]]:
    """What a drill left in its work dir: files and processes running there."""
    files = sorted(p.name for p in work_dir.iterdir()) if work_dir.exists() else []
    return files, postgres_pids_under(work_dir)


def assert_clean(work_dir: Path) -> None:
    files, pids = leftovers(work_dir)
    assert files == [], f"drill left files behind: {files}"
    assert pids == [], f"drill left processes behind: {pids}"


class StderrLines:
    """Collects a child's stderr lines as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if needle in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never appeared in stderr: {self.lines}")

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self.lines)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- unit tests


def test_sql_check_from_file(tmp_path: Path) -> None:
    path = tmp_path / "orders_present.sql"
    path.write_text("-- database: shop\nSELECT count(*) > 0 FROM orders\n")
    check = SqlCheck.from_file(path)
    assert check.name == "orders_present.sql"
    assert check.database == "shop"
    assert "count(*)" in check.sql


def test_report_json_names_first_failure() -> None:
    report = DrillReport(snapshot_id="ab" * 32, kind="logical", database="shop")
    report.add(CheckResult("rows public.t", True, 3, 3))
    report.add(CheckResult("rows public.u", False, 2, 0, "rows public.u: expected 2 rows, "
                                                          "restored 0"))
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["first_failure"] == "rows public.u: expected 2 rows, restored 0"
    assert [c["passed"] for c in doc["checks"]] == [True, False]
    assert report.first_failure() == doc["first_failure"]
