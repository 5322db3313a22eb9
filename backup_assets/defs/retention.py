"""Retention: the backup-pruning asset and the application-table pruning assets."""

import json

import dagster as dg
from dagster import AssetExecutionContext

from ..catalog import Catalog
from .keys import backup_key
from .replication import _storage

RETENTION_KEY = dg.AssetKey(["operations", "retention"])


class PruneConfig(dg.Config):
    dry_run: bool = False


def build_retention(catalog: Catalog) -> list[dg.AssetsDefinition]:
    replicated = catalog.replication.s3 is not None
    days = ", ".join(f"{t} {catalog.retention_days(t)}d" for t in catalog.tiers)

    resource_keys = {"s3"} if replicated else set()

    @dg.asset(key=RETENTION_KEY, group_name="operations", kinds={"s3"} if replicated else None,
              required_resource_keys=resource_keys,
              description=f"Deletes backups past their tier's retention ({days}) from the local repository"
                          f"{' and S3' if replicated else ''}; never the newest verified backup of any source, "
                          "group and tier. Set dry_run to only report.")
    def retention(context: AssetExecutionContext, config: PruneConfig) -> dg.MaterializeResult:
        from ..core.retention import prune

        storage = _storage(catalog, context.resources.s3) if replicated else None
        report = prune(catalog, dry_run=config.dry_run, storage=storage)
        context.log.info(json.dumps({k: v for k, v in report.items()}, default=str)[:4000])
        md = {"report": dg.MetadataValue.json(report), "dry_run": dg.MetadataValue.bool(config.dry_run)}
        for where in ("local", "s3"):
            if where in report:
                md[f"{where}_backups_deleted"] = dg.MetadataValue.int(report[where]["backups"])
                md[f"{where}_bytes_freed"] = dg.MetadataValue.int(report[where]["bytes_freed"])
                md[f"{where}_kept"] = dg.MetadataValue.int(report[where]["kept"])
        return dg.MaterializeResult(metadata=md)

    assets = [retention]
    for source, src in catalog.sources.items():
        if src.engine != "postgres" or not src.prune:
            continue
        assets.append(_table_pruning(catalog, source))
    return assets


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
        from ..core.prune_tables import prune_tables

        report = prune_tables(catalog, source, dry_run=config.dry_run, say=context.log.info)
        md = {"report": dg.MetadataValue.json(report), "dry_run": dg.MetadataValue.bool(config.dry_run),
              "rows_deleted": dg.MetadataValue.int(sum(t.get("deleted", 0) for t in report["tables"].values())),
              "rows_eligible": dg.MetadataValue.int(sum(t.get("would_delete", 0) for t in report["tables"].values()))}
        return dg.MaterializeResult(metadata=md)

    return app_table_pruning
