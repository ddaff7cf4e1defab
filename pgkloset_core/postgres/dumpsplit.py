"""Which tables' data a backup dumps in parallel parts (see dumpmerge.py for why).

The largest tables are spread over ``streams`` bins, largest first into the
least loaded one (the main part starts with everything too small to move).
Only tables of at least ``MIN_SHARE`` of the database are moved, so the
``-t`` lists stay short, and by default only in databases of at least
``AUTO_MIN_BYTES``: below that a second pg_dump's start-up costs more than
it saves.
"""

from __future__ import annotations

from typing import Any

import psycopg

AUTO_STREAMS = 2  # the default: two backends side by side
MAX_STREAMS = 8
AUTO_MIN_BYTES = 64 * 1024 * 1024
MIN_SHARE = 0.01
MAX_MOVED = 100

Table = tuple[str, str]  # (schema, name)

# Ordinary tables whose data pg_dump dumps: not temporary, not an extension's.
_SIZES_SQL = """
SELECT n.nspname, c.relname, pg_table_size(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u')
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype = 'e')
ORDER BY 3 DESC, 1, 2
"""


def table_sizes(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    """(schema, table, bytes on disk) of every table whose data a dump holds, largest first."""
    return [(str(s), str(t), int(n or 0)) for s, t, n in conn.execute(_SIZES_SQL).fetchall()]


def plan_parts(sizes: list[tuple[str, str, int]], streams: int | None) -> list[list[Table]]:
    """The tables of each part after the main one; [] to dump in one part.

    ``streams`` None is the default (AUTO_STREAMS, for databases of at least
    AUTO_MIN_BYTES); an explicit number splits whatever the size.
    """
    total = sum(n for _s, _t, n in sizes)
    if streams is None:
        streams = AUTO_STREAMS if total >= AUTO_MIN_BYTES else 1
    if streams < 2 or total <= 0:
        return []
    movable = sorted((t for t in sizes if t[2] > 0 and t[2] >= total * MIN_SHARE),
                     key=lambda t: -t[2])[:MAX_MOVED]
    loads = [total - sum(n for _s, _t, n in movable)] + [0] * (streams - 1)
    bins: list[list[Table]] = [[] for _ in range(streams)]
    for schema, name, n in movable:
        # The least loaded bin; on a tie the later one, which keeps the main part lean.
        k = min(range(streams), key=lambda i: (loads[i], -i))
        loads[k] += n
        bins[k].append((schema, name))
    return [b for b in bins[1:] if b]


def table_pattern(table: Table) -> str:
    """A pg_dump ``-t`` pattern matching exactly this table (quoted: no wildcards)."""
    schema, name = table
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, name))
