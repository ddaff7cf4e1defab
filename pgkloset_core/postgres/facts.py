"""Catalog facts at the dumped instant.

`SnapshotSession` opens a REPEATABLE READ READ ONLY transaction and exports
its MVCC snapshot; pg_dump imports it with ``--snapshot``, so the row counts
and object counts read here describe exactly the data in the dump. Restore
drills compare a restored database against these numbers.

What is counted (the same queries run on a restored database, so a drill
compares like with like):

- ``tables``: every table that holds rows itself -- ordinary tables,
  partitions and inheritance children (relkind ``r``), unlogged included --
  counted with ``SELECT count(*) FROM ONLY``. Partitioned parents (relkind
  ``p``) hold no rows of their own: their rows are their partitions' rows, so
  they are left out of ``tables`` (no double counting; ``total_rows`` is the
  sum) and listed in ``partitioned_tables``. An inheritance parent is counted
  with ONLY, i.e. its own rows. Tables of extensions (whose data pg_dump does
  not dump) and temporary tables are left out.
- ``object_counts``: user objects outside pg_catalog, information_schema and
  pg_toast, leaving out objects that belong to an extension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from pgkloset_core.errors import KlosetError
from pgkloset_core.postgres.pgenv import ConnTarget

SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema', 'pg_toast')"
USER_NS = (f"n.nspname NOT IN {SYSTEM_SCHEMAS} AND n.nspname NOT LIKE 'pg_temp_%' "
           "AND n.nspname NOT LIKE 'pg_toast_temp_%'")


def _not_ext(catalog: str, oid: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass "
            f"AND d.objid = {oid} AND d.deptype = 'e')")


REL_COUNTS = f"""
SELECT c.relkind, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {USER_NS} AND c.relpersistence <> 't' AND {_not_ext('pg_class', 'c.oid')}
GROUP BY c.relkind"""

OTHER_COUNTS: dict[str, str] = {
    "functions": f"""SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {USER_NS} AND p.prokind IN ('f', 'w') AND {_not_ext('pg_proc', 'p.oid')}""",
    "procedures": f"""SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {USER_NS} AND p.prokind = 'p' AND {_not_ext('pg_proc', 'p.oid')}""",
    "aggregates": f"""SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {USER_NS} AND p.prokind = 'a' AND {_not_ext('pg_proc', 'p.oid')}""",
    "triggers": f"""SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_NS} AND NOT t.tgisinternal AND {_not_ext('pg_class', 'c.oid')}""",
    "constraints": f"""SELECT count(*) FROM pg_constraint k JOIN pg_namespace n
        ON n.oid = k.connamespace WHERE {USER_NS} AND k.contype IN ('p','u','f','c','x')
        AND k.conparentid = 0 AND {_not_ext('pg_constraint', 'k.oid')}""",
    "policies": f"""SELECT count(*) FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NS}""",
    "types": f"""SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        LEFT JOIN pg_class c ON c.oid = t.typrelid
        WHERE {USER_NS} AND {_not_ext('pg_type', 't.oid')} AND t.typelem = 0
        AND (t.typtype IN ('d', 'e', 'r', 'b') OR (t.typtype = 'c' AND c.relkind = 'c'))""",
    "schemas": f"""SELECT count(*) FROM pg_namespace n WHERE {USER_NS}
        AND {_not_ext('pg_namespace', 'n.oid')}""",
    "large_objects": "SELECT count(*) FROM pg_largeobject_metadata",
}

RELKIND_NAMES = {
    "r": "tables", "p": "partitioned_tables", "i": "indexes", "I": "indexes", "v": "views",
    "m": "materialized_views", "S": "sequences", "f": "foreign_tables", "c": "composite_types",
}

TABLES = f"""
SELECT n.nspname, c.relname, c.relkind FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND {USER_NS}
AND {_not_ext('pg_class', 'c.oid')} ORDER BY 1, 2"""

# Objects named in the TOC without their table: indexes, owned sequences, trigger functions;
# and the tables foreign keys reference (a table restore skips keys to tables not there).
TABLE_OBJECTS = f"""
SELECT n.nspname || '.' || t.relname, 'indexes', i.relname
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE {USER_NS} AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid
    AND k.conrelid = t.oid AND k.contype IN ('p', 'u', 'x'))
UNION ALL
SELECT n.nspname || '.' || t.relname, 'sequences', s.relname
FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
AND d.deptype IN ('a', 'i') AND {USER_NS}
UNION ALL
SELECT n.nspname || '.' || t.relname, 'foreign_keys',
    k.conname || ' ' || rn.nspname || '.' || r.relname
FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace JOIN pg_class r ON r.oid = k.confrelid
JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE k.contype = 'f' AND k.conparentid = 0 AND {USER_NS}
UNION ALL
SELECT DISTINCT n.nspname || '.' || c.relname, 'trigger_functions',
    pn.nspname || ' ' || p.proname || '()'
FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = g.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE NOT g.tgisinternal AND {USER_NS} AND pn.nspname NOT IN {SYSTEM_SCHEMAS}
ORDER BY 1, 2, 3"""

ROLES_NEEDED = f"""
WITH owners AS (
    SELECT nspowner AS r FROM pg_namespace n WHERE {USER_NS}
    UNION SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_NS}
    UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {USER_NS}
    UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE {USER_NS}
    UNION SELECT lomowner FROM pg_largeobject_metadata
    UNION SELECT datdba FROM pg_database WHERE datname = current_database()
    UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NS}
    UNION SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace n WHERE {USER_NS}
    UNION SELECT (aclexplode(p.proacl)).grantee FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_NS}
    UNION SELECT (aclexplode(t.typacl)).grantee FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {USER_NS}
    UNION SELECT (aclexplode(lomacl)).grantee FROM pg_largeobject_metadata
    UNION SELECT (aclexplode(a.attacl)).grantee FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_NS} AND a.attacl IS NOT NULL
    UNION SELECT unnest(polroles) FROM pg_policy
    UNION SELECT defaclrole FROM pg_default_acl
)
SELECT DISTINCT rolname FROM owners o JOIN pg_roles r ON r.oid = o.r
WHERE r.rolname NOT LIKE 'pg\\_%' ORDER BY 1"""

TABLESPACES_NEEDED = """
SELECT DISTINCT spcname FROM pg_tablespace t WHERE spcname NOT IN ('pg_default', 'pg_global')
AND (t.oid IN (SELECT reltablespace FROM pg_class)
     OR t.oid = (SELECT dattablespace FROM pg_database WHERE datname = current_database()))
ORDER BY 1"""


def server_facts(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Version and identity of the server (no snapshot needed)."""
    version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    num = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
    facts: dict[str, Any] = {"pg_version": version, "pg_version_num": num,
                             "pg_major": num // 10000, "system_identifier": None}
    with _tolerant(conn):  # restricted to superusers and pg_monitor-like roles
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
        facts["system_identifier"] = row[0] if row else None
    return facts


@contextlib.contextmanager
def _tolerant(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Run a query that may be refused without aborting the surrounding transaction."""
    try:
        with conn.transaction():
            yield
    except psycopg.errors.InsufficientPrivilege:
        pass


def database_facts(conn: psycopg.Connection[Any], *, count_rows: bool = True) -> dict[str, Any]:
    """Row counts and catalog facts of the connected database, JSON-friendly."""
    counts: dict[str, int] = dict.fromkeys(
        ("tables", "partitioned_tables", "indexes", "views", "materialized_views",
         "sequences", "foreign_tables", "composite_types"), 0)
    for relkind, n in conn.execute(REL_COUNTS).fetchall():
        name = RELKIND_NAMES.get(relkind)
        if name:
            counts[name] += int(n)
    for name, query in OTHER_COUNTS.items():
        counts[name] = int(conn.execute(query).fetchone()[0])  # type: ignore[index]
    extensions = {str(n): str(v) for n, v in conn.execute(
        "SELECT extname, extversion FROM pg_extension ORDER BY 1").fetchall()}
    counts["extensions"] = len(extensions)
    schemas = [str(r[0]) for r in conn.execute(
        f"SELECT nspname FROM pg_namespace n WHERE {USER_NS} ORDER BY 1").fetchall()]
    tables: dict[str, int] = {}
    partitioned: list[str] = []
    for schema, name, relkind in conn.execute(TABLES).fetchall():
        key = f"{schema}.{name}"
        if relkind == "p":
            partitioned.append(key)
        elif count_rows:
            query = sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
                sql.Identifier(schema), sql.Identifier(name))
            tables[key] = int(conn.execute(query).fetchone()[0])  # type: ignore[index]
        else:
            tables[key] = -1
    table_objects: dict[str, dict[str, list[str]]] = {}
    for table, kind, name in conn.execute(TABLE_OBJECTS).fetchall():
        table_objects.setdefault(table, {}).setdefault(kind, []).append(name)
    return {
        "tables": tables,
        "total_rows": sum(v for v in tables.values() if v > 0),
        "partitioned_tables": partitioned,
        "object_counts": counts,
        "extensions": extensions,
        "schemas": schemas,
        "table_objects": table_objects,
        "roles_needed": [str(r[0]) for r in conn.execute(ROLES_NEEDED).fetchall()],
        "tablespaces_needed": [str(r[0]) for r in conn.execute(TABLESPACES_NEEDED).fetchall()],
        "encoding": str(conn.execute("SHOW server_encoding").fetchone()[0]),  # type: ignore[index]
    }


class SnapshotSession:
    """An open REPEATABLE READ READ ONLY transaction whose snapshot pg_dump imports.

    Keep it open until pg_dump has finished: the exported snapshot is only
    valid while the exporting transaction lives.
    """

    def __init__(self, target: ConnTarget) -> None:
        self.conn = target.connect(application_name="pgkloset-facts")
        try:
            self.server = server_facts(self.conn)
            self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            # pg_dump reads with row_security off: count the same rows (or fail the same way).
            self.conn.execute("SET LOCAL row_security = off")
            # Counting runs next to the dump: parallel workers would take the cores
            # the dump's own backend needs (docs/BENCHMARKS.md, fifth round).
            self.conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            row = self.conn.execute("SELECT pg_export_snapshot()").fetchone()
            self.snapshot_id = str(row[0])  # type: ignore[index]
        except psycopg.Error as exc:
            self.conn.close()
            raise KlosetError(f"cannot export a snapshot from {target.label()}: "
                              f"{str(exc).strip().splitlines()[0]}") from None

    def table_sizes(self) -> list[tuple[str, str, int]]:
        """The tables whose data the dump holds, with their sizes (to plan a dump in parts)."""
        from pgkloset_core.postgres.dumpsplit import table_sizes

        try:
            return table_sizes(self.conn)
        except psycopg.Error as exc:
            raise KlosetError(f"cannot read table sizes: {str(exc).strip().splitlines()[0]}") \
                from None

    def facts(self) -> dict[str, Any]:
        try:
            return database_facts(self.conn)
        except psycopg.Error as exc:
            raise KlosetError(f"cannot read catalog facts: {str(exc).strip().splitlines()[0]}") \
                from None

    def cancel(self) -> None:
        """Interrupt a running count (from another thread)."""
        with contextlib.suppress(Exception):
            self.conn.cancel_safe()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> SnapshotSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
