"""Sensors that tell people when anything goes wrong, the schedules that run the backups, and the
backup-health asset. Delivery (Slack, email, webhook) and storm control are in core.monitoring.alerts."""

import datetime as dt

import dagster as dg
from dagster import AssetExecutionContext, RunFailureSensorContext, SensorEvaluationContext

# the check-execution table is the one record of check outcomes that every storage indexes
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from backup_assets.catalog import Catalog
from backup_assets.core.monitoring.alerts import Alert, Notifier
from backup_assets.defs import cli_runs
from backup_assets.defs.keys import backup_key, parse_key, replica_key, tier_op_name
from backup_assets.defs.checks import failed_assets
from backup_assets.defs.partitions import DAGSTER_WEEKDAY, FRESHNESS

HEALTH_KEY = dg.AssetKey(["operations", "backup_health"])


def describe_key(key: dg.AssetKey) -> dict:
    parsed = parse_key(key)
    if parsed is not None:
        source, group, tier, _ = parsed
        return {"source": source, "group": group, "tier": tier, "asset": key.to_user_string()}
    return {"asset": key.to_user_string()}


def is_check_failure(event, watched: set | None = None) -> bool:
    """A step that failed only because blocking checks of its assets failed, each of them one that
    check_failure_alerts watches (`watched`) and alerts by name: the step's failure adds nothing."""
    data = event.event_specific_data
    if not (data and data.error and data.error.cls_name == "DagsterAssetCheckFailedError"):
        return False
    if watched is None:
        return True
    # the error lists "<asset key>: check,check" lines
    for line in (data.error.message or "").splitlines():
        asset, sep, names = line.strip().rpartition(": ")
        if not sep or " " in asset or " " in names.strip():  # the heading line, not an asset's
            continue
        key = dg.AssetKey.from_user_string(asset)
        if any(dg.AssetCheckKey(key, n.strip()) not in watched for n in names.split(",") if n.strip()):
            return False
    return True


def root_cause(error) -> str:
    """The innermost error's first line, without the exception's class path."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    line = (error.message or "").strip().splitlines()[0] if (error.message or "").strip() else error.cls_name or ""
    head, sep, rest = line.partition(": ")
    return rest if sep and "." in head and " " not in head else line


def run_partition(tags) -> str | None:
    """The partition of a run: one key, or a range (backfill runs carry a range, often of one key)."""
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    if start and end:
        return start if start == end else f"{start}...{end}"
    return None


def restore_alert(run, step_failures, run_message: str | None, url: str) -> Alert:
    """A failed restore run, named: its source, group, partition and target, the step's own error, and one
    alert per source and target (not one for every restore run)."""
    config = ((run.run_config or {}).get("ops", {}).get("restore_backup", {}) or {}).get("config", {}) or {}
    source = config.get("source")
    target = config.get("target_database") or config.get("target_file") or f"{source}'s own database or file"
    errors = [root_cause(e.event_specific_data.error) for e in step_failures
              if e.event_specific_data is not None and e.event_specific_data.error is not None]
    tables = f" (tables {', '.join(config['tables'])})" if config.get("tables") else ""
    return Alert(what=f"restore into {target}{tables} failed", error=(errors[0] if errors else run_message or
                                                                     "run failed")[:2000],
                 source=source, group=config.get("group"), tier=config.get("tier"), partition=config.get("partition"),
                 run_url=url, cause=f"restore:{target}", asset=f"restore:{source}")


def run_url(catalog: Catalog, run_id: str) -> str:
    return f"{catalog.alerts.dagster_url.rstrip('/')}/runs/{run_id}"


def _notify(context, notifier: Notifier, alert: Alert) -> None:
    if not notifier.channels:
        context.log.info(f"no alert channel configured: {alert.title()}")
        return
    # remembered in the instance's key-value store, which the command line shares: one alert, not two
    reached = notifier.using(context.instance).send(alert)
    context.log.info(f"alert {'sent to ' + ', '.join(reached) if reached else 'suppressed (already sent in window)'}: "
                     f"{alert.title()}")


def build_sensors(catalog: Catalog) -> list:
    notifier = Notifier.for_catalog(catalog)
    interval = catalog.alerts.sensor_interval_seconds
    known = [dg.AssetKey(["operations", n]) for n in ("dr_drill", "retention", "backup_health")]
    known += [dg.AssetKey([s, "app_table_pruning"]) for s in catalog.sources]
    step_keys = {"__".join(k.path): [k] for k in known}
    ops: dict[tuple[str, str], list[tuple[str, str]]] = {}  # a server's tier is one op (tier_op.tier_ops)
    for source, group, tier in catalog.backup_targets():
        ops.setdefault((catalog.sources[source].pool_name(), tier), []).append((source, group))
    for (_pool, tier), targets in ops.items():
        step_keys[tier_op_name(tier, list(dict.fromkeys(s for s, _ in targets)))] = [
            backup_key(s, g, tier) for s, g in targets]

    def assets_of_step(step_key: str | None, event, selection) -> dict[dg.AssetKey, str]:
        """The assets a failed step failed for, each with its error: those a tier op named in its
        failure, else the step's assets that the run selected."""
        data = event.event_specific_data
        error = root_cause(data.error) if data and data.error else (event.message or "")
        named = failed_assets(data.user_failure_data.metadata) if data and data.user_failure_data else {}
        if named:
            return {dg.AssetKey.from_user_string(k): v for k, v in named.items()}
        keys = step_keys.get(step_key or "", [])
        chosen = [k for k in keys if not selection or k in selection] or keys
        return {k: error for k in chosen}

    def alert_run(context: RunFailureSensorContext) -> None:
        run = context.dagster_run
        partition = run_partition(run.tags)
        url = run_url(catalog, run.run_id)
        failed_keys: dict[dg.AssetKey, str] = {}
        step_failures = context.get_step_failure_events()
        if step_failures and all(is_check_failure(e, watched) for e in step_failures):
            context.log.info(f"run {run.run_id} failed on blocking checks: check_failure_alerts names each")
            return
        for event in step_failures:
            if is_check_failure(event, watched):
                continue
            for key, error in assets_of_step(event.step_key, event, set(run.asset_selection or [])).items():
                failed_keys.setdefault(key, error[:2000])
        if not failed_keys:
            error = context.failure_event.message or "run failed"
            for key in run.asset_selection or []:
                failed_keys[key] = error
        if not failed_keys and run.job_name == "restore":
            _notify(context, notifier, restore_alert(run, context.get_step_failure_events(),
                                                     context.failure_event.message, url))
            return
        if not failed_keys:
            _notify(context, notifier, Alert(what=f"job {run.job_name} failed", partition=partition, run_url=url,
                                             error=context.failure_event.message or "run failed",
                                             cause=f"run:{run.job_name}", asset=run.job_name))
            return
        for key, error in sorted(failed_keys.items(), key=lambda kv: kv[0].to_user_string()):
            _notify(context, notifier, Alert(what=f"run of {run.job_name} failed", error=error, partition=partition,
                                             run_url=url, cause="run-failure", **describe_key(key)))

    @dg.run_failure_sensor(name="run_failure_alerts", minimum_interval_seconds=interval,
                           default_status=dg.DefaultSensorStatus.RUNNING,
                           description="Alerts on every failed backup, replication, retention, drill and restore run.")
    def run_failure_alerts(context: RunFailureSensorContext):
        alert_run(context)

    repository = cli_runs.repository_id(catalog)

    @dg.run_failure_sensor(name="cli_run_failure_alerts", minimum_interval_seconds=interval,
                           default_status=dg.DefaultSensorStatus.RUNNING, monitor_all_code_locations=True,
                           description="Alerts on failed runs of `backup-assets backup` for this repository: they run "
                                       "in the command's process, outside any code location, and a command killed "
                                       "mid-run is marked failed by run monitoring or the next command.")
    def cli_run_failure_alerts(context: RunFailureSensorContext):
        run = context.dagster_run
        if run.remote_job_origin is None and run.tags.get(cli_runs.REPOSITORY_TAG) == repository:
            alert_run(context)

    backup_check_names = ("artifact_intact", "archive_readable", "restore_drill", "size_anomaly")
    check_keys = [dg.AssetCheckKey(backup_key(*t), n) for t in catalog.backup_targets() for n in backup_check_names]
    check_keys += [dg.AssetCheckKey(replica_key(*t, r), "replica_intact") for t in catalog.backup_targets()
                   for r in catalog.replication.replicas()]
    from backup_assets.defs.pitr import (base_key, base_replica_key, pitr_check_names, replicated)  # the physical tier's checks too

    for source in catalog.pitr_sources():
        check_keys += [dg.AssetCheckKey(base_key(source), n) for n in pitr_check_names(catalog, source)]
        check_keys += [dg.AssetCheckKey(base_replica_key(source, r), "replica_intact")
                       for r in replicated(catalog, source)]
    watched = set(check_keys)

    @dg.sensor(name="check_failure_alerts", minimum_interval_seconds=interval,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Alerts once on every failed asset check, WARN ones (size anomalies) included, which a "
                           "run-failure sensor never sees.")
    def check_failure_alerts(context: SensorEvaluationContext):
        cursor = int(context.cursor or 0)
        new_cursor = cursor
        found = []
        for check_key in check_keys:
            for record in context.instance.event_log_storage.get_asset_check_execution_history(
                    check_key, limit=200, status={AssetCheckExecutionRecordStatus.FAILED}):
                if record.id > cursor and record.event is not None:
                    found.append(record)
        for record in sorted(found, key=lambda r: r.id):
            evaluation = record.event.dagster_event.event_specific_data
            warn = evaluation.severity == dg.AssetCheckSeverity.WARN
            _notify(context, notifier, Alert(
                what=f"check {evaluation.check_name} failed", error=evaluation.description or "",
                severity="warning" if warn else "error", partition=getattr(evaluation, "partition", None),
                run_url=run_url(catalog, record.run_id), cause=f"check:{evaluation.check_name}",
                **describe_key(evaluation.asset_key)))
            new_cursor = max(new_cursor, record.id)
        context.update_cursor(str(new_cursor))

    backup_keys = [backup_key(*t) for t in catalog.backup_targets()]

    @dg.sensor(name="freshness_alerts", minimum_interval_seconds=max(interval, 60),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Alerts when a backup's newest materialization is older than its tier allows "
                           "(daily: warning after 26 h, error after 30 h).")
    def freshness_alerts(context: SensorEvaluationContext):
        now = dt.datetime.now(dt.timezone.utc)
        for key in backup_keys:
            event = context.instance.get_latest_materialization_event(key)
            if event is None:
                continue  # never backed up yet: backup_health shows it; the schedule has not run
            age = now - dt.datetime.fromtimestamp(event.timestamp, dt.timezone.utc)
            warn, fail = FRESHNESS[parse_key(key)[2]]
            if age > warn:
                level = "error" if age > fail else "warning"
                _notify(context, notifier, Alert(
                    what="backup is stale", severity=level, cause=f"stale-{level}",
                    error=f"newest backup is {age.total_seconds() / 3600:.1f} h old "
                          f"(warn after {warn.total_seconds() / 3600:g} h, fail after {fail.total_seconds() / 3600:g} h)",
                    run_url=run_url(catalog, event.run_id), **describe_key(key)))
        _wal_alerts(context, now)

    def _wal_alerts(context, now: dt.datetime) -> None:
        """Point-in-time recovery: the WAL archive of a source with wal_rpo_seconds is fresh and has no gap."""
        watched = {name: src.wal_rpo_seconds for name, src in catalog.sources.items() if src.wal_rpo_seconds}
        if not watched:
            return
        from backup_assets.core.pitr import base as pitr_base
        from backup_assets.core.pitr import wal

        for name, rpo in watched.items():
            bases = pitr_base.base_backups(catalog, name)
            result = wal.verify(catalog, name, since=bases[0]["start_wal"] if bases else None)
            newest = dt.datetime.fromisoformat(result.newest_pushed_at) if result.newest_pushed_at else None
            age = (now - newest).total_seconds() if newest else None
            if age is None or age > rpo:
                _notify(context, notifier, Alert(
                    what="WAL archive is stale", source=name, asset=f"{name}/wal", cause="wal-stale",
                    error=(f"the newest archived WAL segment is {age:.0f} s old (wal_rpo_seconds {rpo}): check "
                           "archive_command and pg_stat_archiver" if age is not None
                           else "no WAL segment is archived: set archive_command to backup-assets wal-push")))
            if result.gaps:
                before, after = result.gaps[0]
                _notify(context, notifier, Alert(
                    what="WAL archive has a gap", source=name, asset=f"{name}/wal", cause="wal-gap",
                    error=f"{len(result.gaps)} gap(s) in the WAL archive, the first after {before} (next: {after}); "
                          "a restore to a time past it is impossible: take a base backup now"))

    @dg.sensor(name="disk_space_alerts", minimum_interval_seconds=max(interval, 60),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Alerts when the repository's volume runs low on free space.")
    def disk_space_alerts(context: SensorEvaluationContext):
        from backup_assets.core.monitoring import health

        disk = health.disk_status(catalog)
        if disk["low"]:
            _notify(context, notifier, Alert(
                what="backup volume low on space", cause="disk-low", asset=disk["path"],
                error=f"{disk['free_bytes'] / 1024**3:.1f} GB ({disk['free_percent']}%) free on {disk['path']}; "
                      f"threshold {catalog.alerts.disk_free_min_gb:g} GB"
                      + (f" or {catalog.alerts.disk_free_min_percent:g}%" if catalog.alerts.disk_free_min_percent else "")))

    return [run_failure_alerts, cli_run_failure_alerts, check_failure_alerts, freshness_alerts, disk_space_alerts]


def build_health(catalog: Catalog) -> dg.AssetsDefinition:
    @dg.asset(key=HEALTH_KEY, group_name="operations",
              description="Per source, group and tier: the newest good backup, its age against the RPO, the last "
                          "drill's RTO and the size trend; disk space and the 30-day storage forecast.")
    def backup_health(context: AssetExecutionContext) -> dg.MaterializeResult:
        from backup_assets.core.monitoring import health

        from backup_assets.core.monitoring import metrics

        rows, forecast = health.report(catalog)
        textfile = metrics.write_textfile(catalog, report=(rows, forecast))  # the same read of the repository
        missed = [f"{r.source}/{r.group}/{r.tier}" for r in rows if not r.rpo_ok]
        if missed:
            context.log.warning(f"RPO not met: {', '.join(missed)}")
        return dg.MaterializeResult(metadata={
            "report": dg.MetadataValue.md(health.markdown(rows, forecast)),
            "rpo_missed": dg.MetadataValue.int(len(missed)),
            "repository_bytes": dg.MetadataValue.int(forecast["repository_bytes"]),
            "estimated_30_day_bytes": dg.MetadataValue.int(forecast["estimated_30_day_bytes"]),
            "disk_free_bytes": dg.MetadataValue.int(forecast["disk"]["free_bytes"]),
            "safety_copies": dg.MetadataValue.int(len(forecast["safety_copies"])
                                                  if isinstance(forecast["safety_copies"], list) else -1),
            "forecast": dg.MetadataValue.json(forecast),
            "metrics_textfile": dg.MetadataValue.path(str(textfile)),
        })

    return backup_health


def build_schedules(catalog: Catalog, tier_jobs: list, maintenance_job) -> list:
    schedules = []
    by_name = {j.name: j for j in tier_jobs}
    for tier, cfg in catalog.tiers.items():
        job = by_name.get(f"{tier}_backups")
        if job is None:
            continue
        extra = {}
        if tier == "hourly":
            schedules.append(dg.build_schedule_from_partitioned_job(
                job, name="hourly_backup_schedule", minute_of_hour=cfg.minute,
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description=f"Hourly backups at {cfg.minute:02d} past every hour, the hour that just ended."))
            continue
        if tier == "weekly":
            extra["day_of_week"] = DAGSTER_WEEKDAY[cfg.day_of_week]
        if tier == "monthly":
            extra["day_of_month"] = cfg.day_of_month
        schedules.append(dg.build_schedule_from_partitioned_job(
            job, name=f"{tier}_backup_schedule", hour_of_day=cfg.hour, minute_of_hour=cfg.minute,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"{tier.capitalize()} backups at {cfg.time} ({catalog.tier_timezone(tier)})"
                        + (f" on {cfg.day_of_week}s" if tier == "weekly" else "")
                        + (f" on day {cfg.day_of_month}" if tier == "monthly" else "") + ", newest complete partition.",
            **extra))
    daily = catalog.tiers["daily"]
    hour = (daily.hour + 1) % 24
    schedules.append(dg.ScheduleDefinition(
        name="maintenance_schedule", job=maintenance_job, cron_schedule=f"{daily.minute} {hour} * * *",
        execution_timezone=catalog.tier_timezone("daily"), default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Retention, application-table pruning and the health report, daily an hour after the backups."))
    return schedules

