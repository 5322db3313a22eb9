"""Retention: the backup-pruning asset and the application-table pruning assets."""

import json

import dagster as dg
from dagster import AssetExecutionContext

from backup_assets.catalog import REPLICA_LABELS, Catalog
from backup_assets.core import BackupError
from backup_assets.defs.keys import backup_key
from backup_assets.defs.replication import _storage

RETENTION_KEY = dg.AssetKey(["operations", "retention"])


class PruneConfig(dg.Config):
    dry_run: bool = False


def build_retention(catalog: Catalog) -> list[dg.AssetsDefinition]:
    replicas = list(catalog.replication.replicas())
    days = ", ".join(f"{t} {catalog.retention_days(t)}d" for t in catalog.tiers)
    resource_keys = {"s3"} if "s3" in replicas else set()

    @dg.asset(key=RETENTION_KEY, group_name="operations", kinds=set(replicas) or None,
              required_resource_keys=resource_keys,
              description=f"Deletes backups past their tier's retention ({days}) from the local repository"
                          f"{''.join(' and ' + REPLICA_LABELS[r] for r in replicas)}; never the newest verified "
                          "backup of any source, group and tier. Set dry_run to only report.")
    def retention(context: AssetExecutionContext, config: PruneConfig) -> dg.MaterializeResult:
        from backup_assets.core.retention.prune import prune

        storages = {r: _storage(catalog, getattr(context.resources, "s3", None), r) for r in replicas}
        report = prune(catalog, dry_run=config.dry_run, storages=storages)
        context.log.info(json.dumps({k: v for k, v in report.items()}, default=str)[:4000])
        md = {"report": dg.MetadataValue.json(report), "dry_run": dg.MetadataValue.bool(config.dry_run)}
        for where in ("local", *replicas):
            if where in report:
                md[f"{where}_backups_deleted"] = dg.MetadataValue.int(report[where]["backups"])
                md[f"{where}_bytes_freed"] = dg.MetadataValue.int(report[where]["bytes_freed"])
                md[f"{where}_kept"] = dg.MetadataValue.int(report[where]["kept"])
        return dg.MaterializeResult(metadata=md)

    assets = [retention]
    if replicas:
        assets.append(_replica_audit(catalog))
    for source, src in catalog.sources.items():
        if src.engine != "postgres" or not src.prune:
            continue
        assets.append(_table_pruning(catalog, source))
    return assets


REPLICA_AUDIT_KEY = dg.AssetKey(["operations", "replica_audit"])


class AuditConfig(dg.Config):
    every: bool = False  # download every replica now, not only those due


def _replica_audit(catalog: Catalog) -> dg.AssetsDefinition:
    replicas = catalog.replication.replicas()
    cadence = "; ".join(
        f"{REPLICA_LABELS[r]} every {cfg.deep_verify_days} days "
        f"({f'at most {cfg.deep_verify_per_run} a run' if cfg.deep_verify_per_run else 'all that are due'})"
        for r, cfg in replicas.items())

    @dg.asset(key=REPLICA_AUDIT_KEY, group_name="operations", kinds=set(replicas),
              required_resource_keys={"s3"} if "s3" in replicas else set(),
              description=f"Proves the replicas by their bytes: downloads and hashes each copy ({cadence}, the "
                          "longest unproven first) and fails naming every copy whose bytes differ from its manifest "
                          "or that is gone while the replica's retention keeps it. The per-replication check "
                          "compares the storage's own checksums; this compares the bytes.")
    def replica_audit(context: AssetExecutionContext, config: AuditConfig) -> dg.MaterializeResult:
        from backup_assets.core.replica import audit_replicas
        from backup_assets.defs.keys import replica_key
        from backup_assets.defs.checks import FAILED_ASSETS

        results, failed = [], {}
        for replica in replicas:
            try:
                found = audit_replicas(catalog, _storage(catalog, getattr(context.resources, "s3", None), replica),
                                       every=config.every, say=context.log.info)
            except BackupError as exc:  # one replica unreachable: the others are still proven
                failed[f"replication.{replica}"] = str(exc)
                context.log.error(f"{REPLICA_LABELS[replica]}: {exc}")
                continue
            results += found
            for r in found:
                if not r.outcome.passed:
                    name = replica_key(r.source, r.group, r.tier, replica).to_user_string()
                    failed.setdefault(name, f"[{r.partition}] {r.outcome.message}")
                    context.log.error(f"{name} [{r.partition}]: {r.outcome.message}")
        md = {"replicas_proven": dg.MetadataValue.int(sum(r.outcome.passed for r in results)),
              "replicas_failed": dg.MetadataValue.int(len(results) - sum(r.outcome.passed for r in results)),
              "bytes_downloaded": dg.MetadataValue.int(sum(r.outcome.metadata.get("size_bytes", 0) for r in results
                                                           if r.outcome.passed))}
        if failed:
            raise dg.Failure(description="; ".join(f"{k}: {v}" for k, v in failed.items()),
                             metadata={FAILED_ASSETS: dg.MetadataValue.json(failed), **md})
        return dg.MaterializeResult(metadata=md)

    return replica_audit


def _table_pruning(catalog: Catalog, source: str) -> dg.AssetsDefinition:
    src = catalog.sources[source]
    groups = sorted({r.verified_by_group for r in src.prune})
    rules = "; ".join(f"{r.table} older than {r.days} days (by {r.timestamp_column})" for r in src.prune)
    deps = [backup_key(source, g, t) for g in groups for t in catalog.source_tiers(source)]

    @dg.asset(key=dg.AssetKey([source, "app_table_pruning"]), group_name=source, kinds={"postgres"}, deps=deps,
              pool=src.pool_name(),
              description=f"Deletes old application rows: {rules}. Only rows also older than the snapshot of the "
                          f"newest {'/'.join(groups)} backup that passed its restore drill, in small batches. "
                          "Set dry_run to only count.")
    def app_table_pruning(context: AssetExecutionContext, config: PruneConfig) -> dg.MaterializeResult:
        from backup_assets.core.retention.app_tables import prune_tables

        report = prune_tables(catalog, source, dry_run=config.dry_run, say=context.log.info)
        md = {"report": dg.MetadataValue.json(report), "dry_run": dg.MetadataValue.bool(config.dry_run),
              "rows_deleted": dg.MetadataValue.int(sum(t.get("deleted", 0) for t in report["tables"].values())),
              "rows_eligible": dg.MetadataValue.int(sum(t.get("would_delete", 0) for t in report["tables"].values()))}
        return dg.MaterializeResult(metadata=md)

    return app_table_pruning
