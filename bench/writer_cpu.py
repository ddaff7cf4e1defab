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
Passphrase: ``PGKLOSET_PASSPHRASE``, as for the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time

from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.postgres.dumpmap import DUMP_MAP_KEY, DumpScanner
from pgkloset_core.postgres.logical import dump_entry_name, previous_dumps
from pgkloset_core.storage import open_backend


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.writer_cpu", description=__doc__.split("\n")[0])
    ap.add_argument("kloset", help="kloset URL or path (an initialised one)")
    ap.add_argument("dump", help="a custom-format dump file made with -Z0")
    ap.add_argument("--database", default="bench", help="database name the dump is stored under")
    args = ap.parse_args()
    kloset = Kloset.open(open_backend(args.kloset), os.environ["PGKLOSET_PASSPHRASE"])
    previous = previous_dumps(kloset, [args.database]).get(args.database)
    name = dump_entry_name(args.database)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with subprocess.Popen(["cat", args.dump], stdout=subprocess.PIPE) as cat:
        assert cat.stdout is not None
        meta = {"database": args.database, "format": "custom", "entry": name}
        with kloset.writer(kind="logical", meta=meta, lock=None) as writer:
            scanner = DumpScanner()
            clean = previous.clean if previous else frozenset()
            entry = writer.add_stream(name, cat.stdout,
                                      observe=lambda data, blob_id: scanner.feed(data, blob_id in clean),
                                      previous=previous.cuts if previous else None)
            found = scanner.finish()
            if found is not None:
                entry.meta[DUMP_MAP_KEY] = found.to_json()
            snap = writer.commit()
    after, end = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(json.dumps({
        "wall_s": round(end - start, 2),
        "user_s": round(after.ru_utime - before.ru_utime, 2),
        "sys_s": round(after.ru_stime - before.ru_stime, 2),
        "followed_bytes": snap.summary["followed_bytes"],
        "new_blobs": snap.summary["new_blobs"],
        "mapped": found is not None,
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
