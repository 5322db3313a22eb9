"""Run hygiene: prune old runs and their event logs, but never the run that holds a partition's
latest materialization (deleting it makes the partition look missing in the UI and invites a
needless re-backfill)."""

import datetime as dt

import dagster as dg
from dagster import OpExecutionContext


def protected_run_ids(instance: dg.DagsterInstance) -> set[str]:
    """Runs holding the latest materialization of some asset partition (or of an unpartitioned asset)."""
    protected: set[str] = set()
    for key in instance.get_asset_keys():
        latest: dict[str | None, tuple[int, str]] = {}
        cursor = None
        while True:
            result = instance.fetch_materializations(key, limit=1000, cursor=cursor, ascending=True)
            for record in result.records:
                latest[record.partition_key] = (record.storage_id, record.run_id)
            if not result.has_more:
                break
            cursor = result.cursor
        protected.update(run_id for _, run_id in latest.values())
    return protected


RESTORE_KIND = "restore"


def prune_runs(instance: dg.DagsterInstance, *, older_than_days: int, dry_run: bool,
               now: dt.datetime | None = None, include_restores: bool = False) -> dict:
    """Delete finished runs older than `older_than_days`, never one holding a latest materialization, and
    never a restore run (they are few, and the record of what replaced data) unless `include_restores`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    cutoff = (now - dt.timedelta(days=older_than_days)).timestamp()
    protected = protected_run_ids(instance)
    finished = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
    old = instance.get_run_records(filters=dg.RunsFilter(statuses=finished, created_before=dt.datetime.fromtimestamp(cutoff, dt.timezone.utc)))
    restores = {r.dagster_run.run_id for r in old
                if r.dagster_run.tags.get("backup_assets/kind") == RESTORE_KIND and not include_restores}
    doomed = [r.dagster_run.run_id for r in old if r.dagster_run.run_id not in protected | restores]
    kept = [r.dagster_run.run_id for r in old if r.dagster_run.run_id in protected]
    if not dry_run:
        for run_id in doomed:
            instance.delete_run(run_id)
    return {"dry_run": dry_run, "older_than_days": older_than_days, "deleted": len(doomed),
            "kept_latest_materialization": len(kept), "kept_restore_runs": len(restores), "run_ids": doomed}


class PruneRunsConfig(dg.Config):
    older_than_days: int = 90
    dry_run: bool = False
    # restore runs are kept unless asked (the repository's restores.jsonl keeps their record either way)
    include_restores: bool = False


@dg.op(name="prune_old_runs")
def prune_old_runs(context: OpExecutionContext, config: PruneRunsConfig) -> dg.Output:
    report = prune_runs(context.instance, older_than_days=config.older_than_days, dry_run=config.dry_run,
                        include_restores=config.include_restores)
    context.log.info(f"{'would delete' if config.dry_run else 'deleted'} {report['deleted']} run(s), kept "
                     f"{report['kept_latest_materialization']} holding a latest materialization and "
                     f"{report['kept_restore_runs']} restore run(s)")
    return dg.Output(report["deleted"], metadata={"report": dg.MetadataValue.json(report)})


@dg.job(name="prune_run_history", description="Deletes old runs and their event logs, never a run holding a "
                                              "partition's latest materialization.")
def prune_run_history_job():
    prune_old_runs()
