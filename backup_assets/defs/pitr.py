"""The physical tier (base backups and the WAL archive) in Dagster: one `<source>/base_backup` asset per server that archives its WAL,
partitioned by day (a full base backup every `pitr.full_every_days`, incremental ones between where the server
can), with its checks evaluated in the same step:

- base_verified: pg_verifybackup of the new base backup against its own manifest;
- wal_continuity: every WAL segment from the oldest kept base backup's start to the newest one;
- recovery_point: the age of the newest archived WAL against `wal_rpo_seconds` (a warning);
- pitr_drill: a restore to a random committed time in the window into a scratch cluster, proven.

Each check runs on its own too (select it in the UI): the WAL checks then look at the archive as it is now.
"""


import warnings

import dagster as dg
from dagster import AssetExecutionContext

from backup_assets.catalog import REPLICA_LABELS, Catalog
from backup_assets.core import BackupError
from backup_assets.defs.checks import failure_line, keyed_check_result
from backup_assets.defs.partitions import partitions_for
from backup_assets.defs.checks import FAILED_ASSETS
from backup_assets.defs.partitions import freshness_policy
from backup_assets.defs.replication import _storage, where

BASE_BACKUPS_JOB = "base_backups"

PITR_CHECKS = {
    "base_verified": "pg_verifybackup: every file of the base backup is there with the size and checksum its "
                     "manifest records, and nothing else.",
    "wal_continuity": "Every WAL segment from the oldest kept base backup's start to the newest archived one is in "
                      "the archive (no gaps, per timeline): every second of the window can be restored.",
    "recovery_point": "Age of the newest archived WAL (what a restore to the latest point would lose now); warns "
                      "over the source's wal_rpo_seconds.",
    "pitr_drill": "Restores to a random time between two commits in the window into a scratch cluster: recovery "
                  "must stop right before the first commit after the target, the server must promote, pg_amcheck "
                  "must be clean and every table of every database must read. Records the RTO.",
}


def base_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "base_backup"])


def base_replica_key(source: str, replica: str = "s3") -> dg.AssetKey:
    return dg.AssetKey([source, f"base_backup_{replica}"])


def replicated(catalog: Catalog, source: str) -> list[str]:
    """The replicas that hold the source's base backups and WAL (every replica, unless its pitr.s3 is off)."""
    return list(catalog.replication.replicas()) if catalog.sources[source].pitr.s3 else []


def pitr_check_names(catalog: Catalog, source: str) -> list[str]:
    names = ["base_verified", "wal_continuity", "recovery_point"]
    return names + (["pitr_drill"] if catalog.sources[source].pitr.drill else [])


def build_base_backup(catalog: Catalog, source: str, partitions) -> dg.AssetsDefinition:
    src = catalog.sources[source]
    cfg = src.pitr
    key = base_key(source)
    spec = dg.AssetSpec(
        key=key, group_name=source, kinds={"postgres"}, owners=src.owners or None,
        freshness_policy=freshness_policy("daily"),
        tags={"backup_assets/tier": "physical", "backup_assets/source": source},
        description=f"Base backup of the PostgreSQL server of {source} ({src.connection.host}:{src.connection.port}) "
                    f"for point-in-time recovery: full every {cfg.full_every_days} days"
                    f"{', incremental between (PostgreSQL 17+, summarize_wal = on)' if cfg.incremental else ''}; "
                    f"with the WAL archive (wal-push) it restores to any time in the last {cfg.retention_days} days. "
                    f"On disk: `{catalog.repository_root}/base/{source}/` (tar, zstd"
                    f"{', age' if catalog.encryption_for(source) else ''}) and WAL in "
                    f"`{catalog.repository_root}/wal/{source}/`.")
    checks = [dg.AssetCheckSpec(name, asset=key, blocking=name != "recovery_point", partitions_def=partitions,
                                description=PITR_CHECKS[name]) for name in pitr_check_names(catalog, source)]
    specs = [spec]
    replicas = replicated(catalog, source)
    for replica in replicas:
        specs.append(dg.AssetSpec(
            key=base_replica_key(source, replica), group_name=source, kinds={replica}, deps=[key],
            tags={"backup_assets/tier": "physical", "backup_assets/source": source, "backup_assets/replica": replica},
            description=f"The base backups and WAL archive of {source} on {where(catalog, replica)}: every "
                        "kept base backup and archived WAL file the replica lacks, each verified by its SHA-256, "
                        "its JSON last."))
        checks.append(dg.AssetCheckSpec(
            "replica_intact", asset=base_replica_key(source, replica), blocking=True, partitions_def=partitions,
            description="Every kept base backup is on the replica with its size and SHA-256, and every WAL file "
                        "from the oldest kept base backup on."))

    @dg.multi_asset(name=f"{source}__base_backup", specs=specs, check_specs=checks, partitions_def=partitions,
                    can_subset=True, pool=src.pool_name(), backfill_policy=dg.BackfillPolicy.multi_run(1),
                    required_resource_keys={"s3"} if "s3" in replicas else set(),
                    description=f"The base backup of {source}'s server and its checks"
                                f"{', then its ' + ', '.join(REPLICA_LABELS[r] for r in replicas) + ' replicas' if replicas else ''}.")
    def base_backup(context: AssetExecutionContext):
        yield from run_base_backup(catalog, context, source)

    return base_backup


def run_base_backup(catalog: Catalog, context: AssetExecutionContext, source: str):
    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.pitr import checks as pitr_checks
    from backup_assets.core.outcome import Outcome

    key = base_key(source)
    meta = None
    if key in context.selected_asset_keys:
        try:
            meta = pitr_base.base_backup(catalog, source, partition=context.partition_key, say=context.log.info)
        except BackupError as exc:
            raise _failure(context, key, exc) from None
        yield dg.MaterializeResult(asset_key=key, metadata={
            "artifact": dg.MetadataValue.text(meta["artifact"]),
            "kind": dg.MetadataValue.text(meta["kind"]),
            "parent": dg.MetadataValue.text(meta["parent"] or "-"),
            "start_wal": dg.MetadataValue.text(meta["start_wal"]),
            "timeline": dg.MetadataValue.int(meta["timeline"]),
            "dagster/size_bytes": dg.MetadataValue.int(meta["size_bytes"]),
            "raw_size_bytes": dg.MetadataValue.int(meta["raw_size_bytes"]),
            "sha256": dg.MetadataValue.text(meta["sha256"]),
            "server_version": dg.MetadataValue.text(meta["server_version"]),
            "encrypted": dg.MetadataValue.bool(meta["encrypted"]),
            "finished_at": dg.MetadataValue.text(meta["finished_at"]),
        })
    selected = {c.name for c in context.selected_asset_check_keys}
    state = None
    for name in [n for n in pitr_check_names(catalog, source) if n in selected]:  # cheap ones first
        try:
            if name == "base_verified":
                bases = pitr_base.base_backups(catalog, source)
                target = meta or next((b for b in reversed(bases) if b.get("partition") == context.partition_key),
                                      bases[-1] if bases else None)
                outcome = pitr_checks.verify_base(catalog, source, target) if target else \
                    Outcome(False, f"no base backup of {source} to verify", {})
            elif name in ("wal_continuity", "recovery_point"):
                state = state or pitr_checks.archive_state(catalog, source)  # one read of the archive for both
                outcome = (pitr_checks.wal_continuity if name == "wal_continuity" else pitr_checks.recovery_point)(
                    catalog, source, state=state)
            else:
                outcome = pitr_checks.pitr_drill(catalog, source, say=context.log.info)
        except BackupError as exc:  # a missing key: not checked here, never failed
            outcome = Outcome.failure(exc, str(exc))
        if line := failure_line(name, outcome):
            getattr(context.log, line[0])(line[1])
        yield keyed_check_result(key, name, outcome)
    from backup_assets.core.pitr import s3 as pitr_s3

    failed = {}
    for replica in replicated(catalog, source):  # one replica down: the others are still written
        rkey = base_replica_key(source, replica)
        try:
            storage = _storage(catalog, getattr(context.resources, "s3", None), replica)
        except BackupError as exc:
            storage, failed[rkey.to_user_string()] = None, str(exc)
            context.log.error(f"{rkey.to_user_string()}: {exc}")
        if storage is not None and rkey in context.selected_asset_keys:
            try:
                report = pitr_s3.replicate(catalog, source, storage, say=context.log.info)
            except BackupError as exc:
                failed[rkey.to_user_string()] = str(exc)
                context.log.error(f"{rkey.to_user_string()}: {exc}")
            else:
                yield dg.MaterializeResult(asset_key=rkey, metadata={
                    "uri": dg.MetadataValue.text(report["uri"]),
                    "base_backups": dg.MetadataValue.int(report["base_backups"]),
                    "wal_files": dg.MetadataValue.int(report["wal_files"]),
                    "uploaded_files": dg.MetadataValue.int(report["uploaded_files"]),
                    "uploaded_bytes": dg.MetadataValue.int(report["uploaded_bytes"]),
                })
        if any(c.name == "replica_intact" and c.asset_key == rkey for c in context.selected_asset_check_keys):
            try:
                if storage is None:
                    raise BackupError(failed[rkey.to_user_string()])
                outcome = pitr_s3.replica_intact(catalog, source, storage)
            except BackupError as exc:
                outcome = Outcome(False, str(exc), {})
            if line := failure_line("replica_intact", outcome):
                getattr(context.log, line[0])(line[1])
            yield keyed_check_result(rkey, "replica_intact", outcome)
    if failed:
        raise dg.Failure(description="; ".join(f"{k}: {v}" for k, v in failed.items()),
                         metadata={FAILED_ASSETS: dg.MetadataValue.json(failed)})


def _failure(context, key: dg.AssetKey, exc: Exception) -> dg.Failure:
    """The step fails naming the asset (the run-failure sensor alerts per asset from this list)."""
    context.log.error(f"{key.to_user_string()}: {exc}")
    return dg.Failure(description=str(exc), metadata={FAILED_ASSETS: dg.MetadataValue.json(
        {key.to_user_string(): str(exc)})})


def build_pitr(catalog: Catalog) -> tuple[list[dg.AssetsDefinition], list, list]:
    """(assets, jobs, schedules) of the physical tier; empty when no source enables pitr."""
    sources = catalog.pitr_sources()
    if not sources:
        return [], [], []
    partitions = partitions_for(catalog, "daily")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        assets = [build_base_backup(catalog, s, partitions) for s in sources]
    keys = [base_key(s) for s in sources] + [base_replica_key(s, r) for s in sources for r in replicated(catalog, s)]
    job = dg.define_asset_job(
        BASE_BACKUPS_JOB, selection=dg.AssetSelection.assets(*keys),
        description="Base backups of the servers that archive their WAL, with their checks (pg_verifybackup, WAL "
                    "continuity, recovery point, the point-in-time drill).",
        tags={"backup_assets/tier": "physical"},
        executor_def=dg.multiprocess_executor.configured({"max_concurrent": len(sources)}))
    daily = catalog.tiers["daily"]
    # half an hour before the daily dumps, so the two do not compete for the servers
    minute = (daily.hour * 60 + daily.minute - 30) % (24 * 60)
    schedule = dg.build_schedule_from_partitioned_job(
        job, name="base_backup_schedule", hour_of_day=minute // 60, minute_of_hour=minute % 60,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Base backups daily at {minute // 60:02d}:{minute % 60:02d} "
                    f"({catalog.tier_timezone('daily')}), half an hour before the daily dumps.")
    return assets, [job], [schedule]
