"""Dagster resources: a kloset and a PostgreSQL server, their secrets arriving as EnvVar.

Resources hold only what identifies the target; the work is done by
pgkloset_core. Secrets (passphrase, DSN with password) are resolved by Dagster
from environment variables when a run starts, never stored in run config.
"""

from __future__ import annotations

import dagster as dg

from pgkloset_core.errors import NotAKloset
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.storage import open_backend


def kloset_resource_key(name: str) -> str:
    return f"kloset_{name}"


def server_resource_key(name: str) -> str:
    return f"pg_{name}"


class KlosetResource(dg.ConfigurableResource):
    """Where snapshots go: a kloset URL and its passphrase (an EnvVar)."""

    name: str
    url: str
    passphrase: str
    lock_wait: float = 60.0
    create_if_missing: bool = False

    def open(self) -> Kloset:
        """Open the kloset; with ``create_if_missing`` (the demo) an empty location is initialized."""
        backend = open_backend(self.url)
        try:
            return Kloset.open(backend, self.passphrase)
        except NotAKloset:
            if not self.create_if_missing:
                raise
        return Kloset.init(backend, self.passphrase)


class PostgresServerResource(dg.ConfigurableResource):
    """A PostgreSQL server to back up: its DSN (an EnvVar, it may hold a password)."""

    name: str
    dsn: str
    bin_dir: str | None = None
