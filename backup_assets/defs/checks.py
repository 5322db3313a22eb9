"""Asset checks on every backup asset, partition by partition, and the scheduled DR drill."""

import warnings

import dagster as dg
from dagster import AssetCheckExecutionContext, AssetExecutionContext

from ..catalog import Catalog
from ..core import BackupError
from ..core import verification
from ..core.backup import repository_for
from ..core.crypto import identities_if_any
from ..core.drill import markdown_report, run_dr_drill
from ..core.verify import Outcome, archive_readable, artifact_intact, find_backup, restore_drill, size_anomaly
from .assets import backup_key
from .partitions import partitions_for


def metadata_of(outcome: Outcome) -> dict:
    md: dict = {}
    for key, value in outcome.metadata.items():
        if isinstance(value, bool) or value is None:
            md[key] = dg.MetadataValue.text(str(value))
        elif isinstance(value, int):
            md[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            md[key] = dg.MetadataValue.float(value)
        elif isinstance(value, (dict, list)):
            md[key] = dg.MetadataValue.json(value)
        else:
            md[key] = dg.MetadataValue.text(str(value))
    return md


def check_result(outcome: Outcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN if outcome.warn else dg.AssetCheckSeverity.ERROR,
        description=outcome.message,
        metadata=metadata_of(outcome),
    )


def _checks_for(catalog: Catalog, source: str, group: str, tier: str) -> list[dg.AssetChecksDefinition]:
    # partitioned asset checks are a preview feature of dagster 1.13; they are what lets every
    # partition of a backup carry its own check results
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    key = backup_key(source, group, tier)
    partitions = partitions_for(catalog, tier)
    src = catalog.sources[source]

    def run(fn):
        def body(context: AssetCheckExecutionContext) -> dg.AssetCheckResult:
            try:
                backup = find_backup(catalog, source, group, tier, context.partition_key)
            except BackupError as exc:
                return check_result(Outcome(False, str(exc)))
            try:
                outcome = fn(backup)
            except BackupError as exc:
                outcome = Outcome(False, str(exc))
            verification.record(backup, context.check_specs[0].name, outcome.passed, outcome.message, outcome.metadata)
            (context.log.info if outcome.passed else context.log.error)(outcome.message)
            return check_result(outcome)

        return body

    checks = [
        dg.asset_check(asset=key, name="artifact_intact", blocking=True, partitions_def=partitions,
                       description="The manifest parses; the artifact's size and SHA-256 match it; the zstd stream "
                                   "decodes to its end (an encrypted one is decrypted when the identity is at hand; "
                                   "without it, size and SHA-256 of the ciphertext are checked).")(
            run(lambda b: artifact_intact(b, identities_if_any(catalog, b.manifest, artifact=str(b.artifact_path))))),
        dg.asset_check(asset=key, name="archive_readable", blocking=True, partitions_def=partitions,
                       description="pg_restore --list reads the archive and lists every table of the group "
                                   "(SQLite: integrity_check passes and every table is there).")(
            run(lambda b: archive_readable(catalog, b))),
        dg.asset_check(asset=key, name="size_anomaly", blocking=False, partitions_def=partitions,
                       description=f"Warns when the compressed size changed by more than "
                                   f"{catalog.size_anomaly_threshold:.0%} against the previous partition.")(
            run(lambda b: size_anomaly(repository_for(catalog), b, catalog.size_anomaly_threshold))),
    ]
    if catalog.tier(tier).drill:
        pool = f"drill_{src.pool_name()}" if src.engine == "postgres" else src.pool_name()
        checks.append(
            dg.asset_check(asset=key, name="restore_drill", blocking=True, partitions_def=partitions, pool=pool,
                           description="Restores the artifact into a scratch database (SQLite: a temporary file), "
                                       "compares row counts, vectors and indexes with the manifest, records the "
                                       "restore time (RTO) and drops the scratch target.")(
                run(lambda b: restore_drill(catalog, b)))
        )
    return checks


def build_backup_checks(catalog: Catalog) -> list[dg.AssetChecksDefinition]:
    return [c for target in catalog.backup_targets() for c in _checks_for(catalog, *target)]


DR_DRILL_KEY = dg.AssetKey(["operations", "dr_drill"])


def build_dr_drill(catalog: Catalog) -> tuple[dg.AssetsDefinition, dg.ScheduleDefinition]:
    @dg.asset(
        key=DR_DRILL_KEY,
        group_name="operations",
        kinds={"postgres", "sqlite"},
        description="Disaster-recovery drill: restores the newest backup of every source and group into a scratch "
                    "target, compares it with its manifest and reports per source the backup used, RTO, counts "
                    "and pass/fail (markdown in metadata). Fails when any drill fails.",
        deps=[backup_key(*t) for t in catalog.backup_targets()],
    )
    def dr_drill(context: AssetExecutionContext) -> dg.MaterializeResult:
        results = run_dr_drill(catalog, log=context.log.info)
        report = markdown_report(results)
        failed = [r for r in results if not r.outcome.passed]
        metadata = {
            "report": dg.MetadataValue.md(report),
            "drilled": dg.MetadataValue.int(len(results)),
            "failed": dg.MetadataValue.int(len(failed)),
            "max_rto_s": dg.MetadataValue.float(max([r.outcome.metadata.get("rto_s", 0.0) for r in results] or [0.0])),
        }
        if failed:
            raise dg.Failure(
                description="restore drill failed for " + ", ".join(f"{r.source}/{r.group}: {r.outcome.message}"
                                                                   for r in failed),
                metadata=metadata,
            )
        return dg.MaterializeResult(metadata=metadata)

    schedule = dg.ScheduleDefinition(
        name="dr_drill_schedule",
        target=dg.AssetSelection.assets(DR_DRILL_KEY),
        cron_schedule=catalog.dr_drill.cron,
        execution_timezone=catalog.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING if catalog.dr_drill.enabled else dg.DefaultScheduleStatus.STOPPED,
        description="The monthly disaster-recovery drill of every source and group.",
    )
    return dr_drill, schedule
