"""`make demo`: the main job on an embedded default, end to end.

Creates a throwaway kloset, backs up a generated stream twice (the second
with a small change, to show deduplication), lists, verifies and restores,
printing each `pgkloset` command as an operator would type it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile


def _run(args: list[str], env: dict[str, str], data: bytes | None = None) -> bytes:
    print(f"$ pgkloset {shlex.join(args)}" + (" < stream" if data is not None else ""), flush=True)
    proc = subprocess.run([sys.executable, "-m", "pgkloset_core.cli", *args], input=data,
                          env=env, capture_output=True, check=False)
    sys.stderr.write(proc.stderr.decode(errors="replace"))
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed: pgkloset {shlex.join(args)} (exit {proc.returncode})")
    return proc.stdout


def _stream(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)).hex() for _ in range(5000)]
    out, total = [], 0
    while total < size:
        line = f"{rng.randint(1, 10**9)}\t{' '.join(rng.choices(words, k=8))}\t{rng.random()}\n".encode()
        out.append(line)
        total += len(line)
    return b"".join(out)[:size]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pgkloset-demo-") as tmp:
        env = dict(os.environ, PGKLOSET_REPO=os.path.join(tmp, "kloset"),
                   PGKLOSET_PASSPHRASE="demo passphrase, never use in production")
        print(f"demo kloset: {env['PGKLOSET_REPO']}\n")
        _run(["init"], env)
        first = _stream(64 << 20, seed=1)
        r1 = json.loads(_run(["backup", "stream", "--name", "table.tsv", "--tag", "demo", "--json"], env, first))
        second = first[: 20 << 20] + b"one changed row\n" + first[20 << 20 :]
        r2 = json.loads(_run(["backup", "stream", "--name", "table.tsv", "--tag", "demo", "--json"], env, second))
        for label, r in (("first", r1), ("second", r2)):
            print(f"  {label} backup: {r['logical_bytes'] / 2**20:.1f} MiB read, "
                  f"{r['stored_bytes'] / 2**20:.2f} MiB stored, {r['seconds']:.2f} s")
        print(_run(["snapshots"], env).decode())
        print(_run(["check", "--read-data"], env).decode())
        restored = _run(["cat", r1["snapshot_id"][:8]], env)
        same = hashlib.sha256(restored).digest() == hashlib.sha256(first).digest()
        print(f"restored {len(restored)} bytes of the first snapshot: {'identical' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit("demo failed: restored bytes differ")
    print("\ndemo finished: the kloset was temporary and has been removed")


if __name__ == "__main__":
    main()
