"""`databases: all`: list a server's databases when the definitions load, never failing the load.

A short connect timeout keeps an unreachable server from stalling the code
location; on any failure the caller falls back to the server's ``_all`` asset.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pgkloset_core.errors import KlosetError
from pgkloset_core.postgres.pgenv import ConnTarget
from pgkloset_dagster.config import ServerConfig
from pgkloset_dagster.naming import RESERVED

CONNECT_TIMEOUT = 3


def list_databases(server: ServerConfig) -> tuple[list[str] | None, str | None]:
    """(database names, None) or (None, why not)."""
    dsn = os.environ.get(server.dsn_env)
    if not dsn:
        return None, f"environment variable {server.dsn_env} is not set"
    try:
        target = ConnTarget.parse(dsn)
        target = target if target.dbname else target.with_db("postgres")
        with target.connect(connect_timeout=CONNECT_TIMEOUT, application_name="pgkloset") as c:
            rows = c.execute("SELECT datname FROM pg_database "
                             "WHERE datallowconn AND NOT datistemplate ORDER BY 1").fetchall()
    except KlosetError as exc:
        return None, str(exc)
    except Exception as exc:  # a load must never fail because a server misbehaves
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return usable([str(r[0]) for r in rows], server.exclude), None


def usable(names: Sequence[str], exclude: Sequence[str]) -> list[str]:
    return [n for n in names if n not in set(exclude) and n not in RESERVED]
