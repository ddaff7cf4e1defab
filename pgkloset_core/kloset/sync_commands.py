"""``pgkloset sync``: copy snapshots to another kloset (for example local to offsite).

Passphrases never travel in argv: the source's from PGKLOSET_PASSPHRASE (or
_FILE, or a prompt), the destination's from PGKLOSET_TO_PASSPHRASE or
PGKLOSET_TO_PASSPHRASE_FILE, else the source's.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from pgkloset_core.cli_common import (
    AppContext,
    byte_progress,
    emit_json,
    human_bytes,
    pass_app,
    passphrase_from_env,
    read_passphrase,
)
from pgkloset_core.errors import UsageError, WrongPassphrase
from pgkloset_core.storage import open_backend

if TYPE_CHECKING:  # the sync machinery loads only when `pgkloset sync` runs
    from pgkloset_core.kloset.sync import SyncedSnapshot

TO_PASSPHRASE = "PGKLOSET_TO_PASSPHRASE"


def destination_passphrase() -> str | None:
    """From PGKLOSET_TO_PASSPHRASE or PGKLOSET_TO_PASSPHRASE_FILE; None when neither is set."""
    return passphrase_from_env(TO_PASSPHRASE)


@click.command("sync")
@click.argument("snapshots", nargs=-1, metavar="[SNAPSHOT...]")
@click.option("--from", "from_url", metavar="URL",
              help="Source kloset (default: --repo or $PGKLOSET_REPO).")
@click.option("--to", "to_url", required=True, metavar="URL", help="Destination kloset.")
@click.option("--init", "init_dest", is_flag=True,
              help="Create the destination kloset when there is none yet.")
@click.option("--dry-run", is_flag=True, help="Only list what would be copied.")
@click.option("--no-wait", is_flag=True, help="Source on cold storage: request the thaws and stop "
              "(exit 75); run the same sync again later.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def sync_cmd(app: AppContext, snapshots: tuple[str, ...], from_url: str | None, to_url: str,
             init_dest: bool, dry_run: bool, no_wait: bool, as_json: bool) -> None:
    """Copy snapshots missing at the destination (all, or the SNAPSHOTs named).

    Data is re-encrypted for the destination's keys and only what it lacks is
    stored. Safe to interrupt: running it again continues.

    \b
    pgkloset sync --from /backups/kloset --to 's3://offsite/kloset'
    """
    from pgkloset_core.kloset.repository import CONFIG_NAME, Kloset
    from pgkloset_core.kloset.sync import sync
    from pgkloset_core.kloset.thaw import stderr_progress

    source_url = from_url or app.repo or os.environ.get("PGKLOSET_REPO", "")
    if not source_url:
        raise UsageError("name the source kloset with --from URL (or --repo, PGKLOSET_REPO)")
    source_backend = open_backend(source_url)
    dest_backend = open_backend(to_url)
    Kloset.read_config(source_backend)  # "not a kloset" before any prompt
    source_pass = read_passphrase()
    try:
        source = Kloset.open(source_backend, source_pass)
    except WrongPassphrase as exc:
        raise WrongPassphrase(f"source {source_backend.url}: {exc}") from None
    dest_pass = destination_passphrase() or source_pass
    if init_dest and not dest_backend.exists(CONFIG_NAME):
        dest = Kloset.init(dest_backend, dest_pass)
        click.echo(f"created kloset {dest.config.id} at {dest_backend.url}", err=True)
    else:
        Kloset.read_config(dest_backend)
        try:
            dest = Kloset.open(dest_backend, dest_pass)
        except WrongPassphrase as exc:
            raise WrongPassphrase(f"destination {dest_backend.url}: {exc} (set {TO_PASSPHRASE} "
                                  f"or {TO_PASSPHRASE}_FILE)") from None

    def copied(c: SyncedSnapshot) -> None:
        if not as_json:
            click.echo(f"copied {c.source_id[:8]} -> {c.snapshot_id[:8]}  {c.kind:<9} "
                       f"{human_bytes(c.logical_bytes):>10}  ({human_bytes(c.stored_bytes)} new)")

    # One live display at a time: thaw waits report by a line, copying by a bar.
    with byte_progress("sync") as progress:
        report = sync(source, dest, snapshots, lock_wait=app.lock_wait, dry_run=dry_run,
                      wait_thaw=not no_wait, progress=progress,
                      thaw_progress=stderr_progress(), on_copied=copied)
    if as_json:
        emit_json(report.to_json())
        return
    if dry_run:
        for sid in report.missing:
            click.echo(f"would copy {sid[:8]}")
        click.echo(f"would copy {len(report.missing)} snapshot(s); "
                   f"{len(report.present)} already at the destination")
        return
    click.echo(f"copied {len(report.copied)} snapshot(s) ({human_bytes(report.stored_bytes)} "
               f"stored); {len(report.present)} already at the destination")


def register(cli: click.Group, backup: click.Group) -> None:
    del backup  # sync adds no backup sources
    cli.add_command(sync_cmd)
