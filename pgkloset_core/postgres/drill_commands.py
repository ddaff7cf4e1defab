"""`pgkloset drill`: restore a snapshot into a scratch instance and verify it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pgkloset_core.cli_common import AppContext, emit_json, human_bytes, pass_app
from pgkloset_core.errors import KlosetError

if TYPE_CHECKING:  # the drill machinery (psycopg, instances) loads only when a drill runs
    from pgkloset_core.postgres.drill import CheckResult, DrillReport

# Passing checks shown one by one; beyond this, a summary line (failures always shown).
SHOW_PASSING = 40


class DrillStopped(KlosetError):
    """The drill was interrupted by a signal (after its cleanup); exit 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def register(cli: click.Group, _backup: click.Group) -> None:
    cli.add_command(drill)


@click.command()
@click.argument("snapshot")
@click.option("--database", "-d", metavar="NAME",
              help="Drill only this database (default: every database in the snapshot).")
@click.option("--sql-check", "sql_checks", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with a query that must return a single true (repeatable). "
                   "A line `-- database: NAME` picks the database it runs in.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-isolate", is_flag=True,
              help="Let the scratch server use the network (default: its own network "
                   "namespace where the machine allows).")
@click.option("--work-dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Where the scratch instance and restored files go (default: $TMPDIR); "
                   "everything is deleted afterwards.")
@click.option("--pg-bin", metavar="DIR", help="PostgreSQL bin directory to run the scratch "
              "server from (default: searched).")
@pass_app
def drill(app: AppContext, snapshot: str, database: str | None, sql_checks: tuple[Path, ...],
          as_json: bool, no_isolate: bool, work_dir: Path | None, pg_bin: str | None) -> None:
    """Restore SNAPSHOT (an id, a prefix or `latest`) into a scratch instance and verify it.

    Checks: the restore ran without errors, every table has the row count recorded at
    backup time, object counts match, physical restores pass pg_verifybackup and
    pg_amcheck, and every --sql-check returns true. Exit status 4 when a check fails.
    """
    from pgkloset_core.postgres.drill import (
        DrillFailed,
        DrillInterrupted,
        resolve_drillable,
        run_drill,
    )

    kloset = app.open()
    snap = resolve_drillable(kloset, snapshot, database)
    say = _logger(quiet=as_json)
    try:
        report = run_drill(kloset, snap, database=database, sql_checks=list(sql_checks),
                           isolate=not no_isolate, log=say, work_dir=work_dir, bin_dir=pg_bin,
                           lock_wait=app.lock_wait)
    except DrillInterrupted as exc:
        raise DrillStopped(str(exc), 128 + exc.signum) from None
    if as_json:
        emit_json(report.to_json())
    else:
        _print_report(report)
    if not report.passed:
        raise DrillFailed(f"drill failed: {report.first_failure() or 'no check ran'}")


def _logger(quiet: bool) -> Any:
    def say(message: str) -> None:
        if not quiet:
            click.echo(f"drill: {message}", err=True)

    return say


def _mark(check: CheckResult) -> str:
    if check.skipped:
        return "SKIP"
    return "ok  " if check.passed else "FAIL"


def _print_report(report: DrillReport) -> None:
    click.echo(f"drill of {report.kind} snapshot {report.snapshot_id[:8]}"
               f"{f' (database {report.database})' if report.database else ''}")
    shown = hidden = 0
    objects: list[CheckResult] = []
    for check in report.checks:
        if check.passed and not check.skipped and check.name.startswith("objects "):
            objects.append(check)  # one summary line below; failures are listed one by one
            continue
        if check.passed and not check.skipped and shown >= SHOW_PASSING:
            hidden += 1
            continue
        shown += check.passed
        click.echo(f"  {_mark(check)} {check.name}: {_detail(check)}")
    if objects:
        nonzero = ", ".join(f"{c.name.rsplit(' ', 1)[-1]} {c.actual}" for c in objects
                            if c.actual)
        click.echo(f"  ok   object counts: {len(objects)} kinds match ({nonzero or 'all zero'})")
    if hidden:
        click.echo(f"  ok   ... and {hidden} more passing checks (use --json for all)")
    for error in report.errors:
        click.echo(f"  FAIL {error}")
    isolation = "network isolated" if report.isolated else "NOT network isolated"
    click.echo(f"restore: {report.restore_seconds:.2f}s, {human_bytes(report.bytes_read)} read; "
               f"PostgreSQL {report.source_version or '?'} -> scratch {report.scratch_version}, "
               f"{isolation}")
    passed = sum(1 for c in report.checks if c.passed)
    click.echo(f"result: {'PASSED' if report.passed else 'FAILED'} "
               f"({passed}/{len(report.checks)} checks passed, {report.seconds:.1f}s)")


def _detail(check: CheckResult) -> str:
    if not check.passed:
        text = check.message or f"expected {check.expected}, got {check.actual}"
        return text.removeprefix(f"{check.name}: ")
    if check.skipped:
        return f"{check.actual} (skipped)"
    if isinstance(check.actual, int) and not isinstance(check.actual, bool):
        return f"expected {check.expected}, got {check.actual}"
    return f"{check.actual}"
