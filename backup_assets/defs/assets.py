"""The backup asset of a source × table group × tier, as Dagster shows it (see tier_op.py for what runs)."""

import dagster as dg

from backup_assets.catalog import Catalog
from backup_assets.defs.keys import backup_key
from backup_assets.defs.partitions import freshness_policy

KIND = {"postgres": "postgres", "sqlite": "sqlite"}


def upstream_tier(catalog: Catalog, source: str, tier: str) -> str | None:
    """daily → weekly → monthly, skipping tiers the source does not have."""
    tiers = [t for t in catalog.source_tiers(source) if t != "hourly"]  # hourly copies stand on their own
    if tier not in tiers:
        return None
    earlier = [t for t in tiers[: tiers.index(tier)]]
    return earlier[-1] if earlier else None


def backup_metadata(manifest, path: str) -> dict:
    duration = max(manifest.duration_s, 1e-6)
    return {
        "dagster/size_bytes": dg.MetadataValue.int(manifest.size_bytes),
        "dagster/row_count": dg.MetadataValue.int(manifest.total_rows),
        "duration_s": dg.MetadataValue.float(round(manifest.duration_s, 3)),
        "throughput_mb_s": dg.MetadataValue.float(round(manifest.raw_size_bytes / 1e6 / duration, 2)),
        "compression_ratio": dg.MetadataValue.float(
            round(manifest.raw_size_bytes / manifest.size_bytes, 3) if manifest.size_bytes else 0.0
        ),
        "sha256": dg.MetadataValue.text(manifest.sha256),
        "path": dg.MetadataValue.path(path),
        "partition": dg.MetadataValue.text(manifest.partition),
        "snapshot_at": dg.MetadataValue.text(manifest.snapshot_at or ""),
        "promoted_from": dg.MetadataValue.text(manifest.promoted_from or ""),
        "row_counts": dg.MetadataValue.json(manifest.row_counts),
    }


def backup_spec(catalog: Catalog, source: str, group: str, tier: str) -> dg.AssetSpec:
    src = catalog.sources[source]
    tables = src.group_tables(group)
    what = ("the server's roles, memberships and settings, and the database's grants" if tables == []
            else "the whole database" if tables is None else ", ".join(tables))
    upstream = upstream_tier(catalog, source, tier)
    deps = []
    if upstream is not None:
        deps.append(dg.AssetDep(backup_key(source, group, upstream), partition_mapping=dg.TimeWindowPartitionMapping()))
    promoted = " Promoted from the daily backup of the last day of its window (a hard link, no second dump)." if (
        tier in ("weekly", "monthly") and "daily" in catalog.source_tiers(source)) else ""
    description = (
        f"{tier.capitalize()} {src.engine} backup of {source} ({group}: {what}). On disk: one file per "
        f"backup in `{catalog.repository_root}/{src.engine}/{tier}/`, named "
        f"`{source}-{group}-PARTITION-TIMESTAMP.{'dump' if src.engine == 'postgres' else 'db'}.zst` "
        f"(PARTITION is the partition's date, TIMESTAMP the UTC time of the backup), zstd-compressed, with a "
        f"`.meta` JSON manifest beside it (sha256, row counts, versions).{promoted}"
    )
    return dg.AssetSpec(
        key=backup_key(source, group, tier), group_name=source, kinds={KIND[src.engine]}, owners=src.owners or None,
        description=description, deps=deps, freshness_policy=freshness_policy(tier),
        tags={"backup_assets/tier": tier, "backup_assets/source": source},
        metadata={"tables": dg.MetadataValue.text(what), "engine": src.engine},
    )
