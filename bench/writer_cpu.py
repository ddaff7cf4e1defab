"""pgkloset's own CPU for one dump, with no pg_dump beside it.

``python -m bench.writer_cpu KLOSET DUMP_FILE`` feeds a saved custom-format
dump (``pg_dump -Fc -Z0 -f DUMP_FILE``) through a pipe from ``cat`` into the
same writer path ``backup logical`` takes: the cutter following the
database's previous dump in the kloset, the dump map, sealing and packing.
It prints one JSON line: wall seconds, user and system CPU-seconds of this
process (``cat`` not counted), bytes followed, new blobs, peak RSS.

On a shared two-core host pg_dump's own time moves by ±25% from run to
run, which hides a change of a CPU-second in pgkloset; this takes pg_dump
and the server out, so two versions of the code can be compared on the same
bytes (run each against a fresh copy of the same kloset, alternating).
Passphrase as for the CLI (``PGKLOSET_PASSPHRASE[_FILE]`` or a prompt). A
dump that cannot be read, or a ``cat`` that fails, commits nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time

from pgkloset_core.cli_common import read_passphrase
from pgkloset_core.errors import KlosetError
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.dumpmap import DUMP_MAP_KEY, DumpScanner
from pgkloset_core.postgres.logical import dump_entry_name, previous_dumps
from pgkloset_core.storage import open_backend


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.writer_cpu", description=__doc__.split("\n")[0])
    ap.add_argument("kloset", help="kloset URL or path (an initialised one)")
    ap.add_argument("dump", help="a custom-format dump file made with -Z0")
    ap.add_argument("--database", default="bench", help="database name the dump is stored under")
    args = ap.parse_args()
    try:
        with open(args.dump, "rb") as dump:
            print(json.dumps(measure(args.kloset, dump, args.database)))
    except (OSError, KlosetError) as exc:
        print(f"writer_cpu: error: {exc}", file=sys.stderr)
        return 1
    return 0


def measure(url: str, dump: io.BufferedReader, database: str) -> dict[str, object]:
    kloset = Kloset.open(open_backend(url), read_passphrase())
    previous = previous_dumps(kloset, [database]).get(database)
    name = dump_entry_name(database)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with subprocess.Popen(["cat"], stdin=dump, stdout=subprocess.PIPE) as cat:
        assert cat.stdout is not None
        meta = {"database": database, "format": "custom", "entry": name}
        with kloset.writer(kind="logical", meta=meta, lock=None) as writer:
            scanner = DumpScanner()
            clean = previous.clean if previous else frozenset()
            entry = writer.add_stream(name, cat.stdout,
                                      observe=lambda data, blob_id: scanner.feed(data, blob_id in clean),
                                      previous=previous.cuts if previous else None)
            if cat.wait() != 0:
                raise OSError(f"reading {dump.name} failed (cat exited {cat.returncode})")
            found = scanner.finish()
            if found is not None:
                entry.meta[DUMP_MAP_KEY] = found.to_json()
            snap = writer.commit()
    after, end = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {
        "wall_s": round(end - start, 2),
        "user_s": round(after.ru_utime - before.ru_utime, 2),
        "sys_s": round(after.ru_stime - before.ru_stime, 2),
        "followed_bytes": snap.summary["followed_bytes"],
        "new_blobs": snap.summary["new_blobs"],
        "mapped": found is not None,
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
