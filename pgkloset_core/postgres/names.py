"""Names the CLI needs before any PostgreSQL work starts, in a module that imports nothing.

The command modules read these from here so that building the command line
(``pgkloset --help``, ``pgkloset snapshots``) does not load psycopg.
:mod:`pgkloset_core.postgres.pgenv` re-exports ``DSN_ENV`` from here.
"""

from __future__ import annotations

DSN_ENV = "PGKLOSET_DSN"
RESTORE_DSN_ENV = "PGKLOSET_RESTORE_DSN"
