"""S3 replica assets (one per backup asset, same partitions); they run in the tier op (tier_op.py)."""

import dagster as dg

from backup_assets.catalog import Catalog
from backup_assets.defs.keys import backup_key, replica_key


class S3Replica(dg.ConfigurableResource):
    """The catalog's S3 replica, as the UI shows it. The client is made from the catalog's
    `replication.s3` section (endpoint, CA bundle, SSE, part size; keys from the variables it
    names), the same way the command line makes it."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None


def s3_resource(catalog: Catalog) -> S3Replica:
    cfg = catalog.replication.s3
    return S3Replica(bucket=cfg.bucket, prefix=cfg.prefix, region=cfg.region, endpoint_url=cfg.endpoint_url)


def _storage(catalog: Catalog, s3: S3Replica | None = None):
    from backup_assets.core.storage.s3 import S3Storage  # boto3 is loaded by the steps that use S3

    return S3Storage(catalog.replication.s3)


def replica_spec(catalog: Catalog, source: str, group: str, tier: str) -> dg.AssetSpec:
    cfg = catalog.replication.s3
    where = f"s3://{cfg.bucket}/{cfg.prefix.strip('/') + '/' if cfg.prefix.strip('/') else ''}"
    engine = catalog.sources[source].engine
    return dg.AssetSpec(
        key=replica_key(source, group, tier), deps=[backup_key(source, group, tier)], group_name=source, kinds={"s3"},
        description=f"Off-site copy of {source}/{group}/{tier} in {where}{engine}/{tier}/ (artifact and manifest, "
                    f"SSE {cfg.sse}, storage class {cfg.storage_class}); promotions are server-side copies.",
        tags={"backup_assets/tier": tier, "backup_assets/source": source},
    )
