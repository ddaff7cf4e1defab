"""The operator's command line: ``pgkloset``.

Every expected failure is one line on stderr and a non-zero exit; exit 0
means the work is done. Repository from ``--repo`` or ``PGKLOSET_REPO``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from pgkloset_core.cli_common import (
    AppContext,
    byte_progress,
    emit_json,
    human_bytes,
    parse_seconds,
    pass_app,
    read_passphrase,
    status,
)
from pgkloset_core.errors import EntryNotFound, KlosetError, UsageError

# Each command imports what it needs (the kloset, check, thaw, the PostgreSQL modules)
# when it runs, so `pgkloset --help` or `pgkloset snapshots` load none of the rest.

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.option("--repo", "-r", metavar="URL", help="Kloset location: a path, file://, s3:// or sftp:// URL "
              "(default: $PGKLOSET_REPO).")
@click.option("--lock-wait", metavar="DURATION", default="0",
              help="Wait this long for a conflicting lock to go (e.g. 30s, 10m) instead of failing.")
@click.version_option(package_name="pgkloset")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, lock_wait: str) -> None:
    """pgkloset: encrypted, deduplicated PostgreSQL backups.

    The passphrase comes from PGKLOSET_PASSPHRASE, PGKLOSET_PASSPHRASE_FILE or a prompt.
    """
    ctx.obj = AppContext(repo=repo, lock_wait=parse_seconds(lock_wait))


@cli.command()
@pass_app
def init(app: AppContext) -> None:
    """Create a new, empty kloset."""
    from pgkloset_core.kloset.repository import Kloset

    backend = app.backend()
    kloset = Kloset.init(backend, read_passphrase(confirm=True))
    click.echo(f"created kloset {kloset.config.id} at {backend.url}")
    click.echo("keep the passphrase safe: without it the data cannot be read", err=True)


@cli.group()
def backup() -> None:
    """Make a snapshot (of a stream, or of PostgreSQL).

    PGKLOSET_WORKER_NICE=N (0-19, default 0) runs the threads that compress,
    encrypt and upload N nicer than pgkloset, so on a busy machine they wait,
    not pg_dump and the database's queries.
    """
    from pgkloset_core.procs import worker_nice

    try:  # refused before anything connects or locks (the writer checks it again)
        worker_nice()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@backup.command("stream")
@click.option("--name", required=True, help="Entry name of the stream inside the snapshot.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag the snapshot (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def backup_stream(app: AppContext, name: str, tags: tuple[str, ...], as_json: bool) -> None:
    """Store standard input as one snapshot and print its id.

    The latest stream snapshot with an entry of the same name is the
    previous version: unchanged parts are recognised without cutting them
    again. A producer writing through stdio (pg_dump) costs less CPU with a
    large output buffer: `stdbuf -o 1M pg_dump -Fc ... | pgkloset backup
    stream ...` (backup logical does this itself).
    """
    from pgkloset_core.kloset.reader import previous_version

    if sys.stdin.isatty():
        raise UsageError("backup stream reads the data from standard input; pipe something into it")
    kloset = app.open()
    with kloset.lock(exclusive=False, operation="backup", wait=app.lock_wait) as lock, \
            kloset.writer(kind="stream", tags=list(tags), lock=lock) as writer, \
            byte_progress(f"backup {name}") as progress:
        previous = previous_version(kloset, name, kind="stream")
        writer.add_stream(name, sys.stdin.buffer, progress=progress, previous=previous)
        snap = writer.commit()
    result = {
        "snapshot_id": snap.id,
        "logical_bytes": snap.summary["logical_bytes"],
        "stored_bytes": snap.summary["stored_bytes"],
        "seconds": snap.summary["seconds"],
    }
    if as_json:
        emit_json(result)
    else:
        click.echo(snap.id)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Only snapshots with this tag.")
@click.option("--kind", metavar="KIND", help="Only snapshots of this kind.")
@pass_app
def snapshots(app: AppContext, as_json: bool, tags: tuple[str, ...], kind: str | None) -> None:
    """List snapshots, oldest first."""
    kloset = app.open()
    snaps = [s for s in kloset.snapshots()
             if (not tags or set(tags) <= set(s.tags)) and (not kind or s.kind == kind)]
    if as_json:
        emit_json([s.summary_json() for s in snaps])
        return
    if not snaps:
        click.echo("no snapshots", err=True)
        return
    click.echo(f"{'ID':<9} {'TIME':<20} {'KIND':<9} {'SIZE':>10}  TAGS / ENTRIES")
    for s in snaps:
        entries = ",".join(e.name for e in s.entries[:3]) + ("..." if len(s.entries) > 3 else "")
        click.echo(f"{s.short_id:<9} {s.time.strftime('%Y-%m-%d %H:%M:%S'):<20} {s.kind:<9} "
                   f"{human_bytes(s.logical_bytes):>10}  {','.join(s.tags) or '-'} / {entries}")


@cli.command()
@click.argument("snapshot")
@click.argument("entry", required=False)
@click.option("--no-wait", is_flag=True, help="On cold storage: request the thaw and stop "
              "(exit 75); run the same command again later.")
@pass_app
def cat(app: AppContext, snapshot: str, entry: str | None, no_wait: bool) -> None:
    """Write an entry's bytes to standard output.

    SNAPSHOT is a full id, a unique prefix, or `latest`. ENTRY may be left out when the
    snapshot has a single entry; for a logical snapshot dumped in parts it then writes the
    one archive they make, for pg_restore. Packs in cold storage are thawed first.
    """
    from pgkloset_core.kloset.thaw import stderr_progress

    kloset = app.open()
    snap = kloset.resolve(snapshot)
    from pgkloset_core.postgres.dumpmerge import PARTS_KEY

    if entry is None and snap.kind == "logical" and snap.meta.get(PARTS_KEY):
        _cat_merged(app, kloset, snap, no_wait)
        return
    if entry is None:
        with_content = [e for e in snap.entries if e.type in ("stream", "file")]
        if len(with_content) != 1:
            names = ", ".join(e.name for e in with_content[:10])
            raise UsageError(f"snapshot {snap.short_id} has {len(with_content)} entries; name one: {names}")
        chosen = with_content[0]
    else:
        found = snap.entry(entry)
        if found is None:
            raise EntryNotFound(f"snapshot {snap.short_id} has no entry {entry!r}")
        chosen = found
    with status("thaw") as say:
        kloset.prepare_read(snap, [chosen], wait=not no_wait, progress=stderr_progress(say))
    with kloset.lock(exclusive=False, operation="cat", wait=app.lock_wait):
        for data in kloset.read_entry(snap, chosen):
            _write_stdout(data)


def _cat_merged(app: AppContext, kloset: Any, snap: Any, no_wait: bool) -> None:
    """A dump taken in parts, as the single archive pg_restore reads."""
    from pgkloset_core.kloset.thaw import stderr_progress
    from pgkloset_core.postgres.restore_logical import merged_dump, read_merged

    with status("thaw") as say:
        kloset.prepare_read(snap, wait=not no_wait, progress=stderr_progress(say))
    with kloset.lock(exclusive=False, operation="cat", wait=app.lock_wait):
        merged = merged_dump(kloset, snap)
        assert merged is not None
        for data in read_merged(kloset, snap, merged, None):
            _write_stdout(data)


def _write_stdout(data: bytes | memoryview) -> None:
    """Unbuffered, so a failed write leaves nothing for Python to retry noisily at exit."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(sys.stdout.fileno(), view):]
    except BrokenPipeError:
        raise  # the reader went away (`| head`): click exits quietly
    except OSError as exc:
        raise KlosetError(f"cannot write to standard output: {exc.strerror}") from None


@cli.command()
@click.option("--read-data", is_flag=True, help="Download, decrypt and re-hash every pack.")
@click.option("--read-data-subset", type=click.FloatRange(0, 100, min_open=True), metavar="PERCENT",
              help="Like --read-data for a random PERCENT of the packs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def check(app: AppContext, read_data: bool, read_data_subset: float | None, as_json: bool) -> None:
    """Verify the kloset's structure (and with --read-data, every byte)."""
    from pgkloset_core.kloset.check import check as run_check

    kloset = app.open()
    with kloset.lock(exclusive=False, operation="check", wait=app.lock_wait), status("check") as say:
        report = run_check(kloset, read_data=read_data, subset_percent=read_data_subset, progress=say)
    if as_json:
        emit_json(report.to_json())
    else:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        read = f", {report.packs_read} packs read ({human_bytes(report.bytes_read)})" if report.packs_read else ""
        click.echo(f"{report.snapshots} snapshots, {report.packs} packs{read}: "
                   f"{'no problems found' if report.ok else f'{len(report.problems)} problem(s)'}")
    if not report.ok:
        raise SystemExit(3)


@cli.group()
def key() -> None:
    """Manage the passphrases (key files) that open the kloset."""


@key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@pass_app
def key_list(app: AppContext, as_json: bool) -> None:
    """List key files; the one in use is marked with *."""
    kloset = app.open()
    keys, damaged = kloset.list_keys()
    rows: list[dict[str, Any]] = [
        {"id": k.key_id, "current": k.name == kloset.key_name, "created": k.created,
         "hostname": k.hostname, "username": k.username}
        for k in keys
    ]
    if as_json:
        emit_json({"keys": rows, "damaged": [str(d) for d in damaged]})
    else:
        for r in rows:
            mark = "*" if r["current"] else " "
            click.echo(f"{mark} {r['id'][:12]}  {r['created']}  {r['username']}@{r['hostname']}")
        for d in damaged:
            click.echo(f"problem: {d}", err=True)


@key.command("add")
@pass_app
def key_add(app: AppContext) -> None:
    """Add a passphrase (from PGKLOSET_NEW_PASSPHRASE[_FILE] or a prompt)."""
    kloset = app.open()
    name = kloset.add_key(read_passphrase(new=True, confirm=True))
    click.echo(f"added key {name.removeprefix('keys/')[:12]}")


@key.command("remove")
@click.argument("key_id")
@pass_app
def key_remove(app: AppContext, key_id: str) -> None:
    """Remove a key file (never the one in use, never the last one)."""
    kloset = app.open()
    name = kloset.remove_key(key_id)
    click.echo(f"removed key {name.removeprefix('keys/')[:12]}")


@key.command("passwd")
@pass_app
def key_passwd(app: AppContext) -> None:
    """Change the passphrase in use: add the new key file, then remove the old."""
    kloset = app.open()
    old = kloset.key_name
    new = kloset.add_key(read_passphrase(new=True, confirm=True))
    kloset.backend.delete(old)
    click.echo(f"passphrase changed (key {new.removeprefix('keys/')[:12]} replaces {old.removeprefix('keys/')[:12]})")


def _register_extensions() -> None:
    """Commands that live with their subsystem (PostgreSQL, maintenance, ...)."""
    import importlib

    for module in ("pgkloset_core.postgres.commands", "pgkloset_core.postgres.physical_commands",
                   "pgkloset_core.kloset.commands", "pgkloset_core.postgres.drill_commands",
                   "pgkloset_core.kloset.sync_commands"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(cli, backup)


_register_extensions()


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():
        # Scripts and schedulers get exactly one line per failure; the retry notices of the
        # storage layer show only to an operator watching a terminal.
        logging.getLogger("pgkloset_core.storage").addHandler(logging.NullHandler())
    try:
        cli.main(args=argv, prog_name="pgkloset", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("pgkloset: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KlosetError as exc:
        click.echo(f"pgkloset: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("pgkloset: interrupted; nothing was committed", err=True)
        return 130
    except BrokenPipeError:
        return 141
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
