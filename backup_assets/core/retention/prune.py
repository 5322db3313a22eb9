"""Pruning what the catalog keeps, everywhere: the local repository and the S3 replica by each tier's retention
(the rules in retention.py), and the physical tier's base backups and WAL by each source's window."""

from __future__ import annotations

import datetime as dt

from backup_assets.catalog import Catalog
from backup_assets.core.backup.take import repository_for
from backup_assets.core.retention.rules import prune_repository


def prune(catalog: Catalog, *, dry_run: bool, storage=None, now: dt.datetime | None = None) -> dict:
    """Prune the local repository and the S3 replica, each by its own retention days."""
    from backup_assets.core.replica import (_as_repository, replica_repository)  # the S3 client only where there is a replica

    now = now or dt.datetime.now(dt.timezone.utc)
    local = repository_for(catalog)
    places = [("local", local)]
    if catalog.replication.s3 is not None:
        places.append(("s3", _as_repository(storage) if storage is not None else replica_repository(catalog)))
    report: dict = {"dry_run": dry_run}
    for where, repo in places:
        days = {t: catalog.retention_days(t, where) for t in catalog.tiers}
        report[where] = prune_repository(repo, days, dry_run=dry_run, now=now)
    if catalog.pitr_sources():  # base backups and WAL, on disk and on the replica, each by the source's pitr days
        from backup_assets.core.pitr.base import prune_base

        report["pitr"] = {}
        for source in catalog.pitr_sources():
            report["pitr"][source] = {"local": prune_base(catalog, source, dry_run=dry_run, now=now)}
            if len(places) > 1 and catalog.sources[source].pitr.s3:
                report["pitr"][source]["s3"] = prune_base(catalog, source, dry_run=dry_run, now=now,
                                                          storage=places[1][1].storage)
    if not dry_run:
        local.sweep()
    return report
