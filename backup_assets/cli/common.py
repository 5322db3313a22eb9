"""What every command shares: reading the catalog and checking names, progress lines, choosing a backup,
confirmation, the Dagster instance, alerts sent from the command line."""

from __future__ import annotations

import sys

from backup_assets.catalog import REPLICA_LABELS, CatalogError, catalog_from_env, load_catalog
from backup_assets.core import BackupError
from backup_assets.core.partition_keys import validate
from backup_assets.core.secrets import scrub


class UsageError(Exception):
    """Refused: bad arguments or a missing confirmation (exit code 2)."""


class Reporter:
    """Progress on a terminal (one line rewritten in place), plain lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False

    def __call__(self, message: str, progress: bool = False) -> None:
        if progress and self.tty:
            self.stream.write("\r" + message.ljust(60))
            self._open = True
        else:
            if self._open:
                self.stream.write("\n")
                self._open = False
            if not progress:
                self.stream.write(message + "\n")
        self.stream.flush()


def _catalog(args):
    catalog = load_catalog(args.catalog) if args.catalog else catalog_from_env()
    _check_names(catalog, args)
    return catalog


def _check_names(catalog, args) -> None:
    """One rule for every command: a source, group, tier or --select the catalog does not have is one line
    naming the valid ones, exit 2 (never an empty answer that looks like "no backups")."""
    def groups_of(source: str) -> list[str]:
        return catalog.sources[source].group_names()

    source = getattr(args, "source", None)
    if isinstance(source, str) and source not in catalog.sources:
        raise UsageError(f"unknown source {source!r}: the catalog has {', '.join(catalog.sources)}")
    group = getattr(args, "group", None)
    if isinstance(group, str):
        valid = groups_of(source) if source else sorted({g for s in catalog.sources for g in groups_of(s)})
        if group not in valid:
            raise UsageError(f"unknown group {group!r}{f' of source {source!r}' if source else ''}: "
                             f"{'it has' if source else 'the catalog has'} {', '.join(valid)}")
    tier = getattr(args, "tier", None)
    if isinstance(tier, str) and tier not in catalog.tiers:
        raise UsageError(f"tier {tier!r} is not enabled in the catalog: it has {', '.join(catalog.tiers)}")
    for item in getattr(args, "select", None) or []:
        name, _, grp = item.partition("/")
        if name not in catalog.sources or (grp and grp not in groups_of(name)):
            valid = [f"{s}/{g}" for s in catalog.sources for g in groups_of(s)]
            raise UsageError(f"--select {item!r} names no backup asset: choose a source ({', '.join(catalog.sources)}) "
                             f"or a source/group ({', '.join(valid)})")


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _repositories(catalog, args) -> list:
    """The repositories to walk: the local one, and every replica unless --local-only."""
    from backup_assets.core.backup.take import repository_for

    repos = [repository_for(catalog)]
    for name in catalog.replication.replicas() if not getattr(args, "local_only", False) else ():
        from backup_assets.core.replica import replica_repository

        try:
            repos.append(replica_repository(catalog, replica=name))
        except (BackupError, CatalogError) as exc:
            print(f"backup-assets: {REPLICA_NAMES[name]} not listed: {scrub(str(exc))}", file=sys.stderr)
    return repos


REPLICA_NAMES = {**REPLICA_LABELS, "local": "local"}


def _check_partitions(args, catalog) -> None:
    for key in ([args.partition] if isinstance(args.partition, str) else (args.partition or [])):
        validate(catalog, args.tier, key)


def _selected_backup(args, catalog, say, *, to_restore: bool = True):
    from backup_assets.core.restore.choose import backup_from_file, choose_backup

    _check_partitions(args, catalog)
    if args.file:
        return backup_from_file(catalog, args.file)
    if not (args.source and args.group):
        raise UsageError("name a backup: FILE, or --source and --group (with --tier/--partition)")
    if not to_restore and args.partition:  # verify checks the partition's newest backup, whatever its state
        from backup_assets.core.verify.checks import find_backup

        tiers = [args.tier] if args.tier else ["daily", "weekly", "monthly", "hourly"]
        for tier in tiers:
            try:
                return find_backup(catalog, args.source, args.group, tier, args.partition)
            except BackupError:
                continue
        raise BackupError(f"no backup of {args.source}/{args.group} for partition {args.partition} "
                          f"({'/'.join(tiers)})")
    return choose_backup(catalog, source=args.source, group=args.group, tier=args.tier, partition=args.partition, say=say)


def _confirm(args, plan: str, target: str) -> None:
    if args.confirm:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing without --confirm (no terminal to ask); this would {plan}")
    print(f"This will {plan}.", file=sys.stderr)
    answer = input(f"Type {target!r} to go on: ")
    if answer.strip() != target:
        raise UsageError("not confirmed; nothing was changed")


def _dry_run(args) -> bool:
    if args.apply and args.dry_run:
        raise UsageError("--apply and --dry-run exclude each other")
    return not args.apply


def _instance():
    import dagster as dg

    _instance_home()
    return dg.DagsterInstance.get()


def _instance_home() -> None:
    """DAGSTER_HOME is set (the demo's when it is the demo), else a UsageError: checked before anything runs."""
    import os

    from backup_assets.catalog import PROJECT_ROOT

    if not os.environ.get("DAGSTER_HOME"):
        demo = PROJECT_ROOT / ".dagster_home"
        if os.environ.get("BACKUP_ASSETS_CATALOG") or not (demo / "dagster.yaml").exists():
            raise UsageError("DAGSTER_HOME is not set: point it at the Dagster instance's folder (the demo's is "
                             f"{demo}; `make env` prints the settings)")
        os.environ["DAGSTER_HOME"] = str(demo)


def _fail_dead_cli_runs(catalog, instance) -> list[str]:
    """Runs of `backup-assets backup` whose process died mid-run: marked FAILURE and alerted (the daemon's
    run monitoring does the same when it runs first). Says what it did."""
    from backup_assets.core.monitoring.alerts import Alert
    from backup_assets.defs import cli_runs
    from backup_assets.defs.sensors import describe_key, run_partition

    said = []
    for run in cli_runs.fail_dead_runs(instance):
        message = cli_runs.dead_owner_message(run)
        said.append(f"run {run.run_id} of {run.job_name} marked failed: {message}")
        print(said[-1], file=sys.stderr)
        for key in sorted(run.asset_selection or [], key=lambda k: k.to_user_string()):
            _alert(catalog, Alert(what=f"run of {run.job_name} failed", error=message, partition=run_partition(run.tags),
                                  cause="run-failure", **describe_key(key)), instance=instance)
    return said


def _alert(catalog, alert, *, instance=None) -> None:
    """Send an alert from the command line through the catalog's channels; say where it went (or why not).
    The alert memory is the Dagster instance's (shared with the daemon's sensors) for what ran through
    Dagster, else the repository's: a restore or verify at 3 a.m. needs no Dagster."""
    from backup_assets.core.monitoring.alerts import Notifier

    notifier = Notifier.for_catalog(catalog, instance)
    if not notifier.channels:
        return
    try:
        reached = notifier.send(alert)
    except BackupError as exc:
        print(f"alert not sent: {exc}", file=sys.stderr)
        return
    print(f"alert sent to {', '.join(reached)}" if reached else "alert already sent within the alert window",
          file=sys.stderr)
