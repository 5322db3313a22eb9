"""`backup-assets`: the operator's command line. It reads the catalog, the repository and the
manifests directly, so it works when Dagster is down (that is when it is needed most).

Exit codes: 0 success, 1 failure, 2 refused or bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from backup_assets.catalog import TIER_NAMES, CatalogError, catalog_from_env, load_catalog
from backup_assets.core import BackupError
from backup_assets.core.partition_keys import BadPartition, validate
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
    """The repositories to walk: the local one, and the S3 replica unless --local-only."""
    from backup_assets.core.backup.take import repository_for

    repos = [repository_for(catalog)]
    if catalog.replication.s3 is not None and not getattr(args, "local_only", False):
        from backup_assets.core.replica import replica_repository

        try:
            repos.append(replica_repository(catalog))
        except (BackupError, CatalogError) as exc:
            print(f"backup-assets: S3 not listed: {scrub(str(exc))}", file=sys.stderr)
    return repos


def cmd_list(args) -> int:
    from backup_assets.core.verify import records as verification
    from backup_assets.core.artifact import human_size
    from backup_assets.core.crypto import key_summary

    catalog = _catalog(args)
    local, *others = _repositories(catalog, args)
    local.sweep()
    rows: dict[str, dict] = {}
    for repo in [local, *others]:
        try:
            refs = repo.refs(source=args.source, group=args.group, tier=args.tier, partition=args.partition)
        except (BackupError, CatalogError) as exc:
            print(f"backup-assets: {repo.name.replace('s3', 'S3')} not listed: {scrub(str(exc))}", file=sys.stderr)
            continue
        untrusted = repo.untrusted()
        for ref in refs:
            if ref.key in untrusted:
                continue
            if ref.key in rows:
                rows[ref.key]["where"] += f"+{repo.name}"
                continue
            row = {"source": ref.source, "group": ref.group, "tier": ref.tier, "partition": ref.partition,
                   "created": ref.created.isoformat(timespec="seconds"), "size": human_size(ref.size),
                   "size_bytes": ref.size, "rows": "", "verified": "ok (replica)" if repo.replica else "unknown",
                   "where": repo.name, "key": "", "path": repo.storage.uri(ref.key)}
            if repo is local:  # the manifest and check record are at hand: say more
                b = local.stored(ref)
                row.update(created=b.manifest.timestamp, size=b.manifest.size_human, rows=b.manifest.total_rows,
                           verified=verification.summary(b), key=key_summary(b.manifest))
            rows[ref.key] = row
    ordered = sorted(rows.values(), key=lambda r: (r["source"], r["group"], r["tier"], r["partition"], r["created"]))
    if args.json:
        print(json.dumps(ordered, indent=2))
    elif ordered:
        # a terminal's width: the artifact's name, not its path (--paths), "plain" for what is not encrypted
        shown = [{**r, "created": str(r["created"])[:19].replace("T", " "),
                  "key": {"-": "plain", "": "?"}.get(r["key"], r["key"])} for r in ordered]
        _print_table(shown, ["source", "group", "tier", "partition", "created", "size", "rows", "verified", "where",
                             "key"] + (["path"] if args.paths else []))
        if not args.paths:
            print("(key: the fingerprints of the keys that open it, plain, or ? for a copy only S3 has; --paths "
                  "shows where each is)", file=sys.stderr)
    else:
        print(f"no backups match in repository {local.root} (catalog {catalog.catalog_path or 'built in'})",
              file=sys.stderr)
    for orphan in local.orphans():
        print(f"backup-assets: {orphan} has no manifest: not a backup (an interrupted write; "
              "`backup-assets doctor` removes it)", file=sys.stderr)
    for _path, error in local.unreadable():
        print(f"backup-assets: not counted as a backup: {error}", file=sys.stderr)
    return 0


def _check_partitions(args, catalog) -> None:
    for key in ([args.partition] if isinstance(args.partition, str) else (args.partition or [])):
        validate(catalog, args.tier, key)


def _selected_backup(args, catalog, say, *, to_restore: bool = True):
    from backup_assets.core.restore.logical import backup_from_file, choose_backup

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


def cmd_verify(args) -> int:
    from backup_assets.core.verify import records as verification
    from backup_assets.core.backup.take import repository_for
    from backup_assets.core.crypto import identities_if_any
    from backup_assets.core.verify.checks import archive_readable, artifact_intact, restore_drill

    catalog = _catalog(args)
    repository_for(catalog).sweep()
    say = Reporter()
    backup = _selected_backup(args, catalog, say, to_restore=False)
    ids = identities_if_any(catalog, backup.manifest, artifact=str(backup.artifact_path))
    steps = [("artifact_intact", lambda: artifact_intact(backup, ids)),
             ("archive_readable", lambda: archive_readable(catalog, backup))]
    if args.drill:
        steps.append(("restore_drill", lambda: restore_drill(catalog, backup, jobs=args.jobs)))
    results = []
    from backup_assets.core.verify.checks import Outcome

    for name, run in steps:
        try:
            outcome = run()
        except BackupError as exc:  # the check could not be done (a full scratch folder, say): it failed
            outcome = Outcome.failure(exc, str(exc))
        if not outcome.not_checked:  # a check that could not run here never replaces what was recorded
            verification.record(backup, name, outcome.passed, outcome.message, outcome.metadata)
        results.append({"check": name, "passed": outcome.passed, "message": outcome.message,
                        **({"not_checked": True} if outcome.not_checked else {}),
                        **({"rto_s": outcome.metadata["rto_s"]} if "rto_s" in outcome.metadata else {})})
        if not args.json:
            print(f"{'SKIP' if outcome.not_checked else 'PASS' if outcome.passed else 'FAIL'} {name}: "
                  f"{outcome.message}")
        if not outcome.passed and name == "artifact_intact":
            break
    ok = all(r["passed"] or r.get("not_checked") for r in results)
    if args.json:
        print(json.dumps({"artifact": str(backup.artifact_path), "passed": ok, "checks": results}, indent=2))
    m = backup.manifest
    for r in results:  # the check_failure_alerts sensor's alert and key: it never sees a check run here
        if not r["passed"] and not r.get("not_checked"):
            from backup_assets.core.monitoring.alerts import Alert
            from backup_assets.defs.keys import backup_key

            _alert(catalog, Alert(what=f"check {r['check']} failed", error=r["message"], source=m.source,
                                  group=m.group, tier=m.tier, partition=m.partition, cause=f"check:{r['check']}",
                                  asset=backup_key(m.source, m.group, m.tier).to_user_string()))
    return 0 if ok else 1


def _confirm(args, plan: str, target: str) -> None:
    if args.confirm:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing without --confirm (no terminal to ask); this would {plan}")
    print(f"This will {plan}.", file=sys.stderr)
    answer = input(f"Type {target!r} to go on: ")
    if answer.strip() != target:
        raise UsageError("not confirmed; nothing was changed")


def cmd_pitr_restore(args) -> int:
    from backup_assets.core.pitr import recovery as pitr

    catalog = _catalog(args)
    if not args.pgdata:
        raise UsageError("a point-in-time restore builds a new data directory: name it with --pgdata")
    if not args.source:
        raise UsageError("name the source with --source")
    target = pitr.parse_time(args.to_time) if args.to_time else None
    what = target.isoformat() if target else (args.to_lsn or "the end of the archived WAL")
    plan = (f"build a new data directory {args.pgdata} from {args.source}'s base backup and WAL archive, recover it "
            f"to {what} and start it on port {args.port}; the running server is not touched")
    _confirm(args, plan, args.pgdata)
    if args.from_ == "s3":  # the base backups come back into the local repository; WAL one segment at a time
        from backup_assets.core.pitr.s3 import download_bases
        from backup_assets.core.pitr.locations import replica_storage

        if catalog.replication.s3 is None:
            raise UsageError("--from s3: the catalog has no replication.s3 section")
        download_bases(catalog, args.source, replica_storage(catalog), say=Reporter())
    cfg = catalog.sources[args.source].pitr
    run_as = args.run_as or (cfg.run_as if cfg is not None else None)  # the catalog's server user by default
    result = pitr.restore_to_time(catalog, args.source, args.pgdata, to_time=target, to_lsn=args.to_lsn, port=args.port,
                                  run_as=run_as, say=Reporter())
    print(f"recovered {result.pgdata} from {result.base} to {result.target}: {result.reached}")
    try:
        pitr.record_recovered(catalog, result, args.source)
    except OSError as exc:  # the server runs; only `make stop` will not know it
        print(f"backup-assets: the running server was not recorded for `make stop`: {exc.strerror}", file=sys.stderr)
    import shlex

    stop = f"{shlex.quote(str(result.bin_dir / 'pg_ctl'))} -D {shlex.quote(str(result.pgdata))} -m fast stop"
    if result.user is not None:  # PostgreSQL refuses root: stop it as the user it runs as
        stop = f"runuser -u {shlex.quote(result.user.pw_name)} -- {stop}"
    print(f"running on 127.0.0.1:{result.port}; stop it with: {stop}")
    if getattr(args, "timings", False) and result.timings:
        total = sum(v for k, v in result.timings.items() if not k.startswith(" "))
        print("timings: " + "; ".join(f"{k.strip()} {v:.2f}s" for k, v in result.timings.items())
              + f"; total {total:.2f}s (after the command started)")
    return 0


def cmd_basebackup(args) -> int:
    """A base backup. With --dagster it is taken through the `<source>/base_backup` asset (a run in
    DAGSTER_HOME), so it shows in the UI with its checks and replica, as `backup` does for dumps."""
    from backup_assets.core.pitr import recovery as pitr

    catalog = _catalog(args)
    cfg = catalog.sources[args.source].pitr
    replicate_too = catalog.replication.s3 is not None and (cfg is None or cfg.s3) and not args.local_only
    failed_checks = []
    if args.dagster:
        if args.kind != "auto":
            raise UsageError("--dagster takes the kind the asset chooses: leave out --kind")
        if args.source not in catalog.pitr_sources():
            raise UsageError(f"source {args.source!r} has no pitr section: it has no base_backup asset")
        meta, failed_checks = _basebackup_through_dagster(catalog, args.source, replicate_too, debug=args.debug)
    else:
        meta = pitr.base_backup(catalog, args.source, kind=args.kind, say=Reporter())
        if replicate_too:
            from backup_assets.core.pitr.s3 import replicate
            from backup_assets.core.pitr.locations import replica_storage

            replicate(catalog, args.source, replica_storage(catalog), say=Reporter())
    on = f" on {meta['parent']}" if meta.get("parent") else ""
    print(f"{meta['kind']} base backup {meta['artifact']}{on} ({meta['size_bytes']} bytes), WAL from "
          f"{meta['start_wal']}, finished {meta['finished_at']}")
    oldest = pitr.base_backups(catalog, args.source)[0]
    print(f"a point-in-time restore of {args.source} reaches any moment from {oldest['finished_at']} on "
          f"(backup-assets restore --source {args.source} --to-time '...' --pgdata DIR)")
    return 1 if failed_checks else 0


def _basebackup_through_dagster(catalog, source: str, replicate_too: bool, *, debug: bool) -> dict:
    from backup_assets.core.pitr import recovery as pitr
    from backup_assets.defs import cli_runs
    from backup_assets.defs.build import build_definitions
    from backup_assets.defs.pitr import BASE_BACKUPS_JOB, base_key, base_replica_key
    from backup_assets.defs.sensors import root_cause

    defs = build_definitions(catalog)
    job = defs.resolve_job_def(BASE_BACKUPS_JOB)
    partition = defs.resolve_assets_def(base_key(source)).partitions_def.get_last_partition_key()
    instance = _instance()
    _fail_dead_cli_runs(catalog, instance)
    before = {b["artifact"] for b in pitr.base_backups(catalog, source)}
    result = job.execute_in_process(
        partition_key=partition, instance=instance, raise_on_error=False,
        asset_selection=[base_key(source)] + ([base_replica_key(source)] if replicate_too else []),
        tags={**cli_runs.run_tags(catalog), "backup_assets/command": f"backup-assets basebackup --source {source}"},
        run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if debug else "CRITICAL"}}}})
    made = [b for b in pitr.base_backups(catalog, source) if b["artifact"] not in before]
    import dagster as dg

    failed = []
    for check in (c for c in result.get_asset_check_evaluations() if not c.passed):
        error = check.severity == dg.AssetCheckSeverity.ERROR
        print(f"check {check.check_name} of {check.asset_key.to_user_string()} "
              f"{'failed' if error else 'warns'}: {check.description}", file=sys.stderr)
        if error:
            failed.append(check)
    if not made:
        errors = [root_cause(e.event_specific_data.error) for e in result.all_events
                  if e.is_step_failure and e.event_specific_data and e.event_specific_data.error]
        raise BackupError(errors[0] if errors else f"the base backup of {source} was not taken")
    return made[-1], failed


def cmd_restore(args) -> int:
    if args.to_time or args.to_lsn or args.latest:
        return cmd_pitr_restore(args)  # without the logical restore's modules: the recovery time counts
    from backup_assets.core.restore.logical import restore_plan, restore_postgres, restore_sqlite

    catalog = _catalog(args)
    say = Reporter()
    _check_partitions(args, catalog)
    if args.from_ == "s3":
        from backup_assets.core.replica import fetch_from_s3

        backup = fetch_from_s3(catalog, source=args.source, group=args.group, tier=args.tier,
                               partition=args.partition, say=say)
    else:
        backup = _selected_backup(args, catalog, say)
    m = backup.manifest
    if m.engine == "sqlite" and (args.target_db or args.tables):
        raise BackupError(f"{backup.artifact_path.name} is a SQLite backup: --target-db and --tables are for PostgreSQL")
    if m.engine == "postgres" and args.target_file:
        raise BackupError(f"{backup.artifact_path.name} is a PostgreSQL backup and cannot be restored onto a SQLite file")
    tables = list(args.tables or [])
    plan = restore_plan(catalog, backup, target_db=args.target_db, tables=tables, target_file=args.target_file,
                        safety_copy=not args.no_safety_copy)
    target = args.target_db or args.target_file or (
        catalog.sources[m.source].connection.dbname if m.engine == "postgres" else str(catalog.resolve_path(catalog.sources[m.source].path)))
    _confirm(args, plan, target)
    say(f"restoring {backup.artifact_path}")
    from backup_assets.core.monitoring.alerts import Alert

    failed_alert = Alert(what=f"restore into {target}{' (tables ' + ', '.join(tables) + ')' if tables else ''} failed",
                         error="", source=m.source, group=m.group, tier=m.tier, partition=m.partition,
                         asset=f"restore:{m.source}", cause=f"restore:{target}")
    try:
        if m.engine == "postgres":
            result = restore_postgres(catalog, backup, target_db=args.target_db, tables=tables or None, jobs=args.jobs,
                                      safety_copy=not args.no_safety_copy,
                                      terminate_connections=args.terminate_connections,
                                      create_roles=not args.no_create_roles, say=say)
        else:
            result = restore_sqlite(catalog, backup, target_file=args.target_file,
                                    safety_copy=not args.no_safety_copy, say=say)
    except BackupError as exc:
        _alert(catalog, replace(failed_alert, error=str(exc)))
        raise
    if result.problems or result.hook_problem:
        _alert(catalog, replace(failed_alert, error="; ".join(result.problems) or result.hook_problem))
    print(result.table())
    print(f"restored {result.artifact} into {result.target} in {result.duration_s:.1f}s"
          + (f"; the previous data is kept as {result.safety_copy}" if result.safety_copy else ""))
    if result.problems:
        print("DIFFERS from the manifest: " + "; ".join(result.problems), file=sys.stderr)
        return 1
    if result.hook_problem:
        print(f"HOOK FAILED: {result.hook_problem}", file=sys.stderr)
        return 1
    return 0


def cmd_drill(args) -> int:
    from backup_assets.core.verify import records as verification
    from backup_assets.core.verify.dr_drill import markdown_report, run_dr_drill

    catalog = _catalog(args)
    results = run_dr_drill(catalog, sources=args.source, jobs=args.jobs, log=Reporter())
    for r in results:
        if r.backup:
            verification.record(r.backup, "restore_drill", r.outcome.passed, r.outcome.message, r.outcome.metadata)
    print(markdown_report(results))
    return 0 if all(r.outcome.passed for r in results) else 1


def _dry_run(args) -> bool:
    if args.apply and args.dry_run:
        raise UsageError("--apply and --dry-run exclude each other")
    return not args.apply


def cmd_retention_prune(args) -> int:
    from backup_assets.core.retention.prune import prune

    report = prune(_catalog(args), dry_run=_dry_run(args))
    print(json.dumps(report, indent=2))
    return 0


def cmd_retention_prune_tables(args) -> int:
    from backup_assets.core.retention.app_tables import prune_tables

    catalog = _catalog(args)
    sources = args.source or [s for s, src in catalog.sources.items() if src.engine == "postgres" and src.prune]
    if not sources:
        raise UsageError("no postgres source in the catalog has prune rules")
    reports = [prune_tables(catalog, s, dry_run=_dry_run(args), say=Reporter()) for s in sources]
    print(json.dumps(reports, indent=2, default=str))
    return 0


def cmd_runs_prune(args) -> int:

    from backup_assets.defs.hygiene import prune_runs

    report = prune_runs(_instance(), older_than_days=args.older_than_days, dry_run=not args.apply,
                        include_restores=args.include_restores)
    print(json.dumps({k: v for k, v in report.items() if k != "run_ids"}, indent=2))
    return 0


def cmd_restores(args) -> int:
    """The restore log (<repository>/restores.jsonl), newest last."""
    from backup_assets.core.restore import restore_log as audit

    catalog = _catalog(args)
    entries = audit.read(catalog.repository_root)[-args.limit:] if args.limit else audit.read(catalog.repository_root)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    print(f"{'WHEN':25} {'BY':28} {'EVENT':9} {'OUTCOME':8} {'SOURCE':12} {'TARGET':40} BACKUP")
    for e in entries:
        who = f"{e.get('user', '?')}@{e.get('host', '?')}" if e.get("via") == "cli" else f"run {str(e.get('run_id'))[:8]}"
        print(f"{e.get('at', ''):25} {who[:28]:28} {e.get('event', ''):9} {e.get('outcome', '-'):8} "
              f"{e.get('source', ''):12} {str(e.get('target', ''))[:40]:40} {e.get('artifact', '')}"
              + (f"  tables: {', '.join(e['tables'])}" if e.get("tables") else "")
              + (f"  error: {e['error']}" if e.get("error") else ""))
    return 0


def _instance():
    import os

    import dagster as dg

    from backup_assets.catalog import PROJECT_ROOT

    if not os.environ.get("DAGSTER_HOME"):
        demo = PROJECT_ROOT / ".dagster_home"
        if os.environ.get("BACKUP_ASSETS_CATALOG") or not (demo / "dagster.yaml").exists():
            raise UsageError("DAGSTER_HOME is not set: point it at the Dagster instance's folder (the demo's is "
                             f"{demo}; `make env` prints the settings)")
        os.environ["DAGSTER_HOME"] = str(demo)
    return dg.DagsterInstance.get()


def cmd_backup(args) -> int:
    """Run backups through Dagster (recorded in DAGSTER_HOME, visible in the UI): one run per partition with
    every selected asset, as the schedule does, with the backups' checks and, when configured, their S3
    replicas."""
    from backup_assets.core.verify import records as verification
    from backup_assets.core.monitoring.alerts import Alert
    from backup_assets.core.backup.take import repository_for
    from backup_assets.defs import cli_runs
    from backup_assets.defs.build import build_definitions
    from backup_assets.defs.keys import backup_key, replica_key
    from backup_assets.defs.checks import FAILED_ASSETS, failed_assets
    from backup_assets.defs.sensors import root_cause

    catalog = _catalog(args)
    _check_partitions(args, catalog)
    targets = [t for t in catalog.backup_targets() if t[2] == args.tier]
    if args.select:
        targets = [t for t in targets if f"{t[0]}/{t[1]}" in args.select or t[0] in args.select]
    if not targets:
        raise UsageError(f"no {args.tier} backup assets match {', '.join(args.select) if args.select else 'the catalog'}")
    defs = build_definitions(catalog)
    job = defs.resolve_job_def(f"{args.tier}_backups")
    instance = _instance()
    _fail_dead_cli_runs(catalog, instance)
    last = defs.resolve_assets_def(backup_key(*targets[0])).partitions_def.get_last_partition_key()
    if not args.partition and last is None:
        raise UsageError(f"no {args.tier} partition is complete yet (the catalog's start_date is {catalog.start_date}): "
                         "name one with --partition")
    partitions = args.partition or [last]
    selection = [backup_key(*t) for t in targets] + ([replica_key(*t) for t in targets] if catalog.replication.s3 else [])
    command = " ".join(["backup-assets", "backup", "--tier", args.tier]
                       + (["--select", *args.select] if args.select else []))
    failed = 0
    for partition in partitions:
        result = job.execute_in_process(
            partition_key=partition, instance=instance, raise_on_error=False, asset_selection=selection,
            tags={**cli_runs.run_tags(catalog), "backup_assets/command": command},
            run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if args.debug else "CRITICAL"}}}})
        made = {e.asset_key for e in result.all_events if e.is_step_materialization}
        named: dict[str, str] = {}
        unnamed = []
        for event in (e for e in result.all_events if e.is_step_failure):
            data = event.event_specific_data
            if data is None or data.error is None or data.error.cls_name == "DagsterAssetCheckFailedError":
                continue  # blocking checks: said below, check by check
            found = failed_assets(data.user_failure_data.metadata) if data.user_failure_data and \
                FAILED_ASSETS in (data.user_failure_data.metadata or {}) else {}
            named.update(found)
            if not found:
                unnamed.append(root_cause(data.error))
        for source, group, tier in targets:
            key = backup_key(source, group, tier)
            name = key.to_user_string()
            error = named.get(name) or (None if key in made else (unnamed[0] if unnamed else "not backed up"))
            if error is not None:
                failed += 1
                print(f"{name} {partition}: FAILED {scrub(error)}", file=sys.stderr)
                # a run in this process has no code location: the CLI alerts (the sensors' dedupe keys)
                _alert(catalog, Alert(what=f"run of {args.tier}_backups failed", error=error, source=source,
                                      group=group, tier=tier, partition=partition, asset=name, cause="run-failure"),
                       instance=instance)
                continue
            latest = repository_for(catalog).latest(source, group, tier, partition)
            summary = verification.summary(latest) if latest else "unknown"
            replica = named.get(replica_key(source, group, tier).to_user_string())
            print(f"{name} {partition}: {latest.artifact_path if latest else '?'} "
                  f"({latest.manifest.size_human if latest else '?'}, checks {summary})"
                  + (f"; S3 replica FAILED: {scrub(replica)}" if replica else ""))
            if summary.startswith("FAILED") or replica:
                failed += 1
            for check, status in (verification.read_status(latest).items() if latest else []):
                if not status.get("passed") and check != "size_anomaly":
                    _alert(catalog, Alert(what=f"check {check} failed", error=status.get("message", ""),
                                          source=source, group=group, tier=tier, partition=partition, asset=name,
                                          cause=f"check:{check}"), instance=instance)
            if replica:
                rname = replica_key(source, group, tier).to_user_string()
                _alert(catalog, Alert(what=f"run of {args.tier}_backups failed", error=replica, source=source,
                                      group=group, tier=tier, partition=partition, asset=rname, cause="run-failure"),
                       instance=instance)
    return 1 if failed else 0


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


def cmd_doctor(args) -> int:
    import os

    from backup_assets.core.doctor import doctor

    catalog = _catalog(args)
    done = doctor(catalog)
    if os.environ.get("DAGSTER_HOME"):  # runs of `backup-assets backup` killed mid-run
        try:
            done += _fail_dead_cli_runs(catalog, _instance())
        except Exception as exc:  # noqa: BLE001 - the repository and servers are repaired whatever Dagster's state
            done.append(f"Dagster's runs not checked: {scrub(str(exc)).splitlines()[0][:300]}")
    for line in done:
        print(line)
    if not done:
        print(f"nothing to repair in repository {catalog.repository_root} and its servers")
    return 0


def cmd_safety_list(args) -> int:
    from backup_assets.core.doctor import safety_copies

    rows = [{"kind": c.kind, "where": c.where, "name": c.name, "created": c.created.isoformat(timespec="seconds"),
             "age_days": c.age_days} for c in safety_copies(_catalog(args))]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        _print_table(rows, ["kind", "where", "name", "created", "age_days"])
    else:
        print("no safety copies", file=sys.stderr)
    return 0


def cmd_safety_drop(args) -> int:
    from backup_assets.core.doctor import drop_safety_copy, safety_copies

    if args.older_than is None and not args.all:
        raise UsageError("say which: --older-than DAYS, or --all")
    catalog = _catalog(args)
    doomed = [c for c in safety_copies(catalog) if args.all or c.age_days > args.older_than]
    if not doomed:
        print("no safety copies to drop", file=sys.stderr)
        return 0
    names = ", ".join(f"{c.kind} {c.name}" for c in doomed)
    if not args.confirm:
        raise UsageError(f"refusing to drop {len(doomed)} safety cop{'y' if len(doomed) == 1 else 'ies'} ({names}) "
                         "without --confirm")
    for c in doomed:
        drop_safety_copy(catalog, c)
        print(f"dropped {c.kind} {c.name} ({c.where})")
    return 0


def cmd_replicas_verify(args) -> int:
    """Prove S3 replicas by their bytes: download and hash them (those due, or --all)."""
    from backup_assets.core.replica import audit_replicas, storage_for

    catalog = _catalog(args)
    if catalog.replication.s3 is None:
        raise UsageError("the catalog has no replication.s3 section")
    results = audit_replicas(catalog, storage_for(catalog), every=args.all, limit=args.limit,
                             say=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps([{"key": r.key, "passed": r.outcome.passed, "message": r.outcome.message}
                          for r in results], indent=2))
    else:
        for r in results:
            print(f"{'PASS' if r.outcome.passed else 'FAIL'} {r.key}: {r.outcome.message}")
        if not results:
            print("no replica is due for a byte-level verification", file=sys.stderr)
    failed = [r for r in results if not r.outcome.passed]
    for r in failed:
        from backup_assets.core.monitoring.alerts import Alert
        from backup_assets.defs.keys import replica_key

        _alert(catalog, Alert(what="replica audit failed", error=f"[{r.partition}] {r.outcome.message}",
                              source=r.source, group=r.group, tier=r.tier,
                              asset=replica_key(r.source, r.group, r.tier).to_user_string(), cause="run-failure"))
    return 1 if failed else 0


def cmd_rekey(args) -> int:
    from collections import Counter

    from backup_assets.core import crypto
    from backup_assets.core.rekey import leftovers, rekey, select

    catalog = _catalog(args)
    repos = _repositories(catalog, args)
    repos[0].sweep()
    chosen = select(repos, source=args.source, group=args.group, tier=args.tier,
                    older_than_days=args.older_than_days, recipients=args.recipients)
    left = leftovers(repos, args.recipients)
    keys = ", ".join(crypto.fingerprint(r) for r in args.recipients)
    if not args.apply:
        for c in chosen:
            places = "+".join([c.repo.name] + [o.name for o in c.others])
            if c.successor is not None:
                print(f"would finish the interrupted rotation of {c.ref.name} ({places}): replace it by "
                      f"{c.successor[1].name} from {c.successor[0].name}")
            else:
                print(f"would re-encrypt {c.ref.name} ({places}; now: {crypto.key_summary(c.manifest)}) to {keys}")
        for lo in left:
            print(f"would remove {lo.repo.storage.uri(lo.key)}: an old copy left without its manifest by an "
                  f"interrupted rotation (its successor {lo.successor} is complete)")
        print(f"{len(chosen)} backup(s) to re-encrypt (a dry run: --apply does it)", file=sys.stderr)
        return 0
    for lo in left:
        lo.repo.storage.delete([lo.key])
        print(f"removed {lo.repo.storage.uri(lo.key)}: an old copy left without its manifest by an interrupted "
              f"rotation (its successor {lo.successor} is complete)")
    errors: Counter = Counter()
    first: dict[str, str] = {}
    places: Counter = Counter()
    failed = unfinished = 0

    def problem(text: str, same: str) -> None:
        errors[same] += 1
        first.setdefault(same, text)

    for c in chosen:
        try:
            done = rekey(catalog, c, args.recipients, identity_env=args.identity_file_env)
        except BackupError as exc:
            text = scrub(str(exc))
            problem(text, text.replace(c.repo.storage.uri(c.ref.key), "<artifact>"))
            failed += 1
            continue
        if c.successor is None:
            places[c.repo.name] += 1
        for name in done.also_in:
            places[name] += 1
        if done.resumed:
            line = (f"finished the interrupted rotation of {done.old}: replaced by {done.new} in "
                    f"{', '.join(done.also_in) or 'no repository yet'}")
        else:
            line = f"re-encrypted {done.old} -> {done.new} in {c.repo.name} ({done.seconds:.1f}s)"
            if done.also_in:
                line += f"; the copy in {', '.join(done.also_in)} replaced"
        print(line)
        if done.pending:
            unfinished += 1
        for name, why in done.pending.items():  # the rotated side is done; this side keeps the old copy for now
            text = scrub(why)
            problem(f"{done.old}: the copy in {name} still holds the old keys ({text}); run rekey again to "
                    "replace it with the same new artifact", f"{name}: {text}")
    for same, count in errors.items():  # one line per distinct problem, not one per backup
        print(f"backup-assets: {first[same]}" + (f" (and {count - 1} more backup(s) the same way)" if count > 1 else ""),
              file=sys.stderr)
    sides = ", ".join(f"{name} {n}" for name, n in sorted(places.items())) or "none"
    print(f"{len(chosen) - failed - unfinished} of {len(chosen)} backup(s) rotated everywhere; copies now on the new "
          f"keys: {sides}" + (f"; {failed} not rotated" if failed else "")
          + (f"; {unfinished} with a copy still to replace (run rekey again)" if unfinished else ""), file=sys.stderr)
    return 1 if failed or unfinished else 0


def cmd_wal_push(args) -> int:
    from backup_assets.core.pitr import wal

    done = wal.push(_catalog(args), args.source, args.path)
    print(f"{done.name} already archived (identical)" if done.already
          else f"archived {done.name} ({done.raw_size} bytes) as {done.stored}")
    return 0


def cmd_wal_fetch(args) -> int:
    from backup_assets.core.pitr import wal

    wal.fetch(_catalog(args), args.source, args.name, args.dest)
    return 0


def cmd_wal_verify(args) -> int:
    import datetime as dt

    from backup_assets.core.pitr import recovery as pitr
    from backup_assets.core.pitr import wal

    catalog = _catalog(args)
    bases = pitr.base_backups(catalog, args.source)
    since = bases[0]["start_wal"] if bases else None  # from the oldest kept base backup on
    result = wal.verify(catalog, args.source, since=since)
    age = None
    if result.newest_pushed_at:
        age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(result.newest_pushed_at)).total_seconds()
    if args.json:
        print(json.dumps({"source": args.source, "since": since, "segments": result.segments, "first": result.first,
                          "last": result.last, "gaps": [list(g) for g in result.gaps],
                          "newest_pushed_at": result.newest_pushed_at, "newest_age_s": age, "ok": result.ok}))
    elif not result.segments:
        print(f"{args.source}: no WAL segment archived yet")
    else:
        print(f"{args.source}: {result.segments} segment(s) {result.first} .. {result.last}"
              + (f" (from the oldest base backup's {since})" if since else "") + ", "
              + ("no gaps" if not result.gaps else f"{len(result.gaps)} gap(s)")
              + (f"; newest pushed {age:.0f}s ago" if age is not None else ""))
        for before, after in result.gaps:
            print(f"  gap after {before}: the next archived segment is {after}")
    return 0 if result.ok else 1


def cmd_alerts_test(args) -> int:
    from backup_assets.core.monitoring.alerts import Notifier

    notifier = Notifier.for_catalog(_catalog(args))
    if not notifier.channels:
        raise UsageError("no alert channel is configured (alerts.slack, alerts.email or alerts.webhook)")
    results = notifier.test()
    for channel, error in results.items():
        print(f"{'OK  ' if error is None else 'FAIL'} {channel}" + (f": {error}" if error else ""))
    return 1 if any(results.values()) else 0


def cmd_metrics(args) -> int:
    from backup_assets.core.monitoring import metrics

    catalog = _catalog(args)
    if args.textfile:
        print(f"wrote {metrics.write_textfile(catalog, Path(args.textfile))}")
        return 0
    sys.stdout.write(metrics.render(catalog, openmetrics=args.openmetrics).decode())
    return 0


def cmd_metrics_serve(args) -> int:
    import signal
    import threading

    from backup_assets.core.monitoring import metrics

    catalog = _catalog(args)
    try:
        server, thread = metrics.serve(catalog, port=args.port, addr=args.addr)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.addr}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backup-assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", help="catalog file (default: $BACKUP_ASSETS_CATALOG, else the demo catalog)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list backups in the repository")
    p.add_argument("--source")
    p.add_argument("--group")
    p.add_argument("--tier", choices=TIER_NAMES)
    p.add_argument("--partition")
    p.add_argument("--json", action="store_true")
    p.add_argument("--local-only", action="store_true", help="do not list S3")
    p.add_argument("--paths", action="store_true", help="add each backup's full path or S3 URI")
    p.set_defaults(func=cmd_list)

    def backup_selector(p, file_arg: bool = True):
        if file_arg:
            p.add_argument("file", nargs="?", help="an artifact in the repository")
        else:
            p.add_argument("--file", help="an artifact in the repository")
        p.add_argument("--source")
        p.add_argument("--group")
        p.add_argument("--tier", choices=TIER_NAMES)
        p.add_argument("--partition", help="partition key (default: the newest backup that verifies)")

    p = sub.add_parser("verify", help="check a backup: checksum, readability, optionally a restore drill")
    backup_selector(p)
    p.add_argument("--drill", action="store_true", help="also restore it into a scratch target and compare")
    p.add_argument("--jobs", type=int, help="parallel pg_restore jobs (default: the catalog's restore.jobs, 2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="restore a backup (asks first; keeps a safety copy)")
    backup_selector(p, file_arg=False)
    p.add_argument("--from", dest="from_", choices=["local", "s3"], default="local")
    p.add_argument("--target-db", help="restore into this PostgreSQL database (created if missing)")
    p.add_argument("--target-file", help="restore into this SQLite file (default: the source's path)")
    p.add_argument("--tables", nargs="+", help='replace only these tables (PostgreSQL), e.g. runs billing.invoices '
                                                "'public.\"Order Items\"' (a partitioned table with its partitions)")
    p.add_argument("--jobs", type=int, help="parallel pg_restore jobs (default: the catalog's restore.jobs, 2)")
    p.add_argument("--confirm", action="store_true", help="do not ask")
    p.add_argument("--no-safety-copy", action="store_true", help="do not keep the replaced data")
    p.add_argument("--terminate-connections", action="store_true", help="end other sessions on the target")
    p.add_argument("--no-create-roles", action="store_true",
                   help="refuse instead of creating roles that own restored objects and are missing on the target")
    pitr = p.add_argument_group("point-in-time recovery (base backups + WAL archive)")
    pitr.add_argument("--to-time", help="recover to this time, e.g. '2026-11-22 10:41:07+00'")
    pitr.add_argument("--to-lsn", help="recover to this WAL location")
    pitr.add_argument("--latest", action="store_true", help="recover to the end of the archived WAL")
    pitr.add_argument("--pgdata", help="the new data directory to build (must not exist or be empty)")
    pitr.add_argument("--port", type=int, default=5433, help="port of the recovered server (default 5433)")
    pitr.add_argument("--run-as", help="OS user the recovered server runs as (default: the catalog's pitr.run_as)")
    pitr.add_argument("--timings", action="store_true", help="print the seconds each phase of the restore took")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("basebackup", help="a base backup for point-in-time recovery (pg_basebackup, needs the WAL "
                                          "archive)")
    p.add_argument("--source", required=True)
    p.add_argument("--dagster", action="store_true",
                   help="take it through the <source>/base_backup asset: a run in DAGSTER_HOME with the asset's "
                        "checks (the point-in-time drill too) and replica, shown in the UI")
    p.add_argument("--kind", choices=["auto", "full", "incremental"], default="auto",
                   help="auto (default): incremental on the newest base backup where the server can take one "
                        "(PostgreSQL 17+, summarize_wal = on) and the catalog's pitr settings allow, else full")
    p.add_argument("--local-only", action="store_true",
                   help="do not replicate base backups and WAL to the catalog's S3 replica afterwards")
    p.set_defaults(func=cmd_basebackup)

    p = sub.add_parser("drill", help="the disaster-recovery drill: restore the newest backup of everything, compare")
    p.add_argument("--source", nargs="*")
    p.add_argument("--jobs", type=int, help="parallel pg_restore jobs (default: the catalog's restore.jobs, 2)")
    p.set_defaults(func=cmd_drill)

    p = sub.add_parser("retention", help="retention: prune old backups, prune old application rows")
    rsub = p.add_subparsers(dest="retention_command", required=True)
    for name, func, text in (
        ("prune", cmd_retention_prune, "delete backups past their tier's retention (local and S3)"),
        ("prune-tables", cmd_retention_prune_tables, "delete old application rows covered by a drilled backup"),
    ):
        r = rsub.add_parser(name, help=text + " (a dry run unless --apply)")
        r.add_argument("--dry-run", action="store_true", help="only report (the default)")
        r.add_argument("--apply", action="store_true", help="really delete")
        if name == "prune-tables":
            r.add_argument("--source", nargs="*")
        r.set_defaults(func=func)

    p = sub.add_parser("runs", help="Dagster run history in $DAGSTER_HOME")
    rsub = p.add_subparsers(dest="runs_command", required=True)
    r = rsub.add_parser("prune", help="delete old runs, never one holding a partition's latest materialization "
                                      "(a dry run unless --apply)")
    r.add_argument("--older-than-days", type=int, default=90)
    r.add_argument("--apply", action="store_true")
    r.add_argument("--include-restores", action="store_true",
                   help="delete old restore runs too (kept by default; restores.jsonl keeps their record either way)")
    r.set_defaults(func=cmd_runs_prune)

    p = sub.add_parser("restores", help="the restore log: every restore, who started it, from where, and how it ended")
    p.add_argument("--limit", type=int, default=50, help="the newest N entries (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restores)

    p = sub.add_parser("rekey", help="re-encrypt existing backups to new recipients (local and S3; a dry run "
                                     "unless --apply)")
    p.add_argument("--recipients", nargs="+", required=True, help="public keys: age1... or 'ssh-ed25519 AAAA...'")
    p.add_argument("--identity-file-env", help="variable that will name the new identity file (recorded in manifests)")
    p.add_argument("--source")
    p.add_argument("--group")
    p.add_argument("--tier", choices=TIER_NAMES)
    p.add_argument("--older-than-days", type=float)
    p.add_argument("--local-only", action="store_true", help="leave the S3 copies as they are")
    p.add_argument("--apply", action="store_true")
    p.set_defaults(func=cmd_rekey)

    p = sub.add_parser("doctor", help="find and repair what interrupted operations left (partial files, scratch "
                                      "folders and databases, a restore's swap state, artifacts without manifest)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("safety-copies", help="the copies restores kept of what they replaced")
    ssub = p.add_subparsers(dest="safety_command", required=True)
    r = ssub.add_parser("list", help="databases, schemas and SQLite files kept by restores")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_safety_list)
    r = ssub.add_parser("drop", help="drop safety copies (asks for --confirm)")
    r.add_argument("--older-than", type=float, metavar="DAYS")
    r.add_argument("--all", action="store_true")
    r.add_argument("--confirm", action="store_true")
    r.set_defaults(func=cmd_safety_drop)

    p = sub.add_parser("replicas", help="the S3 replica")
    ssub = p.add_subparsers(dest="replicas_command", required=True)
    r = ssub.add_parser("verify", help="download and hash the replicas that are due (replication.s3.deep_verify_days)")
    r.add_argument("--all", action="store_true", help="every replica, due or not")
    r.add_argument("--limit", type=int, metavar="N", help="at most N replicas (default: deep_verify_per_run)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_replicas_verify)

    p = sub.add_parser("wal-push", help="archive one WAL file (PostgreSQL's archive_command: wal-push --source S %%p)")
    p.add_argument("--source", required=True)
    p.add_argument("path", help="the WAL file (%%p)")
    p.set_defaults(func=cmd_wal_push)
    p = sub.add_parser("wal-fetch", help="restore one archived WAL file (restore_command: wal-fetch --source S %%f %%p)")
    p.add_argument("--source", required=True)
    p.add_argument("name", help="the WAL file name (%%f)")
    p.add_argument("dest", help="where to write it (%%p)")
    p.set_defaults(func=cmd_wal_fetch)
    p = sub.add_parser("wal-verify", help="WAL archive continuity: every segment from the oldest to the newest")
    p.add_argument("--source", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wal_verify)

    p = sub.add_parser("alerts", help="alert channels")
    asub = p.add_subparsers(dest="alerts_command", required=True)
    r = asub.add_parser("test", help="send a test alert to every configured channel")
    r.set_defaults(func=cmd_alerts_test)

    p = sub.add_parser("metrics", help="Prometheus metrics of the repository: print them, write a node_exporter "
                                       "textfile, or `metrics serve --port N`")
    p.add_argument("--openmetrics", action="store_true", help="OpenMetrics text instead of Prometheus 0.0.4")
    p.add_argument("--textfile", metavar="PATH", help="write a node_exporter textfile (atomically) instead")
    p.set_defaults(func=cmd_metrics)
    msub = p.add_subparsers(dest="metrics_command")
    r = msub.add_parser("serve", help="serve /metrics over HTTP until stopped")
    r.add_argument("--port", type=int, default=9860, help="default 9860")
    r.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    r.set_defaults(func=cmd_metrics_serve)

    p = sub.add_parser("backup", help="back up now through Dagster (default: the newest complete partition)")
    p.add_argument("--tier", default="daily", choices=TIER_NAMES)
    p.add_argument("--partition", nargs="+", help="partition key(s), e.g. 2026-11-18 2026-11-19 (a backfill: one "
                                                 "run each; default: the newest complete one)")
    p.add_argument("--select", nargs="*", help="source or source/group names")
    p.set_defaults(func=cmd_backup)
    return parser


def _quiet() -> None:
    """A warning that is not the user's business: platformdirs' about XDG_RUNTIME_DIR (root without a login
    session, the usual case on a backup host)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR")


def main(argv: list[str] | None = None) -> int:
    _quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, BadPartition) as exc:
        _fail(args, exc)
        return 2
    except (CatalogError, BackupError) as exc:
        _fail(args, exc)
        return 1
    except KeyboardInterrupt:
        print("backup-assets: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected failure: one scrubbed line, the traceback on --debug
        _fail(args, exc, unexpected=True)
        return 1


def _fail(args, exc: BaseException, *, unexpected: bool = False) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if unexpected:
        text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    print(f"backup-assets: {scrub(text)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

