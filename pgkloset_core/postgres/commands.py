"""CLI commands for logical PostgreSQL backups: ``backup logical`` and ``restore``.

``restore`` serves every snapshot kind: logical and globals here, physical
through the physical module (imported only when a physical snapshot is
restored). Connection strings may carry a password; prefer the
PGKLOSET_DSN / PGKLOSET_RESTORE_DSN environment variables so it is not on
our own argv either. Child tools never see it on theirs.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from pgkloset_core.cli_common import AppContext, byte_progress, emit_json, human_bytes, pass_app
from pgkloset_core.errors import KlosetError, UsageError
from pgkloset_core.postgres.names import DSN_ENV, RESTORE_DSN_ENV


def _stderr_log(verbose: bool) -> Any:
    if not verbose:
        return None
    return lambda line: click.echo(line, err=True)


def register(cli: click.Group, backup: click.Group) -> None:
    """Add ``backup logical`` and ``restore`` to the CLI."""
    backup.add_command(backup_logical_cmd)
    cli.add_command(restore_cmd)


@click.command("logical")
@click.option("--dsn", metavar="DSN", help=f"Server to dump (default: ${DSN_ENV}; a password in "
              "it never reaches a child's argv).")
@click.option("--database", "databases", multiple=True, metavar="NAME",
              help="Database to back up (repeatable).")
@click.option("--all", "all_dbs", is_flag=True, help="Every database that allows connections "
              "(templates excepted).")
@click.option("--exclude", multiple=True, metavar="NAME", help="Leave this database out.")
@click.option("--format", "fmt", type=click.Choice(["custom", "directory"]), default="custom",
              show_default=True, help="custom streams; directory allows --jobs (uses temp disk).")
@click.option("--jobs", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Parallel pg_dump workers (directory format).")
@click.option("--streams", type=click.IntRange(1, 8), default=None, metavar="N",
              help="pg_dump processes side by side in one snapshot, the largest tables' data "
              "spread over them, stored as one archive (custom format). Default: 2 for "
              "databases of 64 MiB or more, else 1.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag the snapshots.")
@click.option("--server", metavar="NAME", help="Server name in metadata (default host:port).")
@click.option("--bin-dir", metavar="DIR", help="Directory of the pg_dump to use.")
@click.option("--verbose", "-v", is_flag=True, help="Show the dump tools' messages.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@pass_app
def backup_logical_cmd(app: AppContext, dsn: str | None, databases: tuple[str, ...],
                       all_dbs: bool, exclude: tuple[str, ...], fmt: str, jobs: int,
                       streams: int | None, tags: tuple[str, ...], server: str | None, bin_dir: str | None,
                       verbose: bool, as_json: bool) -> None:
    """Dump databases (one snapshot each) and the cluster's globals."""
    if all_dbs == bool(databases):
        raise UsageError("name databases with --database, or pass --all (not both)")
    if dsn is None and not os.environ.get(DSN_ENV):
        raise UsageError(f"no server: pass --dsn or set {DSN_ENV}")
    # The unlock (Argon2id releases the GIL) runs while psycopg is imported and
    # backup_logical connects to the server.
    kloset = app.open_soon()
    from pgkloset_core.postgres.logical import backup_logical

    with byte_progress("backup logical") as progress:
        results = backup_logical(
            kloset, dsn or "", None if all_dbs else list(databases), exclude=exclude, fmt=fmt,
            jobs=jobs, streams=streams, tags=tags, server=server, bin_dir=bin_dir, lock_wait=app.lock_wait,
            log=_stderr_log(verbose), progress=progress)
    if as_json:
        emit_json([vars(r) for r in results])
        return
    for r in results:
        what = r.database if r.database is not None else "(globals)"
        rows = f", {r.table_count} tables, {r.total_rows} rows" if r.kind == "logical" else ""
        click.echo(f"{r.snapshot_id[:8]} {r.kind:<8} {what}: {human_bytes(r.logical_bytes)}, "
                   f"{human_bytes(r.stored_bytes)} new{rows}")


_LOGICAL_OPTS = ("to", "database", "create", "clean", "schemas", "tables", "schema_only",
                 "data_only", "no_owner", "jobs", "force_preflight")
_PHYSICAL_OPTS = ("to_dir", "force", "pg_bin", "start", "port")


@click.command("restore")
@click.argument("snapshot")
@click.option("--to", "to", metavar="DSN", help=f"Target server/database (default: "
              f"${RESTORE_DSN_ENV}); its dbname is the target database.")
@click.option("--database", metavar="NAME", help="With `latest`: the latest logical snapshot "
              "of this database.")
@click.option("--create", is_flag=True, help="Create the target database first.")
@click.option("--clean", is_flag=True, help="Drop objects (with --create: the database) first.")
@click.option("--schema", "schemas", multiple=True, metavar="S", help="Restore this schema only.")
@click.option("--table", "tables", multiple=True, metavar="SCHEMA.TABLE",
              help="Restore this table with its indexes, constraints, triggers, grants.")
@click.option("--schema-only", is_flag=True, help="Definitions only, no data.")
@click.option("--data-only", is_flag=True, help="Data only, into existing tables.")
@click.option("--no-owner", is_flag=True, help="Do not set owners (roles may be missing).")
@click.option("--jobs", type=click.IntRange(1, 256), default=1, help="Parallel pg_restore "
              "(spools the dump to a temporary file first).")
@click.option("--force-preflight", is_flag=True, help="Restore even when pre-flight finds "
              "missing extensions, roles or tablespaces.")
@click.option("--bin-dir", metavar="DIR", help="Directory of pg_restore/psql to use.")
@click.option("--to-dir", metavar="DIR", help="Physical: data directory to restore into.")
@click.option("--force", is_flag=True, help="Physical: overwrite a non-empty --to-dir.")
@click.option("--pg-bin", metavar="DIR", help="Physical: PostgreSQL binaries to start with.")
@click.option("--start", is_flag=True, help="Physical: start the restored cluster.")
@click.option("--port", type=int, help="Physical: port for --start.")
@click.option("--verbose", "-v", is_flag=True, help="Show the restore tools' messages.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def restore_cmd(app: AppContext, snapshot: str, verbose: bool, as_json: bool,
                bin_dir: str | None, **opts: Any) -> None:
    """Restore a snapshot: a database, schema or table, cluster globals, or a physical cluster.

    SNAPSHOT is an id, a unique prefix or `latest` (with --database: that database's latest).
    """
    from pgkloset_core.postgres.restore_logical import (
        resolve_snapshot,
        restore_globals,
        restore_logical,
    )

    kloset = app.open()
    snap = resolve_snapshot(kloset, snapshot, opts["database"])
    kloset.prepare_read(snap)  # cold storage: thaw the packs it needs, with progress
    log = _stderr_log(verbose)
    given_logical = [k for k in _LOGICAL_OPTS if opts[k] not in (None, False, (), 1)
                     and k != "database"]
    given_physical = [k for k in _PHYSICAL_OPTS if opts[k] not in (None, False)]
    if snap.kind == "physical":
        if given_logical:
            raise UsageError(f"snapshot {snap.short_id} is physical: --{_flag(given_logical[0])} "
                             "is for logical snapshots (use --to-dir, --force, --pg-bin, "
                             "--start, --port)")
        if not opts["to_dir"]:
            raise UsageError("restoring a physical snapshot needs --to-dir DIR")
        physical = importlib.import_module("pgkloset_core.postgres.physical")
        try:
            with kloset.lock(exclusive=False, operation="restore", wait=app.lock_wait), \
                    byte_progress(f"restore {snap.short_id}") as progress:
                result = physical.restore_physical(
                    kloset, snap, to_dir=opts["to_dir"], force=opts["force"],
                    pg_bin=opts["pg_bin"], start=opts["start"], port=opts["port"],
                    progress=progress)
        except OSError as exc:  # permission denied, disk full, read-only file system ...
            where = f" ({exc.filename})" if exc.filename else ""
            raise KlosetError(f"cannot restore into {opts['to_dir']}: "
                              f"{exc.strerror or exc}{where}") from None
        if as_json:
            emit_json(result if isinstance(result, dict) else getattr(result, "__dict__",
                                                                      str(result)))
        else:
            click.echo(f"restored physical snapshot {snap.short_id} into {opts['to_dir']}")
        return
    if given_physical:
        raise UsageError(f"snapshot {snap.short_id} is {snap.kind}: --{_flag(given_physical[0])} "
                         "is for physical snapshots")
    to = opts["to"] or os.environ.get(RESTORE_DSN_ENV)
    if not to:
        raise UsageError(f"name the target with --to DSN (or {RESTORE_DSN_ENV})")
    with kloset.lock(exclusive=False, operation="restore", wait=app.lock_wait), \
            byte_progress(f"restore {snap.short_id}") as progress:
        if snap.kind == "globals":
            extra = [k for k in given_logical if k != "to"]
            if extra:
                raise UsageError(f"--{_flag(extra[0])} does not apply to a globals snapshot")
            result = restore_globals(kloset, snap, to, bin_dir=bin_dir, log=log)
        else:
            result = restore_logical(
                kloset, snap, to, create=opts["create"], clean=opts["clean"],
                schemas=opts["schemas"], tables=opts["tables"], schema_only=opts["schema_only"],
                data_only=opts["data_only"], no_owner=opts["no_owner"], jobs=opts["jobs"],
                force_preflight=opts["force_preflight"], bin_dir=bin_dir, log=log,
                progress=progress)
    for warning in result.warnings:
        click.echo(f"pgkloset: warning: {warning}", err=True)
    if as_json:
        emit_json(vars(result))
    else:
        into = f"database {result.database}" if result.database else "the cluster's globals"
        click.echo(f"restored {snap.kind} snapshot {snap.short_id} into {into} "
                   f"in {result.seconds:.1f}s")


def _flag(name: str) -> str:
    return {"schemas": "schema", "tables": "table"}.get(name, name).replace("_", "-")
