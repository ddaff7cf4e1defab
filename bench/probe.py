"""A one-table restore that counts the bytes it reads from the kloset.

Run as a child process (``python -m bench.probe``) so its wall time, CPU and
RSS are measured like every other tool's. It calls the same library function
as ``pgkloset restore --table`` with the kloset's backend wrapped in a
counter: the figure is what the restore fetched from storage, not a guess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.restore_logical import resolve_snapshot, restore_logical
from pgkloset_core.storage import open_backend


class CountingBackend:
    """Delegates to a backend and counts the bytes and objects read."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.bytes_read = 0
        self.reads = 0

    def read(self, name: str) -> bytes:
        data: bytes = self._inner.read(name)
        self.bytes_read += len(data)
        self.reads += 1
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        data: bytes = self._inner.read_range(name, offset, length)
        self.bytes_read += len(data)
        self.reads += 1
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--snapshot", required=True)
    parser.add_argument("--to", help="target DSN (its dbname must exist)")
    parser.add_argument("--table", help="restore this table; without it, read the whole dump")
    parser.add_argument("--bin-dir")
    args = parser.parse_args(argv)
    backend = CountingBackend(open_backend(args.repo))
    kloset = Kloset.open(backend, os.environ["PGKLOSET_PASSPHRASE"])  # type: ignore[arg-type]
    snap = resolve_snapshot(kloset, args.snapshot)
    entries = [e for e in snap.entries if e.type == "stream"]  # a dump in parts has several
    before, reads = backend.bytes_read, backend.reads
    if args.table:
        restore_logical(kloset, snap, args.to, tables=[args.table], bin_dir=args.bin_dir)
    else:
        for entry in entries:
            for _data in kloset.read_entry(snap, entry):
                pass
    json.dump({"bytes_read": backend.bytes_read - before, "reads": backend.reads - reads,
               "snapshot_logical_bytes": sum(e.size for e in entries)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
