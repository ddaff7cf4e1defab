"""Names the CLI needs before any PostgreSQL work starts, in a module that imports nothing.

The command modules read these from here so that building the command line
(``pgkloset --help``, ``pgkloset snapshots``) does not load psycopg.
``DSN_ENV`` is also defined in :mod:`pgkloset_core.postgres.pgenv` (which uses it
itself); the two must stay equal, and tests/test_cli_startup.py checks that.
"""

from __future__ import annotations

DSN_ENV = "PGKLOSET_DSN"
RESTORE_DSN_ENV = "PGKLOSET_RESTORE_DSN"
