"""``python -m bench.run [--quick|--full]``: every contender on the same data, in one session.

Order of work: install missing peers, start a PostgreSQL 15 cluster (WAL
archived by pgBackRest), load the workload, then for each simulated day:
change the data, run the logical contenders (order rotated daily so load
noise does not always hit the same tool), the physical ones on the first
days, and feed that day's dump to the chunk-size sweep. Restores come last.
Results go to bench/results/*.json (rewritten after every day, so an
interrupted run keeps what it measured) and a ratio table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

from bench import report, tools
from bench.measure import BenchError, cpu_floor
from bench.sweep import FULL_POINTS, PHYSICAL_POINTS, QUICK_POINTS, Sweep
from bench.workload import ONE_TABLES, BenchCluster, WorkloadSpec
from pgkloset_core.errors import KlosetError

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("logical", "physical", "restore", "sweep")

PRESETS: dict[str, dict[str, Any]] = {
    # A few minutes on 2 cores: ~0.3 GB dump.
    "quick": {"scale": 10, "events": 400_000, "customers": 40_000, "days": 3,
              "physical_days": 2, "sweep_days": 2, "pairs": 3},
    # Tens of minutes to hours: ~3 GB dump, a month of days.
    "full": {"scale": 100, "events": 4_000_000, "customers": 400_000, "days": 30,
             "physical_days": 7, "sweep_days": 3, "pairs": 2},
}


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    disk = shutil.disk_usage("/")
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem,
            "kernel": platform.release(), "disk_free_bytes": disk.free,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small database, 3 days (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="larger database, 30 days")
    p.set_defaults(mode="quick")
    p.add_argument("--scale", type=int, help="pgbench scale factor")
    p.add_argument("--events", type=int, help="initial rows of the events table")
    p.add_argument("--customers", type=int, help="rows of the customers table")
    p.add_argument("--days", type=int, help="simulated days for logical backups")
    p.add_argument("--physical-days", type=int, help="days with physical backups")
    p.add_argument("--sweep-days", type=int, help="days fed to the chunk-size sweep")
    p.add_argument("--pairs", type=int,
                   help="extra back-to-back pg_dump / pgkloset logical pairs per day, each "
                        "pgkloset run into a copy of the kloset as the day found it "
                        "(the logical target is judged on these)")
    p.add_argument("--pair-env", metavar="VAR=VALUE",
                   help="in every pair also run pgkloset with this PGKLOSET_ variable set "
                        "(e.g. PGKLOSET_WORKER_NICE=0), so a setting and the default are "
                        "compared in the same run; the order of the three rotates")
    p.add_argument("--append-pct", type=float, default=2.0, help="events appended per day, %%")
    p.add_argument("--update-pct", type=float, default=1.0, help="events updated per day, %%")
    p.add_argument("--delete-pct", type=float, default=0.5, help="events deleted per day, %%")
    p.add_argument("--pgbench-tx", type=int, default=0,
                   help="pgbench transactions per day (default 0.1%% of the accounts)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run ({','.join(SECTIONS)})")
    p.add_argument("--workdir", default="/var/tmp/pgkloset-bench",
                   help="where the cluster and repositories live (must have room)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install peers")
    p.add_argument("--out", help="results file (default bench/results/MODE-TIMESTAMP.json)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.pair_env is not None:
        var, sep, _ = args.pair_env.partition("=")
        if not sep or not var.startswith("PGKLOSET_") or var in ("PGKLOSET_REPO",
                                                                   "PGKLOSET_PASSPHRASE"):
            p.error("--pair-env takes PGKLOSET_VAR=VALUE (not the repository or passphrase)")
        if args.pairs <= 0:
            p.error("--pair-env needs --pairs 1 or more")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.out = Path(args.out) if args.out else RESULTS / f"{args.mode}-{stamp}.json"
        self.workdir = Path(args.workdir) / f"run-{stamp}"
        self.spec = WorkloadSpec(scale=args.scale, events=args.events, customers=args.customers,
                                 append_pct=args.append_pct, update_pct=args.update_pct,
                                 delete_pct=args.delete_pct, pgbench_tx=args.pgbench_tx)
        self.doc: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "mode": args.mode,
            "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
            "machine": machine(), "workload": self.spec.to_json(), "sizes": {}, "changes": [],
            "pgkloset_rss_mib": [],
        }
        self.peers: dict[str, bool] = {}

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.out)

    def note_rss(self, res: tools.Result) -> None:
        for p in res.measurement.procs:
            if p.name == "pgkloset":
                self.doc["pgkloset_rss_mib"].append(round(p.maxrss_mib, 1))

    def main(self) -> int:
        args = self.args
        self.peers = (tools.ensure_peers(log) if not args.no_install else
                      {e: shutil.which(e) is not None for e in tools.PEER_PACKAGES})
        try:
            for d in (self.workdir.parent, self.workdir):
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o755)  # the postgres OS user must reach the cluster and pgBackRest's repo
        except OSError as exc:
            raise BenchError(f"cannot prepare the work directory {self.workdir}: "
                             f"{exc.strerror or exc}") from None
        log(f"work directory {self.workdir}; results {self.out}")
        started = time.monotonic()
        cluster = BenchCluster(self.workdir, self.spec, process_max=max(2, os.cpu_count() or 2),
                               with_pgbackrest=self.peers.get("pgbackrest", False)
                               and "physical" in args.only)
        try:
            self.doc["versions"] = tools.versions(cluster)
            log(f"loading the workload: {self.spec}")
            t = time.monotonic()
            cluster.load()
            self.doc["load_seconds"] = round(time.monotonic() - t, 1)
            repos = tools.Repos(self.workdir / "repos", cluster)
            repos.init(self.peers)
            self.overhead(repos, "start")
            sweep = Sweep(repos, FULL_POINTS if args.mode == "full" else QUICK_POINTS,
                          PHYSICAL_POINTS if "physical" in args.only else None) \
                if "sweep" in args.only and args.sweep_days > 0 else None
            for day in range(1, args.days + 1):
                self.one_day(cluster, repos, sweep, day)
                self.save()
            if "restore" in args.only:
                self.restores(cluster, repos)
            self.overhead(repos, "end")
        finally:
            cluster.stop()
            if not args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
        self.doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.doc["total_seconds"] = round(time.monotonic() - started, 1)
        self.doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        self.doc["summary"] = report.summarize(self.doc)
        self.save()
        print(report.render(self.doc))
        print(f"\nresults: {self.out}")
        return 0

    def overhead(self, repos: tools.Repos, when: str) -> None:
        """What any pgkloset command pays before work: interpreter, imports, Argon2 unlock."""
        res = tools.Result(tools.run(f"pgkloset snapshots ({when})", [repos.pgkloset(
            repos.kloset_logical, "snapshots", "--json")], capture=True))
        self.doc.setdefault("pgkloset_fixed_cost", {})[when] = res.to_json()
        log(f"pgkloset fixed cost ({when}): {res.measurement.wall_s:.2f}s wall, "
            f"{res.measurement.cpu_s:.2f}s CPU")

    def one_day(self, cluster: BenchCluster, repos: tools.Repos, sweep: Sweep | None,
                day: int) -> None:
        args = self.args
        if day > 1:
            t = time.monotonic()
            change = cluster.change_day()
            change["seconds"] = round(time.monotonic() - t, 1)
            self.doc["changes"].append(change)
        self.doc["sizes"][str(day)] = cluster.sizes()
        log(f"day {day}: database {self.doc['sizes'][str(day)]['database_bytes'] / 2**20:.0f} "
            f"MiB, load {os.getloadavg()[0]:.2f}")
        if "logical" in args.only:
            names = [n for n in tools.LOGICAL
                     if n in ("pg_dump", "pgkloset", "pgkloset_stream") or self.peers.get(n)]
            k = (day - 1) % len(names)
            before = self.workdir / "pairs-kloset"
            if args.pairs > 0:  # the kloset as the day finds it, for the paired runs
                shutil.copytree(repos.kloset_logical, before, copy_function=os.link)
            runs: dict[str, Any] = {}
            for name in names[k:] + names[:k]:
                res = tools.LOGICAL[name](repos, day)
                self.note_rss(res)
                runs[name] = res.to_json()
                log(f"  logical {name:<15} {res.measurement.wall_s:7.2f}s "
                    f"cpu {res.measurement.cpu_s:7.2f}s rss {runs[name]['tool_rss_mib']:6.1f}MiB"
                    + (f" repo {res.repo_bytes / 2**20:8.1f}MiB" if res.repo_bytes else ""))
            pairs = self.pairs(repos, day, before) if args.pairs > 0 else []
            self.doc.setdefault("logical", {"days": []})["days"].append(
                {"day": day, "order": names[k:] + names[:k], "runs": runs, "pairs": pairs})
        if "physical" in args.only and day <= args.physical_days:
            self.physical_day(cluster, repos, day)
        if sweep is not None and day <= args.sweep_days:
            dump = self.workdir / f"sweep-day{day}.dump"
            tools.dump_to_file(repos, dump, f"dump for sweep day {day}")
            got = sweep.ingest(day, dump)
            for label, run in got.items():
                self.doc["pgkloset_rss_mib"].append(run["tool_rss_mib"])
                log(f"  sweep {label:<14} {run['wall_s']:7.2f}s new "
                    f"{run['info']['stored_bytes_new'] / 2**20:8.1f}MiB repo "
                    f"{run['repo_bytes'] / 2**20:8.1f}MiB")
            self.doc.setdefault("sweep", {"days": []})["days"].append({"day": day, "runs": got})
            dump.unlink()
        if sweep is not None and sweep.physical_points and day <= min(args.sweep_days,
                                                                       args.physical_days):
            got = sweep.physical(day)
            for label, run in got.items():
                self.doc["pgkloset_rss_mib"].append(run["tool_rss_mib"])
                log(f"  physical sweep {label:<8} {run['wall_s']:7.2f}s new "
                    f"{run['info']['stored_bytes_new'] / 2**20:8.1f}MiB repo "
                    f"{run['repo_bytes'] / 2**20:8.1f}MiB")
            self.doc.setdefault("physical_sweep", {"days": []})["days"].append(
                {"day": day, "runs": got})

    def pairs(self, repos: tools.Repos, day: int, before: Path) -> list[dict[str, Any]]:
        """pg_dump and pgkloset back to back, ``--pairs`` times, which one first alternating.

        One run of each per day cannot resolve a 10% target on a host whose runs
        vary by 20%; back-to-back pairs share the host's state of the moment, and
        their ratios' median is what the logical target is judged on. Each
        pgkloset run goes into a hard-linked copy of the kloset as the day found
        it (kloset files are never rewritten in place), so every pair does the
        same work as the day's regular run and the measured kloset is untouched.
        With ``--pair-env`` a third run, pgkloset with that variable, joins each
        pair (the order of the three rotates): a setting judged against the
        default at the same moments, not in another hour's run.
        """
        alt = dict([self.args.pair_env.split("=", 1)]) if self.args.pair_env else None
        names = ["pgkloset", "pg_dump", *(["alt"] if alt else [])]
        out = []
        try:
            for i in range(self.args.pairs):
                k = (day + i) % len(names)
                order = names[k:] + names[:k]
                walls: dict[str, float] = {}
                busy: dict[str, float] = {}
                for name in order:
                    label = f"pair {i + 1} {name} day {day}"
                    if name == "pg_dump":
                        res = tools.logical_limit(repos, day, label)
                    else:
                        copy = self.workdir / "pair-kloset"
                        shutil.copytree(before, copy, copy_function=os.link)
                        try:
                            res = tools.logical_pgkloset(repos, day, copy, label,
                                                         env=alt if name == "alt" else None)
                        finally:
                            shutil.rmtree(copy, ignore_errors=True)
                        self.note_rss(res)
                    walls[name] = res.measurement.wall_s
                    busy[name] = res.measurement.host_busy_s
                ratio = walls["pgkloset"] / walls["pg_dump"]
                floor = cpu_floor(busy["pgkloset"], walls["pg_dump"])
                pair: dict[str, Any] = {"order": order, "pg_dump_wall_s": walls["pg_dump"],
                                        "pgkloset_wall_s": walls["pgkloset"],
                                        "ratio": round(ratio, 4),
                                        "pg_dump_host_busy_s": round(busy["pg_dump"], 2),
                                        "pgkloset_host_busy_s": round(busy["pgkloset"], 2),
                                        "cpu_floor": round(floor, 4)}
                line = (f"  pair {i + 1} ({' then '.join(order)}): pg_dump {walls['pg_dump']:.2f}s "
                        f"pgkloset {walls['pgkloset']:.2f}s ratio {ratio:.3f} "
                        f"(CPU floor {floor:.3f})")
                if alt:
                    pair.update(alt_env=self.args.pair_env, alt_wall_s=walls["alt"],
                                alt_ratio=round(walls["alt"] / walls["pg_dump"], 4))
                    line += f" | {self.args.pair_env} {walls['alt']:.2f}s ratio {pair['alt_ratio']:.3f}"
                out.append(pair)
                log(line)
        finally:
            shutil.rmtree(before, ignore_errors=True)
        return out

    def physical_day(self, cluster: BenchCluster, repos: tools.Repos, day: int) -> None:
        steps: list[tuple[str, Any]] = [
            ("pg_basebackup", lambda: tools.physical_limit(repos, day)),
            ("pgkloset", lambda: tools.physical_pgkloset(repos, day)),
        ]
        if cluster.pgbr is not None:
            kind = "full" if day == 1 else "incr"
            steps.append(("pgbackrest", lambda: tools.physical_pgbackrest(repos, day, kind)))
        k = (day - 1) % len(steps)
        runs: dict[str, Any] = {}
        for name, fn in steps[k:] + steps[:k]:
            res = fn()
            self.note_rss(res)
            runs[name] = res.to_json()
            log(f"  physical {name:<13} {res.measurement.wall_s:7.2f}s "
                f"cpu {res.measurement.cpu_s:7.2f}s rss {runs[name]['tool_rss_mib']:6.1f}MiB"
                + (f" repo {res.repo_bytes / 2**20:8.1f}MiB" if res.repo_bytes else ""))
        self.doc.setdefault("physical", {"days": []})["days"].append({"day": day, "runs": runs})

    def one_table(self, cluster: BenchCluster, repos: tools.Repos, dump: Path, snap: str,
                  table: str, sizes: dict[str, int], stored: int) -> dict[str, Any]:
        name = table.split(".", 1)[1]
        tools.createdb(cluster, "t_local")
        listing = tools.table_list(repos, dump, table, self.workdir / "one-table.list")
        c = tools.restore_pg_restore(repos, dump, "t_local", listing)
        tools.createdb(cluster, "t_kloset")
        d = tools.probe(repos, f"pgkloset restore {table}", "--snapshot", snap, "--to",
                        cluster.dsn("t_kloset"), "--table", table)
        self.note_rss(d)
        rows = [cluster.instance.scalar(f"SELECT count(*) FROM {table}", db)
                for db in ("t_local", "t_kloset")]
        for db in ("t_local", "t_kloset"):
            tools.dropdb(cluster, db)
        log(f"  restore {table}: pg_restore {c.measurement.wall_s:.2f}s read "
            f"{c.info['bytes_read'] / 2**20:.1f}MiB; pgkloset {d.measurement.wall_s:.2f}s read "
            f"{d.info['bytes_read'] / 2**20:.1f}MiB of {stored / 2**20:.1f}MiB")
        return {"table": table, "pg_restore": c.to_json(), "pgkloset": d.to_json(),
                "snapshot_stored_bytes": stored,
                "table_share_of_database": sizes[f"{name}_bytes"] / sizes["database_bytes"],
                "rows": rows, "same_rows": rows[0] == rows[1]}

    def restores(self, cluster: BenchCluster, repos: tools.Repos) -> None:
        out: dict[str, Any] = {}
        self.doc["restore"] = out
        logical = self.doc.get("logical", {}).get("days", [])
        if logical:
            snap = logical[-1]["runs"]["pgkloset"]["info"]["snapshot_id"]
            dump = self.workdir / "final.dump"
            made = tools.dump_to_file(repos, dump, "final dump to a local file")
            out["dump_to_file"] = made.to_json()
            # Whole database, into fresh empty databases of the same server.
            tools.createdb(cluster, "r_local")
            a = tools.restore_pg_restore(repos, dump, "r_local")
            tools.createdb(cluster, "r_kloset")
            b = tools.restore_pgkloset(repos, snap, "r_kloset")
            self.note_rss(b)
            same = [cluster.instance.scalar("SELECT count(*) FROM events", db)
                    for db in ("r_local", "r_kloset")]
            out["logical_full"] = {"pg_restore": a.to_json(), "pgkloset": b.to_json(),
                                   "events_rows": same, "same_rows": same[0] == same[1]}
            log(f"  restore full: pg_restore {a.measurement.wall_s:.2f}s, pgkloset "
                f"{b.measurement.wall_s:.2f}s (rows equal: {same[0] == same[1]})")
            for db in ("r_local", "r_kloset"):
                tools.dropdb(cluster, db)
            # One table out of the whole database, for a table early and one late in the dump.
            whole = tools.probe(repos, "pgkloset read whole snapshot", "--snapshot", snap)
            sizes = self.doc["sizes"][str(len(logical))]
            out["snapshot_stored_bytes"] = whole.info["bytes_read"]
            out["read_whole_snapshot"] = whole.to_json()
            out["one_table"] = []
            for table in ONE_TABLES:
                out["one_table"].append(self.one_table(cluster, repos, dump, snap, table, sizes,
                                                       whole.info["bytes_read"]))
            dump.unlink()
        physical = self.doc.get("physical", {}).get("days", [])
        if physical:
            snap = physical[-1]["runs"]["pgkloset"]["info"]["snapshot_id"]
            out["physical"] = self.physical_restores(cluster, repos, snap)
        self.save()

    def physical_restores(self, cluster: BenchCluster, repos: tools.Repos,
                          snap: str) -> dict[str, Any]:
        """Both tools' whole-cluster restores, twice, in both orders.

        On this guest the system time of the same 3.4 GB of writes varies
        up to threefold from run to run, and a tool's first restore also
        reads its repository from disk; with both orders neither tool
        always takes the colder run. The ratio uses the means.
        """
        root = self.workdir / "restored"
        root.mkdir(exist_ok=True)
        names = ["pgkloset"] + (["pgbackrest"] if cluster.pgbr is not None else [])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for order in (names, names[::-1]):
            for name in order:
                if name == "pgkloset":
                    res = tools.restore_physical_pgkloset(repos, snap, root / name)
                    self.note_rss(res)
                else:
                    res = tools.restore_physical_pgbackrest(repos, root / name)
                shutil.rmtree(root / name, ignore_errors=True)
                runs[name].append(res.to_json())
        phys: dict[str, Any] = {name: {**runs[name][0], "wall_s": mean(r["wall_s"] for r in runs[name]),
                                       "cpu_s": mean(r["cpu_s"] for r in runs[name])}
                                for name in names}
        phys["rounds"] = runs
        parts = []
        for name in names:
            each = " / ".join(f"{r['wall_s']:.2f}" for r in runs[name])
            parts.append(f"{name} {phys[name]['wall_s']:.2f}s ({each})")
        log("  restore physical (mean of both orders): " + ", ".join(parts))
        return phys


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        return bench.main()
    except (BenchError, KlosetError) as exc:
        log(f"benchmark failed: {exc}")
        bench.doc["error"] = str(exc)
        bench.save()  # what was measured before the failure stays readable
        return 1


if __name__ == "__main__":
    sys.exit(main())
