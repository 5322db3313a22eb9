"""Replica assets (one per backup asset and replica: S3, GCS, Azure; same partitions); they run in the tier op
(tier_op.py)."""

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


def _storage(catalog: Catalog, s3: S3Replica | None = None, replica: str = "s3"):
    """A replica's storage in a run: for S3, dagster-aws's client from the `s3` resource, with the catalog's Object
    Lock policy (as the command line's `storage_for`); GCS and Azure from the catalog (their SDKs load here)."""
    from backup_assets.core.replica import storage_for  # the SDKs are loaded by the steps that use them

    client = s3.client(catalog.replication.s3) if s3 is not None and replica == "s3" else None
    return storage_for(catalog, client, replica=replica)


def where(catalog: Catalog, replica: str) -> str:
    cfg = catalog.replication.replicas()[replica]
    prefix = cfg.prefix.strip("/") + "/" if cfg.prefix.strip("/") else ""
    if replica == "gcs":
        return f"gs://{cfg.bucket}/{prefix}"
    if replica == "azure":
        return f"the Azure container {cfg.container}/{prefix}"
    return f"s3://{cfg.bucket}/{prefix}"


KINDS = {"s3": "s3", "gcs": "gcs", "azure": "azure"}  # the UI's kind tag of each replica


def replica_spec(catalog: Catalog, source: str, group: str, tier: str, replica: str = "s3") -> dg.AssetSpec:
    cfg = catalog.replication.replicas()[replica]
    engine = catalog.sources[source].engine
    detail = (f"SSE {cfg.sse}, storage class {cfg.storage_class}" if replica == "s3" else
              f"storage class {cfg.storage_class or 'the bucket default'}" if replica == "gcs" else
              f"access tier {cfg.access_tier or 'the account default'}")
    return dg.AssetSpec(
        key=replica_key(source, group, tier, replica), deps=[backup_key(source, group, tier)], group_name=source,
        kinds={KINDS[replica]},
        description=f"Off-site copy of {source}/{group}/{tier} in {where(catalog, replica)}{engine}/{tier}/ (artifact "
                    f"and manifest, {detail}); promotions are server-side copies.",
        tags={"backup_assets/tier": tier, "backup_assets/source": source, "backup_assets/replica": replica},
    )
