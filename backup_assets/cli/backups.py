"""`backup`, `basebackup`, `list`, `verify` and `drill`: taking backups and proving them."""

from __future__ import annotations

import json
import sys

from backup_assets.catalog import CatalogError
from backup_assets.core import BackupError
from backup_assets.core.secrets import scrub
from backup_assets.cli.common import (UsageError, Reporter, _catalog, _print_table, _repositories, _check_partitions,
    _selected_backup, _instance, _instance_home, _fail_dead_cli_runs, _alert, REPLICA_NAMES)


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
            print(f"backup-assets: {REPLICA_NAMES.get(repo.name, repo.name)} not listed: {scrub(str(exc))}",
                  file=sys.stderr)
            continue
        untrusted = repo.untrusted()
        # under Object Lock: objects overwritten or deleted after replication (their locked original is listed)
        replaced = getattr(repo.storage, "replaced", set())
        for ref in refs:
            if ref.key in untrusted:
                continue
            state = ("replaced after replication (the locked original restores)"
                     if {ref.key, ref.manifest_key} & replaced else "present")
            if ref.key in rows:
                rows[ref.key]["where"] += f"+{repo.name}" + ("!" if state != "present" else "")
                rows[ref.key]["copies"][repo.name] = state
                continue
            row = {"source": ref.source, "group": ref.group, "tier": ref.tier, "partition": ref.partition,
                   "created": ref.created.isoformat(timespec="seconds"), "size": human_size(ref.size),
                   "size_bytes": ref.size, "rows": "", "verified": "ok (replica)" if repo.replica else "unknown",
                   "where": repo.name + ("!" if state != "present" else ""), "key": "",
                   "path": repo.storage.uri(ref.key), "copies": {repo.name: state}}
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
        if any("!" in r["where"] for r in ordered):
            print("(where: s3! is a replica overwritten or deleted in the bucket after replication; the locked "
                  "original is what restores, and replica_intact fails on it: see the alerts)", file=sys.stderr)
    else:
        print(f"no backups match in repository {local.root} (catalog {catalog.catalog_path or 'built in'})",
              file=sys.stderr)
    for orphan in local.orphans():
        print(f"backup-assets: {orphan} has no manifest: not a backup (an interrupted write; "
              "`backup-assets doctor` removes it)", file=sys.stderr)
    for _path, error in local.unreadable():
        print(f"backup-assets: not counted as a backup: {error}", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from backup_assets.core.verify import records as verification
    from backup_assets.core.backup.take import repository_for
    from backup_assets.core.crypto import identities_if_any
    from backup_assets.core.verify.checks import artifact_intact
    from backup_assets.core.verify.readable import archive_readable
    from backup_assets.core.verify.restore_drill import restore_drill

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
    from backup_assets.core.outcome import Outcome

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


def cmd_backup(args) -> int:
    """Run backups through Dagster (recorded in DAGSTER_HOME, visible in the UI): one run per partition with
    every selected asset, as the schedule does, with the backups' checks and, when configured, their S3
    replicas."""
    import time

    from backup_assets.core.backup import head_start

    started = time.time()
    catalog = _catalog(args)
    marks = [("catalog", time.time())]
    _check_partitions(args, catalog)
    targets = [t for t in catalog.backup_targets() if t[2] == args.tier]
    if args.select:
        targets = [t for t in targets if f"{t[0]}/{t[1]}" in args.select or t[0] in args.select]
    if not targets:
        raise UsageError(f"no {args.tier} backup assets match {', '.join(args.select) if args.select else 'the catalog'}")
    _instance_home()
    # the first backup starts now, beside Dagster's start (core/backup/head_start.py); its run takes it over
    early = _head_start(args, catalog, targets[0])
    try:
        return _backup_runs(args, catalog, targets, marks, started, early)
    finally:
        for (source, group, tier, partition), what in head_start.leftovers():
            print(f"backup-assets: {source}/{group} {tier} {partition} was backed up while Dagster started, but no run "
                  f"took it over (not recorded in Dagster): {scrub(what)}", file=sys.stderr)


def _head_start(args, catalog, target):
    """Start the command's first backup (the first partition's) in a thread; None when its partition is not
    known without Dagster's partitions (none is complete yet)."""
    from backup_assets.core.backup import head_start
    from backup_assets.core.partition_keys import BadPartition, last_complete, last_complete_hour, validate

    if args.partition:
        partition = args.partition[0]
    else:
        partition = (last_complete_hour(catalog).strftime("%Y-%m-%dT%H") if args.tier == "hourly"
                     else last_complete(catalog, args.tier).isoformat())
        try:
            validate(catalog, args.tier, partition)
        except BadPartition:
            return None
    return head_start.start(catalog, *target, partition)


def _backup_runs(args, catalog, targets, marks, started, early) -> int:
    import time

    from backup_assets.core.verify import records as verification
    from backup_assets.core.monitoring.alerts import Alert
    from backup_assets.core.backup.take import repository_for
    from backup_assets.defs import cli_runs
    from backup_assets.defs.build import build_definitions
    from backup_assets.defs.keys import backup_key, replica_key
    from backup_assets.defs.checks import FAILED_ASSETS, failed_assets
    from backup_assets.defs.sensors import root_cause

    marks.append(("imports", time.time()))
    defs = build_definitions(catalog)
    job = defs.resolve_job_def(f"{args.tier}_backups")
    marks.append(("definitions", time.time()))
    instance = _instance()
    _fail_dead_cli_runs(catalog, instance)
    marks.append(("instance", time.time()))
    last = defs.resolve_assets_def(backup_key(*targets[0])).partitions_def.get_last_partition_key()
    if not args.partition and last is None:
        raise UsageError(f"no {args.tier} partition is complete yet (the catalog's start_date is {catalog.start_date}): "
                         "name one with --partition")
    partitions = args.partition or [last]
    replicas = list(catalog.replication.replicas())
    selection = [backup_key(*t) for t in targets] + [replica_key(*t, r) for t in targets for r in replicas]
    command = " ".join(["backup-assets", "backup", "--tier", args.tier]
                       + (["--select", *args.select] if args.select else []))
    failed = 0
    for partition in partitions:
        result = job.execute_in_process(
            partition_key=partition, instance=instance, raise_on_error=False, asset_selection=selection,
            tags={**cli_runs.run_tags(catalog), "backup_assets/command": command},
            run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if args.debug else "CRITICAL"}}}})
        if args.timings:
            marks += run_timeline(instance, result.run_id, marks[-1][1],
                                  replicas={replica_key(*t, r).to_user_string() for t in targets for r in replicas})
        made = {e.asset_key for e in result.all_events if e.is_step_materialization}
        checked = {e.event_specific_data.asset_key for e in result.all_events
                   if e.event_type_value == "ASSET_CHECK_EVALUATION"}
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
            if error is None and unnamed and key not in checked:  # the step failed between the backup and its checks
                error = f"the run failed after the backup, before its checks: {unnamed[0]}"
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
            broken = {r: named[rname] for r in replicas
                      if (rname := replica_key(source, group, tier, r).to_user_string()) in named}
            print(f"{name} {partition}: {latest.artifact_path if latest else '?'} "
                  f"({latest.manifest.size_human if latest else '?'}, checks {summary})"
                  + "".join(f"; {REPLICA_NAMES[r]} replica FAILED: {scrub(e)}" for r, e in broken.items()))
            if summary.startswith("FAILED") or broken:
                failed += 1
            for check, status in (verification.read_status(latest).items() if latest else []):
                if not status.get("passed") and check != "size_anomaly":
                    _alert(catalog, Alert(what=f"check {check} failed", error=status.get("message", ""),
                                          source=source, group=group, tier=tier, partition=partition, asset=name,
                                          cause=f"check:{check}"), instance=instance)
            for r, error in broken.items():
                _alert(catalog, Alert(what=f"run of {args.tier}_backups failed", error=error, source=source,
                                      group=group, tier=tier, partition=partition,
                                      asset=replica_key(source, group, tier, r).to_user_string(), cause="run-failure"),
                       instance=instance)
            if args.timings and latest:
                drill = verification.read_status(latest).get("restore_drill", {})
                if drill.get("phases_s"):
                    print(f"{name} {partition}: the drill: " + "; ".join(
                        f"{k.replace('_', ' ')} {v:.2f}s" for k, v in drill["phases_s"].items()))
    if args.timings:
        marks.append(("reporting", time.time()))
        steps = [(name, at - before) for (name, at), (_, before) in zip(marks, [("start", started), *marks])]
        print("timings: " + "; ".join(f"{name} {s:.2f}s" for name, s in steps)
              + f"; total {marks[-1][1] - started:.2f}s (after the command started)")
        if early is not None and early.times:
            print(f"head start: {'/'.join(early.target[:2])} {early.target[3]} began beside Dagster's start: "
                  + "; ".join(f"{what} {at - started:.2f}s" for what, at in early.times.items())
                  + " after the command started")
    return 1 if failed else 0


def run_timeline(instance, run_id: str, since: float, replicas: set[str] = frozenset()) -> list[tuple[str, float]]:
    """Where a run's time went, from its events' times: the run's creation and start, each backup's dump
    (until its materialization), its checks (until its last check result), its S3 replica (`replicas`: their
    keys), and the run's end with the run's event count."""
    from dagster import DagsterEventType as T

    marks, events = [], list(instance.all_logs(run_id))
    for record in events:
        event = record.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind == T.RUN_START:
            marks.append(("run created and started", record.timestamp))
        elif kind == T.ASSET_MATERIALIZATION:
            key = event.asset_key.to_user_string()
            marks.append((f"{key} {'replicated' if key in replicas else 'dumped'}", record.timestamp))
        elif kind == T.ASSET_CHECK_EVALUATION:
            name = f"{event.event_specific_data.asset_key.to_user_string()} checked"
            if marks and marks[-1][0] == name:
                marks.pop()
            marks.append((name, record.timestamp))
        elif kind in (T.RUN_SUCCESS, T.RUN_FAILURE):
            marks.append((f"run ended ({len(events)} events)", record.timestamp))
    return [(name, max(at, since)) for name, at in marks]


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


def cmd_basebackup(args) -> int:
    """A base backup. With --dagster it is taken through the `<source>/base_backup` asset (a run in
    DAGSTER_HOME), so it shows in the UI with its checks and replica, as `backup` does for dumps."""
    from backup_assets.core.pitr import base as pitr_base

    catalog = _catalog(args)
    cfg = catalog.sources[args.source].pitr
    replicate_too = [] if args.local_only or (cfg is not None and not cfg.s3) else list(catalog.replication.replicas())
    failed_checks = []
    if args.dagster:
        if args.kind != "auto":
            raise UsageError("--dagster takes the kind the asset chooses: leave out --kind")
        if args.source not in catalog.pitr_sources():
            raise UsageError(f"source {args.source!r} has no pitr section: it has no base_backup asset")
        meta, failed_checks = _basebackup_through_dagster(catalog, args.source, replicate_too, debug=args.debug)
    else:
        meta = pitr_base.base_backup(catalog, args.source, kind=args.kind, say=Reporter())
        from backup_assets.core.pitr.s3 import replicate
        from backup_assets.core.pitr.locations import replica_storage

        for replica in replicate_too:  # one replica down: the others are still written, and the exit says so
            try:
                replicate(catalog, args.source, replica_storage(catalog, replica=replica), say=Reporter())
            except BackupError as exc:
                print(f"backup-assets: the {REPLICA_NAMES[replica]} replica: {scrub(str(exc))}", file=sys.stderr)
                failed_checks.append(str(exc))
    on = f" on {meta['parent']}" if meta.get("parent") else ""
    print(f"{meta['kind']} base backup {meta['artifact']}{on} ({meta['size_bytes']} bytes), WAL from "
          f"{meta['start_wal']}, finished {meta['finished_at']}")
    oldest = pitr_base.base_backups(catalog, args.source)[0]
    print(f"a point-in-time restore of {args.source} reaches any moment from {oldest['finished_at']} on "
          f"(backup-assets restore --source {args.source} --to-time '...' --pgdata DIR)")
    return 1 if failed_checks else 0


def _basebackup_through_dagster(catalog, source: str, replicate_too: list[str], *, debug: bool) -> dict:
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.defs import cli_runs
    from backup_assets.defs.build import build_definitions
    from backup_assets.defs.pitr import BASE_BACKUPS_JOB, base_key, base_replica_key
    from backup_assets.defs.sensors import root_cause

    defs = build_definitions(catalog)
    job = defs.resolve_job_def(BASE_BACKUPS_JOB)
    partition = defs.resolve_assets_def(base_key(source)).partitions_def.get_last_partition_key()
    instance = _instance()
    _fail_dead_cli_runs(catalog, instance)
    before = {b["artifact"] for b in pitr_base.base_backups(catalog, source)}
    result = job.execute_in_process(
        partition_key=partition, instance=instance, raise_on_error=False,
        asset_selection=[base_key(source)] + [base_replica_key(source, r) for r in replicate_too],
        tags={**cli_runs.run_tags(catalog), "backup_assets/command": f"backup-assets basebackup --source {source}"},
        run_config={"loggers": {"console": {"config": {"log_level": "DEBUG" if debug else "CRITICAL"}}}})
    made = [b for b in pitr_base.base_backups(catalog, source) if b["artifact"] not in before]
    import dagster as dg

    failed = []
    for check in (c for c in result.get_asset_check_evaluations() if not c.passed):
        error = check.severity == dg.AssetCheckSeverity.ERROR
        print(f"check {check.check_name} of {check.asset_key.to_user_string()} "
              f"{'failed' if error else 'warns'}: {check.description}", file=sys.stderr)
        if error:
            failed.append(check)
    errors = [root_cause(e.event_specific_data.error) for e in result.all_events
              if e.is_step_failure and e.event_specific_data and e.event_specific_data.error
              and e.event_specific_data.error.cls_name != "DagsterAssetCheckFailedError"]
    if not made:
        raise BackupError(errors[0] if errors else f"the base backup of {source} was not taken")
    for error in errors:  # the base backup was taken; a replica of it was not
        print(f"backup-assets: {scrub(error)}", file=sys.stderr)
        failed.append(error)
    return made[-1], failed
