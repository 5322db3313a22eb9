"""S3 replica assets (one per backup asset, same partitions); they run in the tier op (tier_op.py)."""

import dagster as dg

from backup_assets.catalog import Catalog
from backup_assets.defs.keys import backup_key, replica_key


class S3Replica(dg.ConfigurableResource):
    """The catalog's S3 replica, as the UI shows it, with the fields of dagster-aws's `S3Resource` (region,
    endpoint, CA bundle, retry attempts, profile). The client is dagster-aws's, constructed in the run that uses
    it (`client()`), so loading the definitions never imports dagster-aws; the keys come from the environment
    variables the catalog names, never from this resource's configuration (which the UI shows)."""

    bucket: str
    prefix: str = ""
    region_name: str | None = None
    endpoint_url: str | None = None
    verify: str | None = None
    max_attempts: int = 5
    profile_name: str | None = None

    def client(self, cfg):
        from dagster_aws.s3 import S3Resource  # only in the steps that replicate

        keys = cfg.credentials()
        return S3Resource(region_name=self.region_name, endpoint_url=self.endpoint_url, verify=self.verify,
                          max_attempts=self.max_attempts, profile_name=self.profile_name, **keys).get_client()


def s3_resource(catalog: Catalog) -> S3Replica:
    cfg = catalog.replication.s3
    return S3Replica(bucket=cfg.bucket, prefix=cfg.prefix, region_name=cfg.region, endpoint_url=cfg.endpoint_url,
                     verify=cfg.ca_bundle or None)


def _storage(catalog: Catalog, s3: S3Replica | None = None):
    """The replica's storage in a run: dagster-aws's client from the `s3` resource, with the catalog's Object Lock
    policy (as the command line's `storage_for`)."""
    from backup_assets.core.replica import storage_for  # boto3 is loaded by the steps that use S3

    return storage_for(catalog, s3.client(catalog.replication.s3) if s3 is not None else None)


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
