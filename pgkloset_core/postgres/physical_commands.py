"""``pgkloset backup physical``: a whole cluster with pg_basebackup.

Restoring a physical snapshot is ``pgkloset restore SNAPSHOT --to-dir DIR``,
which calls :func:`pgkloset_core.postgres.physical.restore_physical`.
"""

from __future__ import annotations

import click

from pgkloset_core.cli_common import AppContext, byte_progress, emit_json, human_bytes, pass_app
from pgkloset_core.postgres.names import DSN_ENV


def register(cli: click.Group, backup: click.Group) -> None:
    """Add ``backup physical`` to the ``backup`` group."""

    @backup.command("physical")
    @click.option("--dsn", envvar=DSN_ENV, metavar="DSN", show_envvar=True,
                  help="Connection string of the server (its password belongs in PGPASSWORD "
                       "or a passfile, not on the command line).")
    @click.option("--tag", "tags", multiple=True, metavar="TAG",
                  help="Tag the snapshot (repeatable).")
    @click.option("--fast-checkpoint", is_flag=True,
                  help="Ask for an immediate checkpoint instead of a spread one.")
    @click.option("--server", metavar="NAME", help="Server name in the snapshot's metadata "
                  "(default: host:port).")
    @click.option("--bin-dir", metavar="DIR", help="Directory holding pg_basebackup (its major "
                  "version must equal the server's).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @pass_app
    def backup_physical_cmd(app: AppContext, dsn: str | None, tags: tuple[str, ...],
                            fast_checkpoint: bool, server: str | None, bin_dir: str | None,
                            as_json: bool) -> None:
        """Snapshot a whole PostgreSQL cluster (all databases, WAL included) file by file."""
        kloset = app.open_soon()  # unlocks while psycopg loads and the server is checked
        from pgkloset_core.postgres.physical import backup_physical

        with byte_progress("backup physical") as progress:
            result = backup_physical(kloset, dsn, tags=tags, fast_checkpoint=fast_checkpoint,
                                     server=server, bin_dir=bin_dir, lock_wait=app.lock_wait,
                                     progress=progress)
        if as_json:
            emit_json(result.to_json())
            return
        click.echo(result.snapshot_id)
        click.echo(f"PostgreSQL {result.pg_version}, {result.file_count} files, "
                   f"{human_bytes(result.logical_bytes)}, {human_bytes(result.stored_bytes)} "
                   f"new in the kloset, {result.seconds:.1f}s", err=True)
