"""Maintenance commands: ``forget``, ``prune`` and ``unlock``.

Registered into the ``pgkloset`` group by ``cli._register_extensions``. Every
command that takes a lock honours the global ``--lock-wait``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from pgkloset_core.cli_common import AppContext, emit_json, parse_seconds, pass_app, status
from pgkloset_core.errors import UsageError

if TYPE_CHECKING:  # forget, prune and retention load only in the commands that run them
    from pgkloset_core.kloset.forget import ForgetPlan

# The same value as pgkloset_core.kloset.prune.DEFAULT_MAX_REPACK_RATIO, repeated here so
# that building the command line does not import prune (tests/test_cli_startup.py checks
# that the two agree).
DEFAULT_MAX_REPACK_RATIO = 0.25

_KEEP_HELP = {
    "last": "Keep the N newest snapshots",
    "hourly": "Keep the newest snapshot of each of the last N hours that have one",
    "daily": "Keep the newest snapshot of each of the last N days that have one",
    "weekly": "Keep the newest snapshot of each of the last N ISO weeks that have one",
    "monthly": "Keep the newest snapshot of each of the last N months that have one",
    "yearly": "Keep the newest snapshot of each of the last N years that have one",
}


def _keep_options(func: Any) -> Any:
    for name, text in reversed(_KEEP_HELP.items()):
        func = click.option(f"--keep-{name}", metavar="N",
                            help=f"{text} (per group; 'unlimited' for no limit).")(func)
    return func


@click.command("forget")
@click.argument("snapshot_ids", nargs=-1, metavar="[SNAPSHOT...]")
@_keep_options
@click.option("--keep-within", metavar="DURATION",
              help="Keep snapshots this close to the newest of their group (e.g. 30d, 1y6m).")
@click.option("--keep-tag", "keep_tags", multiple=True, metavar="TAG",
              help="Keep every snapshot with this tag (repeatable).")
@click.option("--group-by", default="server,database,kind", show_default=True, metavar="FIELDS",
              help="Apply the policy per group of these fields (kind, hostname, tags, entries or "
                   "a meta field; '' for one group).")
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Only consider snapshots carrying this tag (repeatable: all of them).")
@click.option("--dry-run", is_flag=True, help="Show what would be kept and removed, and why.")
@click.option("--prune", "then_prune", is_flag=True, help="Run prune afterwards (same lock).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def forget_cmd(app: AppContext, snapshot_ids: tuple[str, ...], keep_last: str | None,
               keep_hourly: str | None, keep_daily: str | None, keep_weekly: str | None,
               keep_monthly: str | None, keep_yearly: str | None, keep_within: str | None,
               keep_tags: tuple[str, ...], group_by: str, tags: tuple[str, ...], dry_run: bool,
               then_prune: bool, as_json: bool) -> None:
    """Remove snapshots by id, or by a retention policy (their data stays until `prune`).

    \b
    pgkloset forget 3fa4c1d2 latest
    pgkloset forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
    """
    from pgkloset_core.kloset.forget import forget, plan_ids, plan_policy
    from pgkloset_core.kloset.prune import describe, prune
    from pgkloset_core.kloset.retention import RetentionPolicy, parse_group_by

    policy = RetentionPolicy.from_mapping({
        "keep_last": keep_last, "keep_hourly": keep_hourly, "keep_daily": keep_daily,
        "keep_weekly": keep_weekly, "keep_monthly": keep_monthly, "keep_yearly": keep_yearly,
        "keep_within": keep_within, "keep_tags": list(keep_tags) or None,
    })
    fields = parse_group_by(group_by)
    if snapshot_ids and (not policy.is_empty() or tags):
        raise UsageError("give snapshot ids or a policy (--keep-*, --tag), not both")
    if not snapshot_ids and policy.is_empty():
        raise UsageError("nothing to forget: give snapshot ids or at least one --keep-* option "
                         "(an empty policy would remove every snapshot)")
    if dry_run and then_prune:
        raise UsageError("--prune cannot be combined with --dry-run (run `prune --dry-run`)")
    kloset = app.open()
    with kloset.lock(exclusive=not dry_run, operation="forget", wait=app.lock_wait) as lock:
        if snapshot_ids:
            plan = plan_ids(kloset, snapshot_ids)
        else:
            plan = plan_policy(kloset.snapshots(), policy, group_by=fields, tags=tags)
        if not dry_run:
            forget(kloset, plan, lock)
        pruned = None
        if then_prune:
            with status("prune") as say:
                say("computing")
                pruned = prune(kloset, lock)
    if as_json:
        doc = plan.to_json(dry_run=dry_run)
        if pruned is not None:
            doc["prune"] = pruned.to_json()
        emit_json(doc)
        return
    _print_plan(plan, dry_run)
    if pruned is not None:
        for line in describe(pruned):
            click.echo(line)


def _print_plan(plan: ForgetPlan, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    if plan.policy is None:
        for s in plan.remove:
            click.echo(f"{verb} snapshot {s.short_id}")
        return
    by_id = {s.id: s for s in plan.remove + plan.keep}
    for decision in plan.decisions:
        label = ", ".join(f"{f}={v or '-'}" for f, v in zip(plan.group_by, decision.group, strict=True))
        click.echo(f"group {label or '(all)'}: keep {len(decision.keep)}, "
                   f"{'remove' if dry_run else 'removed'} {len(decision.remove)}")
        for ref, reasons in decision.keep:
            click.echo(f"  keep    {by_id[ref.id].short_id}  {ref.time:%Y-%m-%d %H:%M:%S}  "
                       f"{', '.join(reasons)}")
        for ref in decision.remove:
            click.echo(f"  {'remove ' if dry_run else 'removed'} {by_id[ref.id].short_id}  "
                       f"{ref.time:%Y-%m-%d %H:%M:%S}")
    click.echo(f"{verb} {len(plan.remove)} snapshot(s), kept {len(plan.keep)} "
               f"(policy: {plan.policy.describe()})")


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted and repacked.")
@click.option("--max-repack-ratio", type=click.FloatRange(0, 1), default=DEFAULT_MAX_REPACK_RATIO,
              show_default=True, metavar="R",
              help="Rewrite a pack when more than this share of its bytes is unused "
                   "(0 rewrites every partly unused pack, 1 never rewrites).")
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="Delete unused data only once it has been unused this long (0 = now).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def prune_cmd(app: AppContext, dry_run: bool, max_repack_ratio: float, grace: str,
              as_json: bool) -> None:
    """Delete data that no snapshot references (after `forget`)."""
    from pgkloset_core.kloset.prune import describe, prune

    grace_seconds = parse_seconds(grace)
    kloset = app.open()
    with kloset.lock(exclusive=True, operation="prune", wait=app.lock_wait) as lock, \
            status("prune") as say:
        say("reading snapshots and index")
        report = prune(kloset, lock, grace=grace_seconds, max_repack_ratio=max_repack_ratio,
                       dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
        return
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for line in describe(report):
        click.echo(line)


@click.command("unlock")
@click.option("--force", is_flag=True, help="Remove every lock, not only stale ones.")
@click.option("--json", "as_json", is_flag=True, help="Print the removed locks as JSON.")
@pass_app
def unlock_cmd(app: AppContext, force: bool, as_json: bool) -> None:
    """Remove stale locks left by dead processes (every lock with --force)."""
    from pgkloset_core.kloset import locks

    kloset = app.open()
    removed = locks.remove_stale(kloset.backend, kloset.master, force=force)
    if as_json:
        emit_json({"removed": [{"name": i.name, "exclusive": i.exclusive, "operation": i.operation,
                                "hostname": i.hostname, "pid": i.pid} for i in removed]})
        return
    for info in removed:
        click.echo(f"removed {info.describe()}")
    if not removed:
        click.echo("no stale locks", err=True)


def register(cli: click.Group, backup: click.Group) -> None:
    del backup  # maintenance adds no backup sources
    for command in (forget_cmd, prune_cmd, unlock_cmd):
        cli.add_command(command)
