"""The workload: a PostgreSQL 15 cluster with pgbench data and tables with real entropy.

pgbench's tables are highly regular; real databases are not, so next to them
live append-mostly tables whose rows carry text drawn from a vocabulary,
JSON documents, UUIDs, hex session ids and jittered timestamps, all made in
SQL so no data travels through Python. A simulated "day" appends rows,
updates some (recent rows mostly, as applications do), deletes the oldest,
runs pgbench transactions and vacuums, so each day's dump shifts the way a
real one does.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import BenchError
from pgkloset_core.postgres.instance import LocalInstance, LocalInstanceProvider

DB = "bench"
STANZA = "bench"
# Tables restored alone, both a few % of the database or less: pg_dump writes table data
# in name order, so customers comes first in the dump and pgbench_tellers last; a restore
# that streams the dump stops early for the first and reads nearly everything for the last.
ONE_TABLES = ("public.customers", "public.pgbench_tellers")

_VOCABULARY = (
    "the of and to in is it that was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "order invoice shipped pending refund customer account balance payment delivered review "
    "warehouse parcel address street city coupon discount subscription renewal cancelled "
    "premium standard basket checkout session browser mobile tablet desktop error retry"
)
_WORDS = _VOCABULARY.split()
_AGENTS = ["Mozilla/5.0 (X11; Linux x86_64)", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1)",
           "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)", "curl/8.4.0",
           "Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "okhttp/4.12.0"]
_KINDS = ["page_view", "click", "purchase", "signup", "login", "logout", "search",
          "add_to_cart", "refund", "review"]


def _array(items: list[str]) -> str:
    return "ARRAY[" + ",".join("'" + i.replace("'", "''") + "'" for i in items) + "]"


SCHEMA_SQL = f"""
CREATE OR REPLACE FUNCTION bench_words(n int) RETURNS text LANGUAGE sql VOLATILE AS $$
  SELECT string_agg(({_array(_WORDS)})[1 + floor(random() * {len(_WORDS)})::int], ' ')
  FROM generate_series(1, n)
$$;
CREATE OR REPLACE FUNCTION bench_customer(n bigint) RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
  SELECT md5('customer-' || n)::uuid
$$;
CREATE TABLE customers (
  id uuid PRIMARY KEY,
  name text NOT NULL,
  email text NOT NULL,
  country text NOT NULL,
  created_at timestamptz NOT NULL,
  profile jsonb NOT NULL
);
CREATE INDEX customers_email ON customers (email);
CREATE TABLE events (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL,
  customer_id uuid NOT NULL,
  kind text NOT NULL,
  status text NOT NULL,
  session text NOT NULL,
  payload jsonb NOT NULL,
  note text
);
CREATE INDEX events_at ON events (at);
CREATE INDEX events_customer ON events (customer_id);
"""


def customers_sql(first: int, last: int) -> str:
    return f"""
INSERT INTO customers
SELECT bench_customer(g),
       initcap(bench_words(2)),
       'user' || g || '.' || substr(md5(random()::text), 1, 6) || '@example.' ||
         ({_array(["com", "org", "net", "io", "de", "fr"])})[1 + floor(random() * 6)::int],
       ({_array(["FR", "DE", "US", "GB", "ES", "IT", "NL", "BR", "JP", "IN"])})
         [1 + floor(random() * 10)::int],
       timestamptz '2024-01-01' + g * interval '37 seconds' + random() * interval '30 s',
       jsonb_build_object('plan', ({_array(["free", "pro", "team", "enterprise"])})
                            [1 + floor(random() * 4)::int],
                          'newsletter', random() < 0.3,
                          'bio', bench_words(4 + (random() * 20)::int),
                          'score', round((random() * 100)::numeric, 3))
FROM generate_series({first}, {last}) g
ON CONFLICT (id) DO NOTHING;
"""


def events_sql(first: int, last: int, customers: int) -> str:
    return f"""
INSERT INTO events (id, at, customer_id, kind, status, session, payload, note)
SELECT g,
       timestamptz '2025-01-01' + g * interval '2 seconds' + random() * interval '2 s',
       bench_customer(1 + floor(random() * {customers})::bigint),
       ({_array(_KINDS)})[1 + floor(random() * {len(_KINDS)})::int],
       'new',
       md5(random()::text),
       jsonb_build_object(
         'ip', concat_ws('.', 10 + floor(random() * 200)::int, floor(random() * 256)::int,
                         floor(random() * 256)::int, floor(random() * 256)::int),
         'ua', ({_array(_AGENTS)})[1 + floor(random() * {len(_AGENTS)})::int],
         'amount', round((random() * 500)::numeric, 2),
         'items', floor(random() * 10)::int,
         'tags', to_jsonb(string_to_array(bench_words(1 + (random() * 3)::int), ' ')),
         'ref', gen_random_uuid()),
       CASE WHEN random() < 0.6 THEN bench_words(5 + (random() * 30)::int) END
FROM generate_series({first}, {last}) g;
SELECT setval('events_id_seq', (SELECT max(id) FROM events));
"""


@dataclass(frozen=True)
class WorkloadSpec:
    """Size of the database and of one day's change."""

    scale: int  # pgbench -s
    events: int  # initial rows of the append-mostly table
    customers: int  # rows of the table restored alone (a few % of the database)
    append_pct: float = 2.0  # new events per day, % of the initial count
    update_pct: float = 1.0  # events updated per day, % of the initial count, recent rows
    delete_pct: float = 0.5  # oldest events deleted per day, % of the initial count
    customer_change_pct: float = 0.5  # customers appended and updated per day
    pgbench_tx: int = 0  # pgbench TPC-B transactions per day (0: 0.1% of the accounts)

    def day_tx(self) -> int:
        return self.pgbench_tx or max(100, self.scale * 100)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pgbench_tx_per_day": self.day_tx()}


@dataclass
class PgBackRestSetup:
    config: Path
    repo: Path
    process_max: int


class BenchCluster:
    """The one cluster every tool reads, with pgBackRest's WAL archive wired in."""

    def __init__(self, workdir: Path, spec: WorkloadSpec, *, process_max: int,
                 with_pgbackrest: bool) -> None:
        self.workdir = workdir
        self.spec = spec
        self.with_pgbackrest = with_pgbackrest and _which("pgbackrest")
        self.pgbr: PgBackRestSetup | None = None
        self.next_event = spec.events + 1
        self.next_customer = spec.customers + 1
        self.day = 0
        pg_user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.owner = (pg_user.pw_uid, pg_user.pw_gid) if pg_user else None
        settings: dict[str, Any] = {
            "shared_buffers": "256MB", "full_page_writes": "on", "max_wal_size": "4GB",
            "checkpoint_timeout": "30min", "maintenance_work_mem": "128MB",
            "max_connections": "50",
        }
        if self.with_pgbackrest:
            self.pgbr = self._pgbackrest_files(process_max)
            settings["archive_mode"] = "on"
            settings["archive_command"] = (f"pgbackrest --config={self.pgbr.config} "
                                           f"--stanza={STANZA} archive-push %p")
        self.instance: LocalInstance = LocalInstanceProvider().start(
            15, wal_level="replica", max_wal_senders=8, settings=settings,
            base_dir=str(workdir))
        if self.pgbr is not None:
            self._write_pgbackrest_conf()
            self.pgbackrest("stanza-create")

    # ------------------------------------------------------------ pgBackRest

    def _own(self, path: Path) -> None:
        if self.owner:
            os.chown(path, *self.owner)

    def _pgbackrest_files(self, process_max: int) -> PgBackRestSetup:
        root = self.workdir / "pgbackrest"
        for sub in ("", "log", "lock", "spool", "repo"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            self._own(root / sub)
        return PgBackRestSetup(config=root / "pgbackrest.conf", repo=root / "repo",
                               process_max=process_max)

    def _write_pgbackrest_conf(self) -> None:
        assert self.pgbr is not None
        root = self.pgbr.config.parent
        cipher = os.urandom(24).hex()
        text = f"""[global]
repo1-path={self.pgbr.repo}
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass={cipher}
repo1-retention-full=99
compress-type=zst
compress-level=3
process-max={self.pgbr.process_max}
start-fast=y
log-level-console=warn
log-level-file=info
log-path={root / 'log'}
lock-path={root / 'lock'}
spool-path={root / 'spool'}

[{STANZA}]
pg1-path={self.instance.data_dir}
pg1-socket-path={self.instance.host}
pg1-port={self.instance.port}
pg1-user=postgres
"""
        self.pgbr.config.write_text(text)
        self.pgbr.config.chmod(0o600)
        self._own(self.pgbr.config)

    def as_server_user(self, argv: list[str]) -> list[str]:
        """pgBackRest must run as the OS user that owns the data directory."""
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def pgbackrest_argv(self, *args: str) -> list[str]:
        assert self.pgbr is not None
        return self.as_server_user(["pgbackrest", f"--config={self.pgbr.config}",
                                    f"--stanza={STANZA}", *args])

    def pgbackrest(self, *args: str) -> None:
        done = subprocess.run(self.pgbackrest_argv(*args), capture_output=True, text=True,
                              cwd="/")
        if done.returncode != 0:
            raise BenchError(f"pgbackrest {' '.join(args)} failed: "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")

    # ------------------------------------------------------------- the data

    @property
    def bin_dir(self) -> Path:
        return self.instance.binaries.bin_dir

    def tool(self, name: str) -> str:
        return str(self.instance.binaries.path(name))

    def env(self, dbname: str = DB) -> dict[str, str]:
        return self.instance.env(dbname)

    def dsn(self, dbname: str = DB) -> str:
        return self.instance.dsn(dbname)

    def load(self) -> None:
        """Create and fill the database (day 1)."""
        spec = self.spec
        self.instance.execute(f"CREATE DATABASE {DB}")
        pgbench = self.tool("pgbench")
        done = subprocess.run([pgbench, "-i", "-q", "-I", "dtGvp", "-s", str(spec.scale), DB],
                              capture_output=True, text=True, env=self.env())
        if done.returncode != 0:
            raise BenchError(f"pgbench -i failed: {done.stderr.strip()[-2000:]}")
        self.instance.execute("SELECT setseed(0.42)", DB)
        self.instance.psql(SCHEMA_SQL, DB)
        self.instance.psql("SELECT setseed(0.42);" + customers_sql(1, spec.customers), DB)
        step = 200_000
        for first in range(1, spec.events + 1, step):
            last = min(spec.events, first + step - 1)
            self.instance.psql(f"SELECT setseed(0.{first % 97 + 1});"
                               + events_sql(first, last, spec.customers), DB)
        self.instance.psql("VACUUM ANALYZE; CHECKPOINT;", DB)
        self.day = 1

    def change_day(self) -> dict[str, Any]:
        """One simulated day of writes; returns what was done."""
        spec = self.spec
        self.day += 1
        appended = max(1, int(spec.events * spec.append_pct / 100))
        updated = int(spec.events * spec.update_pct / 100)
        deleted = int(spec.events * spec.delete_pct / 100)
        cust = max(1, int(spec.customers * spec.customer_change_pct / 100))
        first, last = self.next_event, self.next_event + appended - 1
        self.next_event = last + 1
        c_first, c_last = self.next_customer, self.next_customer + cust - 1
        self.next_customer = c_last + 1
        hot = max(updated * 5, 1)  # updates hit the most recent rows
        sql = f"""
SELECT setseed(0.{self.day % 89 + 1});
{events_sql(first, last, c_last)}
{customers_sql(c_first, c_last)}
UPDATE events SET status = 'done',
       payload = payload || jsonb_build_object('done_at', now()::text,
                                               'ticket', md5(random()::text))
WHERE id IN (SELECT id FROM events WHERE id > (SELECT max(id) FROM events) - {hot}
             ORDER BY random() LIMIT {updated});
UPDATE customers SET profile = profile || jsonb_build_object('last_seen', now()::text)
WHERE id IN (SELECT id FROM customers ORDER BY random() LIMIT {cust});
DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT {deleted});
"""
        self.instance.psql(sql, DB)
        tx = spec.day_tx()
        done = subprocess.run([self.tool("pgbench"), "-n", "-c", "1", "-t", str(tx), DB],
                              capture_output=True, text=True, env=self.env())
        if done.returncode != 0:
            raise BenchError(f"pgbench failed: {done.stderr.strip()[-2000:]}")
        self.instance.psql("VACUUM ANALYZE; CHECKPOINT;", DB)
        return {"day": self.day, "events_appended": appended, "events_updated": updated,
                "events_deleted": deleted, "customers_appended": cust,
                "customers_updated": cust, "pgbench_tx": tx}

    def sizes(self) -> dict[str, int]:
        rows = self.instance.execute(
            "SELECT pg_database_size(current_database()), "
            "(SELECT count(*) FROM events), (SELECT count(*) FROM customers)", DB)
        db, n_ev, n_cust = rows[0]
        out = {"database_bytes": int(db), "events_rows": int(n_ev),
               "customers_rows": int(n_cust)}
        for table in ("customers", "events", "pgbench_accounts", "pgbench_tellers"):
            out[f"{table}_bytes"] = int(self.instance.scalar(
                f"SELECT pg_total_relation_size('{table}')", DB))
        return out

    def stop(self) -> None:
        self.instance.stop()


def _which(name: str) -> bool:
    from shutil import which

    return which(name) is not None
