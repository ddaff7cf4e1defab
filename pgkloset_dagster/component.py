"""PgKlosetComponent: the same Definitions from a `defs.yaml`, for `dg` users.

    type: pgkloset_dagster.PgKlosetComponent
    attributes:
      config_path: pgkloset.yaml    # relative to the defs.yaml folder; omit for the usual lookup
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg


class PgKlosetComponent(dg.Component, dg.Model, dg.Resolvable):
    """pgkloset backups: snapshot assets, drills, prunes and schedules from a pgkloset.yaml."""

    config_path: str | None = None
    discover_databases: bool = True

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from pgkloset_dagster.definitions import build_definitions, load_pgkloset_config

        path: Path | None = None
        if self.config_path:
            path = Path(self.config_path)
            if not path.is_absolute():
                path = Path(context.path) / path
        cfg = load_pgkloset_config(path)
        return build_definitions(cfg, discover=self.discover_databases)
