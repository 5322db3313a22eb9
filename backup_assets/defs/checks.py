"""Check results as Dagster shows them, and the scheduled DR drill."""

import json

import dagster as dg
from dagster import AssetExecutionContext

from backup_assets.catalog import Catalog


FAILED_ASSETS = "failed_assets"  # a tier op's Failure metadata: {asset key: error}


def failed_assets(metadata) -> dict[str, str]:
    """The {asset: error} a failed tier op named (empty for another failure)."""
    value = (metadata or {}).get(FAILED_ASSETS)
    data = getattr(value, "data", value)
    if isinstance(data, str):
        data = json.loads(data)
    return data if isinstance(data, dict) else {}


def metadata_of(outcome) -> dict:
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


def keyed_check_result(key: dg.AssetKey, name: str, outcome) -> dg.AssetCheckResult:
    """The result of check `name` of asset `key` (ops evaluate the checks of several assets)."""
    return dg.AssetCheckResult(
        asset_key=key, check_name=name, passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN if outcome.warn else dg.AssetCheckSeverity.ERROR,
        description=outcome.message, metadata=metadata_of(outcome),
    )


def failure_line(name: str, outcome) -> tuple[str, str] | None:
    """A failed check's (log level, line) for the run's log; None for a passed one, which is in the
    log already as its evaluation, in the same words."""
    if outcome.passed:
        return None
    return ("warning" if outcome.warn else "error", f"{name}: {outcome.message}")


DR_DRILL_KEY = dg.AssetKey(["operations", "dr_drill"])


def build_dr_drill(catalog: Catalog) -> tuple[dg.AssetsDefinition, dg.ScheduleDefinition]:
    @dg.asset(
        key=DR_DRILL_KEY,
        group_name="operations",
        kinds={"postgres", "sqlite"},
        description="Disaster-recovery drill: restores the newest backup of every source and group into a scratch "
                    "target, compares it with its manifest and reports per source the backup used, RTO, counts "
                    "and pass/fail (markdown in metadata). Fails when any drill fails.",
    )
    def dr_drill(context: AssetExecutionContext) -> dg.MaterializeResult:
        from backup_assets.core.verify.dr_drill import markdown_report, run_dr_drill

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
