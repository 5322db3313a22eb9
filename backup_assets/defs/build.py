"""Everything Dagster knows, built from one catalog."""

from __future__ import annotations

import dagster as dg

from backup_assets.catalog import REPLICA_LABELS, Catalog
from backup_assets.defs.keys import backup_key
from backup_assets.defs.checks import build_dr_drill
from backup_assets.defs.replication import replica_key, s3_resource
from backup_assets.defs.restore_job import build_restore_job
from backup_assets.defs.hygiene import prune_run_history_job
from backup_assets.defs.pitr import build_pitr
from backup_assets.defs.retention import build_retention
from backup_assets.defs.sensors import HEALTH_KEY, build_health, build_schedules, build_sensors
from backup_assets.defs.tier_op import build_tier_assets


def build_definitions(catalog: Catalog) -> dg.Definitions:
    dr_drill, dr_drill_schedule = build_dr_drill(catalog)
    resources = {"s3": s3_resource(catalog)} if catalog.replication.s3 else {}
    tiers = tier_jobs(catalog)
    retention_assets = build_retention(catalog)
    maintenance = dg.define_asset_job(
        "maintenance", selection=dg.AssetSelection.assets(*[a.key for a in retention_assets], HEALTH_KEY),
        description="Retention, application-table pruning and the backup-health report.")
    pitr_assets, pitr_jobs, pitr_schedules = build_pitr(catalog)
    jobs = [build_restore_job(catalog), *tiers, *pitr_jobs, maintenance, prune_run_history_job]
    return dg.Definitions(
        assets=[*build_tier_assets(catalog), *pitr_assets, dr_drill, *retention_assets, build_health(catalog)],
        resources=resources,
        schedules=[dr_drill_schedule, *build_schedules(catalog, tiers, maintenance), *pitr_schedules],
        sensors=build_sensors(catalog),
        jobs=jobs,
    )


PRELOAD = "backup_assets.defs.step_preload"


def tier_jobs(catalog: Catalog) -> list:
    """One partitioned job per tier: its backups, their checks and their replicas, one partition a run."""
    jobs = []
    for tier in catalog.tiers:
        targets = [t for t in catalog.backup_targets() if t[2] == tier]
        if not targets:
            continue
        keys = [backup_key(*t) for t in targets]
        replicas = list(catalog.replication.replicas())
        keys += [replica_key(*t, r) for t in targets for r in replicas]
        jobs.append(dg.define_asset_job(
            f"{tier}_backups",
            selection=dg.AssetSelection.assets(*keys),
            description=f"The {tier} backups of every source and group, their checks"
                        f"{' and ' + ', '.join(REPLICA_LABELS[r] for r in replicas) + ' replicas' if replicas else ''}.",
            tags={"backup_assets/tier": tier},
            # a step is a server's backups (tier_op.py): few steps, each its own process, so servers
            # run side by side (all of them, not only as many as there are cores: a dump mostly waits on
            # its server) while each server's pool keeps it to one dump at a time. The step processes are
            # forked from a forkserver that has loaded the definitions once, rather than each started afresh
            # (Python, Dagster and the definitions again: about 2 s of CPU per step on a small machine);
            # the forkserver also imports what each step would import before its first dump (step_preload.py)
            executor_def=dg.multiprocess_executor.configured(
                {"max_concurrent": len({catalog.sources[t[0]].pool_name() for t in targets}),
                 "start_method": {"forkserver": {"preload_modules": [PRELOAD]}}}),
        ))
    return jobs
