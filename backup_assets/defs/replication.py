"""S3 replica assets (one per backup asset, same partitions) and their checks."""

import warnings

import dagster as dg
from dagster import AssetCheckExecutionContext, AssetExecutionContext
from dagster_aws.s3 import S3Resource

from ..catalog import Catalog
from ..core import BackupError
from ..core.replica import replica_intact, replicate
from ..core.storage.s3 import S3Storage
from ..core.verify import Outcome, find_backup
from .assets import backup_key
from .checks import check_result
from .partitions import partitions_for


def replica_key(source: str, group: str, tier: str) -> dg.AssetKey:
    return dg.AssetKey([source, group, tier, "s3"])


def s3_resource(catalog: Catalog) -> S3Resource:
    cfg = catalog.replication.s3
    creds = {}
    if cfg.access_key_id_env:
        creds["aws_access_key_id"] = dg.EnvVar(cfg.access_key_id_env)
    if cfg.secret_access_key_env:
        creds["aws_secret_access_key"] = dg.EnvVar(cfg.secret_access_key_env)
    return S3Resource(region_name=cfg.region, endpoint_url=cfg.endpoint_url, max_attempts=5, **creds)


def _storage(catalog: Catalog, s3: S3Resource) -> S3Storage:
    cfg = catalog.replication.s3
    # S3Resource's `verify` is a bool: with a CA bundle the storage makes its own client
    return S3Storage(cfg, client=None if cfg.ca_bundle else s3.get_client())


def build_replica(catalog: Catalog, source: str, group: str, tier: str) -> list:
    cfg = catalog.replication.s3
    partitions = partitions_for(catalog, tier)
    key = replica_key(source, group, tier)
    where = f"s3://{cfg.bucket}/{cfg.prefix.strip('/') + '/' if cfg.prefix.strip('/') else ''}"
    engine = catalog.sources[source].engine

    @dg.asset(
        key=key,
        deps=[backup_key(source, group, tier)],
        partitions_def=partitions,
        group_name=source,
        kinds={"s3"},
        backfill_policy=dg.BackfillPolicy.multi_run(1),
        description=f"Off-site copy of {source}/{group}/{tier} in {where}{engine}/{tier}/ (artifact and manifest, "
                    f"SSE {cfg.sse}, storage class {cfg.storage_class}); promotions are server-side copies.",
        tags={"backup_assets/tier": tier, "backup_assets/source": source},
    )
    def replica(context: AssetExecutionContext, s3: S3Resource) -> dg.MaterializeResult:
        backup = find_backup(catalog, source, group, tier, context.partition_key)
        try:
            result = replicate(catalog, backup, _storage(catalog, s3), say=context.log.info)
        except BackupError as exc:
            raise dg.Failure(description=str(exc)) from None
        return dg.MaterializeResult(metadata={
            "uri": dg.MetadataValue.text(result.uri),
            "mode": dg.MetadataValue.text(result.mode),
            "dagster/size_bytes": dg.MetadataValue.int(result.size_bytes),
            "duration_s": dg.MetadataValue.float(result.duration_s),
            "sha256": dg.MetadataValue.text(backup.manifest.sha256),
        })

    warnings.filterwarnings("ignore", category=dg.PreviewWarning)

    @dg.asset_check(asset=key, name="replica_intact", blocking=True, partitions_def=partitions,
                    description="The S3 object exists and its size and SHA-256 match the manifest.")
    def replica_check(context: AssetCheckExecutionContext, s3: S3Resource) -> dg.AssetCheckResult:
        try:
            backup = find_backup(catalog, source, group, tier, context.partition_key)
            outcome = replica_intact(catalog, backup, _storage(catalog, s3))
        except BackupError as exc:
            outcome = Outcome(False, str(exc))
        return check_result(outcome)

    return [replica, replica_check]


def build_replicas(catalog: Catalog) -> tuple[list, list]:
    if catalog.replication.s3 is None:
        return [], []
    assets, checks = [], []
    for target in catalog.backup_targets():
        a, c = build_replica(catalog, *target)
        assets.append(a)
        checks.append(c)
    return assets, checks
